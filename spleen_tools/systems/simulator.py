"""Run a job in the NVFlare simulator and locate what it wrote."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from spleen_flare.contract import DATA_DIR_ENV
from spleen_tools.flare import nvflare_command
from spleen_tools.jobs import CUSTOM_DIR
from spleen_tools.procs import start_group, stop_started
from spleen_tools.systems.base import participant_env


@dataclass(frozen=True)
class SimulatorResult:
    returncode: int
    workspace: Path
    log_path: Path

    @property
    def server_job_dir(self) -> Path:
        return self.workspace / "server" / "simulate_job"

    @property
    def cross_site_results_path(self) -> Path:
        return self.server_job_dir / "cross_site_val" / "cross_val_results.json"

    def cross_site_results(self) -> dict:
        return json.loads(self.cross_site_results_path.read_text())

    @property
    def global_model_path(self) -> Path:
        return self.server_job_dir / "app_server" / "FL_global_model.pt"


def run_simulator(
    job_folder: Path,
    workspace: Path,
    sites: int,
    data_dir: Path,
    timeout: float = 1800,
    env: dict[str, str] | None = None,
) -> SimulatorResult:
    """``nvflare simulator`` with ``sites`` clients in parallel; output to ``workspace/simulator.log``.

    The simulator has no site policies: it admits only NVFlare's default classes, unless the job carries its own code
    (``ship_code``), which on one machine is the installed code anyway."""
    if not (Path(job_folder) / "app" / CUSTOM_DIR).is_dir():
        raise ValueError(
            f"{job_folder}: the simulator admits our classes only in a job that carries them: prepare it with "
            "spleen-prepare-jobs --ship-code"
        )
    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    log_path = workspace.parent / f"{workspace.name}.simulator.log"  # the simulator empties its workspace
    job = str(Path(job_folder).resolve())
    cmd = nvflare_command("simulator", job, "-w", str(workspace), "-n", str(sites), "-t", str(sites))
    extra = {**(env or {}), DATA_DIR_ENV: str(Path(data_dir).resolve())}  # ``env``: e.g. SPLEEN_DATALIST
    proc = start_group(cmd, log_path, env=participant_env(extra, sites))
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        returncode = -1
    finally:
        stop_started(proc)  # the simulator's client processes live in the same group
    return SimulatorResult(returncode, workspace, log_path)
