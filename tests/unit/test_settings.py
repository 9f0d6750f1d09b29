"""The one command's settings: what they put into the job copy, and the options they refuse."""

from __future__ import annotations

import pytest

from spleen_tools.jobs import JOB_NAMES, JOB_VARIANTS, JOBS_DIR
from spleen_tools.run.settings import ExperimentSettings, SettingsError


def test_one_job_registry_names_every_job_folder():
    assert JOB_NAMES == tuple(JOB_VARIANTS.values())
    assert all((JOBS_DIR / name / "meta.json").is_file() for name in JOB_NAMES)
    assert ExperimentSettings(job="he").job_name == "spleen_ct_segmentation_he"


def test_the_job_copy_gets_the_runs_fl_knobs():
    s = ExperimentSettings(job="he", sites=3, rounds=4, local_epochs=2, quick=False, site_timeout=90, tracking="wandb")
    job = s.job_settings(tracking_uri="http://127.0.0.1:5000", resume_from="abc", env={})
    assert (job.rounds, job.local_epochs, job.min_clients, job.site_timeout, job.quick) == (4, 2, 3, 90, False)
    assert (job.tracking, job.tracking_uri, job.experiment_name) == ("wandb", "http://127.0.0.1:5000", s.job_name)
    assert (job.resume_from, job.ship_code, job.wandb_mode, job.wandb_project) == ("abc", False, "offline", None)
    assert ExperimentSettings(sites=3, min_clients=2).job_settings(env={}).min_clients == 2


def test_wandb_goes_online_only_with_both_of_its_own_variables():
    s = ExperimentSettings(tracking="wandb")
    assert s.job_settings(env={"WANDB_PROJECT": "p"}).wandb_mode == "offline"
    online = s.job_settings(env={"WANDB_PROJECT": "p", "WANDB_API_KEY": "k"})
    assert (online.wandb_mode, online.wandb_project) == ("online", "p")


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"job": "fancy"}, "--job must be one of local, he"),
        ({"gpus": (0, 1, 2)}, "give one GPU id for all sites or one per site (2)"),
        ({"gpus": (-1,)}, "GPU ids are 0 or more"),
        ({"ship_code": True, "secure": True}, "--ship-code is for development on POC only"),
        ({"tracking": "csv"}, "--tracking must be one of"),
        ({"synthetic_cases": 3}, "too few for 2 sites"),
        ({"job": "local", "stats_min_count": 3}, "--stats-min-count 3: a number of cases, at least 1, for --job stats"),
        ({"job": "he", "stats_min_count": 3}, "for --job stats only"),
        ({"job": "stats", "stats_min_count": 0}, "--stats-min-count 0: a number of cases, at least 1"),
    ],
)
def test_bad_settings_are_refused_naming_the_option(changes, needle):
    with pytest.raises(SettingsError) as err:
        ExperimentSettings(**changes).validate()
    assert needle in str(err.value)


def test_the_statistics_job_trains_nothing_and_takes_its_minimum_count():
    s = ExperimentSettings(job="stats", sites=3, stats_min_count=4)
    s.validate()
    assert s.job_name == "spleen_ct_statistics" and not s.trains
    assert ExperimentSettings(job="local").trains and ExperimentSettings(job="he").trains
    job = s.job_settings(env={})
    assert (job.stats_min_count, job.min_clients) == (4, 3)
    assert ExperimentSettings(job="stats").job_settings(env={}).stats_min_count is None  # the job's own (3)


def test_the_command_line_takes_the_statistics_job():
    from spleen_tools.cli.run_experiment import build_parser

    args = build_parser().parse_args(["--job", "stats", "--stats-min-count", "4"])
    assert (args.job, args.stats_min_count) == ("stats", 4)
    assert build_parser().parse_args([]).stats_min_count is None
