"""A participant checks a job against what it installed: the job side's version, the bundle file for file, and no
file outside the installed bundles (bundle configs run as code)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spleen_flare import __version__
from spleen_flare.bundle_runner import resolve_config_files
from spleen_flare.contract import BUNDLES_DIR_ENV, JOB_VERSION_KEY
from spleen_flare.site_install import confined_path, job_problems
from spleen_tools.jobs import prepare_job


@pytest.fixture
def app(tmp_path) -> Path:
    """A prepared job laid out as NVFlare deploys it at a site: <run>/meta.json and <run>/app_site-1/."""
    job = prepare_job("spleen_ct_segmentation_local", tmp_path / "jobs")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(job / "meta.json", run / "meta.json")
    shutil.copytree(job / "app", run / "app_site-1")
    for added in (".__nvfl_sig.json", ".__nvfl_submitter.crt"):  # what NVFlare adds to a submitted job's folders
        (run / "app_site-1" / "config" / "spleen_ct_segmentation" / added).write_text("{}")
    return run / "app_site-1"


def test_a_prepared_job_passes(app):
    assert job_problems(app, "site-1") == []


def test_another_version_is_one_line_naming_both(app):
    meta = app.parent / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), JOB_VERSION_KEY: "9.9.9"}))
    (problem,) = job_problems(app, "site-1")
    assert f"site-1 has spleen_flare {__version__} installed, the job asks for spleen_flare 9.9.9" in problem
    meta.write_text("{}")
    assert "names no spleen_flare_version" in job_problems(app, "site-1")[0]


def test_a_changed_bundle_config_is_refused(app):
    """A ``$`` expression is Python: a job's bundle that differs from the installed one never runs."""
    train = app / "config" / "spleen_ct_segmentation" / "configs" / "train.json"
    config = json.loads(train.read_text())
    config["pwned"] = "$__import__('os').system('touch /tmp/pwned')"
    train.write_text(json.dumps(config))
    (problem,) = job_problems(app, "site-1")
    assert "differs from the one installed" in problem and "configs/train.json" in problem


def test_an_added_override_or_script_is_refused(app):
    (app / "config" / "overrides" / "evil.json").write_text("{}")
    assert "overrides" in job_problems(app, "site-1")[0]
    (app / "config" / "overrides" / "evil.json").unlink()
    (app / "config" / "spleen_ct_segmentation" / "scripts").mkdir()
    (app / "config" / "spleen_ct_segmentation" / "scripts" / "__init__.py").write_text("import os")
    assert "scripts/__init__.py" in job_problems(app, "site-1")[0]


def test_a_site_may_install_another_bundle(app, tmp_path, monkeypatch):
    """The site admin's choice ($SPLEEN_BUNDLES_DIR): the job must then carry that bundle."""
    own = tmp_path / "site_bundles"
    shutil.copytree(app / "config", own, ignore=shutil.ignore_patterns("*.json"))
    monkeypatch.setenv(BUNDLES_DIR_ENV, str(own))
    assert "differs from the one installed at" in job_problems(app, "site-1")[0]
    monkeypatch.setenv(BUNDLES_DIR_ENV, str(tmp_path / "nothing"))
    assert "has no bundle installed at" in job_problems(app, "site-1")[0]


@pytest.mark.parametrize("name", ["/etc/passwd", "../../x.json", "configs/../../../x.json"])
def test_config_files_stay_inside_the_bundles(app, name):
    with pytest.raises(ValueError, match="outside"):
        resolve_config_files(app / "config" / "spleen_ct_segmentation", [name])
    assert resolve_config_files(app / "config" / "spleen_ct_segmentation", ["../overrides/cpu_quick.json"])
    with pytest.raises(ValueError, match="outside"):
        confined_path(app, "../meta.json")


def test_a_job_cannot_name_the_sites_data(monkeypatch):
    """Where the data is, is the site's environment's to say: the training script takes no data path from a job."""
    from spleen_flare import client_train

    for option in ("--data_dir", "--datalist"):
        monkeypatch.setattr("sys.argv", ["client_train.py", "--app_root", "/app", option, "/etc"])
        with pytest.raises(SystemExit):
            client_train.parse_args()
    monkeypatch.setattr("sys.argv", ["client_train.py", "--app_root", "/app", "--local_epochs", "2"])
    assert client_train.parse_args().local_epochs == 2
