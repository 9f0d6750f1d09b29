"""What a site lets leave (``spleen_flare.stats_privacy``): NVFlare's own cleansers with the filter's thresholds, on
the statistics NVFlare's task handler makes of a real ``SpleenCTStatistics``, filtered as NVFlare filters a task
result (the DXO in a shareable)."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.app_common.app_constant import StatisticsConstants as StC
from stats_tasks import FIRST, both_tasks, job_statistic_configs, run_task, site_context, statistics_of

from spleen_flare.ct_statistics import CASE_FEATURES, CASES, INTENSITY, CaseFigures, SpleenCTStatistics, hu_histogram
from spleen_flare.stats_privacy import DEFAULTS, CTStatisticsPrivacy

# all but the counts (a withheld feature's count of cases without a value may leave: it is a count as well)
WITHHELD = ("sum", "mean", "min", "max", "histogram", "stddev", "var")


def site_with(n: int, seed: int = 0) -> SpleenCTStatistics:
    """A generator holding ``n`` cases' figures (as its initialize() leaves it)."""
    rng = np.random.default_rng(seed)
    generator = SpleenCTStatistics()
    for _ in range(n):
        body, spleen = rng.normal(30, 40, 2000), rng.normal(120, 10, 300)
        values = {"spacing_x_mm": 0.8, "spacing_y_mm": 0.8, "spacing_z_mm": float(rng.choice([2.5, 5.0]))}
        values |= {"size_x": 512.0, "size_y": 512.0, "size_z": float(rng.integers(40, 120))}
        values |= {"spleen_volume_ml": float(rng.uniform(100, 300)), "body_hu": body.mean(), "spleen_hu": spleen.mean()}
        generator.cases.append(CaseFigures(values, hu_histogram(body), hu_histogram(spleen)))
    return generator


def filtered(result, privacy: CTStatisticsPrivacy, site: str = "site-1") -> dict:
    return statistics_of(privacy.process(result, site_context(site)))


def features_of(stats: dict, statistic: str) -> set[tuple[str, str]]:
    return {(ds, f) for ds, features in stats.get(statistic, {}).items() for f in features}


ALL = {(CASES, f) for f in CASE_FEATURES} | {(INTENSITY, "body_hu"), (INTENSITY, "spleen_hu")}


def min_count_only(min_count: int) -> CTStatisticsPrivacy:
    """The minimum count alone (every bins share allowed: 3 bins for 4 cases would be withheld by the default 50 %)."""
    return CTStatisticsPrivacy(min_count=min_count, max_bins_percent=100)


def test_a_site_below_the_minimum_count_sends_its_counts_only():
    first, second = both_tasks(site_with(4))
    for result in (first, second):
        kept = filtered(result, min_count_only(5))
        assert features_of(kept, "count") == ALL
        assert all(n == 4 for ds in kept["count"].values() for n in ds.values())
        for statistic in WITHHELD:
            assert not features_of(kept, statistic), statistic
    first, second = both_tasks(site_with(4))  # the filter changes the shareable it is given
    at_minimum = {**filtered(first, min_count_only(4)), **filtered(second, min_count_only(4))}
    for statistic in ("count", "failure_count", *WITHHELD[:-1]):  # no "var": the job asks for stddev
        assert features_of(at_minimum, statistic) == ALL, statistic


def test_the_minimum_count_is_per_feature():
    """Two of six cases lack a spleen label (4 spleens, under the minimum of 5): only the spleen's figures stay
    home."""
    generator = site_with(6)
    for case in generator.cases[:2]:
        case.values["spleen_volume_ml"] = case.values["spleen_hu"] = None
        case.spleen_hist = None
    first, second = both_tasks(generator)
    kept = {**filtered(first, min_count_only(5)), **filtered(second, min_count_only(5))}
    spleen = {(CASES, "spleen_volume_ml"), (INTENSITY, "spleen_hu")}
    for statistic in WITHHELD[:-1]:
        assert features_of(kept, statistic) == ALL - spleen, statistic
    assert kept["count"][CASES]["spleen_volume_ml"] == 4 and kept["count"][CASES]["size_z"] == 6


def test_a_per_case_histogram_with_too_many_bins_stays_home_voxel_histograms_leave():
    """10 cases, 50 %: a per-case histogram needs fewer than 5 bins; an HU histogram's bins count voxels."""
    configs = job_statistic_configs()
    configs["histogram"]["spleen_volume_ml"] = {"bins": 5}
    first = run_task(site_with(10), FIRST, configs)
    second = run_task(site_with(10), StC.STATS_2nd_STATISTICS, configs, statistics_of(first))
    kept = filtered(second, CTStatisticsPrivacy(max_bins_percent=50))
    assert features_of(kept, "histogram") == ALL - {(CASES, "spleen_volume_ml")}
    assert len(kept["histogram"][INTENSITY]["body_hu"].bins) == 64  # 64 bins, 10 cases: still sent
    assert len(kept["histogram"][CASES]["size_z"].bins) == 3
    for statistic in ("count", "stddev", "failure_count"):  # the bins rule removes the histogram only
        assert features_of(kept, statistic) == ALL, statistic


@pytest.mark.parametrize("low, high", [(0.1, 0.3), (0.05, 0.06)])
def test_minimum_and_maximum_leave_moved_outwards_within_the_noise_bounds(low, high):
    generator = site_with(6)
    configs = job_statistic_configs()
    sent = statistics_of(run_task(generator, FIRST, configs))
    for _ in range(5):
        kept = filtered(
            run_task(generator, FIRST, configs), CTStatisticsPrivacy(min_noise_level=low, max_noise_level=high)
        )
        for ds, features in sent["min"].items():
            for name, true_min in features.items():
                true_max, noisy_min, noisy_max = sent["max"][ds][name], kept["min"][ds][name], kept["max"][ds][name]
                assert noisy_min < true_min and noisy_max > true_max, name
                # NVFlare's rule: a share r in [low, high] of the value's size, outwards
                assert abs(true_min) * low <= true_min - noisy_min <= abs(true_min) * high + 1e-9, name
                assert abs(true_max) * low <= noisy_max - true_max <= abs(true_max) * high + 1e-9, name
    assert sent["min"][INTENSITY]["body_hu"] == -500  # the job's HU range, not the site's voxels


def test_results_that_are_not_statistics_pass_unchanged():
    weights = {"conv.weight": np.arange(6.0).reshape(2, 3)}
    shareable = DXO(data_kind=DataKind.WEIGHTS, data=weights, meta={"NUM_STEPS_CURRENT_ROUND": 4}).to_shareable()
    out = from_shareable(CTStatisticsPrivacy(min_count=100).process(shareable, site_context()))
    assert out.data_kind == DataKind.WEIGHTS and out.meta["NUM_STEPS_CURRENT_ROUND"] == 4
    assert out.data.keys() == weights.keys() and (out.data["conv.weight"] == weights["conv.weight"]).all()


def test_the_job_filter_and_the_sites_own_filter_in_a_row():
    """The job's filter (min count 3) and then the site's privacy.json one (5), and the other way round: the stricter
    wins, and a feature the first withheld stays withheld (no error that would lose the site's counts too)."""
    for thresholds in ((3, 5), (5, 3)):
        for result in both_tasks(site_with(4)):
            once = min_count_only(thresholds[0]).process(result, site_context())
            kept = statistics_of(min_count_only(thresholds[1]).process(once, site_context()))
            assert features_of(kept, "count") == ALL
            for statistic in WITHHELD:
                assert not features_of(kept, statistic), statistic
    first, second = both_tasks(site_with(6))
    for result in (first, second):
        twice = min_count_only(3).process(min_count_only(5).process(result, site_context()), site_context())
        kept = statistics_of(twice)
        assert features_of(kept, "count") == ALL and features_of(kept, "mean" if result is first else "stddev") == ALL


def test_the_filter_uses_its_own_thresholds_whatever_the_job_names():
    privacy = CTStatisticsPrivacy(min_count=7, max_bins_percent=20, min_noise_level=0.2, max_noise_level=0.4)
    min_count, bins, noise = privacy.get_cleansers(["a_weaker_cleanser_of_the_job"], site_context())
    assert (min_count.min_count, bins.max_bins_percent, noise.noise_level) == (7, 20, (0.2, 0.4))
    defaults = CTStatisticsPrivacy().cleansers
    assert (defaults[0].min_count, defaults[1].max_bins_percent) == (
        DEFAULTS["min_count"],
        DEFAULTS["max_bins_percent"],
    )


@pytest.mark.parametrize(
    "args",
    [
        {"min_count": -1},
        {"max_bins_percent": 101},
        {"max_bins_percent": -5},
        {"min_noise_level": 0.5, "max_noise_level": 0.2},
        {"max_noise_level": 1.5},
    ],
)
def test_bad_thresholds_are_refused(args):
    with pytest.raises(ValueError):
        CTStatisticsPrivacy(**args)
