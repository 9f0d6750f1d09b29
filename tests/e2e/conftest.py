"""The one command as the e2e tests start it (``runner_cmd``), and one real run of it shared by the tests of the
runner and of the MLflow dashboard. Everything in this folder is marked slow by ``tests/conftest.py``.

It runs what ``./run_experiment.sh`` runs (``python -m spleen_tools.cli.run_experiment``; the shell script only adds
the venv setup) with 2 sites, 2 rounds, 1 local epoch, tiny synthetic data and ``--quick``, into a temporary
runs directory. The POC ports are fixed, so the run fails fast with a clear message if another POC is up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from spleen_tools.mlflow_server import MLflowServer
from spleen_tools.procs import PidFile

REPO_ROOT = Path(__file__).resolve().parents[2]
SITES = ["site-1", "site-2"]
ROUNDS = 2
LOCAL_EPOCHS = 1
TINY = ["--synthetic-cases", "8", "--synthetic-shape", "80x80x20"]


def runner_cmd(runs_dir: Path, *extra: str) -> list[str]:
    """``run_experiment`` on the test settings; ``extra`` options come last, so they override (``--rounds 1``)."""
    return [
        sys.executable,
        "-m",
        "spleen_tools.cli.run_experiment",
        "--sites",
        str(len(SITES)),
        "--rounds",
        str(ROUNDS),
        "--local-epochs",
        str(LOCAL_EPOCHS),
        "--quick",
        *TINY,
        "--runs-dir",
        str(runs_dir),
        *extra,
    ]


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    seconds: float

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    @property
    def pid_file(self) -> PidFile:
        return PidFile(self.run_dir / "pids.json")


@pytest.fixture(scope="session")
def experiment_run(tmp_path_factory) -> RunResult:
    runs_dir = tmp_path_factory.mktemp("runs")
    t0 = time.monotonic()
    proc = subprocess.run(
        # 9 cases: site-1 trains on 4, site-2 on 3, so step-weighted and plain FedAvg differ
        runner_cmd(runs_dir, "--synthetic-cases", "9", "--timeout", "900"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1000,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    latest = runs_dir / "latest"
    run_dir = latest.resolve() if latest.exists() else runs_dir
    (run_dir / "runner_stdout.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return RunResult(proc.returncode, proc.stdout, proc.stderr, run_dir, time.monotonic() - t0)


@pytest.fixture(scope="session")
def run_mlflow(experiment_run):
    """The run's MLflow store served again (the run stopped its server), for the mlflow client and the browser."""
    if not (experiment_run.run_dir / "mlflow" / "mlflow.db").is_file():
        pytest.fail(f"the run left no MLflow store; output:\n{experiment_run.stdout[-3000:]}\n{experiment_run.stderr}")
    with MLflowServer(experiment_run.run_dir / "mlflow") as server:
        yield server


class FollowedRun(subprocess.Popen):
    """The one command with its stdout piped, to follow line by line, and its stderr in a file: a second pipe
    that nobody reads while the test follows stdout would stall the run once it filled (64 KiB)."""

    def __init__(self, cmd: list[str], stderr_path: Path, **popen_args) -> None:
        self.stderr_path = Path(stderr_path)
        self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        self._stderr_file = self.stderr_path.open("w")
        env = popen_args.pop("env", None) or dict(os.environ, PYTHONUNBUFFERED="1")
        super().__init__(
            cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=self._stderr_file, text=True, env=env, **popen_args
        )

    def stderr_text(self) -> str:
        self._stderr_file.flush()
        return self.stderr_path.read_text(errors="replace")


def alive_recorded(run_dir: Path) -> list[int]:
    """Processes recorded in a run's pids.json (the runner left out) that are still alive."""
    return [ref.pid for ref in PidFile(run_dir / "pids.json").refs() if ref.alive()]


def processes_of(*folders: Path, settle_s: float = 10.0) -> list[str]:
    """Live processes of this machine whose command line, working directory or environment names one of
    ``folders`` ("pid name: cmdline" each), after up to ``settle_s`` for exits under way. The process table, not
    pids.json: NVFlare starts its job processes in sessions of their own, and no record names them. This test
    process, its ancestors and its own children are left out (a run's leftovers are orphans by then)."""
    import psutil

    needles = [str(Path(f).resolve()) for f in folders]
    me = psutil.Process()
    # the test process, its ancestors and what it runs itself (a fixture's MLflow server serving the run's store)
    own = {me.pid, *(p.pid for p in me.parents()), *(p.pid for p in me.children(recursive=True))}

    def names_a_folder(proc: psutil.Process) -> bool:
        with proc.oneshot():
            texts = [*proc.cmdline(), proc.cwd(), *proc.environ().values()]
        return any(needle in text for needle in needles for text in texts)

    deadline = time.monotonic() + settle_s
    while True:
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid in own or proc.status() == psutil.STATUS_ZOMBIE or not names_a_folder(proc):
                    continue
                found.append(f"{proc.pid} {proc.name()}: {' '.join(proc.cmdline())[:300]}")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def assert_nothing_left(run_dir: Path, *more: Path) -> None:
    """Neither a recorded process nor any other process of the run (its folders, ``more`` too) is alive."""
    assert alive_recorded(run_dir) == [], "recorded processes still alive"
    left = processes_of(run_dir, *more)
    assert left == [], "processes of the run still alive:\n" + "\n".join(left)


def last_updates(run_dir: Path, job_id: str) -> dict[str, dict]:
    """What each POC site sent in the job's last round, before any filter: ``{"model", "steps", "round"}``
    (``spleen_flare.client_train.keep_last_update``)."""
    import torch

    from spleen_flare.contract import LAST_LOCAL_UPDATE

    found = {}
    for site in SITES:
        path = next(run_dir.glob(f"poc/**/prod_00/{site}/{job_id}/app_{site}/{LAST_LOCAL_UPDATE}"))
        found[site] = torch.load(path, map_location="cpu", weights_only=True)
    return found


def assert_steps_weighted_fedavg(updates: dict[str, dict], got: dict, label: str = "") -> None:
    """``got`` (name -> array) is the mean of the sites' last updates weighted by their local steps (1e-5), and
    the plain mean is not: the sites trained different numbers of steps on different weights, so the check can
    tell the two apart."""
    import numpy as np

    steps = {site: u["steps"] for site, u in updates.items()}
    assert len(set(steps.values())) > 1, f"equal steps {steps}: weighted and plain means would agree"
    total = sum(steps.values())
    names = list(next(iter(updates.values()))["model"])
    assert sorted(got) == sorted(names), label
    plain_off = 0.0
    for name in names:
        values = [u["model"][name].double().numpy() for u in updates.values()]
        weighted = sum(v * u["steps"] for v, u in zip(values, updates.values(), strict=True)) / total
        value = np.asarray(got[name], dtype=np.float64).reshape(weighted.shape)
        if not next(iter(updates.values()))["model"][name].is_floating_point():
            # BatchNorm's batch counter: NVFlare keeps the weighted mean (plain) or rounds it (ours, under HE)
            assert np.abs(value - weighted).max() < 1.0, f"{label}{name}: {value} vs {weighted}"
            continue
        np.testing.assert_allclose(value, weighted, rtol=1e-5, atol=1e-5, err_msg=f"{label}{name}")
        plain_off = max(plain_off, float(np.abs(value - sum(values) / len(values)).max()))
    assert plain_off > 1e-4, f"{label}the plain mean matches too (max difference {plain_off}): the check is blind"


def assert_best_model_is_the_best_scored(summary: dict, rounds: int = ROUNDS) -> None:
    """The saved best global model is the one with the best mean validation Dice among all global models the
    sites scored, the last one included; its digest is that model's in ``global_model_history.json``. Scores at
    round r are of the model received then: the aggregate of round r - 1 (round 0's, of the untrained model, never
    competes)."""
    history = json.loads(next(Path(summary["paths"]["job_result"]).rglob("global_model_history.json")).read_text())
    digests = {e["round"]: e["sha256"] for e in history if "sha256" in e and not e.get("best")}
    scored = {int(r) - 1: sum(d.values()) / len(d) for r, d in summary["global_dice_per_round"].items() if int(r) > 0}
    assert sorted(scored) == list(range(rounds)), summary["global_dice_per_round"]  # the last aggregate included
    best_round = max(scored, key=scored.get)
    best = summary["best_model"]
    assert best["round"] == best_round and best["sha256"] == digests[best_round], (best, scored)
    if best_round == rounds - 1:  # Dice rose to the end: the best model is the final one
        assert best["sha256"] == summary["final_model"]["sha256"] == digests[rounds - 1]


def wait_finished(admin, job_id: str, timeout: float) -> str:
    """Poll ``nvflare job meta`` until the job has finished; its final status."""
    from spleen_tools.flare import is_finished
    from spleen_tools.procs import wait_for

    status: list[str | None] = [None]

    def done() -> bool:
        status[0] = admin.status(job_id)
        return is_finished(status[0])

    wait_for(done, timeout, f"job {job_id} to finish", interval=2.0)
    return str(status[0])
