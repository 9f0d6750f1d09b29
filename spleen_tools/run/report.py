"""What the one command prints: numbers, times, the cross-site table and the closing report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from spleen_flare.contract import KEY_METRIC
from spleen_tools.run.formatting import clock_time, fmt, mmss
from spleen_tools.run.summary import SUMMARY_FILE, RunSummary, Tracking
from spleen_tools.run.tracking import charts_url

SEGMENTS_AT = 0.8  # Dice at which we call the model's masks a segmentation of the spleen


def segments_note(dice: float | None) -> str:
    """Whether a Dice value means the model segments the spleen (the demo's bar), for the report line."""
    if not isinstance(dice, float | int):
        return ""
    return f" (segments: Dice >= {SEGMENTS_AT})" if dice >= SEGMENTS_AT else f" (does not segment yet: < {SEGMENTS_AT})"


def format_cross_site_table(cross_site: dict[str, dict[str, float]], sites: list[str]) -> str:
    """Rows: models, columns: sites, Dice with 4 decimals (``-`` where missing)."""
    models = sorted(cross_site, key=lambda m: (not m.startswith("SRV_"), m))
    width = max([len("model"), *map(len, models)])
    header = "model".ljust(width) + "".join(f"  {s:>8}" for s in sites)
    lines = [header, "-" * len(header)]
    for model in models:
        cells = "".join(f"  {cross_site[model][s]:8.4f}" if s in cross_site[model] else f"  {'-':>8}" for s in sites)
        lines.append(model.ljust(width) + cells)
    return "\n".join(lines)


def report(summary: RunSummary, sites: list[str], out: Callable[[str], None]) -> None:
    out("")
    out("cross-site validation (Dice, rows: models, columns: sites):")
    out(format_cross_site_table(summary.cross_site, sites))
    untrained, final = summary.untrained_dice, summary.final_global_dice
    rounds = max((int(r) for r in summary.global_dice_per_round), default=summary.rounds)  # a DP budget may end early
    if untrained or final:
        out("")
        out("global model Dice on each site's validation data:")
        for site in sites:
            out(
                f"  {site}: untrained {fmt(untrained.get(site))} -> "
                f"after {rounds} rounds {fmt(final.get(site))}{segments_note(final.get(site))}"
            )
    best, last = summary.best_model, summary.final_model
    if best:
        is_last = last and best.get("sha256") == last.get("sha256")
        which = "the final one" if is_last else f"the one after round {best['round'] + 1}"
        out(f"  best global model: {which} (mean validation Dice {fmt(best.get(KEY_METRIC))})")
    report_dp(summary.dp, out)
    report_dropped(summary.dropped, out)
    if summary.status_note:
        out(f"  job status {summary.status}: {summary.status_note}")
    out("")
    report_costs(summary, out)
    report_tracking(summary.tracking or Tracking(), out)
    for name, path in summary.plots.items():
        out(f"{name.replace('_', ' ')}: {path}")
    out(f"summary: {summary.paths['run_dir']}/{SUMMARY_FILE}")


def report_costs(summary: RunSummary, out: Callable[[str], None]) -> None:
    """Wall time, round times, memory and, for an HE job, what encryption costs."""
    out(f"wall time {mmss(summary.wall_time_s)}; round times (s): {summary.round_times_s}")
    if summary.fl_round_s:
        out(
            f"server round times (s): {summary.fl_round_s}; slowest site's own work per round (validation + "
            f"training, s): {summary.site_work_s}"
        )
    if summary.gpu_peak_mb:
        out("peak GPU memory per site: " + ", ".join(f"{s} {mb:.0f} MB" for s, mb in summary.gpu_peak_mb.items()))
    if summary.server_peak_memory_mb:
        out(f"server peak memory (server + job process, resident): {summary.server_peak_memory_mb:.0f} MB")
    he = summary.he
    if he and he.update_bytes_encrypted:
        plain = he.update_bytes_plain
        ratio = f" = {he.update_bytes_ratio}x the plaintext {plain / 1e6:.1f} MB" if plain else ""
        out(
            f"HE: one client update {he.update_bytes_encrypted / 1e6:.1f} MB{ratio}; per round (s): "
            f"encrypt {he.encrypt_s}, aggregate {he.aggregate_s}, decrypt {he.decrypt_s}"
        )


def report_dp(dp: dict | None, out: Callable[[str], None]) -> None:
    """What each site's updates reveal about any one of its training cases, at the end."""
    if not dp:
        return
    sites = ", ".join(f"{s} {eps:.2f} ({dp['steps'].get(s)} steps)" for s, eps in dp["final_epsilon"].items())
    out(f"  differential privacy (per training case, delta {dp['delta']}): epsilon {sites}")


def report_dropped(dropped: list[dict], out: Callable[[str], None]) -> None:
    """Which sites the server went on without, from which round, and when it first noticed."""
    by_site: dict[str, list[dict]] = {}
    for event in dropped:
        by_site.setdefault(event["site"], []).append(event)
    for site, events in sorted(by_site.items()):
        rounds = ", ".join(str(e["round"] + 1) for e in events if isinstance(e.get("round"), int))
        first = events[0]
        when = clock_time(first.get("at"))
        out(
            f"  dropped: {site} sent no training result in round(s) {rounds} (first noticed {when}, after the "
            f"server waited {(first.get('waited_s') or 0):.0f} s); the results above are without it"
        )


def report_tracking(tracking: Tracking, out: Callable[[str], None]) -> None:
    """Where the metrics are and how to look at them: the MLflow charts URL, or the command for a file store."""
    m, tb = tracking.mlflow, tracking.tensorboard
    if m:
        out(f"MLflow: {m['tracking_uri']} experiment {m['experiment_name']!r} (id {m['experiment_id']})")
        url = charts_url(m)
        if url:
            out(f"  charts of the sites' runs: {url}")
        elif m["tracking_uri"].startswith("sqlite:"):
            out(f"  view: .venv/bin/mlflow ui --backend-store-uri {m['tracking_uri']}")
    if tb:
        dirs = sorted((tb.get("site_dirs") or {}).values())
        if dirs:
            out(f"TensorBoard event files: {', '.join(dirs)}")
            out(f"  view: .venv/bin/tensorboard --logdir {Path(dirs[0]).parent}")
    if tracking.wandb:
        report_wandb(tracking.wandb, out)


def report_wandb(wandb: dict, out: Callable[[str], None]) -> None:
    """The W&B runs, why they stayed offline if online was asked for, and the command that uploads them."""
    if wandb.get("failed_login"):
        out(f"W&B: {wandb['failed_login']}")
    for problem in wandb.get("unreadable") or []:
        out(f"W&B: {problem}")
    files = sorted((wandb.get("run_files") or {}).values())
    if files:
        online = wandb.get("mode") == "online" and not wandb.get("failed_login")
        out(f"W&B {'runs (also online)' if online else 'offline runs'}: {', '.join(files)}")
        if not online:
            out(f"  upload (after `.venv/bin/wandb login`): {wandb['sync']}")


def report_still_running(run_dir, secure: bool, mlflow_pid: int | None, out: Callable[[str], None]) -> None:
    """How to stop what ``--keep-running`` left up."""
    out("")
    system = "the secure system" if secure else "POC"
    kept = f"{system} and MLflow stay" if mlflow_pid else f"{system} stays"
    out(f"still running (--keep-running): {kept} up. Stop with:")
    out(f"  ./run_experiment.sh --stop {run_dir}")
    if not secure:
        out(
            f"  (or by hand: HOME={run_dir}/nvflare_home NVFLARE_POC_WORKSPACE={run_dir}/poc "
            f".venv/bin/nvflare poc stop" + (f"; kill -TERM -- -{mlflow_pid})" if mlflow_pid else ")")
        )
