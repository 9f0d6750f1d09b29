"""The local MLflow tracking server (spleen_tools/mlflow_server.py): it serves its store from the run directory and
leaves no process behind, whether it stopped normally or never became ready.

One test starts the real server (10-25 s on 2 busy cores, most of it MLflow's own start and its database migration);
the failure paths run a small stand-in executable instead of ``mlflow``, so they take about a second.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import urllib.request
from pathlib import Path

import psutil
import pytest

from spleen_tools import mlflow_server
from spleen_tools.mlflow_server import HOST, MLflowServer
from spleen_tools.procs import free_port, port_in_use


def _group(pgid: int) -> list[psutil.Process]:
    """The live processes of process group ``pgid`` (a zombie runs nothing: its parent just has not reaped it)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue  # gone while we looked
    return members


def _api(url: str, method: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_the_server_answers_keeps_its_store_in_the_folder_and_stops_its_whole_group(tmp_path):
    store = tmp_path / "run" / "mlflow"  # not there yet: start() creates it
    # ready well within the unit limit (60 s), or the module's own timeout stops the group and names the URL
    with MLflowServer(store, startup_timeout=45) as server:
        group = server.process.pid  # started in a session of its own: the leader's PID names the group
        assert server.url == f"http://{HOST}:{server.port}"
        # the server and its workers: without several members the "none left" check below would prove little
        assert len(_group(group)) >= 2, [p.name() for p in _group(group)]

        api = f"{server.url}/api/2.0/mlflow"
        created = _api(f"{api}/experiments/create", "POST", {"name": "unit-test"})
        found = _api(f"{api}/experiments/search", "POST", {"max_results": 10})
        assert "unit-test" in [e["name"] for e in found["experiments"]]

        # what the server wrote lands in the SQLite store of the given folder (the run directory keeps it)
        with sqlite3.connect(store / "mlflow.db") as db:
            names = [row[0] for row in db.execute("SELECT name FROM experiments")]
        assert "unit-test" in names and created["experiment_id"]
        assert server.log_path == store / "mlflow_server.log" and server.log_path.is_file()
        port = server.port

    assert server.process is None
    assert _group(group) == [], "stop() left processes of the server's group running"
    assert not port_in_use(port, HOST), "the port stays taken after stop()"


def test_a_taken_port_is_one_clear_error_and_starts_nothing(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind((HOST, 0))
        other.listen()
        port = other.getsockname()[1]
        server = MLflowServer(tmp_path / "mlflow", port=port)
        with pytest.raises(RuntimeError, match=f"port {port} on {HOST} is taken: choose another with --mlflow-port"):
            server.start()
    assert server.process is None
    assert not server.log_path.exists(), "nothing was started, so nothing logged"


@pytest.fixture
def stand_in_mlflow(tmp_path, monkeypatch):
    """Replace the ``mlflow`` executable with a shell script (the body is the test's): a real process group that
    never serves, so the failure paths take a second instead of an MLflow start."""

    def install(body: str) -> Path:
        script = tmp_path / "fake_bin" / "mlflow"
        script.parent.mkdir(exist_ok=True)
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setattr(mlflow_server, "MLFLOW", script)
        return script

    return install


def test_a_server_that_exits_at_start_is_named_and_its_output_kept(tmp_path, stand_in_mlflow):
    stand_in_mlflow('echo "cannot open the backend store" >&2\nexit 3\n')
    server = MLflowServer(tmp_path / "mlflow", port=free_port(HOST), startup_timeout=30)
    with pytest.raises(RuntimeError, match=f"MLflow server on {server.url}: the process exited before it was ready"):
        server.start()
    assert server.process is None
    assert "cannot open the backend store" in server.log_path.read_text(), "the log keeps why it failed"


def test_a_server_that_never_gets_ready_is_stopped_with_its_group(tmp_path, stand_in_mlflow):
    leader_pid = tmp_path / "leader.pid"
    # a child in the group, then the leader itself: neither ever answers /health
    stand_in_mlflow(f"echo $$ > {leader_pid}\nsleep 300 &\nexec sleep 300\n")
    server = MLflowServer(tmp_path / "mlflow", port=free_port(HOST), startup_timeout=1.5)
    with pytest.raises(TimeoutError, match=f"MLflow server on {server.url}: not ready after 2 s"):
        server.start()
    assert server.process is None
    assert _group(int(leader_pid.read_text())) == [], "a failed start left processes of its group running"
