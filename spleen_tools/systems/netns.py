"""Hosts on one machine: one Linux network namespace per participant, joined by a bridge, each with its address
and its own ``/etc/hosts`` (``ip netns exec`` mounts ``/etc/netns/<ns>/hosts`` over it).

The bridge lives in a namespace of its own, so the machine's own network is never touched. Every name a network
makes (namespaces, bridge, cables) carries a random token of its own run, and its ``/24`` is leased through a record
file under ``/run/spleen-netns`` (root's only, on tmpfs like ``/run/netns``): two networks alive at once never
collide. The record lists what the run made, each thing once made; a network removes only that, with the
processes inside, on exit (also after an error or Ctrl-C). A run killed before it could clean up leaves its
record: the next network removes what that record lists once the record's owner is gone, and nothing else.
Needs root and ``ip`` (iproute2); :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import os
import re
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from spleen_tools.procs import ProcessRef, read_json, write_json

NETNS_ETC = Path("/etc/netns")
RECORDS = Path("/run/spleen-netns")  # <subnet>.json per live network: the subnet's lease and what the run made
SUBNET_POOL = tuple(f"10.231.{k}" for k in range(256))
IP_TIMEOUT_S = 10
IFNAMSIZ = 15  # longest interface name the kernel takes
PREFIX = re.compile(r"[a-z][a-z0-9]{0,7}")
TOKEN = re.compile(r"[0-9a-f]{6}")
HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
MADE = ("namespaces", "hosts_files")  # a record's lists of what its run made


class NetnsError(RuntimeError):
    """An ``ip`` command failed while setting the network up, or its settings or records are unusable."""


@functools.cache
def unavailable() -> str | None:
    """Why namespaced hosts cannot be made here (not root, no ``ip``, or the kernel or a container refuses a
    namespace: one is made and removed to find out), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (`ip`)"
    probe = f"splprobe-{new_token()}"
    try:
        _ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return f"no network namespace can be made here: {e}"
    with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
        _ip("netns", "del", probe)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if done.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")


def new_token() -> str:
    return secrets.token_hex(3)


@dataclass(frozen=True)
class Host:
    """A participant's host: its namespace, its address on the bridge, the names it answers to, and its cable's
    end on the switch (down: the host is cut off)."""

    participant: str
    ns: str
    address: str
    hostnames: tuple[str, ...] = ()
    cable: str = ""

    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside this host's namespace (with its /etc/hosts)."""
        return ["ip", "netns", "exec", self.ns, *cmd]


# -- the run's record -------------------------------------------------------------------------------------------
class RunRecord:
    """A network's record, ``<records>/<subnet>.json``: its owner (PID + creation time), token, subnet, and the
    namespaces and hosts files it made, each added once made (a name that was already taken is never listed)."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path = path
        self.data = data

    @property
    def subnet(self) -> str:
        return self.data["subnet"]

    def add(self, kind: str, name: str) -> None:
        self.data[kind].append(name)
        write_json(self.path, self.data)

    def remove_made(self) -> list[str]:
        """Kill what runs in the listed namespaces, delete them and the listed hosts files; the record goes when
        nothing is left (freeing the subnet), else it keeps what is. Returns what could not be removed."""
        namespaces = remove_namespaces(self.data["namespaces"])
        for ns in self.data["hosts_files"]:
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        files = [ns for ns in self.data["hosts_files"] if (NETNS_ETC / ns).exists()]
        self.data.update(namespaces=namespaces, hosts_files=files)
        if namespaces or files:
            write_json(self.path, self.data)
        else:
            self.path.unlink(missing_ok=True)
        return namespaces + files


def own_records_dir(path: Path) -> Path:
    """``path``, made if missing; refused unless it is a real folder of this user's that only it can write (the
    records decide what gets deleted and killed)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise NetnsError(f"{path}: not a folder of this user's that only it can write; remove it and run again")
    return path


@contextlib.contextmanager
def _locked(records: Path) -> Iterator[None]:
    """Leases and leftover cleaning one at a time (a blocking flock, freed when the holder dies)."""
    fd = os.open(records / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def lease(records: Path, token: str, subnet: str | None = None) -> RunRecord:
    """A new record for run ``token``: ``subnet`` (or the first free one of the pool) leased to this process."""
    records = own_records_dir(records)
    with _locked(records):
        remove_leftovers(records)
        for candidate in [subnet] if subnet else SUBNET_POOL:
            path = records / f"{candidate}.json"
            if path.exists():
                continue
            data = {"owner": ProcessRef.of(os.getpid()).to_json(), "pidns": _pid_namespace(), "token": token}
            record = RunRecord(path, {**data, "subnet": candidate, **{kind: [] for kind in MADE}})
            write_json(path, record.data)
            return record
    held = f"{subnet}.0/24 is in use by another network" if subnet else "every subnet of the pool is in use"
    raise NetnsError(f"{held} (records in {records}); stop that network or pick another subnet")


def remove_leftovers(records: Path) -> list[str]:
    """Remove what the records of runs whose owner is gone list (a killed run's namespaces and their processes);
    a record from another PID namespace, or one that does not parse, is left alone. Call with the lock held."""
    left = []
    for path in sorted(records.glob("*.json")):
        data = read_json(path)
        try:
            if data.get("pidns") != _pid_namespace() or ProcessRef.from_json(data["owner"]).alive():
                continue
            record = RunRecord(path, {**data, **recorded_names(data)})
        except (KeyError, TypeError, ValueError):
            continue
        left += record.remove_made()
    return left


def recorded_names(data: dict) -> dict[str, list[str]]:
    """A record's lists, keeping only names this scheme makes for that record's token: a record can never make a
    network remove what another run, or someone else, named."""
    token = data["token"]
    if not isinstance(token, str) or not TOKEN.fullmatch(token):
        raise ValueError(f"not a run token: {token!r}")
    ours = re.compile(rf"{PREFIX.pattern}-{token}-(sw|\d{{1,3}})")
    return {kind: [n for n in data[kind] if isinstance(n, str) and ours.fullmatch(n)] for kind in MADE}


def _pid_namespace() -> str:
    return os.readlink("/proc/self/ns/pid")


# -- the network ------------------------------------------------------------------------------------------------
@dataclass
class HostNetwork:
    """Namespaced hosts ``participant -> hostnames`` on a ``/24`` (addresses from .2 up): ``subnet`` (three octets)
    if given, else a free one of ``SUBNET_POOL``; each run's names are ``<prefix>-<token>-<n>``."""

    hosts_wanted: dict[str, tuple[str, ...]]
    prefix: str = "spl"
    subnet: str | None = None
    records: Path = RECORDS
    hosts: dict[str, Host] = field(default_factory=dict)
    token: str = ""
    record: RunRecord | None = None

    def __post_init__(self) -> None:
        if not PREFIX.fullmatch(self.prefix):
            raise NetnsError(f"namespace prefix {self.prefix!r}: use 1-8 lowercase letters/digits, a letter first")
        if len(self.hosts_wanted) > 253:
            raise NetnsError(f"{len(self.hosts_wanted)} hosts: a /24 holds 253; make fewer")
        bad = [n for names in self.hosts_wanted.values() for n in names if not HOSTNAME.fullmatch(n)]
        if bad:
            raise NetnsError(f"host names {bad}: use letters, digits, '.' and '-' only")
        if self.subnet is not None:
            ipaddress.IPv4Network(f"{self.subnet}.0/24")  # ValueError names the bad subnet

    def namespace(self, n: int | str) -> str:
        return f"{self.prefix}-{self.token}-{n}"

    @property
    def switch(self) -> str:
        return self.namespace("sw")

    @property
    def bridge(self) -> str:
        return f"br{self.token}"

    def cable(self, i: int) -> tuple[str, str]:
        """The veth pair to host ``i``: its switch end and its host end."""
        return f"v{self.token}{i}a", f"v{self.token}{i}b"

    def __enter__(self) -> HostNetwork:
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _create(self) -> None:
        self.token = new_token()
        self.record = lease(self.records, self.token, self.subnet)
        self._add_namespace(self.switch)
        _ip("link", "add", self.bridge, "type", "bridge", ns=self.switch)
        _ip("link", "set", self.bridge, "up", ns=self.switch)
        for i, (participant, names) in enumerate(self.hosts_wanted.items(), start=2):
            outside, inside = self.cable(i)
            address = f"{self.record.subnet}.{i}"
            host = Host(participant, self.namespace(i), address, tuple(names), outside)
            self._add_namespace(host.ns)
            self.hosts[participant] = host
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", host.ns, ns=self.switch)
            _ip("link", "set", outside, "master", self.bridge, ns=self.switch)
            _ip("link", "set", outside, "up", ns=self.switch)
            _ip("addr", "add", f"{host.address}/24", "dev", inside, ns=host.ns)
            _ip("link", "set", inside, "up", ns=host.ns)
            _ip("link", "set", "lo", "up", ns=host.ns)
        self._write_hosts_files()

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)  # refused if the name exists: what is not ours is never recorded
        self.record.add("namespaces", ns)

    def _write_hosts_files(self) -> None:
        lines = ["127.0.0.1 localhost"] + [f"{h.address} {' '.join(h.hostnames)}" for h in self.hosts.values()]
        NETNS_ETC.mkdir(parents=True, exist_ok=True)
        for host in self.hosts.values():
            folder = NETNS_ETC / host.ns
            folder.mkdir(mode=0o755)  # FileExistsError: someone else's folder, never ours to write or remove
            self.record.add("hosts_files", host.ns)
            (folder / "hosts").write_text("\n".join(lines) + "\n")

    def link(self, participant: str, up: bool) -> None:
        """Cut a host off the network (its cable pulled) or connect it again."""
        _ip("link", "set", self.hosts[participant].cable, "up" if up else "down", ns=self.switch)

    def pids(self, participant: str) -> list[int]:
        """Processes running in a host's namespace."""
        return namespace_pids(self.hosts[participant].ns)

    def remove(self) -> list[str]:
        """Kill what runs inside the namespaces this network made, delete them (their links go with them) and
        the hosts files it wrote; returns what could not be removed (nothing, normally)."""
        left = self.record.remove_made() if self.record else []
        self.record, self.hosts = None, {}
        return left


def namespace_pids(ns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def remove_namespaces(namespaces: list[str]) -> list[str]:
    """Kill the processes inside each namespace and delete it; returns those still there."""
    if not namespaces:
        return []
    for ns in namespaces:
        for pid in namespace_pids(ns):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    still = set(existing_namespaces())
    return [ns for ns in namespaces if ns in still]


def existing_namespaces() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
