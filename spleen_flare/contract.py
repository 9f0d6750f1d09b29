"""What the job side and the host tooling agree on: environment names, the key metric, log tags, the line format.

The one module of ``spleen_flare`` that ``spleen_tools`` imports. Standard library only, so that reading it never
pulls in NVFlare, MONAI or torch.

A tagged line is the tag, one space and one JSON object: ``[spleen] {"kind": "round", "site": "site-1", ...}``.
Sites ``print()`` progress lines (NVFlare copies them into the job's ``log.txt``); NVFlare components log HE lines
through their logger. Log prefixes before the tag are fine: the reader looks for the tag anywhere in the line.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Environment of the participants (jobs inherit their client's environment).
DATA_DIR_ENV = "SPLEEN_DATA_DIR"  # the dataset folder (MSD layout)
DATALIST_ENV = "SPLEEN_DATALIST"  # a site's datalist; "{site}" is replaced by the site name
BUNDLES_DIR_ENV = "SPLEEN_BUNDLES_DIR"  # a participant's own bundles folder (default: the one installed with the code)
# A site's own differential-privacy limits (spleen_flare.dp): DP required, epsilon and delta capped
DP_MAX_EPSILON_ENV = "SPLEEN_DP_MAX_EPSILON"
DP_MAX_DELTA_ENV = "SPLEEN_DP_MAX_DELTA"

# The bundle, and where a job carries its copy of it and of the override files (under the app's config/).
BUNDLE_NAME = "spleen_ct_segmentation"
OVERRIDES_NAME = "overrides"
# the bundle override that makes the network and loss per-case for DP-SGD (relative to the bundle root)
DP_OVERRIDE_FILE = "../overrides/dp.json"
# The job side's version a job was written for: a key of the job's meta.json.
JOB_VERSION_KEY = "spleen_flare_version"

# Metrics.
KEY_METRIC = "val_mean_dice"  # the bundle's key validation metric, also the cross-site metric
GLOBAL_METRIC = "global_val_mean_dice"  # a site's score of the global model it received, per round
# DP: a site's training result says, under this meta key, that its budget allows no further round (and why)
DP_LAST_ROUND_KEY = "dp_last_round"
# SCAFFOLD: the keys under which the global control variate travels beside the model's weights (and back)
SCAFFOLD_CONTROL_PREFIX = "scaffold_control::"
# where each site keeps the last global model it received (its app folder of the job; HE: decrypted)
FINAL_GLOBAL_MODEL = "global_model/FL_global_model.pt"
# where each site keeps the update it sent last (weights, steps, round): its own, never encrypted on its disk
LAST_LOCAL_UPDATE = "local_model/last_update.pt"
# W&B (--tracking wandb): the server's runs under <job workspace>/WANDB_FOLDER/, and the warning of a failed login
WANDB_FOLDER = "wandb_runs"
WANDB_FAILED_LOGIN = "W&B login failed"
WANDB_STEP_SUFFIX = "_step"  # a metric's own x-axis field in every W&B row (<metric>_step)

# An NVFlare job id as a job may name an earlier one (``resume_from``): a folder name, never a path.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Log tags and the kinds of progress line.
PROGRESS_TAG = "[spleen]"
HE_TAG = "[spleen-he]"
TAGS = (PROGRESS_TAG, HE_TAG)
# final: the last global model, scored by a site; data_error: a problem a site found in its own cases (one each);
# dropped: the server closed a round without a site's result (logged by the server's workflow);
# resumed / resume_error: the server's persistor went on from an earlier job's last global model, or could not;
# install_error: a participant refused the job because it asks for another version or bundle than it has installed
# device: what a site trains on (its torch device, and the GPU its host gave it)
# dp_error: a site refused the job's DP settings (or a job without DP, under its own limits), or a round its budget
# has no room for; dp_budget: after a round, a site's budget has no room for another (it trains no more)
PROGRESS_KINDS = (
    "round",
    "device",
    "final",
    "cross_site",
    "info",
    "data_error",
    "dropped",
    "resumed",
    "resume_error",
    "install_error",
    "dp_error",
    "dp_budget",
)


def _finite(value: Any) -> Any:
    """NaN/inf become None: the line stays strict JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def tagged_line(tag: str, **fields: Any) -> str:
    """``tag {"k": v, ...}`` on one line; floats are rounded to 4 decimals."""
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}: expected one of {', '.join(TAGS)}")
    values = {k: _finite(round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}
    return f"{tag} {json.dumps(values, separators=(', ', ': '), default=str)}"


def read_tagged_line(line: str) -> tuple[str, dict[str, Any]] | None:
    """``(tag, fields)`` from a line written by :func:`tagged_line` (with any log prefix), else None."""
    for tag in TAGS:
        start = line.find(tag + " {")
        if start < 0:
            continue
        try:
            fields, _ = json.JSONDecoder().raw_decode(line, start + len(tag) + 1)
        except ValueError:
            return None
        return (tag, fields) if isinstance(fields, dict) else None
    return None
