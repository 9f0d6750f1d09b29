"""--gpus: which GPU each site gets, written where its host would set it, and told back by the site."""

from __future__ import annotations

import subprocess

import pytest

from spleen_tools.cli.run_experiment import check_gpus
from spleen_tools.run.settings import SettingsError
from spleen_tools.systems.base import GPU_ENV, gpu_assignment
from spleen_tools.systems.poc import write_site_gpus

SITES = ["site-1", "site-2", "site-3"]


@pytest.mark.parametrize(
    "gpus, expected",
    [
        ((), {}),
        ((0,), {"site-1": "0", "site-2": "0", "site-3": "0"}),  # several sites share one GPU
        ((0, 1, 1), {"site-1": "0", "site-2": "1", "site-3": "1"}),
        ((1, 0), {"site-1": "1", "site-2": "0", "site-3": "1"}),  # round robin, NVFlare POC's rule
    ],
)
def test_each_site_gets_its_gpu_in_order(gpus, expected):
    assert gpu_assignment(SITES, gpus) == expected


def test_the_site_start_script_exports_its_gpu_once_and_still_runs(tmp_path):
    script = tmp_path / "site-2" / "startup" / "sub_start.sh"
    script.parent.mkdir(parents=True)
    script.write_text(f'#!/usr/bin/env bash\necho "gpu=${{{GPU_ENV}:-unset}}"\n')
    for _ in range(2):  # a POC prepared again: replaced, never stacked
        write_site_gpus(tmp_path, {"site-2": "1"})
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and text.count(f"export {GPU_ENV}=") == 1
    ran = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={GPU_ENV: "7"}, check=True)
    assert ran.stdout.strip() == "gpu=1"  # the site's own setting wins over the starter's environment


def test_naming_a_gpu_this_machine_lacks_is_one_line(monkeypatch):
    monkeypatch.setattr("spleen_tools.cli.run_experiment.cuda_device_count", lambda: 1)
    check_gpus((0, 0))
    with pytest.raises(SettingsError) as err:
        check_gpus((0, 1))
    assert str(err.value) == "--gpus 0,1: this machine has 1 CUDA GPU(s) (ids 0-0)"
    monkeypatch.setattr("spleen_tools.cli.run_experiment.cuda_device_count", lambda: 0)
    with pytest.raises(SettingsError, match="leave --gpus out to train on the CPU"):
        check_gpus((0,))
