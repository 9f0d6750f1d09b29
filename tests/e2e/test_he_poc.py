"""The HE job on a real ``nvflare poc prepare -he`` system, run by the one command: 2 sites x 2 rounds on tiny
synthetic data (full-size network, --quick), with FedProx (a method that runs under HE: only the sites' loss
changes, so the aggregate is still the steps-weighted mean). Cross-site results for every model x site, the HE
fields of summary.json, MLflow metrics, and a persisted global model that holds only ciphertexts a site's key
decrypts."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import tenseal as ts  # a broken TenSEAL install fails, never skips
from conftest import (
    REPO_ROOT,
    ROUNDS,
    SITES,
    assert_best_model_is_the_best_scored,
    assert_steps_weighted_fedavg,
    last_updates,
    runner_cmd,
)

pytestmark = pytest.mark.he


@pytest.fixture(scope="module")
def he_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    runs = tmp_path_factory.mktemp("he_runs")
    # 5 cases: site-1 trains on 2, site-2 on 1, so step-weighted and plain FedAvg differ
    cmd = runner_cmd(runs, "--job", "he", "--algorithm", "fedprox", "--synthetic-cases", "5", "--timeout", "1200")
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1320, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    summaries = list(runs.glob("*/summary.json"))
    assert summaries, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = summaries[0].parent
    (run_dir / "runner_stdout.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    summary = json.loads(summaries[0].read_text())
    summary["_run_dir"] = run_dir
    summary["_returncode"] = proc.returncode
    return summary


def test_he_job_completes_with_cross_site_results_for_every_model_and_site(he_run: dict) -> None:
    assert he_run["status"] == "FINISHED:COMPLETED", he_run["status"]
    assert he_run["_returncode"] == 0
    models = he_run["cross_site"]
    # the global model (decrypted by each site) and each site's own model (encrypted, then decrypted elsewhere)
    assert {"SRV_FL_global_model.pt", *SITES} <= set(models), models
    for model, per_site in models.items():
        assert sorted(per_site) == SITES, (model, per_site)
        assert all(0.0 <= d <= 1.0 for d in per_site.values()), (model, per_site)


def test_the_sites_trained_with_fedprox_under_he(he_run: dict) -> None:
    for site in SITES:
        log = (
            he_run["_run_dir"] / "poc" / "example_project" / "prod_00" / site / he_run["job_id"] / "log.txt"
        ).read_text()
        assert '"note": "FedProx mu 0.01"' in log


def test_summary_has_he_cost_fields(he_run: dict) -> None:
    plain, encrypted = he_run["update_bytes_plain"], he_run["update_bytes_encrypted"]
    assert plain > 19_000_000  # the full-size network in fp32 (4.8 M weights)
    assert encrypted <= 2.1 * plain, (encrypted, plain)  # the target is <= 10x; the packed layout gives 2x
    assert len(he_run["encrypt_s"]) == ROUNDS and all(s > 0 for s in he_run["encrypt_s"])
    assert len(he_run["aggregate_s"]) == ROUNDS and all(s > 0 for s in he_run["aggregate_s"])
    # round 0 starts from the plaintext initial model; from round 1 on the sites decrypt the aggregate
    assert he_run["decrypt_s"][0] is None and all(s > 0 for s in he_run["decrypt_s"][1:])
    assert len(he_run["round_times_s"]) == ROUNDS
    assert len(he_run["fl_round_s"]) == ROUNDS  # the server's round times, from its log
    for rnd in range(1, ROUNDS):  # a round holds the sites' decryption, work and encryption
        t = he_run["fl_round_s"][rnd]
        assert t > he_run["site_work_s"][rnd] and t > he_run["decrypt_s"][rnd] + he_run["aggregate_s"][rnd], rnd


def test_mlflow_has_metrics_from_every_site(he_run: dict) -> None:
    import mlflow

    assert sorted(he_run["mlflow"]["run_ids"]) == SITES
    client = mlflow.MlflowClient(f"sqlite:///{he_run['_run_dir'] / 'mlflow' / 'mlflow.db'}")
    for site, run_id in he_run["mlflow"]["run_ids"].items():
        metrics = client.get_run(run_id).data.metrics
        assert {"global_val_mean_dice", "train_loss"} <= set(metrics), (site, sorted(metrics))
        assert len(client.get_metric_history(run_id, "global_val_mean_dice")) == ROUNDS + 1, site  # + final


def test_best_model_is_chosen_on_metrics_among_every_global_model(he_run: dict) -> None:
    """The server cannot read the weights: it selects on the sites' Dice, the last global model included."""
    assert_best_model_is_the_best_scored(he_run)


def _kit(run_dir, participant: str):
    return next(run_dir.glob(f"poc/**/prod_00/{participant}/startup"))


def _stored_global_model(run_dir):
    from nvflare.apis.dxo import from_file
    from nvflare.app_common.decomposers import numpy_decomposers

    numpy_decomposers.register()
    model_files = sorted(run_dir.glob("job_result/**/app_server/FL_global_model.pt"))
    assert model_files, "no persisted global model"
    return from_file(str(model_files[0]))


def _site_decrypts(run_dir, site: str, stored) -> dict:
    from spleen_flare.he.fingerprint import KEY_FINGERPRINT_FILE, read_fingerprint_file
    from spleen_flare.he.packing import HE_META_KEY, decrypt_model

    kit = _kit(run_dir, site)
    ctx = ts.context_from((kit / "client_context.tenseal").read_bytes())
    key = read_fingerprint_file(kit / KEY_FINGERPRINT_FILE)
    return decrypt_model(stored.data, stored.meta[HE_META_KEY], ctx, key=key)


def test_server_kit_holds_no_secret_and_sites_share_its_key_fingerprint(he_run: dict) -> None:
    from spleen_flare.he.fingerprint import KEY_FINGERPRINT_FILE, read_fingerprint_file
    from spleen_flare.he.packing import HE_META_KEY, key_fingerprint

    run_dir = he_run["_run_dir"]
    server = _kit(run_dir, "server")
    assert not (server / "client_context.tenseal").exists()
    server_ctx = ts.context_from((server / "server_context.tenseal").read_bytes())
    assert not server_ctx.is_private() and not server_ctx.has_secret_key()
    for site in SITES:
        assert read_fingerprint_file(_kit(run_dir, site) / KEY_FINGERPRINT_FILE) == key_fingerprint(server_ctx)
    assert _stored_global_model(run_dir).meta[HE_META_KEY]["key"] == key_fingerprint(server_ctx)


def test_server_global_model_is_ciphertext_and_client_key_decrypts_it(he_run: dict) -> None:
    from spleen_flare.bundle_runner import build_network
    from spleen_flare.he.packing import HE_META_KEY, as_ckks_vector
    from spleen_tools.paths import BUNDLE_SRC

    run_dir = he_run["_run_dir"]
    stored = _stored_global_model(run_dir)
    he_meta = stored.meta[HE_META_KEY]
    assert he_meta["contributions"] == len(SITES)
    shapes = {k: tuple(v.shape) for k, v in build_network(BUNDLE_SRC).state_dict().items()}
    float_names = {k for k, v in build_network(BUNDLE_SRC).state_dict().items() if v.dtype.is_floating_point}
    assert not float_names & set(stored.data), "a float tensor stored under its own name"
    blobs = [v for k, v in stored.data.items() if k not in shapes]
    assert blobs and all(isinstance(b, bytes) for b in blobs)
    server_ctx = ts.context_from((_kit(run_dir, "server") / "server_context.tenseal").read_bytes())
    with pytest.raises(ValueError, match="secret"):
        as_ckks_vector(blobs[0], he_meta, server_ctx).decrypt()
    weights = _site_decrypts(run_dir, "site-1", stored)
    assert {k: v.shape for k, v in weights.items()} == shapes


def test_sites_decrypt_the_fedavg_of_their_last_updates(he_run: dict) -> None:
    """The last aggregate, decrypted with a site's key, is the steps-weighted mean of what the sites sent in the
    last round (each site keeps its own last update, before encryption): FedAvg under HE, on the real job."""
    updates = last_updates(he_run["_run_dir"], he_run["job_id"])
    assert all(u["round"] == ROUNDS - 1 for u in updates.values()), {s: u["round"] for s, u in updates.items()}
    stored = _stored_global_model(he_run["_run_dir"])
    for site in SITES:  # each site's key gives the same model
        assert_steps_weighted_fedavg(updates, _site_decrypts(he_run["_run_dir"], site, stored), label=f"{site}: ")


def test_model_bundle_is_a_sites_decryption_of_the_servers_model(he_run: dict) -> None:
    """The server never decrypts: the exported bundle holds a site's copy, which equals the server's stored
    ciphertext decrypted with a site's key."""
    from pathlib import Path

    import torch

    from spleen_tools.model_bundle import verify_bundle

    run_dir = he_run["_run_dir"]
    bundle = Path(he_run["model_bundle"]["path"])
    assert verify_bundle(bundle)["torchscript_max_abs_diff"] <= 1e-4
    exported = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    decrypted = _site_decrypts(run_dir, "site-2", _stored_global_model(run_dir))
    assert exported.keys() == decrypted.keys()
    for name, value in decrypted.items():
        np.testing.assert_allclose(exported[name].numpy(), np.asarray(value).reshape(exported[name].shape), atol=1e-5)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["federated_training"]["job_id"] == he_run["job_id"]


def test_cross_site_models_the_server_holds_are_ciphertext_of_what_the_sites_submitted(he_run: dict) -> None:
    """Cross-site evaluation (spleen_flare.he.cross_site_eval): every model the server saved and broadcast while
    the sites scored each other's models is ciphertext under the provisioned key, which the server's context cannot
    decrypt; a site's model, as the server holds it, decrypts with another site's key to that site's best local
    model."""
    import torch
    from nvflare.apis.dxo import from_file

    from spleen_flare.bundle_runner import BEST_LOCAL_MODEL, build_network
    from spleen_flare.he.packing import HE_META_KEY, as_ckks_vector, key_fingerprint
    from spleen_tools.paths import BUNDLE_SRC

    run_dir, job_id = he_run["_run_dir"], he_run["job_id"]
    # what the server's job stored (its workspace, as the download gives it; the server cleans its own copy)
    saved = sorted(run_dir.glob(f"job_result/{job_id}/workspace/cross_site_val/model_shareables/*"))
    assert set(SITES) <= {p.name for p in saved}, saved  # each site's own model went through the server
    server_ctx = ts.context_from((_kit(run_dir, "server") / "server_context.tenseal").read_bytes())
    state = build_network(BUNDLE_SRC).state_dict()
    float_names = {k for k, v in state.items() if v.dtype.is_floating_point}
    for path in saved:
        dxo = from_file(str(path))
        assert not float_names & set(dxo.data), f"{path.name}: a float tensor stored under its own name"
        blobs = [v for k, v in dxo.data.items() if k not in state]
        assert blobs and all(isinstance(b, bytes) for b in blobs), path.name
        assert dxo.meta[HE_META_KEY]["key"] == key_fingerprint(server_ctx), path.name
        with pytest.raises(ValueError, match="secret"):
            as_ckks_vector(blobs[0], dxo.meta[HE_META_KEY], server_ctx).decrypt()
    site_1 = from_file(str(next(p for p in saved if p.name == "site-1")))
    decrypted = _site_decrypts(run_dir, "site-2", site_1)  # another site's key
    (best_path,) = run_dir.glob(f"poc/**/prod_00/site-1/{job_id}/**/{BEST_LOCAL_MODEL}")
    best = torch.load(best_path, map_location="cpu", weights_only=True)["model"]
    for name in float_names:
        np.testing.assert_allclose(
            np.asarray(decrypted[name]).reshape(best[name].shape), best[name].numpy(), atol=1e-5, err_msg=name
        )
