"""The participants' environment: this interpreter first on PATH, and each site its share of the cores."""

from __future__ import annotations

import os

from spleen_tools.paths import BIN_DIR
from spleen_tools.systems.base import participant_env, thread_share


def test_thread_share_divides_the_cores():
    assert [thread_share(n, cores=8) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert thread_share(2) == max(1, (os.cpu_count() or 1) // 2)


def test_participant_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    env = participant_env({"SPLEEN_DATA_DIR": "/data"}, sites=2)
    assert env["SPLEEN_DATA_DIR"] == "/data" and env["PATH"].split(os.pathsep)[0] == str(BIN_DIR)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(thread_share(2))
    assert "OMP_NUM_THREADS" not in participant_env()  # no sites, no share
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert participant_env(sites=2)["OMP_NUM_THREADS"] == "3", "the user's own setting is kept"


def test_the_server_waits_a_minute_not_fifteen_for_a_dead_sites_outcome(monkeypatch):
    from nvflare.apis.fl_constant import ConfigVarName, SystemConfigs
    from nvflare.fuel.utils.config_service import ConfigService

    monkeypatch.delenv("NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT", raising=False)
    env = participant_env()
    monkeypatch.setattr("os.environ", env)  # what a participant started with it sees
    waited = ConfigService.get_float_var(
        name=ConfigVarName.CLIENT_OUTCOME_WAIT_TIMEOUT, conf=SystemConfigs.APPLICATION_CONF, default=900.0
    )  # NVFlare's JobRunner reads it so
    assert waited == 60.0
