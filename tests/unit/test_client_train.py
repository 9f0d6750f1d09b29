"""A site's Client API script, the parts that need no NVFlare: the lines it says about its cases and its device,
and the files it keeps (its last update, the last global model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from spleen_flare.client_train import (
    SiteDataError,
    check_site_cases,
    device_name,
    gpu_peak_mb,
    keep_final_global_model,
    keep_last_update,
)
from spleen_flare.contract import FINAL_GLOBAL_MODEL, LAST_LOCAL_UPDATE, PROGRESS_TAG, read_tagged_line
from spleen_tools.data import make_synthetic_dataset


def progress_events(text: str) -> list[dict]:
    found = (read_tagged_line(line) for line in text.splitlines())
    return [fields for tag, fields in filter(None, found) if tag == PROGRESS_TAG]


def test_every_problem_of_the_sites_cases_is_one_data_error_line_then_it_stops(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "data", num_train=2, num_test=0, shape=(32, 32, 8))
    images = sorted((data / "imagesTr").iterdir())
    cases = [{"image": str(images[0]), "label": str(data / "labelsTr" / images[0].name)}]
    check_site_cases("site-1", cases)  # good cases: nothing said
    assert progress_events(capsys.readouterr().out) == []
    bad = [{"image": str(tmp_path / "missing.nii.gz"), "label": str(tmp_path / "also_missing.nii.gz")}, *cases]
    with pytest.raises(SiteDataError, match="site-1: "):
        check_site_cases("site-1", bad)
    events = progress_events(capsys.readouterr().out)
    assert events and all(e["kind"] == "data_error" and e["site"] == "site-1" for e in events)
    assert any("missing.nii.gz" in e["problem"] for e in events)


def test_the_last_update_is_kept_whole_with_its_steps_and_round(tmp_path):
    site = SimpleNamespace(name="site-1", app_root=tmp_path)
    weights = {"w": torch.arange(4.0), "n": torch.tensor(3)}
    keep_last_update(site, weights, steps=7, rnd=2)
    kept = torch.load(tmp_path / LAST_LOCAL_UPDATE, map_location="cpu", weights_only=True)
    assert kept["steps"] == 7 and kept["round"] == 2 and torch.equal(kept["model"]["w"], weights["w"])
    assert not list((tmp_path / LAST_LOCAL_UPDATE).parent.glob("*.tmp")), "written through a temporary file"


def test_the_last_global_model_is_kept_in_nvflares_layout(tmp_path, capsys):
    site = SimpleNamespace(name="site-2", app_root=tmp_path)
    keep_final_global_model(site, {"w": [1.0, 2.0]})
    kept = torch.load(tmp_path / FINAL_GLOBAL_MODEL, map_location="cpu", weights_only=True)
    assert torch.equal(kept["model"]["w"], torch.tensor([1.0, 2.0]))
    (event,) = progress_events(capsys.readouterr().out)
    assert event == {"kind": "info", "site": "site-2", "final_global_model": str(tmp_path / FINAL_GLOBAL_MODEL)}


def test_a_site_on_the_cpu_says_so_and_reports_no_gpu_memory():
    assert device_name(torch.device("cpu")) == "cpu"
    assert gpu_peak_mb(torch.device("cpu")) is None


def test_a_site_that_caps_epsilon_refuses_a_job_without_dp_and_methods_that_bypass_it(monkeypatch, capsys):
    from spleen_flare.client_train import DPError, dp_settings, site_dp
    from spleen_flare.contract import DP_MAX_EPSILON_ENV

    def args(**kw) -> SimpleNamespace:
        base = {"dp_noise_multiplier": 0.0, "dp_target_epsilon": 0.0, "dp_max_grad_norm": 1.0, "dp_delta": 1e-5}
        return SimpleNamespace(**(base | {"dp_max_epsilon": 0.0, "fedprox_mu": 0.0, "fedbn": 0} | kw))

    assert dp_settings(args()) is None
    monkeypatch.setenv(DP_MAX_EPSILON_ENV, "4")
    with pytest.raises(DPError):
        site_dp("site-1", args())
    assert site_dp("site-1", args(dp_target_epsilon=8.0)).budget == 4.0  # the site's cap wins
    with pytest.raises(DPError):
        site_dp("site-1", args(dp_target_epsilon=8.0, fedprox_mu=0.01))
    events = progress_events(capsys.readouterr().out)
    assert [(e["kind"], e["problem"][:6]) for e in events] == [("dp_error", "site-1")] * 2
    assert "SPLEEN_DP_MAX_EPSILON=4" in events[0]["problem"] and "FedProx" in events[1]["problem"]
