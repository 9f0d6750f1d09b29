"""What the one command prints: the cross-site table and the closing report."""

from __future__ import annotations

from spleen_tools.job_result import GLOBAL_MODEL
from spleen_tools.run.formatting import fmt, mmss
from spleen_tools.run.report import format_cross_site_table, report, report_tracking, segments_note
from spleen_tools.run.summary import HeCosts, RunSummary, Tracking

SITES = ["site-1", "site-2"]


def test_cross_site_table_global_model_first_and_gaps():
    table = {GLOBAL_MODEL: {"site-1": 0.5, "site-2": 0.6}, "site-1": {"site-1": 0.4, "site-2": 0.3}}
    text = format_cross_site_table(table, SITES).splitlines()
    assert text[0].split() == ["model", "site-1", "site-2"]
    assert text[2].split() == [GLOBAL_MODEL, "0.5000", "0.6000"]
    assert text[3].split() == ["site-1", "0.4000", "0.3000"]
    partial = format_cross_site_table({"site-2": {"site-1": 0.1}}, SITES)
    assert partial.splitlines()[2].split() == ["site-2", "0.1000", "-"]


def test_numbers_and_times():
    assert (fmt(0.12345), fmt(None), fmt("x")) == ("0.1235", "?", "?")
    assert (mmss(0), mmss(61.4), mmss(float("nan"))) == ("0:00", "1:01", "?:??")


def test_report_names_results_times_he_cost_and_mlflow():
    summary = RunSummary(
        cross_site={GLOBAL_MODEL: {"site-1": 0.5, "site-2": 0.6}},
        untrained_dice={"site-1": 0.01},
        final_global_dice={"site-1": 0.5, "site-2": 0.6},
        rounds=2,
        wall_time_s=75.0,
        round_times_s=[30.0, 31.0],
        fl_round_s=[29.0, 30.0],
        site_work_s=[20.0, 21.0],
        he=HeCosts(
            encrypt_s=[1.5, 1.4],
            aggregate_s=[0.2, 0.2],
            decrypt_s=[None, 1.1],
            update_bytes_encrypted=38_600_000,
            update_bytes_plain=19_300_000,
            update_bytes_ratio=2.0,
        ),
        tracking=Tracking(
            mlflow={"tracking_uri": "http://127.0.0.1:5000", "experiment_name": "e", "experiment_id": "1"}
        ),
        paths={"run_dir": "/runs/x"},
    )
    lines = []
    report(summary, SITES, lines.append)
    text = "\n".join(lines)
    assert "site-1: untrained 0.0100 -> after 2 rounds 0.5000 (does not segment yet: < 0.8)" in text
    assert "site-2: untrained ? -> after 2 rounds 0.6000" in text
    assert "wall time 1:15" in text and "server round times (s): [29.0, 30.0]" in text
    assert (
        "HE: one client update 38.6 MB = 2.0x the plaintext 19.3 MB; per round (s): encrypt [1.5, 1.4], "
        "aggregate [0.2, 0.2], decrypt [None, 1.1]"
    ) in text
    assert "http://127.0.0.1:5000/#/experiments/1" in text and "summary: /runs/x/summary.json" in text


def test_segments_note():
    assert segments_note(0.85) == " (segments: Dice >= 0.8)"
    assert segments_note(0.2) == " (does not segment yet: < 0.8)"
    assert segments_note(None) == ""


def test_tracking_lines_per_mode():
    lines: list[str] = []
    server = {"tracking_uri": "http://127.0.0.1:5000", "experiment_name": "e", "experiment_id": "1", "run_ids": {}}
    report_tracking(Tracking(mlflow=server), lines.append)
    assert lines[-1] == "  charts of the sites' runs: http://127.0.0.1:5000/#/experiments/1/runs?compareRunsMode=CHART"
    report_tracking(Tracking(mlflow={**server, "tracking_uri": "sqlite:////r/mlflow.db"}), lines.append)
    assert lines[-1] == "  view: .venv/bin/mlflow ui --backend-store-uri sqlite:////r/mlflow.db"
    report_tracking(Tracking(tensorboard={"site_dirs": {"site-1": "/r/tb_events/site-1"}}), lines.append)
    assert lines[-1] == "  view: .venv/bin/tensorboard --logdir /r/tb_events"
    offline = {"mode": "offline", "run_files": {"site-1": "/r/w/a/run-a.wandb"}, "sync": "wandb sync /r/w/a"}
    report_tracking(Tracking(wandb=offline), lines.append)
    assert lines[-2:] == [
        "W&B offline runs: /r/w/a/run-a.wandb",
        "  upload (after `.venv/bin/wandb login`): wandb sync /r/w/a",
    ]
    lines.clear()
    failed = {**offline, "mode": "online", "failed_login": "W&B login failed (UsageError: bad key); runs kept offline"}
    report_tracking(Tracking(wandb=failed), lines.append)
    assert lines[0] == "W&B: W&B login failed (UsageError: bad key); runs kept offline" and "upload" in lines[-1]
    lines.clear()
    report_tracking(Tracking(wandb={**offline, "mode": "online"}), lines.append)
    assert lines == ["W&B runs (also online): /r/w/a/run-a.wandb"]
