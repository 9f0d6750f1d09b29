"""The local job in the real NVFlare simulator, 2 sites x 2 rounds, metrics to a real MLflow server; with SCAFFOLD
(``--algorithm scaffold``: the server's controls and the sites' corrections), FedAvg being the POC runs' method."""

from __future__ import annotations

import json
import re
import uuid

import mlflow
import pytest

from spleen_tools.data import make_site_datalists, make_synthetic_dataset
from spleen_tools.jobs import JobSettings, prepare_job
from spleen_tools.mlflow_server import MLflowServer
from spleen_tools.systems.simulator import run_simulator

SITES = ["site-1", "site-2"]
ROUNDS = 2


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    data_dir = make_synthetic_dataset(root / "data", num_train=8, num_test=1, shape=(80, 80, 20), seed=3)
    make_site_datalists(data_dir, num_sites=len(SITES))
    experiment = f"sim-test-{uuid.uuid4().hex[:8]}"
    with MLflowServer(root / "mlflow") as server:
        settings = JobSettings(
            rounds=ROUNDS,
            local_epochs=1,
            min_clients=len(SITES),
            quick=True,
            tracking_uri=server.url,
            experiment_name=experiment,
            ship_code=True,
            algorithm="scaffold",
        )
        job = prepare_job("spleen_ct_segmentation_local", root / "jobs", settings)
        result = run_simulator(job, root / "workspace", len(SITES), data_dir, timeout=1200)
        client = mlflow.MlflowClient(server.url)
        experiment_obj = client.get_experiment_by_name(experiment)
        runs = client.search_runs([experiment_obj.experiment_id]) if experiment_obj else []
        histories = {
            re.match(r"(site-\d+)-", run.info.run_name).group(1): {
                name: client.get_metric_history(run.info.run_id, name)
                for name in ("train_loss", "train_loss_epoch", "val_mean_dice", "global_val_mean_dice")
            }
            for run in runs
        }
        yield result, histories


def test_simulator_exits_cleanly(simulated):
    result, _ = simulated
    assert result.returncode == 0, result.log_path.read_text()[-3000:]


def test_scaffold_moved_the_servers_controls_every_round_and_kept_them_out_of_the_model(simulated):
    import torch

    from spleen_flare.bundle_runner import build_network
    from spleen_flare.contract import SCAFFOLD_CONTROL_PREFIX
    from spleen_tools.paths import BUNDLE_SRC

    result, _ = simulated
    log = result.log_path.read_text()
    network = build_network(BUNDLE_SRC)
    trainable = sum(1 for _, p in network.named_parameters() if p.requires_grad)
    assert f"SCAFFOLD: {trainable} control variates, starting from zero" in log
    norms = [float(n) for n in re.findall(r"SCAFFOLD: global control norm (\S+) after update \d+", log)]
    assert len(norms) == ROUNDS and all(n > 0 for n in norms), norms
    assert log.count("SCAFFOLD: control variates correct every step") == len(SITES)
    stored = torch.load(result.global_model_path, map_location="cpu", weights_only=True)["model"]
    assert set(stored) == set(network.state_dict()), "the persisted global model is the network's, no control"
    assert not any(k.startswith(SCAFFOLD_CONTROL_PREFIX) for k in stored)


def test_global_model_saved_and_changed_every_round(simulated):
    result, _ = simulated
    assert result.global_model_path.is_file()
    history = json.loads((result.global_model_path.parent / "global_model_history.json").read_text())
    models = [entry for entry in history if not entry.get("best")]
    assert [entry["round"] for entry in models] == ["initial", *range(ROUNDS)]
    digests = [entry["sha256"] for entry in models]
    assert len(set(digests)) == len(digests), "the global model did not change between rounds"


def test_cross_site_results_cover_every_model_on_every_site(simulated):
    result, _ = simulated
    results = result.cross_site_results()
    assert sorted(results) == SITES
    expected_models = {"SRV_FL_global_model.pt", *SITES}
    for site in SITES:
        assert expected_models <= set(results[site]), results[site]
        for model, metrics in results[site].items():
            dice = metrics["val_mean_dice"]
            assert 0.0 <= dice <= 1.0, (site, model, dice)


def test_metrics_reach_mlflow_per_site(simulated):
    _, histories = simulated
    assert sorted(histories) == SITES
    for site, series in histories.items():
        for name in ("train_loss", "train_loss_epoch", "val_mean_dice", "global_val_mean_dice"):
            steps = [m.step for m in series[name]]
            assert steps, f"{site}: no {name} in MLflow"
            assert len(steps) == len(set(steps)), f"{site}: {name} repeats steps {steps}"
        # one score per round's received model, and the last global model's (final validation) at step ROUNDS
        assert [m.step for m in series["global_val_mean_dice"]] == list(range(ROUNDS + 1))
        assert [m.step for m in series["val_mean_dice"]] == list(range(1, ROUNDS + 1))


def test_sites_report_different_values(simulated):
    _, histories = simulated
    first, second = (histories[site] for site in SITES)
    for name in ("train_loss_epoch", "val_mean_dice"):
        assert [m.value for m in first[name]] != [m.value for m in second[name]], name
