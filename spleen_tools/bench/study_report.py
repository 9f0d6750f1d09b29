"""The study's score tables, its expectations check, its Markdown and its learning-curve PNGs.

Pure functions over plain dicts (``{model: {column: Dice}}``), so they are tested without training anything.
"""

from __future__ import annotations

import math

from spleen_tools.bench.study_settings import CENTRALIZED_TOLERANCE

CENTRALIZED, FEDAVG, HELD_OUT, MEAN = "centralized", "FedAvg", "held_out", "mean"
LOCAL_PREFIX = "local "
Scores = dict[str, dict[str, float]]


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def site_mean(row: dict[str, float], sites: list[str]) -> float:
    """Mean Dice over the sites' validation columns (NaN if one is missing)."""
    values = [row.get(site) for site in sites]
    if not sites or not all(_finite(v) for v in values):
        return math.nan
    return sum(values) / len(values)  # type: ignore[arg-type]


def model_order(models: list[str]) -> list[str]:
    """centralized, the local-only models by site, FedAvg; anything else after them."""
    rank = {CENTRALIZED: 0, FEDAVG: 2}
    return sorted(models, key=lambda m: (rank.get(m, 1 if m.startswith(LOCAL_PREFIX) else 3), _site_key(m)))


def _site_key(name: str) -> tuple[int, str]:
    tail = name.rsplit("-", 1)[-1]
    return (int(tail), name) if tail.isdigit() else (0, name)


def score_table(scores: Scores, sites: list[str]) -> list[dict]:
    """Rows of the table: model, one column per site's validation, held-out, and the mean over the sites."""
    rows = []
    for model in model_order(list(scores)):
        row = {"model": model, **{site: scores[model].get(site, math.nan) for site in sites}}
        row[HELD_OUT] = scores[model].get(HELD_OUT, math.nan)
        row[MEAN] = site_mean(scores[model], sites)
        rows.append(row)
    return rows


def check_expectations(scores: Scores, sites: list[str], tolerance: float = CENTRALIZED_TOLERANCE) -> dict:
    """(1) FedAvg's mean over the sites' validation >= centralized's - ``tolerance``;
    (2) FedAvg scores above every local-only model on every other site's validation data."""
    fed, cen = site_mean(scores.get(FEDAVG, {}), sites), site_mean(scores.get(CENTRALIZED, {}), sites)
    first = {
        "rule": f"FedAvg mean over the sites' validation >= centralized - {tolerance}",
        "fedavg": _r(fed),
        "centralized": _r(cen),
        "gap": _r(fed - cen),
        "holds": _finite(fed) and _finite(cen) and fed >= cen - tolerance,
    }
    comparisons = []
    for trained_on in sites:
        local = scores.get(LOCAL_PREFIX + trained_on, {})
        for site in sites:
            if site == trained_on:
                continue
            l_dice, f_dice = local.get(site, math.nan), scores.get(FEDAVG, {}).get(site, math.nan)
            holds = _finite(l_dice) and _finite(f_dice) and f_dice > l_dice
            comparisons.append(
                {"local_model": LOCAL_PREFIX + trained_on, "on": site, "local": _r(l_dice), "fedavg": _r(f_dice)}
                | {"holds": holds}
            )
    second = {
        "rule": "FedAvg > every local-only model on the other sites' validation data",
        "comparisons": comparisons,
        "holds": bool(comparisons) and all(c["holds"] for c in comparisons),
    }
    return {"fedavg_vs_centralized": first, "fedavg_vs_local": second, "holds": first["holds"] and second["holds"]}


def _r(value: float) -> float | None:
    return round(value, 4) if _finite(value) else None


def _cell(value: object) -> str:
    return f"{value:.4f}" if _finite(value) else "-"


def markdown_table(scores: Scores, sites: list[str]) -> str:
    header = ["model", *(f"{site} val" for site in sites), "held-out", "mean (sites' val)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in score_table(scores, sites):
        cells = [row["model"], *(_cell(row[s]) for s in sites), _cell(row[HELD_OUT]), _cell(row[MEAN])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def expectations_line(expectations: dict) -> str:
    first, second = expectations["fedavg_vs_centralized"], expectations["fedavg_vs_local"]
    failed = [
        f"{c['local_model']} on {c['on']} ({_cell(c['local'])} vs FedAvg {_cell(c['fedavg'])})"
        for c in second["comparisons"]
        if not c["holds"]
    ]
    parts = [
        f"FedAvg >= centralized - {CENTRALIZED_TOLERANCE} (mean over sites' val: {_cell(first['fedavg'])} vs "
        f"{_cell(first['centralized'])}): **{'holds' if first['holds'] else 'does NOT hold'}**",
        "FedAvg above every local-only model on the other sites' data: "
        + ("**holds**" if second["holds"] else "**does NOT hold**" + (f" ({'; '.join(failed)})" if failed else "")),
    ]
    verdict = "Expectations hold." if expectations["holds"] else "Expectations do NOT hold."
    return f"{verdict} " + "; ".join(parts) + "."


def phase_line(result: dict) -> str | None:
    """Which contrast phase each site's scans are in, when the sites' styles name one (the phase setting)."""
    described = (result.get("data") or {}).get("sites", {})
    phases = {site: (d.get("style") or {}).get("phase") for site, d in described.items()}
    if not any(phases.values()):
        return None
    listed = ", ".join(f"{site} {phase}" for site, phase in phases.items())
    return f"Contrast phase: {listed}; held-out: cases of every site's phase."


def markdown_section(setting: str, result: dict) -> str:
    """``## <setting>``, the sites' contrast phases (if any), the score table and the expectations line."""
    sites = result["sites"]
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
    phases = phase_line(result)
    return "\n".join(
        [
            f"## {setting}",
            "",
            *([phases, ""] if phases else []),
            markdown_table(result["scores"], sites),
            "",
            expectations_line(result["expectations"]),
            "",
            f"Time: {seconds}.",
        ]
    )
