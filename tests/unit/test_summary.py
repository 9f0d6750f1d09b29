"""summary.json from progress events and cross-site results; the record and its file; the HE cost fields; what
fails a finished run."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import torch
from model_jobs import bundle_network
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from spleen_flare.contract import HE_TAG, KEY_METRIC, PROGRESS_TAG, tagged_line
from spleen_tools.job_result import GLOBAL_MODEL, count_weights, cross_site_by_model, read_checkpoint
from spleen_tools.run.progress import Progress, parse_event
from spleen_tools.run.settings import ExperimentSettings
from spleen_tools.run.summary import HeCosts, RunSummary, Tracking, build_summary, he_summary, problems

SITES = ["site-1", "site-2"]
CROSS = {
    "site-1": {GLOBAL_MODEL: {KEY_METRIC: 0.5}, "site-1": {KEY_METRIC: 0.4}, "site-2": {}},
    "site-2": {GLOBAL_MODEL: {KEY_METRIC: 0.6}, "site-1": {KEY_METRIC: 0.3}},
}


def he(**fields) -> dict:
    return parse_event(tagged_line(HE_TAG, **fields))


def test_cross_site_by_model():
    assert cross_site_by_model(CROSS) == {
        GLOBAL_MODEL: {"site-1": 0.5, "site-2": 0.6},
        "site-1": {"site-1": 0.4, "site-2": 0.3},
    }


def summary_of(progress: Progress, cross=CROSS, status="FINISHED:COMPLETED") -> RunSummary:
    return build_summary(
        settings=ExperimentSettings(rounds=1, local_epochs=2),
        job_id="abc",
        status=status,
        sites=SITES,
        wall_time_s=12.34,
        progress=progress,
        cross_site_results=cross,
        tracking=Tracking(
            mlflow={
                "tracking_uri": "http://127.0.0.1:1",
                "experiment_id": "1",
                "run_ids": {s: f"run-{s}" for s in SITES},
            }
        ),
        paths={"run_dir": "/x"},
    )


def test_build_summary_has_the_promised_fields():
    p = Progress(SITES, rounds=1, start=0.0)
    for s in SITES:
        line = tagged_line(PROGRESS_TAG, kind="round", site=s, round=0, global_dice=0.02, work_s=7.0 + len(s))
        p.add(parse_event(line), now=10.0)
    for line in (
        "2026-11-29 03:00:01,250 - ScatterAndGather - INFO - [identity=server, run=abc]: Round 0 started.",
        "2026-11-29 03:00:11,000 - ScatterAndGather - INFO - [identity=server, run=abc]: Round 0 finished.",
    ):
        p.add(parse_event(line))
    summary = summary_of(p)
    assert (summary.job_id, summary.job_name, summary.sites, summary.rounds, summary.local_epochs) == (
        "abc",
        "spleen_ct_segmentation_local",
        SITES,
        1,
        2,
    )
    assert summary.untrained_dice == {"site-1": 0.02, "site-2": 0.02}
    assert summary.cross_site[GLOBAL_MODEL] == {"site-1": 0.5, "site-2": 0.6}
    assert summary.final_global_dice == {"site-1": 0.5, "site-2": 0.6}
    assert summary.round_times_s == [10.0] and summary.wall_time_s == 12.3
    assert summary.fl_round_s == [9.8] and summary.site_work_s == [13.0]
    json.dumps(summary.to_json())  # machine-readable
    assert summary.he is None and "encrypt_s" not in summary.to_json()  # no HE lines, no HE fields
    assert problems(summary, SITES, ("FINISHED:COMPLETED",)) == []


# summary.json's keys for a plain job that has run every step, in the file's order
PLAIN_JOB_KEYS = [
    *("job_id", "job_name", "status", "sites", "rounds", "local_epochs", "quick", "data", "wall_time_s"),
    *("round_times_s", "fl_round_s", "site_work_s", "untrained_dice", "devices", "gpu_peak_mb", "data_errors"),
    *("job_errors", "dropped", "global_dice_per_round", "final_global_dice", "final_model", "best_model"),
    *("cross_site", "mlflow", "paths", "server_peak_memory_mb", "resumed", "plots", "model_bundle", "secrets_scan"),
]


def test_the_file_has_the_keys_of_a_plain_job_and_reads_back_as_the_same_record(tmp_path):
    history = [{"round": 0, "sha256": "a"}, {"best": True, "round": 0, "sha256": "a", KEY_METRIC: 0.5}]
    built = build_summary(
        settings=ExperimentSettings(rounds=1, local_epochs=2),
        job_id="abc",
        status="FINISHED:COMPLETED",
        sites=SITES,
        wall_time_s=12.34,
        progress=Progress(SITES, rounds=1, start=0.0),
        cross_site_results=CROSS,
        tracking=Tracking(mlflow={"tracking_uri": "sqlite:///m.db", "run_ids": {}}),
        paths={"run_dir": str(tmp_path), "cross_val_results": None},
        model_history=history,
        job_errors=["site-1: refused"],
        server_peak_memory_mb=512.0,
    )
    before = built.to_json()  # before the model bundle and the secrets scan: neither key
    assert list(before) == [k for k in PLAIN_JOB_KEYS if k not in ("model_bundle", "secrets_scan")]
    summary = replace(built, plots={"learning_curves": "/x.png"}, model_bundle={"path": "/b"}, secrets_scan={})
    assert list(summary.to_json()) == PLAIN_JOB_KEYS
    assert summary.to_json()["best_model"] == {"round": 0, "sha256": "a", KEY_METRIC: 0.5}
    assert RunSummary.from_json(summary.to_json()) == summary
    assert RunSummary.load(summary.save(tmp_path)) == summary == RunSummary.load(tmp_path)  # through the file
    assert RunSummary.from_json(json.loads(json.dumps(built.to_json()))) == built


def test_optional_keys_only_where_the_run_has_them():
    base = RunSummary(status="FINISHED:COMPLETED", tracking=Tracking(tensorboard={"site_dirs": {}}))
    assert "tensorboard" in base.to_json() and base.to_json()["mlflow"] is None and "wandb" not in base.to_json()
    assert "status_note" not in base.to_json() and "mlflow" not in RunSummary().to_json()  # nothing of tracking
    # a dropped site and a failed job: the run looked for why, and says so (null: no known cause)
    failed = replace(base, status="FINISHED:EXECUTION_EXCEPTION", dropped=[{"site": "site-2", "round": 1}])
    assert failed.needs_status_note and failed.to_json()["status_note"] is None
    assert RunSummary.from_json(failed.to_json()) == failed
    he = replace(base, he=HeCosts(encrypt_s=[1.0], aggregate_s=[0.5], decrypt_s=[None]))
    keys = list(he.to_json())
    assert keys[keys.index("paths") + 1 : keys.index("server_peak_memory_mb")] == [
        "encrypt_s",
        "aggregate_s",
        "decrypt_s",
    ]
    assert RunSummary.from_json(he.to_json()) == he


def test_problems_of_a_finished_run():
    complete = {m: {s: {KEY_METRIC: 0.5} for s in [GLOBAL_MODEL, *SITES]} for m in SITES}
    ok = ("FINISHED:COMPLETED",)
    assert problems(summary_of(Progress(SITES, 1), cross=complete), SITES, ok) == []
    one_site = {"site-1": {GLOBAL_MODEL: {KEY_METRIC: 0.5}}}
    assert problems(summary_of(Progress(SITES, 1), cross=one_site), SITES, ok) == ["the cross-site table is incomplete"]
    assert problems(summary_of(Progress(SITES, 1), cross=None, status="ABORTED"), SITES, ok) == [
        "job ended ABORTED",
        "no cross-site results in the downloaded job",
    ]


def test_he_summary_per_round_slowest_and_sizes():
    events = [
        he(side="site-1", round=0, stage="encrypt", seconds=1.5, bytes=5000),
        he(side="site-2", round=0, stage="encrypt", seconds=1.7, bytes=5001),
        he(side="server", round=0, stage="aggregate", seconds=0.9),
        he(side="site-1", round=0, stage="decrypt", seconds=0.4),
        he(side="site-1", round=1, stage="encrypt", seconds=1.2, bytes=5000),
    ]
    out = he_summary(events, param_count=100)
    assert out.encrypt_s == [1.7, 1.2]  # per round, the slowest site
    assert out.aggregate_s == [0.9, None] and out.decrypt_s == [0.4, None]  # indexed by round
    assert out.update_bytes_encrypted == 5000 and out.update_bytes_plain == 400
    assert he_summary([]) is None  # not an HE job


def test_he_summary_leaves_cross_site_out():
    events = [
        he(side="site-1", stage="encrypt", task="train", round=0, seconds=4.8, bytes=1600, plain_bytes=200),
        he(side="server", stage="aggregate", task="train", round=0, seconds=1.1, add_s=0.5),
        he(side="site-1", stage="decrypt", task="train", round=1, seconds=2.9, bytes=1600),
        he(side="site-2", stage="encrypt", task="submit_model", seconds=9.9, bytes=1),
        he(side="site-2", stage="decrypt", task="validate", round=1, seconds=9.9, bytes=1),
    ]
    out = he_summary(events)
    assert out.encrypt_s == [4.8, None] and out.aggregate_s == [1.1, None] and out.decrypt_s == [None, 2.9]
    assert out.update_bytes_encrypted == 1600 and out.update_bytes_plain == 200
    assert out.update_bytes_ratio == 8.0
    assert list(out.to_json())[-3:] == ["update_bytes_encrypted", "update_bytes_plain", "update_bytes_ratio"]


def test_a_site_missing_from_the_tracking_store_is_a_problem():
    complete = {s: 0.5 for s in SITES}
    base = RunSummary(status="FINISHED:COMPLETED", cross_site={GLOBAL_MODEL: complete, **{s: complete for s in SITES}})
    ok = ("FINISHED:COMPLETED",)
    assert problems(replace(base, tracking=Tracking(mlflow={"run_ids": {"site-1": "r1"}})), SITES, ok) == [
        "no metrics of site-2 in the tracking store"
    ]
    assert problems(replace(base, tracking=Tracking()), SITES, ok) == [
        "no metrics of site-1, site-2 in the tracking store"
    ]
    tb = Tracking(tensorboard={"site_dirs": {s: f"/tb/{s}" for s in SITES}})
    assert problems(replace(base, tracking=tb), SITES, ok) == []
    wandb = Tracking(wandb={"run_files": {"site-2": "/w/run-b.wandb"}})
    assert problems(replace(base, tracking=wandb), SITES, ok) == ["no metrics of site-1 in the tracking store"]


def test_a_dropped_sites_abandoned_upload_explains_the_status(tmp_path):
    from spleen_tools.job_result import abandoned_upload

    log = tmp_path / "job-1" / "workspace" / "log.txt"
    log.parent.mkdir(parents=True)
    log.write_text(  # NVFlare 2.9's line when a site died while streaming its result (a real run's, shortened)
        "2026-11-29 20:01:56,797 - Adapter - CRITICAL - failed to decode streamed submit_update in server job cell "
        "server.job-1; exiting job process to fail the job: RuntimeError: failed to download from site-2.job-1 for "
        "source {'fqcn': 'site-2.job-1'}: download service shut down\n"
    )
    note = abandoned_upload(tmp_path, ["site-2"])
    assert note and note.startswith("NVFlare failed the job at its end on site-2's upload")
    assert abandoned_upload(tmp_path, ["site-3"]) is None  # another site's failure is not excused

    base = RunSummary(
        status="FINISHED:EXECUTION_EXCEPTION",
        rounds=2,
        fl_round_s=[3.0, 4.0],
        cross_site={"SRV_FL_global_model.pt": {"site-1": 0.9}, "site-1": {"site-1": 0.8}},
        dropped=[{"site": "site-2", "round": 1}],
    )
    ok = ("FINISHED:COMPLETED",)
    assert problems(replace(base, status_note=note), SITES, ok) == []
    assert problems(base, SITES, ok) == ["job ended FINISHED:EXECUTION_EXCEPTION"]
    unfinished = replace(base, status_note=note, fl_round_s=[3.0])  # a round missing: not excused
    assert problems(unfinished, SITES, ok) == ["job ended FINISHED:EXECUTION_EXCEPTION"]


def test_a_job_that_could_not_resume_names_the_cause_first():
    p = Progress(SITES, 3)
    p.job_errors.append("server: cannot resume from job x: gone")
    found = problems(summary_of(p, cross=None, status="FINISHED:EXECUTION_EXCEPTION"), SITES, ("FINISHED:COMPLETED",))
    assert found[0] == "server: cannot resume from job x: gone" and "job ended FINISHED:EXECUTION_EXCEPTION" in found


def _persisted_global_model(download: Path) -> dict:
    """A global model written the way the job's server writes it (NVFlare's PTFileModelPersistor, which the job's
    persistor extends, with the bundle's network and the learnable NVFlare's FullModelShareableGenerator hands
    it); returns its weights."""
    app = download / "job-1" / "workspace" / "app_server"
    app.mkdir(parents=True)
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app), private=True, sticky=True)
    persistor = PTFileModelPersistor(model=bundle_network())
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    weights = persistor.load_model(fl_ctx)[ModelLearnableKey.WEIGHTS]
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    persistor.save_model(make_model_learnable(weights, {}), fl_ctx)
    return weights


class TouchOnLoad:
    """Unpickled, this calls ``Path.touch(marker)``: a crafted checkpoint's ``os.system``, made harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_the_weight_count_reads_the_servers_checkpoint_as_weights_only(tmp_path):
    weights = _persisted_global_model(tmp_path)
    (checkpoint,) = tmp_path.rglob("FL_global_model.pt")
    assert read_checkpoint(checkpoint).keys() == weights.keys()  # NVFlare's layout needs no allow-listed types
    assert count_weights(tmp_path) == sum(v.size for v in weights.values())


def test_a_crafted_global_model_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "payload_ran"
    crafted = tmp_path / "job-1" / "workspace" / "app_server" / "FL_global_model.pt"
    crafted.parent.mkdir(parents=True)
    payload = {"model": {"w": torch.zeros(2)}, "train_conf": TouchOnLoad(marker)}
    torch.save(payload, crafted)
    lines = []
    assert count_weights(tmp_path, out=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith(f"error: {crafted}: refused") and "\n" not in lines[0]
    assert not marker.exists()
    crafted.write_bytes(pickle.dumps(payload))  # not torch's format (an HE server's DXO file neither): not read
    assert count_weights(tmp_path, out=lines.append) is None and len(lines) == 1
    assert not marker.exists()
