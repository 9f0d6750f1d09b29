"""Fast tests of the one-command runner's pieces: progress lines, follower, summary, table, CLI errors, lock."""

from __future__ import annotations

import json
import os

import pytest

from spleen_fl.cli import run_experiment as cli
from spleen_fl.experiment import (
    GLOBAL_MODEL,
    ExperimentSettings,
    LogFollower,
    Progress,
    build_summary,
    cross_site_by_model,
    format_cross_site_table,
    he_summary,
    make_run_dir,
    parse_progress_line,
)
from spleen_fl.poc import PocBusyError, PocLock, stop_pids

SITES = ["site-1", "site-2"]
ROUND_LINE = (
    "2026-11-28 05:48:17,123 - INFO - [spleen] site={site} round={rnd} global_dice={g} local_dice=0.0175 "
    "loss={loss} steps=2 metrics_sent=6 metrics_failed=0 work_s={work}"
)


def test_parse_round_line_with_log_prefix():
    event = parse_progress_line(ROUND_LINE.format(site="site-1", rnd=0, g=0.0185, loss=0.8514, work=12.5))
    assert event == {
        "site": "site-1",
        "round": 0,
        "global_dice": 0.0185,
        "local_dice": 0.0175,
        "loss": 0.8514,
        "steps": 2,
        "metrics_sent": 6,
        "metrics_failed": 0,
        "work_s": 12.5,
        "kind": "round",
    }


def test_parse_cross_site_and_info_lines():
    assert parse_progress_line("[spleen] site=site-2 cross_site val_mean_dice=0.0167") == {
        "site": "site-2",
        "val_mean_dice": 0.0167,
        "kind": "cross_site",
    }
    info = parse_progress_line("[spleen] site=site-1 training=3 validation=1 datalist=/x/site-1.json")
    assert info["kind"] == "info" and info["training"] == 3


@pytest.mark.parametrize(
    "line",
    ["", "no tag here", "[spleen]", "[spleen] round=1 loss=0.3", "[spleen-he] side=site-1 round=0", "[spleenx] a=1"],
)
def test_parse_ignores_other_lines(line):
    assert parse_progress_line(line) is None


def test_parse_server_round_lines():
    started = parse_progress_line("2026-11-29 03:00:01,250 - ScatterAndGather - INFO - [run=abc]: Round 2 started.")
    assert started["kind"] == "fl_round" and started["round"] == 2 and started["stage"] == "started"
    finished = parse_progress_line("2026-11-29 03:00:31,750 - INFO - Round 2 finished.")
    assert finished["stage"] == "finished" and finished["at"] - started["at"] == pytest.approx(30.5)
    assert parse_progress_line("Round 2 started.") is None  # no timestamp: not a log line
    assert parse_progress_line("2026-11-29 03:00:01,250 - Round 2 started. (retry)") is None


def test_parse_he_line_and_tolerates_odd_values():
    event = parse_progress_line("x [spleen-he] side=server round=1 stage=aggregate seconds=0.5 bytes=n/a extra")
    assert event == {"side": "server", "round": 1, "stage": "aggregate", "seconds": 0.5, "bytes": "n/a", "kind": "he"}


def test_progress_rounds_times_estimate_and_dedupe():
    p = Progress(SITES, rounds=3, start=0.0)
    e = lambda s, r, g: parse_progress_line(ROUND_LINE.format(site=s, rnd=r, g=g, loss=0.5, work=20.0))  # noqa: E731
    assert len(p.add(e("site-1", 0, 0.01), now=30.0)) == 1
    assert p.add(e("site-1", 0, 0.01), now=31.0) == []  # same line in the site log and the job log
    done = p.add(e("site-2", 0, 0.02), now=40.0)
    assert "round 1/3 done in 40 s" in done[-1] and "about 1:40 left" in done[-1]
    p.add(e("site-2", 1, 0.3), now=60.0)
    p.add(e("site-1", 1, 0.4), now=70.0)
    assert p.round_times() == [40.0, 30.0]
    assert p.untrained_dice() == {"site-1": 0.01, "site-2": 0.02}


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


CROSS = {
    "site-1": {GLOBAL_MODEL: {"val_mean_dice": 0.5}, "site-1": {"val_mean_dice": 0.4}, "site-2": {}},
    "site-2": {GLOBAL_MODEL: {"val_mean_dice": 0.6}, "site-1": {"val_mean_dice": 0.3}},
}


def test_cross_site_by_model_and_table():
    table = cross_site_by_model(CROSS)
    assert table == {GLOBAL_MODEL: {"site-1": 0.5, "site-2": 0.6}, "site-1": {"site-1": 0.4, "site-2": 0.3}}
    text = format_cross_site_table(table, SITES).splitlines()
    assert text[0].split() == ["model", "site-1", "site-2"]
    assert text[2].split() == [GLOBAL_MODEL, "0.5000", "0.6000"]  # the global model first
    assert text[3].split() == ["site-1", "0.4000", "0.3000"]
    partial = format_cross_site_table({"site-2": {"site-1": 0.1}}, SITES)
    assert partial.splitlines()[2].split() == ["site-2", "0.1000", "-"]


def test_build_summary_has_the_promised_fields():
    p = Progress(SITES, rounds=1, start=0.0)
    for s in SITES:
        p.add(parse_progress_line(ROUND_LINE.format(site=s, rnd=0, g=0.02, loss=0.7, work=7.0 + len(s))), now=10.0)
    for line in (
        "2026-11-29 03:00:01,250 - ScatterAndGather - INFO - [identity=server, run=abc]: Round 0 started.",
        "2026-11-29 03:00:11,000 - ScatterAndGather - INFO - [identity=server, run=abc]: Round 0 finished.",
    ):
        p.add(parse_progress_line(line))
    summary = build_summary(
        settings=ExperimentSettings(rounds=1, local_epochs=2),
        job_id="abc",
        status="FINISHED:COMPLETED",
        sites=SITES,
        wall_time_s=12.34,
        progress=p,
        cross_site_results=CROSS,
        mlflow_info={"tracking_uri": "http://127.0.0.1:1", "experiment_id": "1", "run_ids": {}},
        paths={"run_dir": "/x"},
    )
    for key in ("job_id", "job_name", "sites", "rounds", "local_epochs", "wall_time_s", "round_times_s"):
        assert key in summary
    assert summary["untrained_dice"] == {"site-1": 0.02, "site-2": 0.02}
    assert summary["cross_site"][GLOBAL_MODEL] == {"site-1": 0.5, "site-2": 0.6}
    assert summary["final_global_dice"] == {"site-1": 0.5, "site-2": 0.6}
    assert summary["round_times_s"] == [10.0] and summary["wall_time_s"] == 12.3
    assert summary["fl_round_s"] == [9.8] and summary["site_work_s"] == [13.0]
    json.dumps(summary)  # machine-readable
    assert "encrypt_s" not in summary  # no HE lines, no HE fields


def test_he_summary_from_lines():
    lines = [
        "[spleen-he] side=site-1 round=0 stage=encrypt seconds=1.5 bytes=5000",
        "[spleen-he] side=site-2 round=0 stage=encrypt seconds=1.7 bytes=5001",
        "[spleen-he] side=server round=0 stage=aggregate seconds=0.9",
        "[spleen-he] side=site-1 round=0 stage=decrypt seconds=0.4",
        "[spleen-he] side=site-1 round=1 stage=encrypt seconds=1.2 bytes=5000",
    ]
    out = he_summary([parse_progress_line(x) for x in lines], param_count=100)
    assert out["encrypt_s"] == [1.7, 1.2]  # per round, the slowest site
    assert out["aggregate_s"] == [0.9, None] and out["decrypt_s"] == [0.4, None]  # indexed by round
    assert out["update_bytes_encrypted"] == 5000 and out["update_bytes_plain"] == 400


def test_he_summary_packed_lines_and_cross_site_left_out():
    lines = [
        "[spleen-he] side=site-1 stage=encrypt task=train round=0 seconds=4.8 bytes=1600 plain_bytes=200 ratio=8.0",
        "[spleen-he] side=server stage=aggregate task=train round=0 seconds=1.1 add_s=0.5 serialize_s=0.6",
        "[spleen-he] side=site-1 stage=decrypt task=train round=1 seconds=2.9 bytes=1600",
        "[spleen-he] side=site-2 stage=encrypt task=submit_model seconds=9.9 bytes=1",
        "[spleen-he] side=site-2 stage=decrypt task=validate round=1 seconds=9.9 bytes=1",
    ]
    out = he_summary([parse_progress_line(x) for x in lines])
    assert out["encrypt_s"] == [4.8, None] and out["aggregate_s"] == [1.1, None] and out["decrypt_s"] == [None, 2.9]
    assert out["update_bytes_encrypted"] == 1600 and out["update_bytes_plain"] == 200
    assert out["update_bytes_ratio"] == 8.0


def test_run_dir_and_latest_link(tmp_path):
    first = make_run_dir(tmp_path)
    second = make_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    assert (tmp_path / "latest").resolve() == second.resolve()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--sites", "0"], "--sites must be at least 1"),
        (["--local-epochs", "-1"], "--local-epochs must be at least 1"),
        (["--rounds", "two"], "invalid int value"),
        (["--job", "fancy"], "invalid choice"),
        (["--synthetic-shape", "9x9"], "expected three sizes"),
        (["--synthetic-cases", "3"], "too few for 2 sites"),
        (["--data", "/nonexistent/Task09_Spleen"], "no dataset.json"),
        (["--no-such-option"], "unrecognized arguments"),
        (["--stop", "/nonexistent/run"], "no pids.json"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(cli.main([*argv, "--quick", "--runs-dir", str(tmp_path)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not any(tmp_path.iterdir()), "bad input must not make a run directory"


def test_he_job_missing_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("spleen_fl.experiment.JOBS_DIR", tmp_path / "jobs")
    assert cli.main(["--job", "he", "--quick", "--runs-dir", str(tmp_path)]) == 2
    assert "spleen_ct_segmentation_he not found" in capsys.readouterr().err


def test_poc_lock_is_exclusive(tmp_path, monkeypatch):
    monkeypatch.setattr("spleen_fl.poc.LOCK_DIR", tmp_path)
    with PocLock("first run", port=1):
        with pytest.raises(PocBusyError, match=f"another POC run is active \\(pid {os.getpid()}, first run\\)"):
            PocLock("second run", port=1).acquire()
    with PocLock("third run", port=1):  # released: free again
        pass


def test_stop_pids_ends_a_process_group(tmp_path):
    import subprocess

    from spleen_fl.poc import pid_alive
    from spleen_fl.procs import start_group

    proc = start_group(["sh", "-c", "sleep 60 & sleep 60"], tmp_path / "log")
    assert stop_pids({"poc_group": proc.pid, "leader": proc.pid}, grace=5) == []
    proc.wait(timeout=5)
    assert not pid_alive(proc.pid)
    assert subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).returncode == 1
