"""The study's Markdown: per data setting the table over seeds (mean and range), the verdicts per method, the
phase question's answer, then each seed's own table and checks. Formatting only: the figures come from
``study_tables`` and ``study_checks``."""

from __future__ import annotations

from spleen_tools.bench.study_checks import DISAGREE, FAILS, HOLDS
from spleen_tools.bench.study_tables import FEDAVG, HELD_OUT, MEAN, finite


def _cell(value: object) -> str:
    return f"{value:.4f}" if finite(value) else "-"


def _signed(value: object) -> str:
    return f"{value:+.4f}" if finite(value) else "-"


def _header(sites: list[str]) -> list[str]:
    header = ["model", *(f"{site} val" for site in sites), "held-out", "mean (sites' val)"]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def markdown_table(table: list[dict], sites: list[str]) -> str:
    """One seed's table (rows of ``study_tables.score_table``)."""
    lines = _header(sites)
    for row in table:
        cells = [row["model"], *(_cell(row[s]) for s in sites), _cell(row[HELD_OUT]), _cell(row[MEAN])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def range_cell(cell: dict) -> str:
    """``mean (min-max)`` over the seeds; the mean alone for one seed; ``n of N`` where seeds lack a score."""
    scored = [v for v in cell.get("values", []) if v is not None]
    if not scored:
        return "-"
    text = _cell(cell["mean"])
    if len(cell["values"]) > 1:
        text += f" ({_cell(cell['min'])}-{_cell(cell['max'])})"
    if len(scored) < len(cell["values"]):
        text += f" [{len(scored)} of {len(cell['values'])} seeds]"
    return text


def summary_table(table: list[dict], summary: dict, sites: list[str]) -> str:
    """The mean table's rows (its order), each cell the mean and range over the seeds."""
    lines = _header(sites)
    for row in table:
        model = row["model"]
        cells = [range_cell(summary[model].get(column, {})) for column in [*sites, HELD_OUT, MEAN]]
        lines.append("| " + " | ".join([model, *cells]) + " |")
    return "\n".join(lines)


def over_seeds(seeds: list[str]) -> str:
    if len(seeds) == 1:
        return f"at its one seed ({seeds[0]})"
    return "in both seeds" if len(seeds) == 2 else f"in all {len(seeds)} seeds"


def _per_seed(figures: dict[str, object]) -> str:
    return " / ".join(_signed(v) for v in figures.values())


def verdict_table(verdicts: dict[str, dict], tolerance: float) -> str:
    """A row per method: each expectation's verdict with its figures per seed, and the conclusion."""
    seeds = next(iter(verdicts.values()))["seeds"] if verdicts else []
    label = "seed " + seeds[0] if len(seeds) == 1 else "seeds " + " / ".join(seeds)
    header = [
        "method",
        f"within {tolerance} of centralized: gap ({label})",
        f"above every local-only model on the other sites' data: worst margin ({label})",
        "conclusion",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, v in verdicts.items():
        first, second = v["vs_centralized"], v["vs_local"]
        cells = [
            name,
            f"{first['verdict']} ({_per_seed(first['gaps'])})",
            f"{second['verdict']} ({_per_seed(second['worst_margins'])})",
            f"**{v['verdict']}**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def expectations_line(check: dict, tolerance: float) -> str:
    """One seed's check of one method, in a sentence."""
    name, first, second = check["method"], check["vs_centralized"], check["vs_local"]
    failed = [
        f"{c['local_model']} on {c['on']} ({_cell(c['local'])} vs {name} {_cell(c['method'])})"
        for c in second["comparisons"]
        if not c["holds"]
    ]
    parts = [
        f"{name} >= centralized - {tolerance} (mean over sites' val: {_cell(first['method'])} vs "
        f"{_cell(first['centralized'])}): **{'holds' if first['holds'] else 'does NOT hold'}**",
        f"{name} above every local-only model on the other sites' data: "
        + ("**holds**" if second["holds"] else "**does NOT hold**" + (f" ({'; '.join(failed)})" if failed else "")),
    ]
    verdict = f"{name}: expectations hold." if check["holds"] else f"{name}: expectations do NOT hold."
    return f"{verdict} " + "; ".join(parts) + "."


def phase_line(described: dict | None) -> str | None:
    """Which contrast phase each site's scans are in, when the sites' styles name one (the phase setting)."""
    sites = (described or {}).get("sites", {})
    phases = {site: (d.get("style") or {}).get("phase") for site, d in sites.items()}
    if not any(phases.values()):
        return None
    listed = ", ".join(f"{site} {phase}" for site, phase in phases.items())
    return f"Contrast phase: {listed}; held-out: cases of every site's phase."


def _gap_words(gaps: dict[str, object]) -> str:
    words = []
    for seed, gap in gaps.items():
        if not finite(gap):
            words.append(f"not scored at seed {seed}")
        else:
            words.append(f"{abs(gap):.4f} {'below' if gap < 0 else 'above'} centralized's at seed {seed}")
    return ", ".join(words)


def phase_goal_line(goal: dict, verdicts: dict[str, dict]) -> str:
    """The phase setting's question answered: FedAvg's gap to centralized, and the methods that meet both
    expectations in every seed, or "none does" with every method's figures."""
    tol = goal["tolerance"]
    lines = ["**Does FedAvg fall behind pooled training, and which method closes the gap?**"]
    if goal["fedavg_gaps"] is None:
        lines.append("FedAvg was not run (add it to --methods).")
    else:
        seeds = verdicts[FEDAVG]["seeds"]
        within = {
            HOLDS: f"within {tol} of centralized {over_seeds(seeds)}",
            FAILS: f"behind by more than {tol} {over_seeds(seeds)}",
            DISAGREE: f"the seeds disagree whether it is within {tol}",
        }.get(goal["fedavg_within_tolerance"], "not judged (a seed has no FedAvg score)")
        lines.append(f"FedAvg's mean Dice over the sites' validation is {_gap_words(goal['fedavg_gaps'])}: {within}.")
    seeds = next(iter(verdicts.values()))["seeds"] if verdicts else []
    question = (
        f"Within {tol} of centralized and above every local-only model on the other sites' data {over_seeds(seeds)}"
    )
    if goal["meeting"]:
        lines.append(f"{question}: {', '.join(goal['meeting'])}.")
    else:
        figures = "; ".join(
            f"{name}: gap {_per_seed(v['vs_centralized']['gaps'])}, worst margin "
            f"{_per_seed(v['vs_local']['worst_margins'])} ({v['verdict']})"
            for name, v in verdicts.items()
        )
        lines.append(f"{question}: none does ({figures}).")
    return " ".join(lines)


HELD_BY_SITES_NOTE = (
    "{names}: each site keeps its own BatchNorm layers, so the server's model is no model of its own: each site's"
    " column scores that site's copy of the last global model (with its own layers) on its own validation cases,"
    " and held-out is the mean of the sites' copies on the held-out cases."
)


def seed_section(seed: str, run: dict, tolerance: float) -> list[str]:
    """``### seed N``: the seed's table, each method's check and the times."""
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in run["seconds"].items())
    lines = [f"### seed {seed}", "", markdown_table(run["table"], run["sites"]), ""]
    lines += [f"- {expectations_line(check, tolerance)}" for check in run["expectations"].values()]
    if run.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{arm}: {msg}" for arm, msg in run["errors"].items())]
    return [*lines, "", f"Time: {seconds}."]


def markdown_section(setting: str, result: dict, tolerance: float) -> str:
    """``## <setting>``: phases, the table over seeds, verdicts, the phase question, then each seed."""
    seeds = list(result["seeds"])
    lines = [f"## {setting}", ""]
    phases = phase_line(next(iter(result["seeds"].values())).get("data"))
    if phases:
        lines += [phases, ""]
    lines += [
        f"Dice, mean (min-max) over seed(s) {', '.join(seeds)}:",
        "",
        summary_table(result["table"], result["summary"], result["sites"]),
        "",
    ]
    if result.get("held_by_sites"):
        lines += [HELD_BY_SITES_NOTE.format(names=", ".join(result["held_by_sites"])), ""]
    if result["verdicts"]:
        lines += [verdict_table(result["verdicts"], tolerance), ""]
    if result.get("phase_goal"):
        lines += [phase_goal_line(result["phase_goal"], result["verdicts"]), ""]
    for seed, run in result["seeds"].items():
        lines += [*seed_section(seed, run, tolerance), ""]
    return "\n".join(lines).rstrip()


def markdown_report(study: dict) -> str:
    s = study["settings"]
    methods = ", ".join(s.get("method_names", {}).values()) or FEDAVG
    lines = [
        f"# Validity study: centralized vs local-only vs {methods}",
        "",
        f"Same data, bundle settings (cpu_quick) and epochs per arm: E = {s['rounds']} rounds x {s['local_epochs']} "
        f"local epochs = {s['epochs']} epochs; {s['sites']} sites; data seed(s) {', '.join(map(str, s['seeds']))}"
        + ("; tiny smoke-run data" if s["tiny"] else "")
        + ". Dice of the final model of each arm; 'mean' is over the sites' validation columns. A conclusion"
        " across seeds is stated only where every seed agrees.",
    ]
    for setting, result in study["results"].items():
        lines += ["", markdown_section(setting, result, s["centralized_tolerance"])]
    return "\n".join(lines) + "\n"
