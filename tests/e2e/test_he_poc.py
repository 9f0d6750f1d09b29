"""HE job on a real POC -he system: 2 sites x 2 rounds on tiny synthetic data, cross-site results,
and the server's persisted global model holds only ciphertexts that a client's key decrypts."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.he]
ts = pytest.importorskip("tenseal")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def he_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    runs = tmp_path_factory.mktemp("he_runs")
    cmd = [
        sys.executable,
        "-m",
        "spleen_fl.cli.run_experiment",
        "--job",
        "he",
        "--rounds",
        "2",
        "--local-epochs",
        "1",
        "--synthetic-cases",
        "4",
        "--runs-dir",
        str(runs),
        "--timeout",
        "600",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=720)
    summaries = list(runs.glob("*/summary.json"))
    assert summaries, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summaries[0].read_text())
    summary["_run_dir"] = summaries[0].parent
    return summary


def test_he_job_completes_with_cross_site_results(he_run: dict) -> None:
    assert he_run["status"] == "FINISHED:COMPLETED", he_run["status"]
    assert he_run["cross_site"], "empty cross-site results"


def test_server_global_model_is_ciphertext_and_client_key_decrypts_it(he_run: dict) -> None:
    run_dir = he_run["_run_dir"]
    model_files = list(run_dir.glob("job_result/*/workspace/app_server/FL_global_model.pt")) + list(
        run_dir.glob("job_result/*/workspace/**/FL_global_model.pt")
    )
    assert model_files, "no persisted global model"
    data = pickle.loads(model_files[0].read_bytes())
    weights = data["weights"]
    encrypted = {k: v for k, v in weights.items() if isinstance(v, bytes)}
    assert encrypted and all(not isinstance(v, np.ndarray) or v.size <= 1 for v in weights.values())
    server_ctx = ts.context_from(next(run_dir.glob("poc/*/prod_00/server/startup/server_context.tenseal")).read_bytes())
    assert not server_ctx.is_private()
    client_ctx = ts.context_from(next(run_dir.glob("poc/*/prod_00/site-1/startup/client_context.tenseal")).read_bytes())
    name, blob = next(iter(encrypted.items()))
    with pytest.raises(ValueError):
        ts.ckks_vector_from(server_ctx, blob).decrypt()
    values = ts.ckks_vector_from(client_ctx, blob).decrypt()
    assert len(values) > 0 and np.all(np.isfinite(values)), name
