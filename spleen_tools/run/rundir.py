"""The run directory (``runs/<timestamp>/``, ``runs/latest``) and the data a run trains on."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path

from spleen_tools.run.settings import ExperimentError, ExperimentSettings


def make_run_dir(runs_dir: Path, latest: bool = True) -> Path:
    """A new ``runs_dir/<timestamp>/``; ``runs_dir/latest`` points at it unless ``latest`` is False (the one
    command points it there once the run passed its preflight: a refused run leaves it where it was)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(100):
        path = runs_dir / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        if latest:
            point_latest(path)
        return path
    raise ExperimentError(f"could not make a run directory under {runs_dir}")


def point_latest(run_dir: Path) -> None:
    """``<runs_dir>/latest`` -> ``run_dir``, atomically: it always points at a whole run directory."""
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    tmp.replace(latest)


def prepare_data(settings: ExperimentSettings, run_dir: Path, log: Callable[[str], None]) -> tuple[Path, Path]:
    """Dataset folder and the folder of per-site datalists (always inside the run directory)."""
    from spleen_tools.data import make_site_datalists, make_synthetic_dataset

    if settings.data is not None:
        dataset = Path(settings.data).resolve()
        log(f"data: {dataset}")
    else:
        shape = settings.synthetic_shape
        key = f"synthetic-n{settings.synthetic_cases}-{'x'.join(map(str, shape))}-seed{settings.synthetic_seed}"
        cache = Path(settings.runs_dir).resolve() / "cache" / key  # absolute: the clients run elsewhere
        dataset = cache / "Task09_Spleen"
        meta = dataset / "dataset.json"
        if meta.is_file() and len(json.loads(meta.read_text()).get("training", [])) == settings.synthetic_cases:
            log(f"data: synthetic, reused from {dataset}")
        else:
            log(f"data: making {settings.synthetic_cases} synthetic cases ({'x'.join(map(str, shape))}) in {dataset}")
            dataset = make_synthetic_dataset(
                cache, num_train=settings.synthetic_cases, num_test=1, shape=shape, seed=settings.synthetic_seed
            )
    datalists = run_dir / "datalists"
    try:
        make_site_datalists(dataset, settings.sites, out_dir=datalists)
    except ValueError as err:
        raise ExperimentError(str(err)) from err
    return dataset, datalists
