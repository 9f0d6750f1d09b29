"""PNG plots of a finished run: per-site learning curves read back from MLflow, and the cross-site Dice heatmap.

A picture shows at a glance what summary.json and the printed table hold as numbers; Agg renders them headless.
"""

from __future__ import annotations

import math
from pathlib import Path

from spleen_flare.contract import GLOBAL_METRIC, KEY_METRIC
from spleen_tools.run.summary import RunSummary, Tracking
from spleen_tools.run.tracking import Curves, join_curves, mlflow_curves, tensorboard_curves
from spleen_tools.run.wandb_files import wandb_curves

TRAIN_LOSS = "train_loss_epoch"
CURVE_METRICS = (TRAIN_LOSS, KEY_METRIC, GLOBAL_METRIC)
# (metric, panel title, x label, y label, Dice axis)
PANELS = (
    (TRAIN_LOSS, "training loss", "epoch", "loss", False),
    (KEY_METRIC, "local validation Dice", "epoch", "Dice", True),
    (GLOBAL_METRIC, "global model Dice (start of round)", "round", "Dice", True),
)


def row_order(models: list[str]) -> list[str]:
    """Server models (``SRV_``) first, then the rest sorted: the order of the printed cross-site table."""
    return sorted(models, key=lambda m: (not m.startswith("SRV_"), m))


def _new_figure(figsize: tuple[float, float], ncols: int = 1):
    """A figure on the Agg canvas (no display, no pyplot state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_learning_curves(curves: Curves, path: Path, title: str = "") -> Path:
    """Three panels side by side (loss, local Dice, global Dice), one line per site."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _new_figure((15, 4.5), ncols=len(PANELS))
    for ax, (metric, panel_title, xlabel, ylabel, is_dice) in zip(axes, PANELS, strict=True):
        for site in sorted(curves):
            points = curves[site].get(metric) or []
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o", markersize=4, label=site)
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and rounds are whole numbers
        if is_dice:
            ax.set_ylim(0, 1)
        if ax.has_data():
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_cross_site_heatmap(
    cross_site: dict[str, dict[str, float]], sites: list[str], path: Path, title: str = ""
) -> Path:
    """Models as rows, sites as columns, Dice written in every cell (``-`` where missing)."""
    models = row_order(list(cross_site))
    values = [[cross_site[m].get(s, math.nan) for s in sites] for m in models]
    width = max(6.0, 2.0 + 1.4 * len(sites) + 0.08 * max((len(m) for m in models), default=0))
    fig, (ax,) = _new_figure((width, 1.5 + 0.6 * len(models)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sites)), labels=sites)
    ax.set_yticks(range(len(models)), labels=models)
    ax.set_xlabel("validation data of site")
    ax.set_ylabel("model")
    for i, row in enumerate(values):
        for j, dice in enumerate(row):
            missing = math.isnan(dice)
            color = "black" if missing or dice > 0.6 else "white"  # readable on viridis' dark and light ends
            ax.text(j, i, "-" if missing else f"{dice:.4f}", ha="center", va="center", color=color)
    fig.colorbar(image, ax=ax, label="Dice")
    ax.set_title(title or "cross-site validation (Dice)")
    fig.tight_layout()
    return _save(fig, path)


def read_curves(summary: RunSummary) -> Curves:
    """The sites' series from where the run tracked them (MLflow server or store, TensorBoard or W&B files)."""
    tracking = summary.tracking or Tracking()
    mlflow_info = tracking.mlflow or {}
    if mlflow_info.get("run_ids"):
        curves = mlflow_curves(mlflow_info["tracking_uri"], mlflow_info["run_ids"], CURVE_METRICS)
        for resumed in reversed(summary.resumed):  # the jobs lost with a restarted server, first
            lost = mlflow_curves(
                mlflow_info["tracking_uri"], resumed.get("lost_job_mlflow_run_ids") or {}, CURVE_METRICS
            )
            curves = join_curves(lost, curves)
        return curves
    run_files = (tracking.wandb or {}).get("run_files")
    if run_files:
        return wandb_curves(run_files, CURVE_METRICS)
    site_dirs = (tracking.tensorboard or {}).get("site_dirs")
    return tensorboard_curves(site_dirs, CURVE_METRICS) if site_dirs else {}


def write_run_plots(run_dir: Path, summary: RunSummary) -> dict[str, Path]:
    """Both plots into the run folder; one without data (no MLflow runs, no cross-site results) is skipped."""
    run_dir = Path(run_dir)
    curves = read_curves(summary)
    written: dict[str, Path] = {}
    if curves:
        written["learning_curves"] = plot_learning_curves(curves, run_dir / "learning_curves.png", "learning curves")
    if summary.cross_site:
        written["cross_site_heatmap"] = plot_cross_site_heatmap(
            summary.cross_site, summary.sites, run_dir / "cross_site_heatmap.png"
        )
    return written
