"""The local MLflow tracking server (spleen_tools/mlflow_server.py) when it cannot start: it says why in one line and
leaves no process behind. The failure paths run a small stand-in executable instead of ``mlflow`` (about a second);
the real server's start and stop are in tests/e2e/test_mlflow_server_process.py (10-25 s).
"""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
from process_groups import live_group_members

from spleen_tools import mlflow_server
from spleen_tools.mlflow_server import HOST, MLflowServer
from spleen_tools.procs import free_port


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
    assert live_group_members(int(leader_pid.read_text())) == [], "a failed start left processes of its group running"
