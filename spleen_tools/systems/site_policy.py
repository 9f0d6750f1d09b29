"""What each participant allows, written into its kit's ``local/`` folder: the site's own decision, not the job's.

- ``resources.json``: NVFlare 2.9's ``class_allow_list``, exactly the classes our jobs name on that side. A job that
  names any other class is refused when its components are built. A site's list has no ``ClientAPIExecutor``: that
  one runs any command or script a job names; ``SiteTrainingExecutor`` runs only the installed training script.
- ``authorization.json`` (sites, and the server): NVFlare's default policy with the ``byoc`` right taken from every
  role, so a job that carries code (``app/custom``) is refused at deployment and the allow-list cannot be bypassed.
  Each site decides on its own: a server that accepts such a job still cannot make a site run it.
- ``privacy.json`` (sites that ask for it): one scope, the default, so it applies whatever the job says: the HE
  filters (the site encrypts what it sends), ``KeepLocalModel`` (no local model leaves in cross-site evaluation)
  and/or ``CTStatisticsPrivacy`` with the site's own minimum count and bins share for the statistics job. A job
  naming another scope is refused by NVFlare.

Provisioning writes these with :class:`SitePolicyBuilder` (``workspaces/secure_project.yml``); the one command writes
them into the POC kits it prepares (:func:`write_poc_policies`). docs/secure_and_he.md has the table of what a site
admin controls and how to check it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nvflare.lighter.constants import ProvFileName
from nvflare.lighter.entity import Project
from nvflare.lighter.spec import Builder

from spleen_flare.stats_privacy import DEFAULTS as STATS_PRIVACY_DEFAULTS
from spleen_flare.stats_privacy import CTStatisticsPrivacy
from spleen_tools.jobs import STATS_PRIVACY_FILTER, TB_RECEIVER, WANDB_RECEIVER_PATH

# NVFlare's site log streaming adds it to every job's config (the site's own SiteLogStreamer, not the job).
JOB_LOG_STREAMER = "nvflare.app_common.logging.job_log_streamer.JobLogStreamer"
# Exactly what the jobs' config JSON and the site policies name (tests/unit/test_site_policy.py checks both lists).
SITE_CLASSES = (
    "spleen_flare.site_executor.SiteTrainingExecutor",
    "spleen_flare.he.filters.PackedHEDecryptor",
    "spleen_flare.he.filters.PackedHEEncryptor",
    "spleen_flare.site_filters.SiteHEEncryptor",
    "spleen_flare.site_filters.SiteHEDecryptor",
    "spleen_flare.site_filters.KeepLocalModel",
    "nvflare.app_common.widgets.metric_relay.MetricRelay",
    "nvflare.app_common.executors.statistics.statistics_executor.StatisticsExecutor",
    "spleen_flare.ct_statistics.SpleenCTStatistics",
    STATS_PRIVACY_FILTER,
    JOB_LOG_STREAMER,
)
SERVER_CLASSES = (
    "spleen_flare.workflows.ScatterAndGather",
    "spleen_flare.workflows.CrossSiteModelEval",
    "spleen_flare.final_validation.FinalGlobalValidation",
    "spleen_flare.persistor.BundleModelPersistor",
    "spleen_flare.fedopt.BundleFedOptShareableGenerator",
    "spleen_flare.scaffold.ScaffoldShareableGenerator",
    "spleen_flare.model_selection.ResumableModelSelector",
    "spleen_flare.mlflow_receiver.ModelTrainingMLflowReceiver",
    "spleen_flare.he.persistor.HEBundleModelPersistor",
    "spleen_flare.he.aggregator.PackedHEAggregator",
    "spleen_flare.he.aggregator.PackedHEShareableGenerator",
    "spleen_flare.he.cross_site_eval.SerializingHECrossSiteModelEval",
    "nvflare.app_common.aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator",
    "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator",
    "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator",
    "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator",
    "nvflare.app_common.workflows.statistics_controller.StatisticsController",
    "nvflare.app_common.statistics.json_stats_file_persistor.JsonStatsFileWriter",
    TB_RECEIVER["path"],
    WANDB_RECEIVER_PATH,
    JOB_LOG_STREAMER,
)
RIGHTS = (
    "submit_job",
    "clone_job",
    "manage_job",
    "download_job",
    "view",
    "operate",
    "shell_commands",
    "byoc",
    "server-predeployed-flwr",
)
SCOPE = "site"  # the one privacy scope a site with a policy defines (its default)
HE_FILTERS = {
    "task_data_filters": [{"path": "spleen_flare.site_filters.SiteHEDecryptor", "args": {}}],
    "task_result_filters": [{"path": "spleen_flare.site_filters.SiteHEEncryptor", "args": {}}],
}
KEEP_LOCAL_MODEL = {"path": "spleen_flare.site_filters.KeepLocalModel", "args": {}}


@dataclass(frozen=True)
class SitePolicy:
    """A site's choices; the defaults are the safe ones (no job code, no class but ours)."""

    allow_byoc: bool = False  # development only (./run_experiment.sh --ship-code on POC)
    encrypt_results: bool = False  # HE sites: every result leaves encrypted, whatever the job says
    keep_local_model: bool = False  # no local model leaves in cross-site evaluation
    stats_min_count: int | None = None  # statistics: the fewest cases a feature needs to leave (None: the job's)
    stats_max_bins_percent: float | None = None  # statistics: per-case histograms' bins below this % of the cases

    def __post_init__(self) -> None:
        # NVFlare builds the privacy filters for every job at the site: one it cannot build fails them all
        if self.stats_privacy is not None:
            try:
                CTStatisticsPrivacy(**self.stats_privacy["args"])
            except ValueError as err:
                raise ValueError(f"the site's statistics thresholds: {str(err).strip()}") from None

    @property
    def stats_privacy(self) -> dict | None:
        """The site's statistics privacy filter (``spleen_flare.stats_privacy``), or None to leave it to the job."""
        if self.stats_min_count is None and self.stats_max_bins_percent is None:
            return None
        args = dict(STATS_PRIVACY_DEFAULTS)
        if self.stats_min_count is not None:
            args["min_count"] = self.stats_min_count
        if self.stats_max_bins_percent is not None:
            args["max_bins_percent"] = self.stats_max_bins_percent
        return {"path": STATS_PRIVACY_FILTER, "args": args}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def with_allow_list(local: Path, classes: tuple[str, ...]) -> Path:
    """``local/resources.json`` (from itself or ``resources.json.default``) with ``class_allow_list`` = classes."""
    target = local / "resources.json"
    source = target if target.is_file() else local / "resources.json.default"
    resources = json.loads(source.read_text())
    resources["class_allow_list"] = list(classes)
    resources["class_list_enforcement_mode"] = "enforce"
    _write_json(target, resources)
    return target


def site_authorization(allow_byoc: bool) -> dict:
    """NVFlare's default permissions, every role spelled out, ``byoc`` as the site chose (where allowed: for the
    roles NVFlare's default gives it to)."""
    byoc = "any" if allow_byoc else "none"
    roles = {
        "project_admin": dict.fromkeys(RIGHTS, "any"),
        "org_admin": {
            "submit_job": "none",
            "clone_job": "none",
            "manage_job": "o:submitter",
            "download_job": "o:submitter",
            "view": "any",
            "operate": "o:site",
            "shell_commands": "o:site",
        },
        "lead": {
            "submit_job": "any",
            "clone_job": "n:submitter",
            "manage_job": "n:submitter",
            "download_job": "n:submitter",
            "view": "any",
            "operate": "o:site",
            "shell_commands": "o:site",
        },
        "member": {"view": "any"},
    }
    for role, rights in roles.items():
        rights["byoc"] = byoc if role in ("project_admin", "lead") else "none"  # NVFlare's default roles for it
        rights["server-predeployed-flwr"] = "none"
    return {"format_version": "1.0", "permissions": roles}


def site_privacy(policy: SitePolicy) -> dict | None:
    """A single default scope with the site's filters; None when the site sets none."""
    data, results = [], []
    if policy.encrypt_results:
        data += HE_FILTERS["task_data_filters"]
        results += HE_FILTERS["task_result_filters"]
    if policy.keep_local_model:
        results.insert(0, KEEP_LOCAL_MODEL)  # before encryption: the model is dropped, not encrypted
    if policy.stats_privacy is not None:
        results.insert(0, policy.stats_privacy)
    if not data and not results:
        return None
    return {
        "scopes": [{"name": SCOPE, "task_data_filters": data, "task_result_filters": results}],
        "default_scope": SCOPE,
    }


def write_site_policy(site_kit: Path, policy: SitePolicy | None = None) -> list[Path]:
    """The site's allow-list, authorization and privacy policy in ``<kit>/local``; returns the files written."""
    local = Path(site_kit) / "local"
    written = [with_allow_list(local, SITE_CLASSES)]
    _write_json(local / "authorization.json", site_authorization(bool(policy and policy.allow_byoc)))
    written.append(local / "authorization.json")
    privacy = site_privacy(policy or SitePolicy())
    if privacy is not None:
        _write_json(local / "privacy.json", privacy)
        written.append(local / "privacy.json")
    else:
        (local / "privacy.json").unlink(missing_ok=True)
    return written


def kit_policy(kit: Path) -> dict:
    """What a kit allows now, as NVFlare will read it (``local/`` files over their ``.default``)."""
    local = Path(kit) / "local"

    def read(name: str) -> dict | None:
        for path in (local / name, local / f"{name}.default"):
            if path.is_file():
                return json.loads(path.read_text())
        return None

    resources, authz, privacy = read("resources.json") or {}, read("authorization.json") or {}, read("privacy.json")
    byoc = {
        role: rights.get("byoc", "any") if isinstance(rights, dict) else rights
        for role, rights in (authz.get("permissions") or {}).items()
    }
    scope = (privacy or {}).get("default_scope")
    return {
        "class_allow_list": resources.get("class_allow_list", "NVFlare's default list"),
        "byoc": byoc,
        "privacy_default_scope": scope,
        "privacy_filters": [
            f["path"]
            for s in (privacy or {}).get("scopes", [])
            if s.get("name") == scope
            for key in ("task_data_filters", "task_result_filters")
            for f in s.get(key, [])
        ],
    }


def write_server_policy(server_kit: Path, allow_byoc: bool = False) -> list[Path]:
    """The server's allow-list, and no job code on the server either (its own authorization policy)."""
    local = Path(server_kit) / "local"
    _write_json(local / "authorization.json", site_authorization(allow_byoc))
    return [with_allow_list(local, SERVER_CLASSES), local / "authorization.json"]


def write_poc_policies(prod_dir: Path, sites: list[str], policy: SitePolicy) -> None:
    """The POC kits the one command prepared: the server's allow-list and each site's policy."""
    write_server_policy(Path(prod_dir) / "server", allow_byoc=policy.allow_byoc)
    for site in sites:
        write_site_policy(Path(prod_dir) / site, policy)


class SitePolicyBuilder(Builder):
    """Provisioning builder: the allow-lists and site policies in every kit. List it after ``StaticFileBuilder``
    (which writes ``resources.json.default``) and before ``SignatureBuilder`` (which signs HE kits' ``local``).
    Args are :class:`SitePolicy`'s, for every site of the project."""

    def __init__(self, encrypt_results: bool = False, keep_local_model: bool = False) -> None:
        self.policy = SitePolicy(encrypt_results=encrypt_results, keep_local_model=keep_local_model)

    def build(self, project: Project, ctx) -> None:
        server = project.get_server()
        if server is not None:
            write_server_policy(Path(ctx.get_local_dir(server)).parent)
        for client in project.get_clients():
            local = Path(ctx.get_local_dir(client))
            if (local / ProvFileName.SIGNATURE_JSON).exists():
                raise RuntimeError(f"SitePolicyBuilder: {local} is already signed: list it before SignatureBuilder")
            write_site_policy(local.parent, self.policy)
