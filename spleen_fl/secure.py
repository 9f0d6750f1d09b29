"""The provisioned secure system (TLS with mutual certificates, signed kits, HE context) on this machine.

``provision()`` runs ``nvflare provision`` on ``workspaces/secure_project.yml`` and places the newest ``prod_NN`` in
``workspaces/secure_workspace``. ``SecureSystem`` starts the server and N sites from their startup kits, waits until
the admin API (with the admin kit) shows every site connected, and stops exactly what it started.

Why the care:
- Each participant runs its kit's own ``startup/sub_start.sh`` (what ``start.sh`` backgrounds) in a new session, so
  the kit's restart loop and its ``python3`` share one process group that we record; ``python3`` comes from this
  interpreter's folder (first on ``PATH``), as in POC.
- NVFlare starts each job in a process of its own session (``posix_spawn(setsid=True)``): at stop time we also
  signal every descendant of our groups, found through ``/proc``.
- The groups go into ``<workspace>/system.json`` (with the leaders' start times, against PID reuse) so that a
  separate ``start_fl_secure.sh --stop`` stops them; a start while that file names live processes is refused.
- The server ports are fixed by provisioning (8102/8103), so start and stop take an exclusive ``flock`` on
  ``/tmp/spleen_fl_secure-<port>.lock``; an in-process system (``run_experiment --secure``) holds it until ``stop()``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spleen_fl.jobs import REPO_ROOT
from spleen_fl.procs import LockHeld, lock_file, port_in_use, start_group, unlock_file

WORKSPACES_DIR = REPO_ROOT / "workspaces"
PROJECT_YML = WORKSPACES_DIR / "secure_project.yml"
WORKSPACE_NAME = "secure_workspace"
WORKSPACE_ENV = "SPLEEN_SECURE_WORKSPACE"  # another provisioned workspace (tests use one in a temp folder)
STATE_FILE = "system.json"
CONSOLE_DIR = "logs"  # <workspace>/logs/<participant>.console.log: what sub_start.sh and python3 print
LOCK_DIR = Path("/tmp")
SITE_RE = re.compile(r"^site-(\d+)$")
_RUNTIME_FLAGS = ("pid.fl", "daemon_pid.fl", "shutdown.fl", "restart.fl")
_FIX_PROVISION = "./start_fl_secure.sh provision"
_FIX_STOP = "./start_fl_secure.sh --stop"


class SecureError(RuntimeError):
    """A failure with a one-line message for the user that names the fix."""


class NotProvisionedError(SecureError):
    pass


class SecureBusyError(SecureError):
    """A secure system (ours or another server) already uses the workspace or the ports."""


def default_workspace() -> Path:
    """``$SPLEEN_SECURE_WORKSPACE`` if set, else ``workspaces/secure_workspace`` in the repo."""
    env = os.environ.get(WORKSPACE_ENV)
    return Path(env).resolve() if env else WORKSPACES_DIR / WORKSPACE_NAME


def _nvflare_bin() -> str:
    return str(Path(sys.executable).parent / "nvflare")


# -- provisioning ---------------------------------------------------------------------------------------------
def _prod_number(path: Path) -> int:
    match = re.fullmatch(r"prod_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def provision(
    workspace_root: Path = WORKSPACES_DIR,
    project_yml: Path = PROJECT_YML,
    name: str = WORKSPACE_NAME,
    timeout: float = 300.0,
) -> Path:
    """``nvflare provision -p PROJECT_YML -w WORKSPACE_ROOT/workspace``; the newest ``prod_NN`` becomes
    ``WORKSPACE_ROOT/NAME`` (returned). The provisioning state (root CA) in ``workspace/`` is kept, so provisioning
    again gives new kits under the same CA. Refused while a secure system runs from ``WORKSPACE_ROOT/NAME``."""
    import yaml

    workspace_root = Path(workspace_root).resolve()
    project_yml = Path(project_yml).resolve()
    target = workspace_root / name
    if not project_yml.is_file():
        raise SecureError(f"no provisioning project at {project_yml}")
    if running_pids(target):
        raise SecureBusyError(f"a secure system is running from {target}; stop it first ({_FIX_STOP})")
    project = yaml.safe_load(project_yml.read_text()).get("name")
    work = workspace_root / "workspace"
    work.mkdir(parents=True, exist_ok=True)
    # --force: answer the "workspace exists, continue?" prompt with yes (keep the CA, add a prod_NN) without a TTY.
    proc = subprocess.run(
        [_nvflare_bin(), "provision", "-p", str(project_yml), "-w", str(work), "--force"],
        cwd=work,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    prods = sorted((work / str(project)).glob("prod_*"), key=_prod_number)
    if proc.returncode != 0 or not prods:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise SecureError(f"`nvflare provision -p {project_yml}` failed (exit {proc.returncode}): {' | '.join(tail)}")
    newest = prods[-1]
    # Copy next to the target, then swap by renames: the target is never half-written.
    tmp = target.parent / f".{name}.tmp-{os.getpid()}"
    old = target.parent / f".{name}.old-{os.getpid()}"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(newest, tmp, symlinks=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


# -- the provisioned kits ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kits:
    """What ``nvflare provision`` made: one server kit, site kits ``site-N``, one admin kit."""

    root: Path
    server: Path
    sites: dict[str, Path]  # in site-number order
    admin: Path
    admin_user: str
    fl_port: int
    admin_port: int


def read_kits(workspace: Path) -> Kits:
    """The kits in a provisioned workspace; NotProvisionedError (naming the fix) if there are none."""
    workspace = Path(workspace)
    if not workspace.is_dir():
        raise NotProvisionedError(f"no secure workspace at {workspace}: provision it first ({_FIX_PROVISION})")
    servers = sorted(p.parent.parent for p in workspace.glob("*/startup/fed_server.json"))
    admins = sorted(p.parent.parent for p in workspace.glob("*/startup/fed_admin.json"))
    sites = {
        p.parent.parent.name: p.parent.parent
        for p in workspace.glob("*/startup/fed_client.json")
        if SITE_RE.match(p.parent.parent.name)
    }
    if len(servers) != 1 or not admins:
        raise NotProvisionedError(
            f"{workspace} is not a provisioned secure workspace (need one server kit and an admin kit): "
            f"provision it first ({_FIX_PROVISION})"
        )
    server_conf = json.loads((servers[0] / "startup" / "fed_server.json").read_text())["servers"][0]
    fl_port = int(str(server_conf["service"]["target"]).rsplit(":", 1)[1])
    admin_conf = json.loads((admins[0] / "startup" / "fed_admin.json").read_text())["admin"]
    return Kits(
        root=workspace,
        server=servers[0],
        sites=dict(sorted(sites.items(), key=lambda kv: int(SITE_RE.match(kv[0]).group(1)))),
        admin=admins[0],
        admin_user=str(admin_conf["username"]),
        fl_port=fl_port,
        admin_port=int(server_conf["admin_port"]),
    )


def check_sites(kits: Kits, n_sites: int) -> list[str]:
    """``site-1..N``, all provisioned; SecureError naming the fix otherwise."""
    if n_sites < 1:
        raise SecureError(f"the number of sites must be at least 1, got {n_sites}")
    wanted = [f"site-{i}" for i in range(1, n_sites + 1)]
    missing = [s for s in wanted if s not in kits.sites]
    if missing:
        raise SecureError(
            f"{n_sites} sites asked, but {kits.root} has kits for {len(kits.sites)} "
            f"({', '.join(kits.sites) or 'none'}): add {', '.join(missing)} to the participants in "
            f"{PROJECT_YML.relative_to(REPO_ROOT)} and provision again ({_FIX_PROVISION})"
        )
    return wanted


_SHARED_STORAGE = {"/tmp/nvflare/jobs-storage": "jobs", "/tmp/nvflare/snapshot-storage": "snapshot"}


def isolate_server_storage(server_kit: Path) -> Path:
    """NVFlare's default server resources keep the job store and snapshots in ``/tmp/nvflare/``, shared by every
    provisioned server on the machine (another workspace would list, and after a crash resume, this one's jobs).
    Write ``local/resources.json`` (NVFlare reads it instead of ``resources.json.default``) with both under
    ``<server kit>/storage/``; a ``resources.json`` that is already there (the user's) is left alone."""
    local = Path(server_kit) / "local"
    target = local / "resources.json"
    if target.exists():
        return target

    def swap(node):
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        if isinstance(node, str) and node in _SHARED_STORAGE:
            return str((Path(server_kit) / "storage" / _SHARED_STORAGE[node]).resolve())
        return node

    resources = swap(json.loads((local / "resources.json.default").read_text()))
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(resources, indent=2) + "\n")
    tmp.replace(target)
    return target


# -- processes ------------------------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused PID apart)."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) for every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and fields[0] != "Z":
                table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def _live_groups(groups: list[int]) -> set[int]:
    """Those of ``groups`` with a live (not zombie) member; ``killpg(g, 0)`` also counts unreaped zombies."""
    wanted = set(groups)
    return {pgid for _, pgid in _processes().values() if pgid in wanted}


def _our_groups(state: dict) -> list[int]:
    """Recorded process groups that are still ours (a reused leader PID with another start time is not)."""
    groups = []
    records = [r for r in (state.get("participants") or {}).values() if isinstance(r.get("pgid"), int)]
    live = _live_groups([r["pgid"] for r in records])
    for rec in records:
        pgid = rec["pgid"]
        if pgid not in live:
            continue
        now = start_time(pgid)
        if now is not None and rec.get("start_time") not in (None, now):
            continue
        groups.append(pgid)
    return groups


def _members(groups: list[int]) -> list[int]:
    """Every live process in ``groups`` and every descendant of those (job processes run in sessions of their own)."""
    table = _processes()
    found = {pid for pid, (_, pgid) in table.items() if pgid in groups}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def _signal_all(groups: list[int], pids: list[int], sig: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def terminate(groups: list[int], grace: float = 15.0) -> list[int]:
    """SIGTERM the groups and all their descendants, SIGKILL after ``grace`` s; returns PIDs still alive (none)."""
    pids = _members(groups)
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = sorted(set(pids) | set(_members(groups)))  # children started meanwhile
        _signal_all(groups, pids, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not any(_alive(p) for p in pids) and not _live_groups(groups):
                return []
            time.sleep(0.2)
    return [p for p in pids if _alive(p)]


# -- state file and lock --------------------------------------------------------------------------------------
def state_path(workspace: Path) -> Path:
    return Path(workspace) / STATE_FILE


def read_state(workspace: Path) -> dict:
    try:
        return json.loads(state_path(workspace).read_text())
    except (OSError, ValueError):
        return {}


def running_pids(workspace: Path) -> list[int]:
    """Live processes of the secure system recorded in ``<workspace>/system.json`` (empty when none)."""
    return _members(_our_groups(read_state(workspace)))


class _PortLock:
    """Exclusive, non-blocking ``flock`` for the server port: one start/stop (or in-process system) at a time."""

    def __init__(self, port: int) -> None:
        self.path = LOCK_DIR / f"spleen_fl_secure-{port}.lock"
        self._fd: int | None = None

    def acquire(self, owner: str) -> None:
        if self._fd is not None:
            return
        try:
            self._fd = lock_file(self.path, owner)
        except LockHeld as held:
            raise SecureBusyError(
                f"another secure system is starting, running or stopping ({held.holder}); wait for it or stop it "
                f"({_FIX_STOP}), then retry (lock: {self.path})"
            ) from None

    def release(self) -> None:
        if self._fd is not None:
            unlock_file(self._fd)
            self._fd = None


def preflight(n_sites: int, workspace: Path | None = None) -> Kits:
    """Fail fast (one line naming the fix) when the system cannot start: not provisioned, too few site kits,
    a secure system still running from this workspace, or the server ports taken."""
    workspace = Path(workspace) if workspace is not None else default_workspace()
    kits = read_kits(workspace)
    check_sites(kits, n_sites)
    live = running_pids(workspace)
    if live:
        raise SecureBusyError(
            f"a secure system started from {workspace} still runs (PIDs {', '.join(map(str, live[:6]))}); "
            f"stop it first ({_FIX_STOP})"
        )
    busy = [p for p in (kits.fl_port, kits.admin_port) if port_in_use(p)]
    if busy:
        raise SecureBusyError(
            f"port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use by another process (another NVFlare "
            f"server?): stop it, or change fed_learn_port/admin_port in {PROJECT_YML.name} and provision again"
        )
    return kits


# -- admin API --------------------------------------------------------------------------------------------------
def connected_sites(kits: Kits, timeout: float = 5.0) -> list[str]:
    """Sites the server reports as connected, asked through the admin API with the admin kit (mutual TLS)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    # The API prints "Connecting to FLARE ..." and logs "no connection to server" while the server is starting.
    logging.disable(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            session = new_secure_session(kits.admin_user, str(kits.admin), timeout=timeout)
            try:
                info = session.get_system_info()
            finally:
                with contextlib.suppress(Exception):
                    session.close()
    finally:
        logging.disable(logging.NOTSET)
    return sorted(c.name for c in info.client_info)


# -- the system -----------------------------------------------------------------------------------------------
class SecureSystem:
    """``with SecureSystem(n_sites=2) as system: system.admin_startup_kit`` starts, waits for the sites, stops.

    ``env`` adds variables for the participants (e.g. ``SPLEEN_DATA_DIR``; jobs inherit the clients' env).
    ``pid_file`` (optional) gets the process groups as JSON under ``"secure"`` as soon as they are known.
    ``start()`` keeps the port lock until ``stop()``; ``detach()`` lets the processes outlive this object.
    """

    def __init__(
        self,
        workspace: Path | None = None,
        n_sites: int = 2,
        env: dict[str, str] | None = None,
        start_timeout: float = 300.0,
        pid_file: Path | None = None,
        out: Callable[[str], None] | None = None,
    ) -> None:
        if n_sites < 1:
            raise ValueError(f"n_sites must be at least 1, got {n_sites}")
        self.workspace = (Path(workspace) if workspace is not None else default_workspace()).resolve()
        self.n_sites = n_sites
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.pid_file = pid_file
        self.out = out or (lambda msg: None)
        self.site_names = [f"site-{i}" for i in range(1, n_sites + 1)]
        self._kits: Kits | None = None
        self._lock: _PortLock | None = None
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
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> SecureSystem:
        kits = preflight(self.n_sites, self.workspace)
        self._kits = kits
        self._lock = _PortLock(kits.fl_port)
        self._lock.acquire(owner=f"secure workspace {self.workspace}")
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
                proc = start_group(["bash", str(kit / "startup" / "sub_start.sh")], self.console_logs[name], env=env)
                self._procs[name] = proc
                self._started = True
                state["participants"][name] = {
                    "pgid": proc.pid,
                    "start_time": start_time(proc.pid),
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
        path = state_path(self.workspace)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(path)
        if self.pid_file is not None:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            data = json.loads(self.pid_file.read_text()) if self.pid_file.is_file() else {}
            data["secure"] = {
                "workspace": str(self.workspace),
                **{name: rec["pgid"] for name, rec in state["participants"].items()},
            }
            self.pid_file.write_text(json.dumps(data, indent=2) + "\n")

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
                connected = connected_sites(self.kits)
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
                self.left += terminate([p.pid for p in self._procs.values() if p.poll() is None], grace=5.0)
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
            lock = _PortLock(read_kits(workspace).fl_port)
            lock.acquire(owner=f"stopping {workspace}")
    try:
        left = terminate(_our_groups(state), grace=grace)
        if not left:
            state_path(workspace).unlink(missing_ok=True)
        return left
    finally:
        if lock is not None:
            lock.release()
