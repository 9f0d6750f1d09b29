"""Following a run: events from tagged lines and server round lines, the log follower, progress and ETA."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest

from spleen_flare.contract import HE_TAG, KEY_METRIC, PROGRESS_TAG, tagged_line
from spleen_tools.run.progress import LogFollower, Progress, parse_event

SITES = ["site-1", "site-2"]
PREFIX = "2026-11-28 05:48:17,123 - INFO - "


def round_line(site: str, rnd: int, global_dice: float, loss: float = 0.5, work: float = 20.0, prefix="") -> str:
    fields = dict(site=site, round=rnd, global_dice=global_dice, local_dice=0.0175, loss=loss, steps=2, work_s=work)
    return prefix + tagged_line(PROGRESS_TAG, kind="round", **fields)


def test_round_event_from_a_logged_line():
    at = dt.datetime(2026, 11, 28, 5, 48, 17, 123000).timestamp()  # the log line's time
    assert parse_event(round_line("site-1", 0, 0.0185, loss=0.8514, work=12.5, prefix=PREFIX)) == {
        "at": at,
        "kind": "round",
        "site": "site-1",
        "round": 0,
        "global_dice": 0.0185,
        "local_dice": 0.0175,
        "loss": 0.8514,
        "steps": 2,
        "work_s": 12.5,
    }


def test_cross_site_info_and_he_events():
    cross = parse_event(tagged_line(PROGRESS_TAG, kind="cross_site", site="site-2", **{KEY_METRIC: 0.0167}))
    assert cross == {"kind": "cross_site", "site": "site-2", KEY_METRIC: 0.0167}
    info = parse_event(tagged_line(PROGRESS_TAG, kind="info", site="site-1", training=3, validation=1))
    assert info["kind"] == "info" and info["training"] == 3
    he = parse_event("x " + tagged_line(HE_TAG, side="server", round=1, stage="aggregate", seconds=0.5))
    assert he == {"side": "server", "round": 1, "stage": "aggregate", "seconds": 0.5, "kind": "he"}


@pytest.mark.parametrize(
    "line",
    [
        "",
        "no tag here",
        tagged_line(PROGRESS_TAG, kind="round", round=1, loss=0.3),  # no site
        tagged_line(PROGRESS_TAG, kind="round", site="site-1", round="1"),  # round not an integer
        tagged_line(PROGRESS_TAG, kind="party", site="site-1"),  # unknown kind
        tagged_line(HE_TAG, side="site-1", round=0),  # no stage
        "[spleen] site=site-1 round=0 global_dice=0.1",  # the old k=v format
    ],
)
def test_other_lines_are_ignored(line):
    assert parse_event(line) is None


def test_server_round_lines():
    started = parse_event("2026-11-29 03:00:01,250 - ScatterAndGather - INFO - [run=abc]: Round 2 started.")
    assert started["kind"] == "fl_round" and started["round"] == 2 and started["stage"] == "started"
    finished = parse_event("2026-11-29 03:00:31,750 - INFO - Round 2 finished.")
    assert finished["stage"] == "finished" and finished["at"] - started["at"] == pytest.approx(30.5)
    assert parse_event("Round 2 started.") is None  # no timestamp: not a log line
    assert parse_event("2026-11-29 03:00:01,250 - Round 2 started. (retry)") is None


def test_progress_rounds_times_estimate_and_dedupe():
    p = Progress(SITES, rounds=3, start=0.0)
    assert len(p.add(parse_event(round_line("site-1", 0, 0.01)), now=30.0)) == 1
    assert p.add(parse_event(round_line("site-1", 0, 0.01)), now=31.0) == []  # site log and job log
    done = p.add(parse_event(round_line("site-2", 0, 0.02)), now=40.0)
    assert "round 1/3 done in 40 s" in done[-1] and "about 1:40 left" in done[-1]
    p.add(parse_event(round_line("site-2", 1, 0.3)), now=60.0)
    p.add(parse_event(round_line("site-1", 1, 0.4)), now=70.0)
    assert p.round_times() == [40.0, 30.0]
    assert p.untrained_dice() == {"site-1": 0.01, "site-2": 0.02}
    assert p.site_work_times() == [20.0, 20.0]


def test_rounds_finished_between_two_polls_keep_their_log_times():
    p = Progress(SITES, rounds=2, start=dt.datetime(2026, 11, 28, 5, 48, 0).timestamp())
    lines = [
        round_line(s, r, 0.1, prefix=f"2026-11-28 05:48:{10 + 3 * r:02d},500 - INFO - ") for r in (0, 1) for s in SITES
    ]
    for line in lines:  # all read in one poll, 20 s later
        p.add(parse_event(line), now=p.start + 20.0)
    assert p.round_times() == [10.5, 3.0]


def test_log_follower_reads_only_new_complete_lines(tmp_path):
    site = tmp_path / "site-1"
    (site / "job1").mkdir(parents=True)
    (site / "log.txt").write_text("old line\n")
    follower = LogFollower([site])
    follower.skip_existing()
    with open(site / "log.txt", "a") as f:
        f.write("new 1\npart")
    (site / "job1" / "log.txt").write_text("job line\n")
    assert sorted(follower.poll()) == ["job line", "new 1"]
    with open(site / "log.txt", "a") as f:
        f.write("ial\n")
    assert follower.poll() == ["partial"]
    assert follower.poll() == []


def test_a_dropped_site_closes_its_round_and_is_excused_from_the_table_but_reported():
    from spleen_tools.run.report import report_dropped
    from spleen_tools.run.summary import RunSummary, problems

    p = Progress(SITES, rounds=3, start=0.0)
    p.add(parse_event(round_line("site-1", 0, 0.01)), now=10.0)
    p.add(parse_event(round_line("site-2", 0, 0.02)), now=11.0)
    assert p.add(parse_event(round_line("site-1", 1, 0.2)), now=20.0)[-1].startswith("[0:20] round 2/3 site-1")
    server = "2026-11-29 19:49:16,001 - ScatterAndGather - WARNING - [identity=example_project]: "
    dropped = dict(kind="dropped", site="site-2", round=1, task="train", waited_s=30.0, at=50.0)
    lines = p.add(parse_event(server + tagged_line(PROGRESS_TAG, **dropped)), now=51.0)
    assert "site-2 dropped: no train result in round 2 (the server waited 30 s" in lines[0]
    assert lines[1].endswith("round 2/3 done without site-2") and p.round_times() == [11.0, 39.0]
    assert p.dropped_sites() == ["site-2"]

    summary = RunSummary(
        status="FINISHED:COMPLETED",
        cross_site={"SRV_FL_global_model.pt": {"site-1": 0.9}, "site-1": {"site-1": 0.8}},
        dropped=p.dropped,
    )
    assert problems(summary, SITES, ("FINISHED:COMPLETED",)) == []  # the table lacks only the dropped site
    unexcused = problems(replace(summary, dropped=[]), SITES, ("FINISHED:COMPLETED",))
    assert unexcused == ["the cross-site table is incomplete"]
    out: list[str] = []
    report_dropped(p.dropped, out.append)
    assert out[0].startswith("  dropped: site-2 sent no training result in round(s) 2 (first noticed ")


def test_a_resumed_job_runs_its_rounds_again_and_they_count_once():
    p = Progress(SITES, rounds=3, start=0.0)
    for rnd, now in ((0, 10.0), (1, 20.0)):
        for site in SITES:
            p.add(parse_event(round_line(site, rnd, 0.1 * (rnd + 1))), now=now)
    p.add(parse_event(round_line("site-1", 2, 0.25)), now=25.0)  # round 3 under way when the server died
    resumed = tagged_line(PROGRESS_TAG, kind="resumed", site="server", job="job-a", round=1)
    [line] = p.add(parse_event(PREFIX + resumed), now=40.0)
    assert "resumed job job-a from its model of round 1 (rounds 2..3 to go)" in line
    assert p.add(parse_event(resumed), now=41.0) == []  # the server log and the job log
    assert sorted(p.per_round) == [0] and p.resumed[0]["round"] == 1
    for rnd, now in ((1, 50.0), (2, 60.0)):  # the same rounds again, in the resumed job: seen, not deduplicated
        for site in SITES:
            assert p.add(parse_event(round_line(site, rnd, 0.5)), now=now)
    assert sorted(p.per_round) == [0, 1, 2] and p.per_round[1]["site-1"]["global_dice"] == 0.5


def test_a_job_that_cannot_resume_says_why():
    p = Progress(SITES, rounds=3, start=0.0)
    line = tagged_line(PROGRESS_TAG, kind="resume_error", site="server", reason="cannot resume from job x: gone")
    assert p.add(parse_event(line), now=1.0) == ["[0:01] server: cannot resume from job x: gone"]
    assert p.job_errors == ["server: cannot resume from job x: gone"]


def test_each_site_says_what_it_trains_on_and_its_peak_gpu_memory_is_kept():
    progress = Progress(SITES, rounds=2, start=0.0)
    line = PREFIX + tagged_line(PROGRESS_TAG, kind="device", site="site-1", device="cuda:0 (NVIDIA H200, 150 GB)")
    assert progress.add(parse_event(line), now=5.0) == ["[0:05] site-1 trains on cuda:0 (NVIDIA H200, 150 GB)"]
    for rnd, peak in ((0, 1100.0), (1, 1050.0)):
        event = parse_event(round_line("site-1", rnd, 0.5))
        progress.add({**event, "gpu_peak_mb": peak}, now=10.0)
    progress.add(parse_event(round_line("site-2", 0, 0.5)), now=10.0)  # a CPU site sends none
    assert progress.devices == {"site-1": "cuda:0 (NVIDIA H200, 150 GB)"}
    assert progress.gpu_peak_mb == {"site-1": 1100.0}
