"""Where a run's metrics went, and reading them back: an MLflow server, the job's own MLflow SQLite store, or
TensorBoard event files (``--tracking server|workspace|tensorboard``; see ``spleen_tools.jobs.TRACKING_MODES``)."""

from __future__ import annotations

import re
from pathlib import Path

from spleen_tools.jobs import TB_FOLDER

WORKSPACE_STORE = "mlflow.db"  # NVFlare 2.9's MLflowReceiver without tracking_uri: <job result>/mlflow.db
Curves = dict[str, dict[str, list[tuple[int, float]]]]  # {site: {metric: [(step, value), ...]}}
SITE_IN_RUN_NAME = re.compile(r"(site-\d+)")  # NVFlare names a site's run "<site>-<job id>-<run name>"


def mlflow_runs(url: str, experiment_name: str, job_id: str | None, sites: list[str]) -> dict:
    """The experiment and each site's run of this job, for summary.json."""
    import mlflow

    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return {"tracking_uri": url, "experiment_name": experiment_name, "experiment_id": None, "run_ids": {}}
    run_ids = {}
    for run in client.search_runs([experiment.experiment_id]):
        if job_id and run.data.tags.get("job_id") not in (None, job_id):
            continue
        match = SITE_IN_RUN_NAME.search(run.info.run_name or "")
        if match and match.group(1) in sites:
            run_ids[match.group(1)] = run.info.run_id
    return {
        "tracking_uri": url,
        "experiment_name": experiment_name,
        "experiment_id": experiment.experiment_id,
        "run_ids": run_ids,
    }


def charts_url(mlflow_info: dict) -> str | None:
    """The experiment's runs as charts (MLflow 3's compare-runs chart view), for an MLflow server."""
    uri, experiment_id = mlflow_info.get("tracking_uri") or "", mlflow_info.get("experiment_id")
    if not uri.startswith("http") or experiment_id is None:
        return None
    return f"{uri}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART"


def workspace_store(download_dir: Path) -> str | None:
    """The SQLite URI of the MLflow store that came back with the downloaded job, if any."""
    found = sorted(Path(download_dir).rglob(WORKSPACE_STORE))
    return f"sqlite:///{found[0].resolve()}" if found else None


def tensorboard_dirs(download_dir: Path, sites: list[str]) -> dict[str, str]:
    """Each site's TensorBoard event folder in the downloaded job (``tb_events/<site>/``)."""
    found = {}
    for folder in sorted(Path(download_dir).rglob(TB_FOLDER)):
        for site in sites:
            if (folder / site).is_dir():
                found.setdefault(site, str(folder / site))
    return found


def mlflow_curves(tracking_uri: str, run_ids: dict[str, str], metrics: tuple[str, ...]) -> Curves:
    """Each site's series, sorted by step, through the MLflow client (a server URL or a SQLite URI)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    return {
        site: {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name)) for name in metrics}
        for site, run_id in sorted(run_ids.items())
    }


def tensorboard_curves(site_dirs: dict[str, str], metrics: tuple[str, ...]) -> Curves:
    """Each site's series, sorted by step, through TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: Curves = {}
    for site, folder in sorted(site_dirs.items()):
        events = EventAccumulator(folder, size_guidance={"scalars": 0})
        events.Reload()
        tags = set(events.Tags().get("scalars", []))
        curves[site] = {
            name: sorted((e.step, e.value) for e in events.Scalars(name)) if name in tags else [] for name in metrics
        }
    return curves


def join_curves(earlier: Curves, later: Curves) -> Curves:
    """A job lost with its server, then the job that resumed it: each series is the earlier job's points before
    the later job's first step, then the later job's (a round run again counts once, as the later job ran it)."""
    joined: Curves = {}
    for site in sorted(set(earlier) | set(later)):
        before, after = earlier.get(site, {}), later.get(site, {})
        joined[site] = {}
        for name in sorted(set(before) | set(after)):
            points = after.get(name) or []
            first = points[0][0] if points else float("inf")
            joined[site][name] = [p for p in before.get(name) or [] if p[0] < first] + list(points)
    return joined
