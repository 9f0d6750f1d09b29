"""The statistics job's results (``spleen_tools.run.stats_report``) from NVFlare's JSON output as the job writes it
(``feature -> statistic -> site / "Global" -> dataset -> value``): the table, its pooled row, the PNG, the files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from spleen_flare.ct_statistics import CASE_FEATURES, CASES, INTENSITY, INTENSITY_FEATURES
from spleen_tools.run.stats_report import (
    COLUMNS,
    STATS_FILE,
    STATS_OUTPUT,
    STATS_PNG,
    StatsResultError,
    find_stats,
    format_table,
    histogram,
    load_stats,
    pooled_mean,
    save_results,
    sites_of,
    write_stats_png,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# run 20261205-012240 (POC, synthetic cases): site-1 sent everything; site-2, 7 cases under the job's minimum of 8,
# sent its counts only. NVFlare's Global mean divides site-1's sum by all 15 cases.
SIZE_Z_OF_A_RUN = {
    "count": {"site-1": {"cases": 8}, "site-2": {"cases": 7}, "Global": {"cases": 15}},
    "mean": {"site-1": {"cases": 14.75}, "Global": {"cases": 7.8667}},
    "sum": {"site-1": {"cases": 118.0}, "Global": {"cases": 118.0}},
    "stddev": {"site-1": {"cases": 3.0119}, "Global": {"cases": 5.6223}},
    "histogram": {
        "site-1": {"cases": [[9.7848, 14.403, 4.0], [14.403, 19.0213, 3.0], [19.0213, 23.6395, 1.0]]},
        "Global": {"cases": [[9.7848, 14.403, 4.0], [14.403, 19.0213, 3.0], [19.0213, 23.6395, 1.0]]},
    },
}


def dataset_of(feature: str) -> str:
    return INTENSITY if feature in INTENSITY_FEATURES else CASES


def stats_output(sites: dict[str, tuple[int, dict[str, float] | None]]) -> dict:
    """NVFlare's output for ``{site: (cases, {feature: per-case mean} or None where it sent its counts only)}``:
    each feature's count, sum, mean, stddev and a 3-bin histogram per site, and NVFlare's ``Global`` (the sum of
    the sums sent over the count of all sites)."""
    out = {}
    for feature in (*CASE_FEATURES, *INTENSITY_FEATURES):
        ds = dataset_of(feature)
        stat = {"count": {}, "sum": {}, "mean": {}, "stddev": {}, "histogram": {}}
        for site, (n, means) in sites.items():
            stat["count"][site] = {ds: n}
            if means is not None:
                mean = means.get(feature, 1.0)
                stat["sum"][site], stat["mean"][site] = {ds: mean * n}, {ds: mean}
                stat["stddev"][site] = {ds: 0.1 * mean}
                stat["histogram"][site] = {
                    ds: [[mean - 1, mean, n - 1.0], [mean, mean + 1, 1.0], [mean + 1, mean + 2, 0]]
                }
        total = sum(n for n, _ in sites.values())
        sent = sum(v[ds] for v in stat["sum"].values())
        stat["count"]["Global"], stat["sum"]["Global"] = {ds: total}, {ds: sent}
        stat["mean"]["Global"] = {ds: round(sent / total, 4)}
        out[feature] = stat
    return out


def table_rows(table: str) -> dict[str, list[str]]:
    """Row name -> its cells (the header and the rule left out)."""
    return {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}


def column(name: str) -> int:
    """A feature's cell index in a row (after the cases)."""
    return 1 + [c[1] for c in COLUMNS].index(name)


def test_a_site_that_sent_its_counts_only_is_withheld_and_left_out_of_the_pooled_row():
    stats = stats_output({"site-1": (8, {"size_z": 14.75}), "site-2": (7, None)})
    stats["size_z"] = SIZE_Z_OF_A_RUN
    rows = table_rows(format_table(stats))
    assert list(rows) == ["site-1", "site-2", "pooled"]
    assert rows["site-2"] == ["7", *["withheld"] * len(COLUMNS)]
    assert rows["site-1"][0] == "8" and rows["site-1"][column("slices")] == "15"  # 14.75, no decimals
    # pooled: site-1's 8 cases only, its mean (NVFlare's Global mean, 7.87, counts site-2's 7 cases as well)
    assert rows["pooled"][0] == "8" and rows["pooled"][column("slices")] == "15"
    assert pooled_mean(stats, "size_z") == pytest.approx(14.75)
    assert sites_of(stats) == ["site-1", "site-2"]


def test_the_pooled_mean_is_over_the_cases_of_the_sites_that_sent_theirs():
    stats = stats_output(
        {
            "site-1": (8, {"spacing_z_mm": 5.0, "spleen_hu": 120.0}),
            "site-2": (7, None),
            "site-3": (5, {"spacing_z_mm": 2.5, "spleen_hu": 100.0}),
        }
    )
    rows = table_rows(format_table(stats))
    # dz: (8 x 5.0 + 5 x 2.5) / 13 = 52.5 / 13 = 4.038...; NVFlare's Global: 52.5 / 20 = 2.625
    assert pooled_mean(stats, "spacing_z_mm") == pytest.approx(52.5 / 13)
    assert stats["spacing_z_mm"]["mean"]["Global"][CASES] == pytest.approx(2.625)
    assert rows["pooled"][0] == "13" and rows["pooled"][column("dz mm")] == "4.04"
    # spleen HU: (8 x 120 + 5 x 100) / 13 = 112.3
    assert rows["pooled"][column("spleen HU")] == "112"
    assert rows["site-3"][column("dz mm")] == "2.50" and rows["site-2"][column("dz mm")] == "withheld"


def test_a_site_that_withheld_one_feature_only():
    """A site whose spleen figures stayed home (too few labelled cases) still counts for the other columns."""
    stats = stats_output({"site-1": (8, {"spleen_volume_ml": 200.0}), "site-2": (6, {"spleen_volume_ml": 100.0})})
    for statistic in ("sum", "mean", "stddev", "histogram"):
        del stats["spleen_volume_ml"][statistic]["site-2"]
    rows = table_rows(format_table(stats))
    assert rows["site-2"][column("spleen mL")] == "withheld" and rows["site-2"][column("dx mm")] == "1.00"
    assert rows["pooled"][0] == "14" and rows["pooled"][column("spleen mL")] == "200"
    assert histogram(stats, "spleen_volume_ml", "site-2") is None
    assert histogram(stats, "spleen_volume_ml", "site-1") == [
        (199.0, 200.0, 7.0),
        (200.0, 201.0, 1.0),
        (201.0, 202.0, 0),
    ]


def test_find_stats_in_the_downloaded_job_or_say_why_not(tmp_path):
    download = tmp_path / "job_result"
    with pytest.raises(StatsResultError, match=f"no {STATS_OUTPUT} in the downloaded job {download}.*min_clients"):
        find_stats(download)
    written = download / "abc-123" / "workspace" / "statistics" / STATS_OUTPUT
    written.parent.mkdir(parents=True)
    written.write_text("{}")
    assert find_stats(download) == written


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"site-1": {"val_mean_dice": 0.9}}),  # another job's result (cross-site validation)
        json.dumps([1, 2]),
        json.dumps({"size_z": {"mean": {}}}),  # no count
    ],
)
def test_load_stats_refuses_what_the_job_does_not_write(tmp_path, text):
    path = tmp_path / STATS_OUTPUT
    path.write_text(text)
    with pytest.raises(StatsResultError, match=f"{path}: not the statistics job's output"):
        load_stats(path)


def test_load_stats_refuses_a_file_cut_short_in_one_line(tmp_path):
    """A download cut short is the server's output gone wrong: a refusal the run reports, not a traceback."""
    path = tmp_path / STATS_OUTPUT
    path.write_text(json.dumps(stats_output({"site-1": (8, {})}))[:500])
    with pytest.raises(StatsResultError, match=f"{path}: not JSON .*download the job again"):
        load_stats(path)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize(
    "sites",
    [
        {"site-1": (8, {"body_hu": 25.0}), "site-2": (8, {"body_hu": 27.0})},
        {"site-1": (8, {"body_hu": 25.0}), "site-2": (7, None)},  # a site withheld everything
        {"site-1": (2, None), "site-2": (1, None)},  # every site did
    ],
)
def test_the_png_is_written_whatever_the_sites_withheld(tmp_path, sites):
    path = write_stats_png(stats_output(sites), tmp_path / "out" / STATS_PNG)
    assert path == tmp_path / "out" / STATS_PNG
    assert png_size(path) == (1500, 800)  # 15 x 8 inches at 100 dpi
    assert path.stat().st_size > 20_000


def test_save_results_writes_the_json_and_the_png_into_the_run_folder(tmp_path):
    stats = stats_output({"site-1": (8, {}), "site-2": (7, None)})
    written = tmp_path / "job_result" / "abc-123" / "workspace" / "statistics" / STATS_OUTPUT
    written.parent.mkdir(parents=True)
    written.write_text(json.dumps(stats))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    loaded, json_path, png_path = save_results(tmp_path / "job_result", run_dir)
    assert loaded == stats and (json_path, png_path) == (run_dir / STATS_FILE, run_dir / STATS_PNG)
    assert json.loads(json_path.read_text()) == stats
    assert png_path.read_bytes()[:8] == PNG_MAGIC
