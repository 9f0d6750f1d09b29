"""FL methods as override files of the training jobs (jobs/algorithms, spleen_tools.algorithms)."""

from __future__ import annotations

import json
import shlex

import pytest

from spleen_tools.algorithms import algorithm_names, apply_algorithm, check_under_he, load_algorithm
from spleen_tools.jobs import JOB_VARIANTS, JobSettings, prepare_job
from spleen_tools.run.settings import ExperimentSettings, SettingsError


def _configs(job):
    config = job / "app" / "config"
    server = json.loads((config / "config_fed_server.json").read_text())
    client = json.loads((config / "config_fed_client.json").read_text())
    args = shlex.split(client["executors"][0]["executor"]["args"]["task_script_args"])
    return server, dict(zip(args[::2], args[1::2], strict=True))


def test_the_registry_is_the_folder_and_fedavg_changes_nothing(tmp_path):
    assert algorithm_names() == ["fedavg", "fedbn", "fedopt", "fedprox", "scaffold"]
    plain = prepare_job(JOB_VARIANTS["local"], tmp_path / "plain", JobSettings(rounds=2))
    fedavg = prepare_job(JOB_VARIANTS["local"], tmp_path / "fedavg", JobSettings(rounds=2, algorithm="fedavg"))
    server_plain, args_plain = _configs(plain)
    server_avg, args_avg = _configs(fedavg)
    assert args_plain == args_avg
    receiver = next(c for c in server_avg["components"] if c["id"] == "mlflow_receiver")
    assert receiver["args"]["kw_args"]["experiment_tags"]["algorithm"] == "FedAvg"
    assert [c["path"] for c in server_plain["components"]] == [c["path"] for c in server_avg["components"]]


def test_fedprox_and_fedbn_set_the_sites_script_arguments(tmp_path):
    prox = prepare_job(JOB_VARIANTS["local"], tmp_path / "p", JobSettings(algorithm="fedprox", local_epochs=3))
    server, args = _configs(prox)
    assert args["--fedprox_mu"] == "0.01" and args["--local_epochs"] == "3"
    receiver = next(c for c in server["components"] if c["id"] == "mlflow_receiver")
    assert receiver["args"]["kw_args"]["run_name"] == "fedprox"
    _, args = _configs(prepare_job(JOB_VARIANTS["local"], tmp_path / "b", JobSettings(algorithm="fedbn")))
    assert args["--fedbn"] == "1" and "--fedprox_mu" not in args


def test_fedopt_replaces_the_servers_shareable_generator_and_tags_wandb_too(tmp_path):
    job = prepare_job(JOB_VARIANTS["local"], tmp_path / "o", JobSettings(algorithm="fedopt", tracking="wandb"))
    server, _ = _configs(job)
    generator = next(c for c in server["components"] if c["id"] == "shareable_generator")
    assert generator["path"] == "spleen_flare.fedopt.BundleFedOptShareableGenerator"
    assert generator["args"]["optimizer"] == "sgd" and generator["args"]["lr"] == 1.0
    wandb = next(c for c in server["components"] if c["id"] == "wandb_receiver")
    assert wandb["args"]["wandb_args"]["config"]["algorithm"] == "FedOpt"


def test_scaffold_replaces_the_generator_and_turns_on_the_sites_controls(tmp_path):
    job = prepare_job(JOB_VARIANTS["local"], tmp_path / "s", JobSettings(algorithm="scaffold", quick=True))
    server, args = _configs(job)
    generator = next(c for c in server["components"] if c["id"] == "shareable_generator")
    assert generator["path"] == "spleen_flare.scaffold.ScaffoldShareableGenerator"
    assert args["--scaffold"] == "1" and "--fedbn" not in args and "--fedprox_mu" not in args


def test_methods_the_server_must_read_are_refused_under_he(tmp_path):
    check_under_he("fedprox", he=True)
    check_under_he("fedopt", he=False)
    with pytest.raises(ValueError, match="FedOpt does not run in the HE job: the server's optimizer reads"):
        prepare_job(JOB_VARIANTS["he"], tmp_path / "he", JobSettings(algorithm="fedopt"))
    ExperimentSettings(job="he", algorithm="fedbn").validate()  # run under HE: the sites send all but BatchNorm
    with pytest.raises(SettingsError, match="FedOpt does not run in the HE job"):
        ExperimentSettings(job="he", algorithm="fedopt").validate()
    with pytest.raises(ValueError, match="SCAFFOLD does not run in the HE job: the server adds the sites' control"):
        prepare_job(JOB_VARIANTS["he"], tmp_path / "he", JobSettings(algorithm="scaffold"))
    with pytest.raises(SettingsError, match="--algorithm must be one of fedavg, fedbn, fedopt, fedprox, scaffold"):
        ExperimentSettings(algorithm="fednova").validate()
    with pytest.raises(SettingsError, match="for the training jobs"):
        ExperimentSettings(job="stats", algorithm="fedprox").validate()


def test_a_broken_override_file_is_named(tmp_path):
    (tmp_path / "odd.json").write_text(json.dumps({"name": "Odd", "server_components": {"aggregator": {"args": {}}}}))
    with pytest.raises(ValueError, match=r"odd.json: server_components.aggregator needs a path"):
        load_algorithm("odd", tmp_path)
    with pytest.raises(ValueError, match="unknown algorithm 'nope'"):
        load_algorithm("nope", tmp_path)
    spec = {"name": "Bad", "under_he": True, "server_components": {"nowhere": {"path": "y"}}}
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="has no server component 'nowhere'"):
        apply_algorithm(
            {"components": [{"id": "persistor", "path": "x", "args": {}}]}, "bad", he=False, folder=tmp_path
        )
