"""The one command's runner, the parts that need no FL system: where a run stopped, the job copy it writes, what a
refused run leaves, that stopping a run that started nothing is safe, and that summary.json is written once, also
when the run fails after its results came in."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from spleen_tools.job_result import GLOBAL_MODEL
from spleen_tools.run import runner
from spleen_tools.run.runner import STOPPED_FILE, Run, conclude, prepare_job_copy, record_stop, stop_everything
from spleen_tools.run.settings import ExperimentError, ExperimentSettings, SettingsError, Terminated
from spleen_tools.run.summary import SUMMARY_FILE, RunSummary, Tracking


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


SITES = ["site-1", "site-2"]
COMPLETE = {m: {s: 0.5 for s in SITES} for m in [GLOBAL_MODEL, *SITES]}


@pytest.fixture
def concluding(tmp_path, monkeypatch):
    """A run whose job has ended (collect_results gives ``results``), counting summary.json's writes."""
    run = make_run(tmp_path)
    run.system = SimpleNamespace(site_names=SITES, log_paths={s: tmp_path / s / "log.txt" for s in SITES})
    results = {"summary": RunSummary(status="FINISHED:COMPLETED", sites=SITES, paths={"run_dir": str(run.run_dir)})}
    monkeypatch.setattr(runner, "collect_results", lambda *args: results["summary"])
    writes = []
    save = RunSummary.save
    monkeypatch.setattr(RunSummary, "save", lambda self, run_dir: writes.append(self) or save(self, run_dir))
    return run, results, writes


def test_a_run_that_fails_its_check_still_writes_its_summary_once(concluding):
    run, results, writes = concluding
    results["summary"] = RunSummary(status="ABORTED", sites=SITES, paths={"run_dir": str(run.run_dir)})
    with pytest.raises(ExperimentError, match="job ended ABORTED"):
        conclude(run, None, "abc", "ABORTED", None)
    assert len(writes) == 1
    written = json.loads((run.run_dir / SUMMARY_FILE).read_text())
    assert written["status"] == "ABORTED" and "model_bundle" not in written and "secrets_scan" not in written
    assert run.lines[-1] == f"summary: {run.run_dir}/summary.json"  # the report came first


def test_a_secret_found_is_in_the_summary_with_the_model_bundle(concluding, monkeypatch):
    run, results, writes = concluding
    tracking = Tracking(tensorboard={"site_dirs": {s: f"/tb/{s}" for s in SITES}})
    paths = {"run_dir": str(run.run_dir)}
    results["summary"] = RunSummary(status="FINISHED:COMPLETED", cross_site=COMPLETE, tracking=tracking, paths=paths)
    monkeypatch.setattr(runner, "export_model", lambda run, result: {"path": "/bundle"})
    scan = {"secrets": 3, "files": 10, "bytes": 100, "findings": ["a.log: a key (PEM)"], "unchecked": []}
    monkeypatch.setattr(runner, "scan_for_secrets", lambda run: scan)
    with pytest.raises(ExperimentError, match="secret left behind: a.log"):
        conclude(run, None, "abc", "FINISHED:COMPLETED", None)
    assert len(writes) == 1 and RunSummary.load(run.run_dir) == writes[0]
    assert writes[0].model_bundle == {"path": "/bundle"} and writes[0].secrets_scan == scan
