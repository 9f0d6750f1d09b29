"""An NVFlare POC system (server + N sites on 127.0.0.1) in a folder we choose, started and stopped by PID.

Why the care:
- ``nvflare poc`` keeps its CLI state in ``$HOME/.nvflare/config.conf``; we give the nvflare commands a
  ``HOME`` inside our workspace so a run never rewrites the user's (or another developer's) POC settings.
- POC ports 8002/8003 are fixed, so only one POC may run on a machine. We hold an exclusive ``fcntl.flock``
  on ``/tmp/spleen_fl_poc-8002.lock`` (one lock per server port) for as long as the system runs; a second run
  fails at once with a message naming the holder (the lock file holds its PID and workspace).
- ``start.sh`` runs the participants with ``python3`` from ``PATH``: we put this interpreter's folder first.
- ``nvflare poc start`` is started in its own session, so server, clients and their job processes share one
  process group; after ``nvflare poc stop`` we SIGTERM/SIGKILL that group and every PID from the pid files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from spleen_fl.procs import LockHeld, group_alive, lock_file, port_in_use, start_group, stop_group, unlock_file

ADMIN = "admin@nvidia.com"
PROJECT = "example_project"
SERVER_PORTS = (8002, 8003)
LOCK_DIR = Path("/tmp")


class PocBusyError(RuntimeError):
    """Another POC run holds the lock or the fixed POC ports."""


def lock_path(port: int = SERVER_PORTS[0]) -> Path:
    return LOCK_DIR / f"spleen_fl_poc-{port}.lock"


class PocLock:
    """Exclusive, non-blocking lock on the POC ports; released by ``release()`` or when the process dies."""

    def __init__(self, owner: str, port: int = SERVER_PORTS[0]) -> None:
        self.path = lock_path(port)
        self.owner = owner
        self._fd: int | None = None

    def acquire(self) -> PocLock:
        try:
            self._fd = lock_file(self.path, self.owner)
        except LockHeld as held:
            raise PocBusyError(
                f"another POC run is active ({held.holder}); wait for it, or stop it "
                f"(`spleen-run --stop RUN_DIR`), then retry (lock: {self.path})"
            ) from None
        return self

    def release(self) -> None:
        if self._fd is not None:
            unlock_file(self._fd)
            self._fd = None

    def __enter__(self) -> PocLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def preflight(owner: str = "preflight") -> None:
    """Fail fast (before data and MLflow are set up) when another POC holds the lock or the ports."""
    PocLock(owner).acquire().release()
    busy = [p for p in SERVER_PORTS if port_in_use(p)]
    if busy:
        raise PocBusyError(
            f"port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use: another NVFlare POC or server is "
            "running; stop it first"
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class PocSystem:
    """``with PocSystem(workspace, 2) as poc: poc.admin_startup_kit`` prepares, starts, waits, and stops.

    ``env`` adds variables for the participants (e.g. ``SPLEEN_DATA_DIR``): jobs inherit the clients' env.
    ``pid_file`` (optional) gets the PIDs/process groups as JSON as soon as they are known.
    """

    def __init__(
        self,
        workspace: Path,
        n_sites: int,
        he: bool = False,
        env: dict[str, str] | None = None,
        start_timeout: float = 180.0,
        pid_file: Path | None = None,
    ) -> None:
        if n_sites < 1:
            raise ValueError(f"n_sites must be at least 1, got {n_sites}")
        self.workspace = Path(workspace).resolve()
        self.n_sites = n_sites
        self.he = he
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.pid_file = pid_file
        self.site_names = [f"site-{i}" for i in range(1, n_sites + 1)]
        self._lock = PocLock(owner=f"workspace {self.workspace}")
        self._starter: subprocess.Popen | None = None
        self.pids: dict[str, int] = {}

    # -- layout ------------------------------------------------------------------------------------------
    @property
    def prod_dir(self) -> Path:
        return self.workspace / PROJECT / "prod_00"

    @property
    def admin_startup_kit(self) -> Path:
        return self.prod_dir / ADMIN

    @property
    def participants(self) -> list[str]:
        return ["server", *self.site_names]

    @property
    def log_paths(self) -> dict[str, Path]:
        """Each participant's main log; a job's own log is ``<participant dir>/<job_id>/log.txt``."""
        return {name: self.prod_dir / name / "log.txt" for name in self.participants}

    @property
    def home(self) -> Path:
        return self.workspace.parent / "nvflare_home"

    @property
    def logs_dir(self) -> Path:
        return self.workspace.parent / "logs"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["HOME"] = str(self.home)
        env["NVFLARE_POC_WORKSPACE"] = str(self.workspace)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def nvflare(self, *args: str, log_name: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        """Run ``nvflare ARGS`` with our HOME/workspace; output appended to ``logs/<log_name>``."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        nvflare_bin = str(Path(sys.executable).parent / "nvflare")
        with open(self.logs_dir / log_name, "ab") as log:
            proc = subprocess.run(
                [nvflare_bin, *args], env=self.env(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        if proc.returncode != 0:
            where = self.logs_dir / log_name
            raise RuntimeError(f"`nvflare {' '.join(args)}` failed (exit {proc.returncode}); see {where}")
        return proc

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> PocSystem:
        self._lock.acquire()
        try:
            busy = [p for p in SERVER_PORTS if port_in_use(p)]
            if busy:
                raise PocBusyError(
                    f"port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use: another NVFlare POC or server is "
                    "running; stop it first"
                )
            self.home.mkdir(parents=True, exist_ok=True)
            prepare = ["poc", "prepare", "-n", str(self.n_sites), "--force"] + (["-he"] if self.he else [])
            self.nvflare(*prepare, log_name="poc_prepare.log", timeout=300)
            if not (self.admin_startup_kit / "startup").is_dir():
                raise RuntimeError(f"`nvflare poc prepare` made no admin kit at {self.admin_startup_kit}")
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            nvflare_bin = str(Path(sys.executable).parent / "nvflare")
            cmd = [nvflare_bin, "poc", "start", "-ex", ADMIN, "--timeout", str(int(self.start_timeout))]
            # Own session: server, clients and job processes all land in this process group.
            self._starter = start_group(cmd, self.logs_dir / "poc_start.log", env=self.env())
            self.pids["poc_group"] = self._starter.pid
            self._write_pids()
            try:
                rc = self._starter.wait(timeout=self.start_timeout + 60)
            except subprocess.TimeoutExpired:
                rc = None
            self._record_pid_files()
            if rc != 0:
                raise RuntimeError(
                    f"POC did not become ready (nvflare poc start exit {rc}); see {self.logs_dir / 'poc_start.log'}"
                )
            missing = [p for p in self.participants if f"{p}" not in self.pids]
            if missing:
                raise RuntimeError(f"POC started but wrote no pid file for {', '.join(missing)}")
        except BaseException:
            self.stop()
            raise
        return self

    def _record_pid_files(self) -> None:
        for name in self.participants:
            for kind, fname in (("", "pid.fl"), ("_daemon", "daemon_pid.fl")):
                path = self.prod_dir / name / fname
                try:
                    self.pids[f"{name}{kind}"] = int(path.read_text().strip())
                except (OSError, ValueError):
                    pass
        self._write_pids()

    def _write_pids(self) -> None:
        if self.pid_file is not None:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            data = json.loads(self.pid_file.read_text()) if self.pid_file.is_file() else {}
            data["poc"] = {"workspace": str(self.workspace), "home": str(self.home), **self.pids}
            self.pid_file.write_text(json.dumps(data, indent=2) + "\n")

    def alive_pids(self) -> list[int]:
        return [pid for pid in self.pids.values() if pid_alive(pid)]

    def stop(self) -> None:
        """``nvflare poc stop``, then make sure by process group and PID that nothing we started is left."""
        try:
            if self._starter is not None or self.pids:
                self._record_pid_files()
                if any(pid_alive(p) for k, p in self.pids.items() if k != "poc_group"):
                    try:
                        self.nvflare("poc", "stop", log_name="poc_stop.log", timeout=90)
                    except (RuntimeError, subprocess.TimeoutExpired, OSError):
                        pass  # the kills below finish the job
                stop_pids(self.pids, grace=10.0)
                if self._starter is not None:
                    stop_group(self._starter, grace=5.0)
                    self._starter = None
        finally:
            self._lock.release()

    def __enter__(self) -> PocSystem:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_pids(pids: dict[str, int], grace: float = 10.0) -> list[int]:
    """SIGTERM the process group ``pids['poc_group']`` (if any) and every PID, SIGKILL after ``grace``; returns
    the PIDs still alive at the end (should be none)."""
    group = pids.get("poc_group")
    targets = [p for k, p in pids.items() if k != "poc_group" and isinstance(p, int)]
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if group and group_alive(group):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        for pid in targets:
            if pid_alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not any(pid_alive(p) for p in targets) and not (group and group_alive(group)):
                return []
            time.sleep(0.2)
    return [p for p in targets if pid_alive(p)]
