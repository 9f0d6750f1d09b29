"""NVFlare's site side of the statistics workflow, driven as its controller drives it: the task inputs its
``StatisticsController`` sends for the job's ``statistic_configs``, NVFlare's ``StatisticsTaskHandler`` asking a real
``SpleenCTStatistics``, and the result as the DXO NVFlare's ``StatisticsExecutor`` returns (what filters see)."""

from __future__ import annotations

import json

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import StatisticsConstants as StC
from nvflare.app_common.executors.statistics.statistics_task_handler import StatisticsTaskHandler
from nvflare.app_common.workflows.statistics_controller import StatisticsController
from nvflare.fuel.utils import fobs

from spleen_flare.ct_statistics import SpleenCTStatistics
from spleen_tools.jobs import STATS_JOB
from spleen_tools.paths import JOBS_DIR

FIRST, SECOND = StC.STATS_1st_STATISTICS, StC.STATS_2nd_STATISTICS


def job_statistic_configs() -> dict:
    """The ``statistic_configs`` of jobs/spleen_ct_statistics (what the server asks the sites for)."""
    server = json.loads((JOBS_DIR / STATS_JOB / "app" / "config" / "config_fed_server.json").read_text())
    return server["workflows"][0]["args"]["statistic_configs"]


def site_context(site: str = "site-1", app_root: str | None = None) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    if app_root is not None:
        fl_ctx.set_prop(FLContextKey.APP_ROOT, app_root, private=True, sticky=True)
    return fl_ctx


def task_inputs(task: str, configs: dict, global_stats: dict | None = None) -> Shareable:
    """What ``StatisticsController._prepare_inputs`` sends: the task's statistics and, for the second task, the
    global min/max (histogram ranges) and the global count and mean (variance)."""
    inputs = Shareable()
    targets = StatisticsController._get_target_statistics(configs, StC.ordered_statistics[task])
    names = {t.name for t in targets}
    for key, wanted in ((StC.STATS_MIN, StC.STATS_HISTOGRAM), (StC.STATS_MAX, StC.STATS_HISTOGRAM)):
        if wanted in names and global_stats:
            inputs[key] = global_stats[key]
    if StC.STATS_VAR in names and global_stats:
        inputs[StC.STATS_GLOBAL_COUNT] = global_stats[StC.STATS_COUNT]
        inputs[StC.STATS_GLOBAL_MEAN] = global_stats[StC.STATS_MEAN]
    inputs[StC.STATISTICS_TASK_KEY] = task
    inputs[StC.STATS_TARGET_STATISTICS] = fobs.dumps(targets)
    return inputs


def run_task(
    generator: SpleenCTStatistics, task: str, configs: dict | None = None, global_stats: dict | None = None
) -> Shareable:
    """One ``fed_stats`` task at the site: the result as a STATISTICS DXO's shareable."""
    handler = StatisticsTaskHandler("ct_statistics")
    handler.stats_generator = generator  # what its initialize() takes from the engine's components
    inputs = task_inputs(task, configs if configs is not None else job_statistic_configs(), global_stats)
    result = handler.execute_task(StC.FED_STATS_TASK, inputs, site_context(), Signal())
    return DXO(data_kind=DataKind.STATISTICS, data=result).to_shareable()


def statistics_of(shareable: Shareable) -> dict:
    """The statistics dict inside a task result (``statistic -> dataset -> feature -> value``)."""
    data = from_shareable(shareable).data
    return fobs.loads(data[data[StC.STATISTICS_TASK_KEY]])


def both_tasks(generator: SpleenCTStatistics, configs: dict | None = None) -> tuple[Shareable, Shareable]:
    """The first task's result and the second's, the second with this one site's figures as the global ones."""
    first = run_task(generator, FIRST, configs)
    return first, run_task(generator, SECOND, configs, statistics_of(first))
