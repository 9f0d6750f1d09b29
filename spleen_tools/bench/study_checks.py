"""What the study expects of an FL method, judged per seed and across seeds.

Per seed (:func:`check_expectations`): (1) the method's mean over the sites' validation >= centralized's - 0.02;
(2) the method above every local-only model on every other site's validation data. Across seeds
(:func:`method_verdict`): a conclusion (holds / does not hold) only where every seed agrees, else "seeds disagree"
("not judged" where a seed has no score of the method).
:func:`phase_goal` answers the phase setting's question: does FedAvg fall behind pooled training, and which
method, if any, meets both expectations in every seed.
"""

from __future__ import annotations

import math

from spleen_tools.bench.study_settings import CENTRALIZED_TOLERANCE
from spleen_tools.bench.study_tables import CENTRALIZED, FEDAVG, LOCAL_PREFIX, Scores, finite, site_mean

HOLDS, FAILS, DISAGREE, UNJUDGED = "holds", "does not hold", "seeds disagree", "not judged"


def _r(value: float) -> float | None:
    return round(value, 4) if finite(value) else None


def check_expectations(
    scores: Scores, sites: list[str], method: str = FEDAVG, tolerance: float = CENTRALIZED_TOLERANCE
) -> dict:
    """Both expectations of ``method`` on one seed's scores (a missing score never holds)."""
    own = scores.get(method, {})
    fed, cen = site_mean(own, sites), site_mean(scores.get(CENTRALIZED, {}), sites)
    first = {
        "rule": f"{method} mean over the sites' validation >= centralized - {tolerance}",
        "method": _r(fed),
        "centralized": _r(cen),
        "gap": _r(fed - cen),
        "holds": finite(fed) and finite(cen) and fed >= cen - tolerance,
    }
    comparisons = []
    for trained_on in sites:
        local = scores.get(LOCAL_PREFIX + trained_on, {})
        for site in sites:
            if site == trained_on:
                continue
            l_dice, m_dice = local.get(site, math.nan), own.get(site, math.nan)
            holds = finite(l_dice) and finite(m_dice) and m_dice > l_dice
            comparisons.append(
                {"local_model": LOCAL_PREFIX + trained_on, "on": site, "local": _r(l_dice), "method": _r(m_dice)}
                | {"holds": holds}
            )
    second = {
        "rule": f"{method} > every local-only model on the other sites' validation data",
        "comparisons": comparisons,
        "worst_margin": worst_margin(comparisons),
        "holds": bool(comparisons) and all(c["holds"] for c in comparisons),
    }
    return {"method": method, "vs_centralized": first, "vs_local": second, "holds": first["holds"] and second["holds"]}


def worst_margin(comparisons: list[dict]) -> float | None:
    """The smallest lead of the method over a local-only model on another site's data (None if one is missing)."""
    margins = [c["method"] - c["local"] for c in comparisons if finite(c["method"]) and finite(c["local"])]
    if not comparisons or len(margins) != len(comparisons):
        return None
    return round(min(margins), 4)


def agreed(flags: list[bool]) -> str:
    """A conclusion only where every seed agrees."""
    if not flags:
        return UNJUDGED
    if all(flags):
        return HOLDS
    return FAILS if not any(flags) else DISAGREE


def method_verdict(per_seed: dict[str, dict]) -> dict:
    """One method's checks over the seeds (``{seed: check_expectations(...)}``): each expectation's verdict with
    its figures per seed (gap to centralized, worst margin over the local-only models, what failed). A seed without
    the method's scores (its run failed) is no evidence either way: then nothing is concluded ("not judged")."""
    seeds = list(per_seed)
    firsts = {s: per_seed[s]["vs_centralized"] for s in seeds}
    seconds = {s: per_seed[s]["vs_local"] for s in seeds}
    scored = all(finite(firsts[s]["method"]) for s in seeds)

    def verdict(flags: list[bool]) -> str:
        return agreed(flags) if scored else UNJUDGED

    failed = {
        s: [f"{c['local_model']} on {c['on']}" for c in seconds[s]["comparisons"] if not c["holds"]] for s in seeds
    }
    return {
        "method": next(iter(per_seed.values()))["method"] if per_seed else None,
        "seeds": seeds,
        "vs_centralized": {
            "verdict": verdict([firsts[s]["holds"] for s in seeds]),
            "gaps": {s: firsts[s]["gap"] for s in seeds},
        },
        "vs_local": {
            "verdict": verdict([seconds[s]["holds"] for s in seeds]),
            "worst_margins": {s: seconds[s]["worst_margin"] for s in seeds},
            "failed": {s: names for s, names in failed.items() if names},
        },
        "verdict": verdict([per_seed[s]["holds"] for s in seeds]),
    }


def method_verdicts(seed_checks: dict[str, dict[str, dict]], methods: list[str]) -> dict[str, dict]:
    """``{method: method_verdict}`` from ``{seed: {method: check}}``, for every method some seed checked."""
    return {
        method: method_verdict({seed: checks[method] for seed, checks in seed_checks.items() if method in checks})
        for method in methods
        if any(method in checks for checks in seed_checks.values())
    }


def phase_goal(verdicts: dict[str, dict], tolerance: float = CENTRALIZED_TOLERANCE) -> dict:
    """Does FedAvg fall behind centralized training (its gap per seed; "holds" = within ``tolerance`` in every seed),
    and which methods meet both expectations in every seed (none: ``meeting`` is empty; the verdicts hold the
    figures)."""
    fedavg = verdicts.get(FEDAVG)
    return {
        "tolerance": tolerance,
        "fedavg_gaps": fedavg["vs_centralized"]["gaps"] if fedavg else None,
        "fedavg_within_tolerance": fedavg["vs_centralized"]["verdict"] if fedavg else UNJUDGED,
        "meeting": [name for name, verdict in verdicts.items() if verdict["verdict"] == HOLDS],
        "methods": list(verdicts),
    }
