"""Readers of a downloaded NVFlare job (``nvflare job download`` of one of ours): its cross-site results, the
server's model history and checkpoints, and what its logs say about how it ended. Used by the run summary and the
model export; nothing here writes.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

from spleen_flare.contract import KEY_METRIC

GLOBAL_MODEL = "SRV_FL_global_model.pt"  # the server's final global model in NVFlare's cross-site results


def cross_site_by_model(results: dict) -> dict[str, dict[str, float]]:
    """``{site: {model: {KEY_METRIC: x}}}`` (cross_val_results.json) -> ``{model: {site: x}}``."""
    table: dict[str, dict[str, float]] = {}
    for site, models in sorted(results.items()):
        for model, metrics in (models or {}).items():
            dice = metrics.get(KEY_METRIC) if isinstance(metrics, dict) else None
            if isinstance(dice, float | int):
                table.setdefault(model, {})[site] = float(dice)
    return table


def model_choice(history: list[dict]) -> dict:
    """The saved best global model and the final one, from the server's ``global_model_history.json``: rounds
    (the aggregate of that round), digests, and the mean validation Dice the best was chosen on."""
    models = [e for e in history if not e.get("best") and isinstance(e.get("round"), int)]
    bests = [e for e in history if e.get("best")]
    out = {}
    if models:
        out["final_model"] = {"round": models[-1]["round"], "sha256": models[-1]["sha256"]}
    if bests:
        out["best_model"] = {k: bests[-1].get(k) for k in ("round", "sha256", KEY_METRIC)}
    return out


def read_model_history(download_dir: Path) -> list[dict] | None:
    found = sorted(Path(download_dir).rglob("global_model_history.json"))
    return json.loads(found[0].read_text()) if found else None


class CheckpointError(Exception):
    """A checkpoint that is refused or unreadable; the message is one line naming the file."""


def read_checkpoint(path: Path) -> dict:
    """The weights (a state dict) of a PyTorch checkpoint from another party: NVFlare's ``{"model": ...}`` or a
    plain state dict. Read with ``weights_only=True``: tensors and plain containers only, so a crafted pickle is
    refused before it can run code here. NVFlare's own checkpoints ({"model", "train_conf", "meta_props"}: dicts,
    strings, numbers, tensors) need nothing more."""
    import torch  # the one command imports this module; torch only when a checkpoint is read

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a foreign pickle: refused below
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", str(err))
        why = found.group(1).strip() if found else "not a PyTorch checkpoint"
        raise CheckpointError(
            f"{path}: refused: not plain weights ({why}); nothing in it ran. Take the model from a server you"
            " trust; never load this file with weights_only off"
        ) from None
    except Exception as err:  # torch raises many kinds for damaged or foreign files
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    weights = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: holds no state dict (expected NVFlare's {{'model': ...}} or a state dict)")
    return dict(weights)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def count_weights(download_dir: Path, out: Callable[[str], None] = _stderr) -> int | None:
    """Number of weights in the downloaded global model (for the plain update size of HE runs). Only a file in
    torch's zip format is read (an HE server keeps NVFlare's encrypted DXO file under this name); a refused one
    is one ``error:`` line and None."""
    found = sorted(download_dir.rglob("FL_global_model.pt"))
    if not found or not zipfile.is_zipfile(found[0]):
        return None
    try:
        weights = read_checkpoint(found[0])
    except CheckpointError as err:
        out(f"error: {err}")
        return None
    return int(sum(v.numel() for v in weights.values()))


ABANDONED_UPLOAD = "failed to decode streamed submit_update"  # NVFlare 2.9's server job log, at its very end


def abandoned_upload(download_dir: Path, dropped: list[str]) -> str | None:
    """Why a job that finished its work still ended FINISHED:EXECUTION_EXCEPTION, when that is a dropped site's
    upload cut off mid-stream: NVFlare 2.9 keeps the stream pending and, at the job's end, fails the job on it."""
    for log in sorted(Path(download_dir).glob("*/workspace/log.txt")):
        for line in log.read_text(errors="replace").splitlines():
            if ABANDONED_UPLOAD in line:
                site = next((s for s in dropped if f"failed to download from {s}." in line), None)
                if site:
                    return (
                        f"NVFlare failed the job at its end on {site}'s upload, cut off when {site} dropped; every "
                        "round and the cross-site evaluation finished without it"
                    )
    return None
