"""The real local MLflow tracking server (spleen_tools/mlflow_server.py): it serves its store from the run directory
and stop() leaves no process of its group behind (10-25 s on 2 cores, most of it MLflow's own start and migration).
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request

from process_groups import live_group_members

from spleen_tools.mlflow_server import HOST, MLflowServer
from spleen_tools.procs import port_in_use


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
        assert len(live_group_members(group)) >= 2, [p.name() for p in live_group_members(group)]

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
    assert live_group_members(group) == [], "stop() left processes of the server's group running"
    assert not port_in_use(port, HOST), "the port stays taken after stop()"
