"""What a site allows: its allow-list covers exactly what our jobs name, NVFlare's own authorizer reads it from the
kit, BYOC is taken from every role, and the privacy scope holds the site's filters."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from nvflare.apis.fl_exception import UnsafeComponentError
from nvflare.apis.workspace import Workspace as NVFlareWorkspace
from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer
from nvflare.fuel.sec.authz import AuthzContext, Person
from nvflare.private.fed.app.fl_conf import create_privacy_manager
from nvflare.security.security import FLAuthorizer

from spleen_flare.stats_privacy import CTStatisticsPrivacy
from spleen_tools.algorithms import algorithm_names
from spleen_tools.jobs import JOB_VARIANTS, STATS_JOB, STATS_PRIVACY_FILTER, TRACKING_MODES, JobSettings, prepare_job
from spleen_tools.paths import JOBS_DIR
from spleen_tools.systems.site_policy import (
    HE_FILTERS,
    JOB_LOG_STREAMER,
    SCOPE,
    SERVER_CLASSES,
    SITE_CLASSES,
    SitePolicy,
    kit_policy,
    site_privacy,
    write_server_policy,
    write_site_policy,
)

JOBS = sorted(p.name for p in JOBS_DIR.iterdir() if (p / "meta.json").is_file())


def paths(node) -> set[str]:
    if isinstance(node, dict):
        found = {node["path"]} if isinstance(node.get("path"), str) and "." in node["path"] else set()
        return found.union(*(paths(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(paths(v) for v in node)) if node else set()
    return set()


def kit(tmp_path: Path, name: str) -> Path:
    local = tmp_path / name / "local"
    local.mkdir(parents=True)
    (local / "resources.json.default").write_text(json.dumps({"format_version": 2, "components": []}))
    return tmp_path / name


class Workspace:
    """What the authorizer asks of NVFlare's workspace: the site's resources file."""

    def __init__(self, resources: Path) -> None:
        self.resources = resources

    def get_resources_file_path(self) -> str:
        return str(self.resources)


@pytest.mark.parametrize("tracking", TRACKING_MODES)
@pytest.mark.parametrize("job", JOBS)
def test_the_allow_lists_cover_every_class_the_jobs_name(job, tracking, tmp_path):
    config = prepare_job(job, tmp_path, JobSettings(tracking=tracking)) / "app" / "config"
    client = paths(json.loads((config / "config_fed_client.json").read_text()))
    server = paths(json.loads((config / "config_fed_server.json").read_text()))
    assert client <= set(SITE_CLASSES), client - set(SITE_CLASSES)
    assert server <= set(SERVER_CLASSES), server - set(SERVER_CLASSES)


def test_the_allow_lists_cover_the_statistics_job_and_its_filter():
    """The parametrised test above walks every job folder, filters included: here, that it has the statistics job's."""
    assert STATS_JOB in JOBS
    client = json.loads((JOBS_DIR / STATS_JOB / "app" / "config" / "config_fed_client.json").read_text())
    filters = {f["path"] for entry in client["task_result_filters"] for f in entry["filters"]}
    assert filters == {STATS_PRIVACY_FILTER} and filters <= paths(client) <= set(SITE_CLASSES)
    assert "spleen_flare.ct_statistics.SpleenCTStatistics" in paths(client)


def test_a_site_allows_no_class_that_runs_what_a_job_names():
    """ClientAPIExecutor runs any command (external_process) or script: only our pinned executor is allowed."""
    assert not [c for c in SITE_CLASSES if c.endswith("ClientAPIExecutor") or c.endswith("LauncherExecutor")]
    assert all(not c.endswith(".") for c in (*SITE_CLASSES, *SERVER_CLASSES)), "classes, not package prefixes"


def test_nvflare_enforces_the_written_allow_list(tmp_path):
    site = kit(tmp_path, "site-1")
    write_site_policy(site)
    authorizer, workspace = ComponentPathAuthorizer(), Workspace(site / "local" / "resources.json")
    authorizer.authorize_component_config({"path": SITE_CLASSES[0]}, workspace=workspace)
    for outside in (
        "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
        "spleen_flare.workflows.ScatterAndGather",  # a server class is not a site's
        "os.system",
    ):
        with pytest.raises(UnsafeComponentError, match="not in allow_list"):
            authorizer.authorize_component_config({"path": outside}, workspace=workspace)
    server = kit(tmp_path, "server")
    write_server_policy(server)
    resources = json.loads((server / "local" / "resources.json").read_text())
    assert resources["class_allow_list"] == list(SERVER_CLASSES) and resources["format_version"] == 2
    assert json.loads((server / "local" / "authorization.json").read_text())["permissions"]["lead"]["byoc"] == "none"


@pytest.mark.parametrize("allow_byoc", [False, True])
def test_byoc_is_refused_for_every_role_unless_the_site_allows_it(tmp_path, allow_byoc):
    site = kit(tmp_path, "site-1")
    write_site_policy(site, SitePolicy(allow_byoc=allow_byoc))
    policy = json.loads((site / "local" / "authorization.json").read_text())
    authorizer = FLAuthorizer("nvidia", policy)
    for role in ("project_admin", "org_admin", "lead", "member"):
        person = Person("admin@nvidia.com", "nvidia", role)
        allowed, _ = authorizer.authorize(AuthzContext(right="byoc", user=person, submitter=person))
        assert allowed is (allow_byoc and role in ("project_admin", "lead")), role
    person = Person("admin@nvidia.com", "nvidia", "project_admin")
    assert authorizer.authorize(AuthzContext(right="submit_job", user=person, submitter=person))[0]


def test_privacy_scope_is_the_only_and_default_one():
    assert site_privacy(SitePolicy()) is None
    both = site_privacy(SitePolicy(encrypt_results=True, keep_local_model=True))
    assert both["default_scope"] == SCOPE and [s["name"] for s in both["scopes"]] == [SCOPE]
    results = [f["path"] for f in both["scopes"][0]["task_result_filters"]]
    assert results == ["spleen_flare.site_filters.KeepLocalModel", "spleen_flare.site_filters.SiteHEEncryptor"]
    assert paths(both) <= set(SITE_CLASSES)


def test_a_site_without_privacy_choices_has_no_privacy_file(tmp_path):
    site = kit(tmp_path, "site-1")
    write_site_policy(site, SitePolicy(keep_local_model=True))
    assert (site / "local" / "privacy.json").is_file()
    write_site_policy(site, SitePolicy())
    assert not (site / "local" / "privacy.json").exists()


def test_a_shipped_code_job_differs_from_the_default_by_custom_only(tmp_path):
    default = prepare_job("spleen_ct_segmentation_local", tmp_path / "a")
    shipped = prepare_job("spleen_ct_segmentation_local", tmp_path / "b", JobSettings(ship_code=True))
    rel = {p.relative_to(shipped).parts[:2] for p in shipped.rglob("*") if p.is_file()}
    assert ("app", "custom") in rel
    assert {p.relative_to(default) for p in default.rglob("*.json")} == {
        p.relative_to(shipped) for p in shipped.rglob("*.json") if "custom" not in p.parts
    }


def test_the_site_admin_command_writes_and_shows_its_own_kit(tmp_path, capsys):
    from spleen_tools.cli.site_policy import main

    site = kit(tmp_path, "site-1")
    (site / "startup").mkdir()
    (site / "startup" / "fed_client.json").write_text("{}")
    assert main([str(site), "--encrypt-results"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 3)[-1])
    assert shown["privacy_default_scope"] == SCOPE and shown["byoc"]["project_admin"] == "none"
    assert shown["privacy_filters"] == [
        f["path"] for f in (*HE_FILTERS["task_data_filters"], *HE_FILTERS["task_result_filters"])
    ]
    before = {p.name: p.read_text() for p in (site / "local").iterdir()}
    assert main([str(site), "--show"]) == 0 and before == {p.name: p.read_text() for p in (site / "local").iterdir()}
    assert main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


STATS_DEFAULTS = {"min_count": 3, "max_bins_percent": 50, "min_noise_level": 0.1, "max_noise_level": 0.3}


def test_a_sites_statistics_thresholds_are_its_first_result_filter():
    privacy = site_privacy(SitePolicy(stats_min_count=10))
    assert privacy["default_scope"] == SCOPE and [s["name"] for s in privacy["scopes"]] == [SCOPE]
    (scope,) = privacy["scopes"]
    assert scope["task_result_filters"] == [{"path": STATS_PRIVACY_FILTER, "args": {**STATS_DEFAULTS, "min_count": 10}}]
    assert scope["task_data_filters"] == []
    bins = site_privacy(SitePolicy(stats_max_bins_percent=20))["scopes"][0]["task_result_filters"]
    assert bins == [{"path": STATS_PRIVACY_FILTER, "args": {**STATS_DEFAULTS, "max_bins_percent": 20}}]
    everything = site_privacy(SitePolicy(encrypt_results=True, keep_local_model=True, stats_min_count=10))
    (scope,) = everything["scopes"]
    assert [f["path"] for f in scope["task_result_filters"]] == [
        STATS_PRIVACY_FILTER,
        "spleen_flare.site_filters.KeepLocalModel",
        *(f["path"] for f in HE_FILTERS["task_result_filters"]),
    ]
    assert scope["task_data_filters"] == HE_FILTERS["task_data_filters"]
    assert paths(everything) <= set(SITE_CLASSES)


def test_nvflare_builds_the_sites_statistics_filter_from_its_privacy_file(tmp_path):
    site = kit(tmp_path, "site-1")
    (site / "startup").mkdir()  # NVFlare's workspace needs one
    write_site_policy(site, SitePolicy(encrypt_results=True, stats_min_count=10, stats_max_bins_percent=20))
    assert kit_policy(site)["privacy_filters"][-2:] == [
        STATS_PRIVACY_FILTER,
        *(f["path"] for f in HE_FILTERS["task_result_filters"]),
    ]
    # what NVFlare's client does for each job it runs: the default scope's filters, built
    scope = create_privacy_manager(NVFlareWorkspace(str(site), "site-1"), names_only=False).default_scope
    stats, *he = scope.task_result_filters["out"]
    assert isinstance(stats, CTStatisticsPrivacy) and len(he) == len(HE_FILTERS["task_result_filters"])
    assert (stats.cleansers[0].min_count, stats.cleansers[1].max_bins_percent) == (10, 20)


@pytest.mark.parametrize("args", [{"stats_min_count": -1}, {"stats_max_bins_percent": 150}])
def test_thresholds_nvflare_refuses_are_refused_before_they_are_written(tmp_path, args):
    """A privacy.json whose filter cannot be built fails every job at the site, training jobs as well."""
    with pytest.raises(ValueError):
        SitePolicy(**args)


def test_the_site_admin_command_writes_the_statistics_thresholds(tmp_path, capsys):
    from spleen_tools.cli.site_policy import main

    site = kit(tmp_path, "site-1")
    (site / "startup").mkdir()
    (site / "startup" / "fed_client.json").write_text("{}")
    assert main([str(site), "--stats-min-count", "6", "--stats-max-bins-percent", "25"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 3)[-1])
    assert shown["privacy_filters"] == [STATS_PRIVACY_FILTER]
    privacy = json.loads((site / "local" / "privacy.json").read_text())
    (stats,) = privacy["scopes"][0]["task_result_filters"]
    assert stats["args"] == {**STATS_DEFAULTS, "min_count": 6, "max_bins_percent": 25}
    before = (site / "local" / "privacy.json").read_text()
    assert main([str(site), "--stats-max-bins-percent", "150"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "150" in err
    assert (site / "local" / "privacy.json").read_text() == before  # the kit keeps its last good policy


@pytest.mark.parametrize("algorithm", algorithm_names())
def test_the_allow_lists_cover_every_algorithm(algorithm, tmp_path):
    for job in (JOB_VARIANTS["local"], JOB_VARIANTS["he"]):
        try:
            config = prepare_job(job, tmp_path / job, JobSettings(algorithm=algorithm)) / "app" / "config"
        except ValueError as err:  # refused under HE, saying why
            assert job == JOB_VARIANTS["he"] and "does not run in the HE job" in str(err)
            continue
        assert paths(json.loads((config / "config_fed_client.json").read_text())) <= set(SITE_CLASSES)
        assert paths(json.loads((config / "config_fed_server.json").read_text())) <= set(SERVER_CLASSES)


def test_the_allow_lists_name_no_class_that_no_job_or_policy_uses(tmp_path):
    """Exactly our classes: every one on the lists is named by a job (any tracking, any algorithm) or a site policy,
    or added by NVFlare's own log streaming."""
    client, server = {JOB_LOG_STREAMER}, {JOB_LOG_STREAMER}
    for n, (job, tracking, algorithm) in enumerate(itertools.product(JOBS, TRACKING_MODES, algorithm_names())):
        try:
            config = prepare_job(job, tmp_path / str(n), JobSettings(tracking=tracking, algorithm=algorithm))
        except ValueError:  # an algorithm refused under HE
            continue
        client |= paths(json.loads((config / "app" / "config" / "config_fed_client.json").read_text()))
        server |= paths(json.loads((config / "app" / "config" / "config_fed_server.json").read_text()))
    client |= paths(site_privacy(SitePolicy(encrypt_results=True, keep_local_model=True, stats_min_count=3)))
    assert set(SITE_CLASSES) == client and set(SERVER_CLASSES) == server
