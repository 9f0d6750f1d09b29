"""The one command's runner, the parts that need no FL system: where a run stopped, the job copy it writes, what a
refused run leaves, and that stopping a run that started nothing is safe."""

from __future__ import annotations

import json
import time

import pytest

from spleen_tools.run.runner import STOPPED_FILE, Run, prepare_job_copy, record_stop, stop_everything
from spleen_tools.run.settings import ExperimentSettings, SettingsError, Terminated


def make_run(tmp_path, **settings) -> Run:
    run_dir = tmp_path / "runs" / "20261204-000000"
    run_dir.mkdir(parents=True)
    lines: list[str] = []
    run = Run(ExperimentSettings(runs_dir=tmp_path / "runs", **settings), run_dir, time.monotonic(), lines.append)
    run.lines = lines  # what the run printed
    return run


@pytest.mark.parametrize(
    "err, reason",
    [
        (KeyboardInterrupt(), "interrupted (Ctrl-C / SIGINT)"),
        (Terminated("SIGTERM"), "terminated (SIGTERM)"),
        (SettingsError("--rounds must be at least 1"), "SettingsError: --rounds must be at least 1"),
    ],
)
def test_stopped_json_names_the_phase_and_why(tmp_path, err, reason):
    run = make_run(tmp_path)
    run.enter("starting the FL system")
    record_stop(run, err)
    stopped = json.loads((run.run_dir / STOPPED_FILE).read_text())
    assert stopped["phase"] == "starting the FL system" and stopped["reason"] == reason


def test_the_job_copy_carries_the_runs_settings(tmp_path):
    run = make_run(tmp_path, rounds=3, local_epochs=2, quick=True, tracking="tensorboard")
    job = prepare_job_copy(run)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    assert json.dumps(server).count('"num_rounds": 3') == 1, server
    assert run.lines == [f"job: {job} (3 rounds x 2 local epochs, quick=True)"]
    assert job.parent == run.run_dir / "jobs"


def test_stopping_a_run_that_started_nothing_is_safe(tmp_path):
    run = make_run(tmp_path)
    stop_everything(run)
    stop_everything(run)  # twice, as a signal during cleanup would
