"""The W&B receiver's writer, run as NVFlare runs it (a process per site fed by a queue), with real wandb offline:
per-iteration, per-epoch and per-round points arrive interleaved with falling steps, and every one of them comes
back from the run file. NVFlare's own writer keeps one step per run and drops every point below the last step."""

from __future__ import annotations

import multiprocessing

from nvflare.app_opt.tracking.wandb.wandb_receiver import WandBReceiver, WandBTask

from spleen_flare.wandb_receiver import JobWandBReceiver
from spleen_tools.run.wandb_files import read_run, series

POINTS = [  # (metric, step, value) in the order a site sends them in one round
    *(("train_loss", i, 1.0 / i) for i in range(1, 9)),  # per iteration
    ("train_loss_epoch", 1, 0.7),
    ("val_mean_dice", 1, 0.3),
    *(("train_loss", i, 1.0 / i) for i in range(9, 17)),
    ("train_loss_epoch", 2, 0.5),
    ("val_mean_dice", 2, 0.6),
    ("global_val_mean_dice", 0, 0.1),  # per round, sent after the epochs
    ("global_val_mean_dice", 1, 0.6),
]


def _write(receiver_class, folder) -> list[dict]:
    receiver = receiver_class({"project": "p", "group": "g", "job_type": "train", "name": "r"})
    queue = multiprocessing.get_context("fork").Queue()
    args = {"project": "p", "name": "site-1-job-r", "group": "g", "job_type": "train", "mode": "offline"}
    queue.put(WandBTask("site-1", "init", {**args, "dir": str(folder)}, 0))
    for name, step, value in POINTS:
        queue.put(WandBTask("site-1", "log", {name: value}, step))
    queue.put(WandBTask("site-1", "stop", {}, 0))
    process = multiprocessing.get_context("fork").Process(target=receiver._process_queue_tasks, args=(queue,))
    process.start()
    process.join(120)
    assert process.exitcode == 0
    (run_file,) = folder.rglob("run-*.wandb")
    return read_run(run_file)[1]


def _points(rows: list[dict]) -> set[tuple[str, int, float]]:
    names = tuple(sorted({n for n, _, _ in POINTS}))
    return {(n, s, round(v, 6)) for n, pts in series(rows, names).items() for s, v in pts}


def test_every_point_reaches_the_run_file(tmp_path):
    rows = _write(JobWandBReceiver, tmp_path / "ours")
    assert _points(rows) == {(n, s, round(v, 6)) for n, s, v in POINTS}


def test_nvflares_own_writer_drops_points_that_is_why_ours_exists(tmp_path):
    rows = _write(WandBReceiver, tmp_path / "nvflare")
    assert len(_points(rows)) < len(POINTS)
