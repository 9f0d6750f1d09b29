"""The study's score tables: one seed's (``{model: {column: Dice}}`` -> rows) and the summary over seeds (mean and
range of every cell). Pure functions over plain dicts, so they are tested without training anything."""

from __future__ import annotations

import math

CENTRALIZED, FEDAVG, HELD_OUT, MEAN = "centralized", "FedAvg", "held_out", "mean"
LOCAL_PREFIX = "local "
Scores = dict[str, dict[str, float]]


def finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def site_mean(row: dict[str, float], sites: list[str]) -> float:
    """Mean Dice over the sites' validation columns (NaN if one is missing)."""
    values = [row.get(site) for site in sites]
    if not sites or not all(finite(v) for v in values):
        return math.nan
    return sum(values) / len(values)  # type: ignore[arg-type]


def model_order(models: list[str], methods: list[str] | None = None) -> list[str]:
    """centralized, the local-only models by site, then the FL methods (in ``methods``' order; FedAvg first
    without it); anything else after them."""
    methods = methods or [FEDAVG]

    def key(model: str) -> tuple:
        if model == CENTRALIZED:
            return (0, 0, "")
        if model.startswith(LOCAL_PREFIX):
            return (1, *_site_key(model))
        if model in methods:
            return (2, methods.index(model), "")
        return (3, 0, model)

    return sorted(models, key=key)


def _site_key(name: str) -> tuple[int, str]:
    tail = name.rsplit("-", 1)[-1]
    return (int(tail), name) if tail.isdigit() else (0, name)


def score_table(scores: Scores, sites: list[str], methods: list[str] | None = None) -> list[dict]:
    """Rows of the table: model, one column per site's validation, held-out, and the mean over the sites."""
    rows = []
    for model in model_order(list(scores), methods):
        row = {"model": model, **{site: scores[model].get(site, math.nan) for site in sites}}
        row[HELD_OUT] = scores[model].get(HELD_OUT, math.nan)
        row[MEAN] = site_mean(scores[model], sites)
        rows.append(row)
    return rows


def table_scores(table: list[dict]) -> Scores:
    """A table's rows back to ``{model: {column: Dice}}`` (without the mean; missing cells left out)."""
    return {row["model"]: {k: v for k, v in row.items() if k not in ("model", MEAN) and finite(v)} for row in table}


def summarize(tables: dict[str, list[dict]], columns: list[str]) -> dict[str, dict[str, dict]]:
    """``{model: {column: {"mean", "min", "max", "values"}}}`` over the seeds' tables (``{seed: rows}``): ``values``
    per seed in the seeds' order (None where a seed has no score), mean and range over the scores there are."""
    models: list[str] = []
    for rows in tables.values():
        models += [row["model"] for row in rows if row["model"] not in models]
    by_seed = {seed: {row["model"]: row for row in rows} for seed, rows in tables.items()}
    summary: dict[str, dict[str, dict]] = {}
    for model in models:
        summary[model] = {}
        for column in columns:
            values = [by_seed[seed].get(model, {}).get(column) for seed in tables]
            values = [round(v, 4) if finite(v) else None for v in values]
            scored = [v for v in values if v is not None]
            cell = {"mean": None, "min": None, "max": None, "values": values}
            if scored:
                cell |= {"mean": round(sum(scored) / len(scored), 4), "min": min(scored), "max": max(scored)}
            summary[model][column] = cell
    return summary


def mean_table(summary: dict[str, dict[str, dict]], sites: list[str], methods: list[str] | None = None) -> list[dict]:
    """The table of the means over seeds, rows as :func:`score_table`'s (None where no seed scored)."""
    rows = []
    for model in model_order(list(summary), methods):
        row = {"model": model}
        for column in [*sites, HELD_OUT, MEAN]:
            row[column] = summary[model].get(column, {}).get("mean")
        rows.append(row)
    return rows


def copy_name(method: str, site: str) -> str:
    """A site's copy of a method's model (FedBN: the last global model with the site's own BatchNorm layers)."""
    return f"{method} at {site}"


def site_copies_row(copies: dict[str, dict[str, float]], sites: list[str]) -> dict[str, float]:
    """A method whose sites each hold their own copy (``{site: {column: Dice}}``), as one row: each site's column is
    its own copy's score there (the model that site uses); held-out (cases of no site) is the mean of the copies'."""
    row = {site: copies.get(site, {}).get(site, math.nan) for site in sites}
    held = [copies[site].get(HELD_OUT) for site in sites if site in copies]
    row[HELD_OUT] = sum(held) / len(held) if held and len(held) == len(sites) and all(map(finite, held)) else math.nan
    return row
