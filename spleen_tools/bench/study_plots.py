"""The study's PNGs (Agg canvas, no pyplot state): learning curves per arm, seed and setting; a Dice chart per
setting."""

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


def plot_summary(
    summary: dict[str, dict[str, dict]], models: list[str], columns: list[str], path: Path, title: str
) -> Path:
    """Bars of each model's mean Dice per column (the sites' validation, held-out), whiskers from the lowest to the
    highest seed's; a cell without a score gets no bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(7.5, 0.5 * len(columns) * len(models)), 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        xs, means, low, high = [], [], [], []
        for j, column in enumerate(columns):
            cell = summary.get(model, {}).get(column, {})
            if cell.get("mean") is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            means.append(cell["mean"])
            low.append(cell["mean"] - cell["min"])
            high.append(cell["max"] - cell["mean"])
        if xs:
            ax.bar(xs, means, width=width, yerr=[low, high], capsize=3, label=model)
    ax.set_xticks(range(len(columns)), [c.replace("_", "-") if c == "held_out" else f"{c} val" for c in columns])
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    if ax.has_data():  # below the axes: bars reach the top
        ax.legend(fontsize=8, ncols=min(4, len(models)), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
