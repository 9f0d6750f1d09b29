"""Job folders: configs parse, every component class imports, and the prepare step places and configures."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

from spleen_flare.contract import DP_OVERRIDE_FILE
from spleen_tools.jobs import (
    JOB_NAMES,
    MLFLOW_RECEIVER_ID,
    STATS_JOB,
    STATS_PRIVACY_FILTER,
    TB_FOLDER,
    TB_RECEIVER,
    WANDB_RECEIVER_PATH,
    DPOptions,
    JobSettings,
    check_job_version,
    get_script_args,
    place_bundle_and_code,
    prepare_job,
    set_tracking,
)
from spleen_tools.paths import JOBS_DIR

JOBS = sorted(p.name for p in JOBS_DIR.iterdir() if (p / "meta.json").is_file())


def _component_paths(config: dict) -> list[str]:
    paths = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("path"), str) and "." in node["path"]:
                paths.append(node["path"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return paths


def _import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_local_job_is_present():
    assert "spleen_ct_segmentation_local" in JOBS


@pytest.mark.parametrize("job", JOBS)
def test_meta_and_configs_parse(job):
    folder = JOBS_DIR / job
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["name"] == job
    assert meta["min_clients"] >= 1
    for side in ("client", "server"):
        config = json.loads((folder / "app" / "config" / f"config_fed_{side}.json").read_text())
        assert config["format_version"] == 2


@pytest.mark.parametrize("job", JOBS)
def test_every_component_path_imports(job):
    config_dir = JOBS_DIR / job / "app" / "config"
    paths = []
    for side in ("client", "server"):
        paths += _component_paths(json.loads((config_dir / f"config_fed_{side}.json").read_text()))
    assert paths
    for path in paths:
        assert callable(_import_class(path)), path


@pytest.mark.parametrize("job", JOBS)
def test_no_dotted_config_keys(job):
    # `nvflare job submit` parses configs with pyhocon, which turns "a.b" keys into nested dicts.
    config_dir = JOBS_DIR / job / "app" / "config"

    def keys(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from keys(value)
        elif isinstance(node, list):
            for value in node:
                yield from keys(value)

    for side in ("client", "server"):
        dotted = [k for k in keys(json.loads((config_dir / f"config_fed_{side}.json").read_text())) if "." in k]
        assert not dotted, dotted


def test_place_bundle_without_code(tmp_path):
    """The default job carries the bundle (checked by each participant) and no code: sites run what they installed."""
    job = prepare_job("spleen_ct_segmentation_local", tmp_path)
    app = job / "app"
    assert (app / "config" / "spleen_ct_segmentation" / "configs" / "train.json").is_file()
    assert (app / "config" / "overrides" / "cpu_quick.json").is_file()
    assert not (app / "custom").exists()
    assert not list(app.rglob("__pycache__"))
    assert not list(job.rglob("*.py")), "no Python file travels in a default job"


def test_ship_code_puts_the_job_side_into_custom_and_a_later_default_removes_it(tmp_path):
    job = prepare_job("spleen_ct_segmentation_local", tmp_path, JobSettings(ship_code=True))
    assert (job / "app" / "custom" / "spleen_flare" / "client_train.py").is_file()
    job = prepare_job("spleen_ct_segmentation_local", tmp_path)
    assert not (job / "app" / "custom").exists()
    assert not (JOBS_DIR / "spleen_ct_segmentation_local" / "app" / "custom").exists()


def test_jobs_name_the_installed_version(tmp_path):
    from spleen_flare import __version__
    from spleen_flare.contract import JOB_VERSION_KEY

    for name in JOB_NAMES:
        assert json.loads((JOBS_DIR / name / "meta.json").read_text())[JOB_VERSION_KEY] == __version__
    job = tmp_path / "job"
    shutil.copytree(JOBS_DIR / "spleen_ct_segmentation_local", job, ignore=shutil.ignore_patterns("app"))
    meta = json.loads((job / "meta.json").read_text())
    meta[JOB_VERSION_KEY] = "0.0.1"
    (job / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta.json: spleen_flare_version is '0.0.1'.*set it to"):
        check_job_version(job)


def test_settings_are_written_into_the_copy_only(tmp_path):
    source_before = (
        JOBS_DIR / "spleen_ct_segmentation_local" / "app" / "config" / "config_fed_server.json"
    ).read_text()
    settings = JobSettings(rounds=3, local_epochs=2, min_clients=3, quick=True, tracking_uri="http://127.0.0.1:1234")
    job = prepare_job("spleen_ct_segmentation_local", tmp_path, settings)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    meta = json.loads((job / "meta.json").read_text())
    assert server["num_rounds"] == 3 and server["min_clients"] == 3 and meta["min_clients"] == 3
    receiver = next(c for c in server["components"] if c["id"] == "mlflow_receiver")
    assert receiver["args"]["tracking_uri"] == "http://127.0.0.1:1234"
    args = get_script_args(job)
    assert args["local_epochs"] == "2"
    assert args["config_files"] == "configs/train.json,../overrides/cpu_quick.json"
    source_after = (JOBS_DIR / "spleen_ct_segmentation_local" / "app" / "config" / "config_fed_server.json").read_text()
    assert source_before == source_after


@pytest.mark.parametrize("name", ["spleen_ct_segmentation_local", "spleen_ct_segmentation_he"])
def test_dp_gives_the_sites_its_options_and_every_participant_the_dp_network(tmp_path, name):
    """Plain and HE: the sites train with the DP override last (after --quick's), and every server component that
    builds the bundle's network (persistor, exporter, validators) builds the same DP network."""
    dp = DPOptions(target_epsilon=8.0, max_grad_norm=0.5, delta=1e-6)
    job = prepare_job(name, tmp_path / "1", JobSettings(quick=True, dp=dp))
    args = get_script_args(job)
    assert args["config_files"] == f"configs/train.json,../overrides/cpu_quick.json,{DP_OVERRIDE_FILE}"
    assert {k: float(v) for k, v in args.items() if k.startswith("dp_")} == {
        "dp_target_epsilon": 8.0, "dp_noise_multiplier": 0.0, "dp_max_epsilon": 0.0,
        "dp_max_grad_norm": 0.5, "dp_delta": 1e-6,
    }  # fmt: skip
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    builders = [c["args"]["config_files"] for c in server["components"] if "config_files" in c.get("args", {})]
    assert builders and all(configs.split(",")[-1] == DP_OVERRIDE_FILE for configs in builders), builders
    assert all(configs.count(DP_OVERRIDE_FILE) == 1 for configs in builders), builders
    plain = prepare_job(name, tmp_path / "2", JobSettings(quick=True))
    assert DP_OVERRIDE_FILE not in (plain / "app" / "config" / "config_fed_server.json").read_text()
    assert not any(k.startswith("dp_") for k in get_script_args(plain))


def test_dp_options_the_sites_cannot_use_are_refused_naming_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        prepare_job("spleen_ct_segmentation_local", tmp_path, JobSettings(dp=DPOptions(8.0, 1.0)))


def test_quick_off_restores_plain_train_config(tmp_path):
    job = prepare_job("spleen_ct_segmentation_local", tmp_path, JobSettings(quick=False))
    assert get_script_args(job)["config_files"] == "configs/train.json"


def test_settings_without_copy_are_refused():
    with pytest.raises(ValueError, match="--out"):
        prepare_job("spleen_ct_segmentation_local", None, JobSettings(rounds=2))


def test_unknown_job_names_the_choices():
    with pytest.raises(FileNotFoundError, match="spleen_ct_segmentation_local"):
        prepare_job("no_such_job", None)


def test_missing_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.json"):
        place_bundle_and_code(JOBS_DIR / "spleen_ct_segmentation_local", bundle_src=tmp_path / "nothing")


def test_cli_bad_input_is_one_line(capsys):
    from spleen_tools.cli.prepare_jobs import main

    assert main(["--job", "spleen_ct_segmentation_local", "--rounds", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--out" in err[0]


def test_official_bundle_ids_are_the_ones_we_use():
    # The ids our integration reads; the model-zoo bundle defines the same ones.
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(JOBS_DIR).parent / "bundles" / "spleen_ct_segmentation" / "configs" / "train.json"))
    for key in (
        "bundle_root",
        "dataset_dir",
        "ckpt_dir",
        "device",
        "network_def",
        "network",
        "train#dataset#data",
        "train#trainer",
        "validate#dataset#data",
        "validate#evaluator",
        "validate#key_metric#val_mean_dice",
    ):
        assert key in parser, key


def _receiver_components() -> list[dict]:
    server = json.loads(
        (JOBS_DIR / "spleen_ct_segmentation_local" / "app" / "config" / "config_fed_server.json").read_text()
    )
    return server["components"]


def test_tracking_server_sets_the_uri_and_workspace_removes_it():
    components = _receiver_components()
    set_tracking(components, JobSettings(tracking="server", tracking_uri="http://127.0.0.1:1234", experiment_name="e"))
    receiver = next(c for c in components if c["id"] == MLFLOW_RECEIVER_ID)
    assert receiver["args"]["tracking_uri"] == "http://127.0.0.1:1234"
    assert receiver["args"]["kw_args"]["experiment_name"] == "e"
    set_tracking(components, JobSettings(tracking="workspace"))
    assert "tracking_uri" not in receiver["args"]  # NVFlare then writes <job result>/mlflow.db


def test_tracking_tensorboard_swaps_in_nvflares_tb_receiver():
    components = _receiver_components()
    set_tracking(components, JobSettings(tracking="tensorboard"))
    assert not any(c["id"] == MLFLOW_RECEIVER_ID for c in components)
    (tb,) = [c for c in components if c["id"] == TB_RECEIVER["id"]]
    assert callable(_import_class(tb["path"])) and tb["args"]["tb_folder"] == TB_FOLDER
    with pytest.raises(ValueError, match="tracking must be one of"):
        set_tracking(_receiver_components(), JobSettings(tracking="comet"))


def test_tracking_wandb_takes_project_run_name_and_tags_from_the_mlflow_receiver():
    components = _receiver_components()
    mlflow_args = next(c for c in components if c["id"] == MLFLOW_RECEIVER_ID)["args"]["kw_args"]
    set_tracking(components, JobSettings(tracking="wandb", resume_from="job-1"))
    assert not any(c["id"] == MLFLOW_RECEIVER_ID for c in components)
    (wandb,) = [c for c in components if c["path"] == WANDB_RECEIVER_PATH]
    assert callable(_import_class(wandb["path"])) and wandb["args"]["mode"] == "offline"
    args = wandb["args"]["wandb_args"]
    assert args["project"] == mlflow_args["experiment_name"] and args["name"] == mlflow_args["run_name"]
    assert args["config"] == {**mlflow_args["experiment_tags"], **mlflow_args["run_tags"], "resumed_from": "job-1"}
    online = _receiver_components()
    set_tracking(online, JobSettings(tracking="wandb", wandb_project="lab", wandb_mode="online"))
    (wandb,) = [c for c in online if c["path"] == WANDB_RECEIVER_PATH]
    assert wandb["args"]["mode"] == "online" and wandb["args"]["wandb_args"]["project"] == "lab"
    assert "api_key" not in json.dumps(online).lower()  # the key stays in the server's environment
    with pytest.raises(ValueError, match="W&B mode must be one of"):
        set_tracking(_receiver_components(), JobSettings(tracking="wandb", wandb_mode="cloud"))


def test_the_statistics_job_carries_no_bundle_and_takes_its_sites_and_minimum_count(tmp_path):
    source = {p.relative_to(JOBS_DIR / STATS_JOB): p.read_text() for p in (JOBS_DIR / STATS_JOB).rglob("*.json")}
    job = prepare_job(STATS_JOB, tmp_path, JobSettings(min_clients=3, stats_min_count=5))
    assert sorted(p.relative_to(job).as_posix() for p in job.rglob("*") if p.is_file()) == [
        "app/config/config_fed_client.json",
        "app/config/config_fed_server.json",
        "meta.json",
    ]  # no bundle, no overrides, no code: the statistics job trains nothing
    config = job / "app" / "config"
    server = json.loads((config / "config_fed_server.json").read_text())
    assert server["min_clients"] == 3 and json.loads((job / "meta.json").read_text())["min_clients"] == 3
    assert server["workflows"][0]["args"]["min_clients"] == "{min_clients}"  # NVFlare fills it from the top level
    client = json.loads((config / "config_fed_client.json").read_text())
    (privacy,) = [f for entry in client["task_result_filters"] for f in entry["filters"]]
    assert privacy["path"] == STATS_PRIVACY_FILTER
    assert privacy["args"] == {"min_count": 5, "max_bins_percent": 50, "min_noise_level": 0.1, "max_noise_level": 0.3}
    assert _import_class(privacy["path"])(**privacy["args"]).cleansers[0].min_count == 5
    assert {
        p.relative_to(JOBS_DIR / STATS_JOB): p.read_text() for p in (JOBS_DIR / STATS_JOB).rglob("*.json")
    } == source


def test_the_statistics_job_without_settings_keeps_its_own_minimum_count(tmp_path):
    client = prepare_job(STATS_JOB, tmp_path, JobSettings()) / "app" / "config" / "config_fed_client.json"
    (privacy,) = [f for entry in json.loads(client.read_text())["task_result_filters"] for f in entry["filters"]]
    assert privacy["args"]["min_count"] == 3


@pytest.mark.parametrize("count", [0, -2])
def test_the_statistics_job_refuses_a_minimum_count_below_one_case(tmp_path, count):
    with pytest.raises(ValueError, match=f"at least 1 case, got {count}"):
        prepare_job(STATS_JOB, tmp_path, JobSettings(stats_min_count=count))
