"""Every repository path and executable the host tooling uses, defined once."""

from __future__ import annotations

import sys
from pathlib import Path

from spleen_flare.contract import BUNDLE_NAME, OVERRIDES_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
JOBS_DIR = REPO_ROOT / "jobs"
ALGORITHMS_DIR = JOBS_DIR / "algorithms"  # FL methods as small overrides of the training jobs (spleen_tools.algorithms)
BUNDLES_DIR = REPO_ROOT / "bundles"
BUNDLE_SRC = BUNDLES_DIR / BUNDLE_NAME
OVERRIDES_SRC = BUNDLES_DIR / OVERRIDES_NAME
JOB_SIDE_SRC = REPO_ROOT / "spleen_flare"  # installed at each participant; in a job's app/custom/ only with --ship-code
WORKSPACES_DIR = REPO_ROOT / "workspaces"
SECURE_PROJECT_YML = WORKSPACES_DIR / "secure_project.yml"
RUNS_DIR = REPO_ROOT / "runs"
# Lock files of the systems with fixed ports (one machine-wide lock per server port).
LOCK_DIR = Path("/tmp")

# The interpreter's own folder: nvflare, mlflow and the participants' python3 come from the same environment.
BIN_DIR = Path(sys.executable).parent
NVFLARE = BIN_DIR / "nvflare"
MLFLOW = BIN_DIR / "mlflow"
