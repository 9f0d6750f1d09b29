"""The one process layer, on psutil: start in a group, liveness that survives PID reuse, tree termination,
machine-wide locks, the pids file, ports and readiness waits. POC, the secure system, the simulator, the MLflow
server and the runner all use it.

A process we started is remembered as a :class:`ProcessRef` (PID + creation time): a PID that the kernel gave to
another process since is not ours, is never reported alive and is never signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

KILL_WAIT = 5.0  # seconds to wait after SIGKILL


# -- liveness ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessRef:
    """A process we started: its PID and creation time (``None`` when it had already gone when recorded)."""

    pid: int
    created: float | None = None

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return cls(pid, None)

    def process(self) -> psutil.Process | None:
        """The live (not zombie) process, or None if it is gone or the PID now belongs to another process."""
        if self.created is None:
            return None
        try:
            proc = psutil.Process(self.pid)
            if proc.create_time() != self.created or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "created": self.created}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ProcessRef:
        return cls(int(value["pid"]), value.get("created"))


def _live(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- termination ------------------------------------------------------------------------------------------------
def _group_members(refs: Sequence[ProcessRef]) -> list[psutil.Process]:
    """Live members of the process groups that ``refs`` lead. A leader that has exited still names its group (the
    kernel does not hand out a PID while a group of that ID exists); a leader PID now held by another process
    does not."""
    groups = set()
    for ref in refs:
        holder = None
        with contextlib.suppress(psutil.Error):
            holder = psutil.Process(ref.pid)
        if holder is None or holder.create_time() == ref.created:
            groups.add(ref.pid)
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(proc.pid) in groups and _live(proc):
                members.append(proc)
    return members


def process_tree(refs: Sequence[ProcessRef]) -> list[psutil.Process]:
    """The live processes of ``refs``, the members of the groups they lead, and every descendant of those (NVFlare
    starts each job in a session of its own, outside the group)."""
    found = {p.pid: p for p in _group_members(refs)}
    for ref in refs:
        proc = ref.process()
        if proc is not None:
            found[proc.pid] = proc
    for proc in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                if _live(child):
                    found.setdefault(child.pid, child)
    return sorted(found.values(), key=lambda p: p.pid)


def terminate(refs: Iterable[ProcessRef], grace: float = 10.0) -> list[int]:
    """SIGTERM every process of :func:`process_tree`, SIGKILL what is left after ``grace`` seconds (children started
    meanwhile included). Returns the PIDs still alive at the end: none, on success."""
    refs = list(refs)
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT)):
        procs = process_tree(refs)
        if not procs:
            return []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        psutil.wait_procs(procs, timeout=wait_s)
    return [p.pid for p in process_tree(refs)]


# -- starting ---------------------------------------------------------------------------------------------------
def start_group(
    cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group), stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def stop_started(proc: subprocess.Popen, grace: float = 10.0) -> list[int]:
    """Terminate a process from :func:`start_group` with its group and descendants, and reap it."""
    left = terminate([ProcessRef.of(proc.pid)], grace=grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_WAIT)
    return left


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.5,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll ``condition`` until true; raise TimeoutError naming ``what`` (or RuntimeError if ``alive`` fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited before it was ready")
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


# -- ports ------------------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def busy_ports(ports: Iterable[int], host: str = "127.0.0.1") -> list[int]:
    return [p for p in ports if port_in_use(p, host)]


# -- locks ------------------------------------------------------------------------------------------------------
class HostLock:
    """Exclusive, non-blocking ``flock`` on a file (freed when the holder dies). The file names the holder (PID and
    ``owner``); ``busy(holder)`` makes the exception raised when another process holds it."""

    def __init__(self, path: Path, owner: str, busy: Callable[[str], Exception]) -> None:
        self.path = Path(path)
        self.owner = owner
        self.busy = busy
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> HostLock:
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise self.busy(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {self.owner}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> HostLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- the pids file ----------------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    """Write by rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class PidFile:
    """A JSON file of what a run started: entries are written as soon as they are known, so that another command
    can stop them. A process is recorded as ``{"pid": N, "created": T}`` (see :class:`ProcessRef`), anywhere in the
    entry's JSON."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> dict:
        return read_json(self.path)

    def update(self, **entries: Any) -> None:
        data = self.read()
        data.update({k: v.to_json() if isinstance(v, ProcessRef) else v for k, v in entries.items()})
        write_json(self.path, data)

    def refs(self, skip: Sequence[str] = ("runner",)) -> list[ProcessRef]:
        """Every recorded process, except the top-level entries in ``skip``."""
        return [ref for key, value in self.read().items() if key not in skip for ref in find_refs(value)]


def find_refs(value: Any) -> list[ProcessRef]:
    """The process records anywhere in a JSON value."""
    if isinstance(value, dict):
        if isinstance(value.get("pid"), int):
            return [ProcessRef.from_json(value)]
        return [ref for v in value.values() for ref in find_refs(v)]
    if isinstance(value, list):
        return [ref for v in value for ref in find_refs(v)]
    return []
