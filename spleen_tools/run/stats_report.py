"""The statistics job's results: ``stats.json`` (NVFlare's output as it came back), a table and a PNG per run.

NVFlare's ``JsonStatsFileWriter`` writes ``feature -> statistic -> site (and "Global") -> dataset -> value`` into
the server's job folder (``statistics/ct_stats.json``, downloaded with the job). A site whose privacy filter
withheld a feature sends its count only: the table shows ``withheld`` there and the PNG leaves the site out of that
panel. NVFlare's ``Global`` mean divides the sum of the sites that sent one by the count of *all* sites (so does its
spread), so the table's ``pooled`` row is the mean over the sites that sent theirs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from spleen_flare.ct_statistics import CASES, INTENSITY, INTENSITY_FEATURES
from spleen_tools.flare import TERMINAL_OK
from spleen_tools.run.settings import ExperimentError

if TYPE_CHECKING:
    from spleen_tools.flare import JobAdmin
    from spleen_tools.run.runner import Run

STATS_OUTPUT = "ct_stats.json"  # the job's writer output_path's name (jobs/spleen_ct_statistics)
STATS_FILE = "stats.json"
STATS_PNG = "stats.png"
GLOBAL = "Global"
# (feature, table column, decimals) in the printed table's order
COLUMNS = (
    ("spacing_x_mm", "dx mm", 2),
    ("spacing_y_mm", "dy mm", 2),
    ("spacing_z_mm", "dz mm", 2),
    ("size_z", "slices", 0),
    ("spleen_volume_ml", "spleen mL", 0),
    ("body_hu", "body HU", 0),
    ("spleen_hu", "spleen HU", 0),
)
DATASET = dict.fromkeys(INTENSITY_FEATURES, INTENSITY)  # the rest are per-case figures (CASES)
HU_PANELS = (("body_hu", "HU inside the body"), ("spleen_hu", "HU inside the spleen label"))
CASE_PANELS = (("spacing_z_mm", "slice spacing (mm)"), ("size_z", "slices"), ("spleen_volume_ml", "spleen (mL)"))


class StatsResultError(ValueError):
    """The job's statistics are missing or not what the job writes."""


def find_stats(download_dir: Path) -> Path:
    found = sorted(Path(download_dir).rglob(STATS_OUTPUT))
    if not found:
        raise StatsResultError(
            f"no {STATS_OUTPUT} in the downloaded job {download_dir}: the statistics workflow wrote nothing "
            "(see the server's log for the reason, e.g. fewer sites than min_clients sent statistics)"
        )
    return found[0]


def load_stats(path: Path) -> dict:
    try:
        stats = json.loads(Path(path).read_text())
    except ValueError as err:  # the server's output cut short or garbled: the run says so in one line
        raise StatsResultError(f"{path}: not JSON ({err}); download the job again") from None
    if not isinstance(stats, dict) or "size_z" not in stats or "count" not in stats["size_z"]:
        raise StatsResultError(f"{path}: not the statistics job's output (no size_z count)")
    return stats


def value(stats: dict, feature: str, statistic: str, site: str) -> float | None:
    """One site's (or ``Global``'s) figure, None where it was withheld or not computed."""
    dataset = DATASET.get(feature, CASES)
    found = stats.get(feature, {}).get(statistic, {}).get(site, {})
    return found.get(dataset) if isinstance(found, dict) else None


def sites_of(stats: dict) -> list[str]:
    return sorted(s for s in stats["size_z"]["count"] if s != GLOBAL)


def cases(stats: dict, site: str) -> int:
    return int(value(stats, "size_z", "count", site) or 0)


def pooled_mean(stats: dict, feature: str) -> float | None:
    """The mean over the cases of the sites that sent their sum (NVFlare's ``Global`` mean also counts the cases of
    sites that withheld it)."""
    sent = [(value(stats, feature, "sum", s), value(stats, feature, "count", s)) for s in sites_of(stats)]
    sent = [(total, n) for total, n in sent if total is not None and n]
    return sum(t for t, _ in sent) / sum(n for _, n in sent) if sent else None


def format_table(stats: dict) -> str:
    """Rows: sites, then the cases of the sites that sent figures, pooled; columns: cases, then each feature's mean
    (``withheld`` where the site's filter kept it)."""
    header = f"{'site':<10}{'cases':>6}" + "".join(f"{name:>11}" for _, name, _ in COLUMNS)
    lines = [header, "-" * len(header)]

    def row(name: str, count: int, means: list[float | None]) -> str:
        cells = [
            f"{'withheld':>11}" if m is None else f"{m:>11.{d}f}" for m, (_, _, d) in zip(means, COLUMNS, strict=True)
        ]
        return f"{name:<10}{count:>6}" + "".join(cells)

    sites = sites_of(stats)
    for site in sites:
        lines.append(row(site, cases(stats, site), [value(stats, f, "mean", site) for f, _, _ in COLUMNS]))
    sent = [s for s in sites if any(value(stats, f, "sum", s) is not None for f, _, _ in COLUMNS)]
    lines.append(row("pooled", sum(cases(stats, s) for s in sent), [pooled_mean(stats, f) for f, _, _ in COLUMNS]))
    return "\n".join(lines)


def histogram(stats: dict, feature: str, site: str) -> list[tuple[float, float, float]] | None:
    """``(low, high, count)`` per bin, or None where the site withheld it."""
    bins = value(stats, feature, "histogram", site)
    return [tuple(map(float, b[:3])) for b in bins] if bins else None


def write_stats_png(stats: dict, path: Path) -> Path:
    """Top: the HU histograms per site (each normalised to its own voxels), overlaid; bottom: per-case figures,
    each site's mean and standard deviation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3, squeeze=False)
    sites = sites_of(stats)
    for ax, (feature, title) in zip(axes[0], HU_PANELS, strict=False):
        for site in sites:
            bins = histogram(stats, feature, site)
            total = sum(b[2] for b in bins) if bins else 0
            if total:
                edges = [b[0] for b in bins] + [bins[-1][1]]
                ax.stairs([b[2] / total for b in bins], edges, label=f"{site} ({cases(stats, site)} cases)")
        ax.set_title(title)
        ax.set_xlabel("HU")
        ax.set_ylabel("share of voxels")
        ax.legend(fontsize=8)
    _withheld_note(axes[0][2], stats, sites)
    for ax, (feature, title) in zip(axes[1], CASE_PANELS, strict=True):
        for i, site in enumerate(sites):
            mean, sd = value(stats, feature, "mean", site), value(stats, feature, "stddev", site)
            if mean is not None:
                ax.errorbar([i], [mean], yerr=[sd or 0.0], fmt="o", capsize=6, label=site)
        ax.set_xticks(range(len(sites)), sites)
        ax.set_title(f"{title}: mean ± SD per site")
    fig.suptitle("Federated statistics of the sites' CT (no voxel left a site)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return Path(path)


def _withheld_note(ax, stats: dict, sites: list[str]) -> None:
    """The third top panel: what each site sent, in words."""
    ax.axis("off")
    lines = []
    for site in sites:
        kept = [f for f, _, _ in COLUMNS if value(stats, f, "mean", site) is None]
        sent = "everything asked" if not kept else f"its counts only for {', '.join(kept)}"
        lines.append(f"{site}: {cases(stats, site)} cases; sent {sent}")
    ax.text(0, 1, "\n".join(lines), va="top", fontsize=9, wrap=True)


def save_results(download_dir: Path, run_dir: Path) -> tuple[dict, Path, Path]:
    """``stats.json`` and ``stats.png`` in the run folder from the downloaded job: (stats, json path, png path)."""
    stats = load_stats(find_stats(download_dir))
    target = Path(run_dir) / STATS_FILE
    target.write_text(json.dumps(stats, indent=2) + "\n")
    return stats, target, write_stats_png(stats, Path(run_dir) / STATS_PNG)


def conclude_statistics(run: Run, admin: JobAdmin, job_id: str, status: str | None) -> None:
    """The statistics job's end: download it, write ``stats.json`` and ``stats.png``, print the table; a job that
    did not complete, or statistics without a site, fail the run."""
    run.enter("collecting statistics")
    say: Callable[[str], None] = run.out
    logs = f"logs: {run.run_dir / 'logs'}"
    if status not in TERMINAL_OK:
        raise ExperimentError(f"job {job_id} ended {status}: no statistics ({logs})")
    download_dir = admin.download(job_id, run.run_dir / "job_result")
    try:
        stats, json_path, png_path = save_results(download_dir, run.run_dir)
    except StatsResultError as err:
        raise ExperimentError(f"{err} ({logs})") from None
    say("")
    say("federated statistics (each site's mean over its cases; per-case spread and histograms in stats.json):")
    say(format_table(stats))
    say(f"statistics: {json_path}, {png_path}")
    missing = [s for s in run.system.site_names if s not in sites_of(stats)]
    if missing:
        raise ExperimentError(f"no statistics from {', '.join(missing)} in {json_path} ({logs})")
