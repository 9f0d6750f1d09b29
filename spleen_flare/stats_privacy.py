"""The statistics a site lets leave: NVFlare's own privacy cleansers, with the site's thresholds as arguments.

NVFlare's ``StatisticsPrivacyFilter`` takes its cleansers from the *job's* components, so a job could bring weaker
ones. ``CTStatisticsPrivacy`` builds NVFlare's cleansers itself from its own arguments: a site lists it in its
``local/privacy.json`` (``spleen-site-policy --stats-min-count N``) with its thresholds, and it runs on every
statistics result whatever the job says (the job's own filter, with the job's thresholds, runs as well: the stricter
of the two wins, since each only removes).

- ``min_count``: a feature whose count (cases, see ``spleen_flare.ct_statistics``) is below it leaves with its counts
  only (cases, and cases without a value): no sum, mean, spread, range or histogram. NVFlare compares the count
  minus the cases without a value, and our count already leaves those out: with unlabelled cases the spleen features
  are withheld a little sooner than the threshold says (on the private side; so is the bins rule).
- ``max_bins_percent``: a histogram of per-case values (dataset ``cases``) must have fewer bins than this share of
  the cases, or it stays at the site; voxel histograms (dataset ``intensity``) count voxels, not cases, so the rule
  does not apply to them.
- ``min_noise_level``/``max_noise_level``: the local minimum and maximum (used by the server to choose histogram
  ranges) leave moved outwards by a random 10-30 % (NVFlare's ``AddNoiseToMinMax``).
"""

from __future__ import annotations

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import StatisticsConstants as StC
from nvflare.app_common.filters.statistics_privacy_filter import StatisticsPrivacyFilter
from nvflare.app_common.statistics.histogram_bins_cleanser import HistogramBinsCleanser
from nvflare.app_common.statistics.min_count_cleanser import MinCountCleanser
from nvflare.app_common.statistics.min_max_cleanser import AddNoiseToMinMax
from nvflare.app_common.statistics.statistics_privacy_cleanser import StatisticsPrivacyCleanser

from spleen_flare.ct_statistics import CASES

DEFAULTS = {"min_count": 3, "max_bins_percent": 50, "min_noise_level": 0.1, "max_noise_level": 0.3}


class CountsKeptMinCountCleanser(MinCountCleanser):
    """NVFlare's minimum count, keeping the failure counts as it keeps the counts: NVFlare's cleanser removes a
    withheld feature's failure count, and the next filter's minimum count (the job's after the site's) then fails
    on the missing key."""

    def apply(self, statistics: dict, client_name: str) -> tuple[dict, bool]:
        valid = self.min_count_validate(client_name, statistics)
        return self.cleanse(statistics, [k for k in statistics if k != StC.STATS_FAILURE_COUNT], valid)


class CaseHistogramBinsCleanser(HistogramBinsCleanser):
    """NVFlare's bins rule on the per-case histograms only (an intensity histogram's records are voxels)."""

    def hist_bins_validate(self, client_name: str, statistics: dict) -> dict[str, dict[str, bool]]:
        result = super().hist_bins_validate(client_name, statistics)
        return {ds: (valid if ds == CASES else dict.fromkeys(valid, True)) for ds, valid in result.items()}


class CTStatisticsPrivacy(StatisticsPrivacyFilter):
    """NVFlare's minimum count, bins share and min/max noise, set by this filter's own arguments."""

    def __init__(
        self,
        min_count: int = DEFAULTS["min_count"],
        max_bins_percent: float = DEFAULTS["max_bins_percent"],
        min_noise_level: float = DEFAULTS["min_noise_level"],
        max_noise_level: float = DEFAULTS["max_noise_level"],
    ) -> None:
        super().__init__(result_cleanser_ids=[])
        self.cleansers: list[StatisticsPrivacyCleanser] = [
            CountsKeptMinCountCleanser(min_count),
            CaseHistogramBinsCleanser(max_bins_percent),
            AddNoiseToMinMax(min_noise_level, max_noise_level),
        ]

    def get_cleansers(self, result_checker_ids: list[str], fl_ctx: FLContext) -> list[StatisticsPrivacyCleanser]:
        return self.cleansers
