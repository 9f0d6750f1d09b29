"""Queries of the MLflow tracking server a run streamed to."""

from __future__ import annotations

import re


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
        match = re.search(r"(site-\d+)", run.info.run_name or "")
        if match and match.group(1) in sites:
            run_ids[match.group(1)] = run.info.run_id
    return {
        "tracking_uri": url,
        "experiment_name": experiment_name,
        "experiment_id": experiment.experiment_id,
        "run_ids": run_ids,
    }
