"""``summary.json``: what a finished run measured, from its progress events and the downloaded job."""

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
from spleen_tools.run.progress import Progress
from spleen_tools.run.settings import ExperimentSettings

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


def he_summary(events: list[dict], param_count: int | None = None) -> dict:
    """HE costs from ``[spleen-he]`` events: per-round seconds per stage and one client update's size.

    ``<stage>_s[r]`` is round r's time (the slowest participant), ``None`` where round r had no such step (no
    decryption in round 0: the initial global model is plaintext). Only training rounds count (``task=train``,
    or no task, and an integer ``round``): cross-site evaluation's encrypt/decrypt lines are left out.
    """
    train = [e for e in events if e.get("task", "train") == "train" and isinstance(e.get("round"), int)]
    if not train:
        return {}
    out: dict = {}
    last_round = max(e["round"] for e in train)
    for stage in ("encrypt", "aggregate", "decrypt"):
        per_round: dict[int, float] = {}
        for e in train:
            if e.get("stage") == stage and isinstance(e.get("seconds"), float | int):
                per_round[e["round"]] = max(per_round.get(e["round"], 0.0), float(e["seconds"]))
        out[f"{stage}_s"] = [per_round.get(r) for r in range(last_round + 1)]
    client_enc = [
        e
        for e in train
        if e.get("stage") == "encrypt" and e.get("side") != "server" and isinstance(e.get("bytes"), int)
    ]
    if client_enc:
        first = min(client_enc, key=lambda e: (e["round"], str(e.get("side"))))
        out["update_bytes_encrypted"] = first["bytes"]
        plain = first.get("plain_bytes")
        if not isinstance(plain, int) and param_count:
            plain = 4 * param_count  # float32 weights
        out["update_bytes_plain"] = plain
        if isinstance(plain, int) and plain > 0:
            out["update_bytes_ratio"] = round(first["bytes"] / plain, 2)
    return out


def build_summary(
    *,
    settings: ExperimentSettings,
    job_id: str | None,
    status: str | None,
    sites: list[str],
    wall_time_s: float,
    progress: Progress,
    cross_site_results: dict | None,
    mlflow_info: dict | None,
    paths: dict[str, str],
    param_count: int | None = None,
    model_history: list[dict] | None = None,
) -> dict:
    cross_site = cross_site_by_model(cross_site_results or {})
    per_round = {
        str(r): {s: e.get("global_dice") for s, e in sorted(progress.per_round[r].items())}
        for r in sorted(progress.per_round)
    }
    if progress.final_dice:  # the last global model, scored as if round N started
        per_round[str(settings.rounds)] = dict(sorted(progress.final_dice.items()))
    summary = {
        "job_id": job_id,
        "job_name": settings.job_name,
        "status": status,
        "sites": sites,
        "rounds": settings.rounds,
        "local_epochs": settings.local_epochs,
        "quick": settings.quick,
        "data": str(settings.data) if settings.data else "synthetic",
        "wall_time_s": round(wall_time_s, 1),
        "round_times_s": progress.round_times(),
        "fl_round_s": progress.fl_round_times(),
        "site_work_s": progress.site_work_times(),
        "untrained_dice": progress.untrained_dice(),
        "devices": dict(sorted(progress.devices.items())),  # what each site trained on
        "gpu_peak_mb": dict(sorted(progress.gpu_peak_mb.items())),  # per site; empty when no site used a GPU
        "data_errors": progress.data_errors,
        "job_errors": progress.job_errors,  # the server's own: a job that could not resume
        "dropped": progress.dropped,  # rounds the server closed without a site's result
        "global_dice_per_round": per_round,
        "final_global_dice": cross_site.get(GLOBAL_MODEL, {}),
        **model_choice(model_history or []),
        "cross_site": cross_site,
        "mlflow": mlflow_info,
        "paths": paths,
    }
    summary.update(he_summary(progress.he_events, param_count))
    return summary


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


def problems(summary: dict, sites: list[str], terminal_ok: tuple[str, ...]) -> list[str]:
    """What makes a finished run a failure: a job that did not complete, or missing cross-site results."""
    # a site's own check of its cases, or a resume the server refused: the cause, so first
    found = list(summary.get("data_errors") or []) + list(summary.get("job_errors") or [])
    finished_all = len(summary.get("fl_round_s") or []) == summary.get("rounds")
    excused = summary.get("status_note") and finished_all  # see abandoned_upload
    if summary["status"] not in terminal_ok and not excused:
        found.append(f"job ended {summary['status']}")
    cross_site = summary["cross_site"]
    present = [s for s in sites if s not in {d["site"] for d in summary.get("dropped") or []}]  # dropped: reported
    if not cross_site:
        found.append("no cross-site results in the downloaded job")
    elif any(set(present) - set(v) for v in cross_site.values()) or GLOBAL_MODEL not in cross_site:
        found.append("the cross-site table is incomplete")
    tracked = tracked_sites(summary)
    if tracked is not None and set(sites) - tracked:
        found.append(f"no metrics of {', '.join(sorted(set(sites) - tracked))} in the tracking store")
    return found


def tracked_sites(summary: dict) -> set[str] | None:
    """Sites with a run (MLflow, W&B) or event files (TensorBoard); None where the summary says nothing of
    tracking."""
    if summary.get("tensorboard") is not None:
        return set(summary["tensorboard"].get("site_dirs") or {})
    if summary.get("wandb") is not None:
        return set(summary["wandb"].get("run_files") or {})
    if "mlflow" in summary:
        return set((summary["mlflow"] or {}).get("run_ids") or {})
    return None
