"""Learning-curve PNGs of the study, one per arm and data setting (Agg canvas, no pyplot state)."""

from __future__ import annotations

from pathlib import Path


def plot_arm_curves(
    curves: dict[str, list[dict]],
    path: Path,
    title: str,
    labels: dict[str, str] | None = None,
    xlabel: str = "epochs trained",
) -> Path:
    """Validation Dice against epochs trained, one line per curve (``{"epoch", "dice"}`` points); ``labels``
    renames curves in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, points in curves.items():
        points = [p for p in points if p.get("dice") is not None]
        if points:
            ax.plot(
                [p["epoch"] for p in points],
                [p["dice"] for p in points],
                marker="o",
                markersize=3,
                label=(labels or {}).get(name, name),
            )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.has_data():
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
