"""--stop RUN_DIR: each recorded system is handed to the module that started it; nothing recorded is left."""

from __future__ import annotations

import subprocess

import pytest

from spleen_tools.procs import PidFile, ProcessRef, start_group, stop_started
from spleen_tools.run.settings import SettingsError
from spleen_tools.run.stop import MLFLOW, PIDS_FILE, STOPPERS, alive_pids, stop_run
from spleen_tools.systems import poc, secure


def test_each_system_kind_has_its_stopper():
    assert STOPPERS == {"poc": poc.stop_recorded, "secure": secure.stop_recorded}


def test_stop_run_ends_the_recorded_groups(tmp_path):
    mlflow = start_group(["sh", "-c", "sleep 60 & sleep 60"], tmp_path / "mlflow.log")
    starter = start_group(["sh", "-c", "sleep 60 & sleep 60 & exit 0"], tmp_path / "poc.log")
    starter.wait(timeout=5)
    pids = PidFile(tmp_path / PIDS_FILE)
    try:
        pids.update(**{MLFLOW: ProcessRef.of(mlflow.pid)})
        processes = {poc.STARTER: ProcessRef(starter.pid, None).to_json()}
        pids.update(poc={"workspace": str(tmp_path / "poc"), "home": str(tmp_path / "home"), "processes": processes})
        assert alive_pids(pids) == [mlflow.pid]
        lines = []
        assert stop_run(tmp_path, out=lines.append) == 0
        assert lines == [f"stopped everything recorded in {pids.path}"]
        for group in (mlflow.pid, starter.pid):
            assert subprocess.run(["pgrep", "-g", str(group)], capture_output=True).returncode == 1
    finally:
        stop_started(mlflow, grace=1)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(SettingsError, match=f"{tmp_path} has no pids.json: not a run directory"):
        stop_run(tmp_path)
