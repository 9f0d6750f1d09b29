"""``summary.json``: what a finished run measured, from its progress events and the downloaded job."""

from __future__ import annotations

from spleen_tools.job_result import GLOBAL_MODEL, cross_site_by_model, model_choice
from spleen_tools.run.progress import Progress
from spleen_tools.run.settings import ExperimentSettings


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
