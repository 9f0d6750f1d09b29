"""Everything that talks to NVFlare from the host: its command line (``nvflare ...``) and its admin API
(``nvflare.fuel.flare_api``). Systems call :func:`nvflare` for their lifecycle commands (poc, provision,
simulator); the runner submits and follows jobs through :class:`JobAdmin`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

from spleen_tools.paths import NVFLARE

TERMINAL_OK = ("FINISHED:COMPLETED", "FINISHED_OK")


class FlareError(RuntimeError):
    """An ``nvflare`` command failed; the message names the command and its log."""


def nvflare(
    *args: str,
    env: dict[str, str] | None,
    log_path: Path,
    timeout: float = 300.0,
    cwd: Path | None = None,
) -> None:
    """``nvflare ARGS``, output appended to ``log_path``; FlareError naming the log if it exits non-zero."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.run(
            [str(NVFLARE), *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0:
        raise FlareError(f"`nvflare {' '.join(args)}` failed (exit {proc.returncode}); see {log_path}")


def nvflare_command(*args: str) -> list[str]:
    """The argv of ``nvflare ARGS`` (for commands started in a process group of their own)."""
    return [str(NVFLARE), *args]


def find_status(data) -> str | None:
    """The job status anywhere in ``nvflare job meta``'s JSON data."""
    if isinstance(data, dict):
        for key in ("status", "job_status"):
            if isinstance(data.get(key), str):
                return data[key]
        for value in data.values():
            found = find_status(value)
            if found:
                return found
    return None


def is_finished(status: str | None) -> bool:
    return bool(status) and (status.startswith("FINISHED") or status in ("ABORTED", "FAILED"))


class JobAdmin:
    """Job commands as an admin: ``nvflare --format json job ... --startup-kit KIT``, each call logged."""

    def __init__(self, startup_kit: Path, env: dict[str, str], log_path: Path, prefix: Sequence[str] = ()) -> None:
        self.startup_kit = Path(startup_kit)
        self.env = env
        self.log_path = log_path
        self.prefix = list(prefix)  # e.g. ``ip netns exec <admin host>``: the admin's own host

    def __call__(self, *args: str, timeout: float = 120.0) -> dict:
        """One command; its JSON reply's ``data``. FlareError with the server's message if it failed."""
        cmd = [*self.prefix, str(NVFLARE), "--format", "json", *args, "--startup-kit", str(self.startup_kit)]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
        try:
            reply = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
        except ValueError:
            reply = {}
        if proc.returncode != 0 or reply.get("status") not in (None, "ok"):
            message = reply.get("message") or reply.get("error") or proc.stderr.strip()[-300:]
            raise FlareError(f"`nvflare {' '.join(args)}` failed: {message} (see {self.log_path})")
        return reply.get("data") or {}

    def submit(self, job_folder: Path) -> str:
        return str(self("job", "submit", "-j", str(job_folder))["job_id"])

    def status(self, job_id: str) -> str | None:
        return find_status(self("job", "meta", job_id))

    def abort(self, job_id: str) -> None:
        self("job", "abort", job_id, "--force", timeout=60)

    def download(self, job_id: str, out_dir: Path) -> Path:
        self("job", "download", job_id, "-o", str(out_dir), "--force", timeout=300)
        return out_dir


def connected_sites(admin_user: str, admin_kit: Path, timeout: float = 5.0) -> list[str]:
    """Sites the server reports as connected, asked through the admin API with an admin kit (mutual TLS)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    # The API prints "Connecting to FLARE ..." and logs "no connection to server" while the server is starting.
    logging.disable(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            session = new_secure_session(admin_user, str(admin_kit), timeout=timeout)
            try:
                info = session.get_system_info()
            finally:
                with contextlib.suppress(Exception):
                    session.close()
    finally:
        logging.disable(logging.NOTSET)
    return sorted(c.name for c in info.client_info)
