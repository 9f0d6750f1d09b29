"""The final validation workflow (spleen_flare/final_validation.py) on NVFlare's real server side: a ServerEngine
with its RunManager (components, event delivery), a WFCommServer (task queue) and the job's components: the model
selector, the shareable generator and our persistor. The test plays the sites through the server's own entry
points (``process_task_request`` / ``process_submission``), as a site's client runner does over the network.

The persistor holds a small network instead of the bundle's: building the bundle's is tests/unit/test_persistor.py's
business, and the workflow only moves the weights it is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.client import Client
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.impl.wf_comm_server import WFCommServer
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
from nvflare.private.fed.server.client_manager import ClientManager
from nvflare.private.fed.server.run_manager import RunManager
from nvflare.private.fed.server.server_engine import ServerEngine

from spleen_flare.contract import KEY_METRIC
from spleen_flare.final_validation import FinalGlobalValidation
from spleen_flare.model_selection import ResumableModelSelector
from spleen_flare.persistor import BundleModelPersistor, weights_digest
from spleen_flare.resume import HISTORY_FILE

LAST_ROUND = 4  # the last training round: the sites score its aggregate as if round 5 had started
WAIT_S = 10.0  # a site waits this long for its task; far above the workflow's 0.02 s polling


@dataclass
class Server:
    engine: ServerEngine
    comm: WFCommServer
    workflow: FinalGlobalValidation
    selector: ResumableModelSelector
    persistor: BundleModelPersistor
    clients: dict[str, Client]
    app: Path

    def history(self) -> list[dict]:
        return json.loads((self.app / HISTORY_FILE).read_text())

    def best_entries(self) -> list[dict]:
        return [e for e in self.history() if e.get("best")]


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """``start_server(sites)``: the server side of a job at the point the final validation starts."""
    started: list[Server] = []

    def start(sites: tuple[str, ...] = ("site-1", "site-2")) -> Server:
        workspace = tmp_path / "workspace"
        for folder in ("startup", "local"):  # what NVFlare checks a workspace by
            (workspace / folder).mkdir(parents=True)
        app = workspace / "app_server"
        app.mkdir()
        client_manager = ClientManager()
        clients = {name: Client(name, f"token-{name}") for name in sites}
        for client in clients.values():
            client_manager.clients[client.token] = client
            client_manager.name_to_clients[client.name] = client
        engine = ServerEngine(
            server=None, args=argparse.Namespace(set=[]), client_manager=client_manager, snapshot_persistor=None
        )
        torch.manual_seed(0)
        selector = ResumableModelSelector(key_metric=KEY_METRIC)
        persistor = BundleModelPersistor(model=torch.nn.Linear(4, 2))
        generator = FullModelShareableGenerator()
        components = {"model_selector": selector, "shareable_generator": generator, "persistor": persistor}
        engine.run_manager = RunManager(
            "server", engine, "", Workspace(str(workspace)), components, client_manager, [selector, persistor]
        )
        workflow = FinalGlobalValidation(task_check_period=0.02, wait_time_after_min_received=0)
        comm = WFCommServer(task_check_period=0.02)
        workflow.set_communicator(comm)
        with engine.new_context() as fl_ctx:
            fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app), private=True, sticky=True)
            for component in (selector, persistor):
                component.handle_event(EventType.START_RUN, fl_ctx)
            comm.initialize_run(fl_ctx)
            workflow.start_controller(fl_ctx)
            persistor.load_model(fl_ctx)  # as ScatterAndGather does first: the history's "initial" entry
        server = Server(engine, comm, workflow, selector, persistor, clients, app)
        started.append(server)
        return server

    yield start
    for server in started:
        with server.engine.new_context() as fl_ctx:
            server.workflow.stop_controller(fl_ctx)
            server.comm.finalize_run(fl_ctx)  # ends the communicator's task monitor thread
        server.engine.executor.shutdown(wait=False)


def _last_global_model(server: Server) -> dict:
    """The aggregate of the last round: the persistor's weights moved, so that it differs from the initial model."""
    weights = {k: np.asarray(v) + 0.5 for k, v in server.persistor.model.state_dict().items()}
    return make_model_learnable(weights, {})


def _scored(dice: float, rc: str = ReturnCode.OK) -> Shareable:
    reply = DXO(DataKind.METRICS, {KEY_METRIC: dice}).to_shareable()
    reply.set_return_code(rc)
    return reply


@dataclass
class Received:
    task_name: str
    scored_round: int | None
    weights: dict


def _site_runs_task(server: Server, site: str, answer: Shareable) -> Received:
    """One site: asks the server for a task until it gets one, answers it."""
    client = server.clients[site]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with server.engine.new_context() as fl_ctx:
            task_name, task_id, data = server.comm.process_task_request(client, fl_ctx)
        if data is not None and task_id:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"{site} got no task within {WAIT_S} s")
    with server.engine.new_context() as fl_ctx:
        server.comm.process_submission(client, task_name, task_id, answer, fl_ctx)
    return Received(task_name, data.get_header(AppConstants.CURRENT_ROUND), from_shareable(data).data)


def _final_validation(
    server: Server, answers: dict[str, Shareable], model: dict | None, last_round: int | None = LAST_ROUND
) -> dict[str, Received]:
    """Runs the workflow's control flow (its own thread, as NVFlare runs it) while the sites answer."""
    fl_ctx = server.engine.new_context()
    if model is not None:
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, model, private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, last_round, private=True, sticky=False)
    flow = threading.Thread(target=server.workflow.control_flow, args=(Signal(), fl_ctx), daemon=True)
    flow.start()
    received = {site: _site_runs_task(server, site, answer) for site, answer in answers.items()}
    flow.join(timeout=WAIT_S)
    assert not flow.is_alive(), "the workflow still waits after every site answered"
    return received


def test_every_site_scores_the_last_global_model_as_the_round_after_the_last(start_server):
    server = start_server()
    model = _last_global_model(server)
    received = _final_validation(server, {"site-1": _scored(0.5), "site-2": _scored(0.6)}, model)
    for site, got in received.items():
        # "validate" with round header LAST_ROUND + 1: the sites' executor tells it from cross-site evaluation so
        assert (got.task_name, got.scored_round) == (AppConstants.TASK_VALIDATION, LAST_ROUND + 1), site
        assert weights_digest(got.weights) == weights_digest(model[ModelLearnableKey.WEIGHTS]), site


def test_a_last_model_that_beats_the_best_so_far_is_saved_as_the_best_model(start_server):
    server = start_server()
    server.selector.best_val_metric = server.selector.best_raw_val_metric = 0.7  # the rounds' best
    model = _last_global_model(server)
    _final_validation(server, {"site-1": _scored(0.8), "site-2": _scored(0.9)}, model)

    assert server.selector.best_val_metric == pytest.approx(0.85)  # the mean: a later resume starts from it
    assert server.selector.best_raw_val_metric == pytest.approx(0.85)
    saved = torch.load(server.app / "best_FL_global_model.pt", map_location="cpu", weights_only=True)["model"]
    digest = weights_digest(model[ModelLearnableKey.WEIGHTS])
    assert weights_digest({k: v.numpy() for k, v in saved.items()}) == digest
    # the persistor names the model by the round it was aggregated in: the last one
    assert server.best_entries() == [
        {"best": True, "round": LAST_ROUND, "sha256": digest, KEY_METRIC: pytest.approx(0.85)}
    ]


@pytest.mark.parametrize("dice", [(0.8, 0.85), (0.9, 0.9)], ids=["lower", "equal"])
def test_a_last_model_no_better_than_the_best_leaves_the_best_model_alone(start_server, dice):
    server = start_server()
    server.selector.best_val_metric = server.selector.best_raw_val_metric = 0.9
    _final_validation(server, {"site-1": _scored(dice[0]), "site-2": _scored(dice[1])}, _last_global_model(server))
    assert server.selector.best_val_metric == 0.9
    assert not (server.app / "best_FL_global_model.pt").exists()
    assert server.best_entries() == []


def test_only_finite_key_metrics_of_sites_that_succeeded_are_averaged(start_server):
    server = start_server(("site-1", "site-2", "site-3", "site-4"))
    answers = {
        "site-1": _scored(0.99, rc=ReturnCode.EXECUTION_EXCEPTION),  # a metric, but the site reports a failure
        "site-2": DXO(DataKind.METRICS, {"val_loss": 0.1}).to_shareable(),  # no key metric
        "site-3": _scored(math.nan),
        "site-4": _scored(0.6),
    }
    _final_validation(server, answers, _last_global_model(server))
    assert server.selector.best_val_metric == 0.6  # site-4's alone
    assert [e[KEY_METRIC] for e in server.best_entries()] == [0.6]


def test_when_no_site_scores_the_last_model_the_selection_is_unchanged(start_server, caplog):
    server = start_server()
    answers = {"site-1": _scored(0.9, rc=ReturnCode.EXECUTION_EXCEPTION), "site-2": _scored(math.inf)}
    with caplog.at_level(logging.WARNING):
        _final_validation(server, answers, _last_global_model(server))
    assert "no site scored the last global model: best-model selection unchanged" in caplog.text
    assert "site-1 did not score the last global model" in caplog.text
    assert server.selector.best_val_metric == -math.inf
    assert not (server.app / "best_FL_global_model.pt").exists()


def test_without_a_global_model_in_the_context_the_persistors_model_is_scored(start_server):
    # e.g. a job whose training rounds ran no aggregation: the persistor's model is the last global model
    server = start_server()
    received = _final_validation(server, {"site-1": _scored(0.4), "site-2": _scored(0.6)}, None, last_round=None)
    initial = weights_digest(server.persistor.model.state_dict())
    assert {weights_digest(r.weights) for r in received.values()} == {initial}
    assert {r.scored_round for r in received.values()} == {None}
    assert server.best_entries() == [{"best": True, "round": None, "sha256": initial, KEY_METRIC: 0.5}]
