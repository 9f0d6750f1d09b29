"""What a running federated system offers the runner, and the environment its participants start with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from spleen_tools.paths import BIN_DIR

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch's intra-op pool follows OMP_NUM_THREADS
# After a job's server side ends, NVFlare's server waits for every site's own outcome before it calls the job
# finished: 900 s by default, all of it for a site that died. A healthy site reports within seconds.
OUTCOME_WAIT = ("NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT", "60")


GPU_ENV = "CUDA_VISIBLE_DEVICES"


def gpu_assignment(site_names: list[str], gpus: tuple[int, ...]) -> dict[str, str]:
    """Site -> its ``CUDA_VISIBLE_DEVICES``: the i-th site gets ``gpus[i % len(gpus)]`` (NVFlare POC's own rule for
    ``poc start -gpu``), so ``(0,)`` puts every site on GPU 0 and ``(0, 1)`` alternates. Empty: no assignment."""
    return {site: str(gpus[i % len(gpus)]) for i, site in enumerate(site_names)} if gpus else {}


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch missing or its CUDA broken: no GPU to give
        return 0


def thread_share(sites: int, cores: int | None = None) -> int:
    """Threads per site when ``sites`` train side by side on this machine: its cores divided among them."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, sites))


def participant_env(extra: dict[str, str] | None = None, sites: int | None = None) -> dict[str, str]:
    """This environment plus ``extra`` (e.g. ``SPLEEN_DATA_DIR``), with this interpreter's folder first on ``PATH``
    (NVFlare's start scripts run ``python3``) and unbuffered output (progress lines reach the logs at once).

    With ``sites`` (participants sharing this machine), each gets its share of the cores: default thread pools
    oversubscribe them (two trainings side by side take 5-11 s per epoch instead of about 2 s). Thread counts the
    user set already are kept."""
    env = dict(os.environ)
    env.update(extra or {})
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault(*OUTCOME_WAIT)
    if sites:
        for var in THREAD_VARS:
            env.setdefault(var, str(thread_share(sites)))
    return env


@runtime_checkable
class FLSystem(Protocol):
    """A server plus sites that ``start()`` brings up and ``stop()`` takes down again.

    ``start()`` returns only when the server is up and every site is connected (a readiness check, not a sleep);
    ``stop()`` stops exactly the processes ``start()`` started and is safe to call twice or after a failed start.
    Used as a context manager: ``with system: ...``. ``env()`` is the environment for commands against it.
    """

    kind: str  # the key of its entry in the run's pids.json ("poc", "secure")
    workspace: Path  # the provisioning output: every participant's kit, logs and job folders
    site_names: list[str]
    admin_startup_kit: Path  # the admin kit to submit jobs with (``nvflare job submit --startup-kit``)
    log_paths: dict[str, Path]  # participant ("server", "site-1", ...) -> its log file

    def env(self) -> dict[str, str]: ...

    def start(self) -> FLSystem: ...

    def stop(self) -> None: ...

    def __enter__(self) -> FLSystem: ...

    def __exit__(self, *exc) -> None: ...
