"""The provisioned secure system (TLS with mutual certificates, signed kits, HE context) on this machine.

The design and the reasons for it: docs/design.md, "spleen_tools/systems/secure.py".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from spleen_tools.flare import connected_sites
from spleen_tools.paths import LOCK_DIR, SECURE_PROJECT_YML
from spleen_tools.procs import HostLock, PidFile, ProcessRef, busy_ports, start_group, terminate, write_json
from spleen_tools.systems.base import GPU_ENV, gpu_assignment, participant_env
from spleen_tools.systems.secure_workspace import (
    FIX_PROVISION,
    FIX_STOP,
    Kits,
    NotProvisionedError,
    SecureBusyError,
    SecureError,
    check_sites,
    default_workspace,
    isolate_server_storage,
    read_kits,
    read_state,
    recorded_processes,
    running_pids,
    state_path,
)
from spleen_tools.systems.site_policy import SERVER_CLASSES, SITE_CLASSES, kit_policy

KIND = "secure"
CONSOLE_DIR = "logs"  # <workspace>/logs/<participant>.console.log: what sub_start.sh and python3 print
_RUNTIME_FLAGS = ("pid.fl", "daemon_pid.fl", "shutdown.fl", "restart.fl")


def port_lock(port: int, owner: str) -> HostLock:
    """One start/stop (or in-process system) at a time on the server port."""

    def busy(holder: str) -> SecureBusyError:
        return SecureBusyError(
            f"another secure system is starting, running or stopping ({holder}); wait for it or stop it "
            f"({FIX_STOP}), then retry (lock: {LOCK_DIR / f'spleen-secure-{port}.lock'})"
        )

    return HostLock(LOCK_DIR / f"spleen-secure-{port}.lock", owner, busy)


def check_policies(kits: Kits, n_sites: int) -> None:
    """Kits provisioned before the job side (or one of its jobs, e.g. the statistics job) was installed at the sites
    lack some of its classes: say so now, naming the first one missing."""
    wanted = {kits.server: SERVER_CLASSES, **{kits.sites[f"site-{i}"]: SITE_CLASSES for i in range(1, n_sites + 1)}}
    for kit, classes in wanted.items():
        allowed = kit_policy(kit)["class_allow_list"]
        missing = [c for c in classes if not isinstance(allowed, list) or c not in allowed]
        if missing:
            raise SecureError(
                f"{kit / 'local'} does not allow {missing[0]} (kits from an older provisioning): provision again "
                f"({FIX_PROVISION}), or let a site allow our classes with spleen-site-policy {kit}"
            )


def preflight(n_sites: int, workspace: Path | None = None) -> Kits:
    """Fail fast (one line naming the fix) when the system cannot start: not provisioned, too few site kits,
    a secure system still running from this workspace, or the server ports taken."""
    workspace = Path(workspace) if workspace is not None else default_workspace()
    kits = read_kits(workspace)
    check_sites(kits, n_sites)
    check_policies(kits, n_sites)
    live = running_pids(workspace)
    if live:
        raise SecureBusyError(
            f"a secure system started from {workspace} still runs (PIDs {', '.join(map(str, live[:6]))}); "
            f"stop it first ({FIX_STOP})"
        )
    busy = busy_ports((kits.fl_port, kits.admin_port))
    if busy:
        raise SecureBusyError(
            f"port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use by another process (another NVFlare "
            f"server?): stop it, or change fed_learn_port/admin_port in {SECURE_PROJECT_YML.name} and provision again"
        )
    return kits


# -- the system -----------------------------------------------------------------------------------------------
class SecureSystem:
    """``with SecureSystem(n_sites=2) as system: system.admin_startup_kit`` starts, waits for the sites, stops.

    ``env`` adds variables for the participants (e.g. ``SPLEEN_DATA_DIR``; jobs inherit the clients' env).
    ``pid_file`` (optional) gets the process groups as JSON under ``"secure"`` as soon as they are known.
    ``start()`` keeps the port lock until ``stop()``; ``detach()`` lets the processes outlive this object.
    """

    kind = KIND

    def __init__(
        self,
        workspace: Path | None = None,
        n_sites: int = 2,
        env: dict[str, str] | None = None,
        start_timeout: float = 300.0,
        pid_file: Path | None = None,
        out: Callable[[str], None] | None = None,
        gpus: tuple[int, ...] = (),
    ) -> None:
        if n_sites < 1:
            raise ValueError(f"n_sites must be at least 1, got {n_sites}")
        self.workspace = (Path(workspace) if workspace is not None else default_workspace()).resolve()
        self.n_sites = n_sites
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.pid_file = PidFile(pid_file) if pid_file is not None else None
        self.out = out or (lambda msg: None)
        self.site_names = [f"site-{i}" for i in range(1, n_sites + 1)]
        self.gpu_of = gpu_assignment(self.site_names, tuple(gpus))
        self._kits: Kits | None = None
        self._lock: HostLock | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._started = False  # True once this object started a process (only then does stop() stop anything)
        self.left: list[int] = []  # PIDs still alive after stop() (should stay empty)

    # -- layout -----------------------------------------------------------------------------------------------
    @property
    def kits(self) -> Kits:
        if self._kits is None:
            self._kits = read_kits(self.workspace)
        return self._kits

    @property
    def admin_startup_kit(self) -> Path:
        return self.kits.admin

    def kit_dir(self, participant: str) -> Path:
        return self.kits.server if participant == "server" else self.kits.sites[participant]

    @property
    def participants(self) -> list[str]:
        return ["server", *self.site_names]

    @property
    def log_paths(self) -> dict[str, Path]:
        """Each participant's NVFlare log; a job's own log is ``<kit>/<job_id>/log.txt``."""
        return {name: self.kit_dir(name) / "log.txt" for name in self.participants}

    @property
    def console_logs(self) -> dict[str, Path]:
        return {name: self.workspace / CONSOLE_DIR / f"{name}.console.log" for name in self.participants}

    def env(self) -> dict[str, str]:
        return participant_env(self.extra_env, self.n_sites)

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> SecureSystem:
        kits = preflight(self.n_sites, self.workspace)
        self._kits = kits
        self._lock = port_lock(kits.fl_port, owner=f"secure workspace {self.workspace}").acquire()
        try:
            preflight(self.n_sites, self.workspace)  # again, now under the lock
        except BaseException:
            self._release_lock()
            raise
        t0 = time.monotonic()
        try:
            state = {
                "workspace": str(self.workspace),
                "started": dt.datetime.now().isoformat(timespec="seconds"),
                "starter_pid": os.getpid(),
                "sites": self.site_names,
                "participants": {},
            }
            env = self.env()
            isolate_server_storage(kits.server)
            for name in self.participants:
                kit = self.kit_dir(name)
                for flag in _RUNTIME_FLAGS:  # left by an earlier, killed run; sub_start.sh would trip on them
                    (kit / flag).unlink(missing_ok=True)
                # Own session: the kit's restart loop and its python3 share this process group.
                own_env = {**env, **({GPU_ENV: self.gpu_of[name]} if name in self.gpu_of else {})}
                proc = start_group(
                    ["bash", str(kit / "startup" / "sub_start.sh")], self.console_logs[name], env=own_env
                )
                self._procs[name] = proc
                self._started = True
                state["participants"][name] = {
                    **ProcessRef.of(proc.pid).to_json(),
                    "kit": str(kit),
                    "log": str(self.log_paths[name]),
                    "console_log": str(self.console_logs[name]),
                }
                self._write_state(state)
            self._wait_ready(t0)
            self.out(f"secure system ready in {time.monotonic() - t0:.0f} s: server and {', '.join(self.site_names)}")
        except BaseException:
            self.stop()
            raise
        return self

    def _write_state(self, state: dict) -> None:
        write_json(state_path(self.workspace), state)
        if self.pid_file is not None:
            processes = {name: ProcessRef.from_json(rec).to_json() for name, rec in state["participants"].items()}
            self.pid_file.update(**{KIND: {"workspace": str(self.workspace), "processes": processes}})

    def _wait_ready(self, t0: float) -> None:
        """Until the admin API answers and lists every site as connected (each probe waits up to 5 s)."""
        deadline = t0 + self.start_timeout
        last = "no answer from the admin API yet"
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SecureError(
                        f"{name} exited (status {proc.returncode}) before the system was ready; see "
                        f"{self.console_logs[name]} and {self.log_paths[name]}"
                    )
            try:
                connected = connected_sites(self.kits.admin_user, self.kits.admin)
            except Exception as err:  # not up yet: connection refused, TLS not ready, login not ready
                last = f"admin API: {type(err).__name__}: {err}"
                time.sleep(1.0)
                continue
            missing = [s for s in self.site_names if s not in connected]
            if not missing:
                return
            last = f"server up; connected: {', '.join(connected) or 'none'}; waiting for {', '.join(missing)}"
            time.sleep(1.0)
        logs = ", ".join(str(p) for p in self.console_logs.values())
        raise SecureError(f"secure system not ready after {self.start_timeout:.0f} s ({last}); see {logs}")

    def detach(self) -> None:
        """Leave the processes running (``start_fl_secure.sh``); ``stop_system()`` ends them later."""
        self._procs.clear()
        self._started = False
        self._release_lock()

    def stop(self) -> None:
        """Stop every process this object started (recorded groups + descendants); safe to call twice. PIDs that
        survive (should be none) are kept in ``self.left``."""
        try:
            if self._started:
                self.left = stop_system(self.workspace, lock_held=self._lock is not None)
                # Also by our own handles: a signal may land between starting a group and recording it.
                self.left += terminate([ProcessRef.of(p.pid) for p in self._procs.values()], grace=5.0)
                for proc in self._procs.values():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
                self._procs.clear()
                self._started = False
                if self.left:
                    self.out(f"warning: processes still alive after stopping the secure system: {self.left}")
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> SecureSystem:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_system(workspace: Path | None = None, grace: float = 15.0, lock_held: bool = False) -> list[int]:
    """Stop what ``<workspace>/system.json`` records (groups + descendants); returns PIDs left (none on success).
    The state file is removed when nothing is left."""
    workspace = Path(workspace) if workspace is not None else default_workspace()
    state = read_state(workspace)
    if not state:
        return []
    lock = None
    if not lock_held:
        with contextlib.suppress(NotProvisionedError, OSError, KeyError, ValueError):
            lock = port_lock(read_kits(workspace).fl_port, owner=f"stopping {workspace}").acquire()
    try:
        left = terminate(recorded_processes(state), grace=grace)
        if not left:
            state_path(workspace).unlink(missing_ok=True)
        return left
    finally:
        if lock is not None:
            lock.release()


def stop_recorded(record: dict) -> list[int]:
    """Stop a secure system from its entry in a run's ``pids.json`` (``./run_experiment.sh --stop``)."""
    return stop_system(Path(record["workspace"]))
