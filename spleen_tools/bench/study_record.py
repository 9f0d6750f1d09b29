"""A recorded validity study (``benchmarks/results/validity.json``, written by benchmarks/save_validity.py) read
back in one shape, whichever format recorded it: format 1 (one seed, FedAvg only: a setting's ``table`` and
``expectations`` with ``fedavg_*`` keys) or format 2 (a setting's ``seeds``, each with its table and every method's
checks, and the verdicts across them)."""

from __future__ import annotations

from spleen_tools.bench.study_checks import method_verdicts, worst_margin
from spleen_tools.bench.study_tables import FEDAVG


def recorded_settings(result: dict) -> list[str]:
    return list(result["settings"]["settings"])


def recorded_sites(result: dict) -> list[str]:
    return [f"site-{i}" for i in range(1, result["settings"]["sites"] + 1)]


def recorded_seeds(result: dict, setting: str) -> dict[str, dict]:
    """``{seed: {"table", "expectations": {method: check}, ...}}`` of one recorded setting."""
    entry = result[setting]
    if "seeds" in entry:
        return entry["seeds"]
    seed = str(result["settings"].get("seed", 0))
    return {seed: {**entry, "expectations": {FEDAVG: expectations_from_format_1(entry["expectations"])}}}


def recorded_verdicts(result: dict, setting: str) -> dict[str, dict]:
    """Each method's verdict across the recorded seeds (format 1: judged from its one seed)."""
    entry = result[setting]
    if "verdicts" in entry:
        return entry["verdicts"]
    seeds = recorded_seeds(result, setting)
    methods = list(next(iter(seeds.values()))["expectations"])
    return method_verdicts({seed: run["expectations"] for seed, run in seeds.items()}, methods)


def expectations_from_format_1(old: dict) -> dict:
    """FedAvg's check as format 1 recorded it (``fedavg_vs_centralized``, ``fedavg_vs_local``, a ``fedavg`` figure)
    in today's shape (``study_checks.check_expectations``)."""
    first, second = old["fedavg_vs_centralized"], old["fedavg_vs_local"]
    comparisons = [
        {
            "local_model": c["local_model"],
            "on": c["on"],
            "local": c["local"],
            "method": c["fedavg"],
            "holds": c["holds"],
        }
        for c in second["comparisons"]
    ]
    return {
        "method": FEDAVG,
        "vs_centralized": {
            "rule": first["rule"],
            "method": first["fedavg"],
            "centralized": first["centralized"],
            "gap": first["gap"],
            "holds": first["holds"],
        },
        "vs_local": {
            "rule": second["rule"],
            "comparisons": comparisons,
            "worst_margin": worst_margin(comparisons),
            "holds": second["holds"],
        },
        "holds": old["holds"],
    }
