"""Score every model on every evaluation set: one bundle evaluator per set, each model's weights loaded in turn."""

from __future__ import annotations

import time
from pathlib import Path

from spleen_flare.contract import KEY_METRIC
from spleen_tools.bench.arms import CONFIG_FILES, Log, Weights, drop_checkpoints, make_runner
from spleen_tools.bench.study_data import Case, StudyData

HELD_OUT = "held_out"


def eval_sets(data: StudyData) -> dict[str, list[Case]]:
    """Column name -> cases: each site's validation cases, then the held-out cases."""
    sets = {site: validation for site, (_, validation) in data.sites.items()}
    sets[HELD_OUT] = data.held_out
    return sets


def score_models(
    models: dict[str, Weights],
    sets: dict[str, list[Case]],
    dataset_dir: Path,
    workdir: Path,
    log: Log,
    config_files: list[str] = CONFIG_FILES,
) -> dict[str, dict[str, float]]:
    """``{model: {column: Dice}}`` with the bundle's evaluator (``BundleRunner.evaluate``) on each set; the models
    share the network of ``config_files``."""
    scores: dict[str, dict[str, float]] = {name: {} for name in models}
    for column, cases in sets.items():
        start = time.perf_counter()
        # The runner's own training list is never trained on here; one case keeps its cache small.
        runner = make_runner(Path(workdir) / column, dataset_dir, cases[:1], cases, config_files)
        for name, weights in models.items():
            scores[name][column] = round(float(runner.evaluate(weights)[KEY_METRIC]), 4)
        log(f"scored {len(models)} models on {column} ({len(cases)} cases) in {time.perf_counter() - start:.0f} s")
        drop_checkpoints(runner)
        del runner
    return scores
