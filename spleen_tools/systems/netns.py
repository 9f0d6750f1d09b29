"""Hosts on one machine: one Linux network namespace per participant, joined by a bridge, each with its address
and its own ``/etc/hosts`` (``ip netns exec`` mounts ``/etc/netns/<ns>/hosts`` over it).

The bridge lives in a namespace of its own, so the machine's own network is never touched; every name this makes
starts with the network's prefix and is removed on exit (also after an error or Ctrl-C), with the processes
still running inside. Needs root and ``ip`` (iproute2); :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

NETNS_ETC = Path("/etc/netns")
IP_TIMEOUT_S = 10


class NetnsError(RuntimeError):
    """An ``ip`` command failed while setting the network up."""


def unavailable() -> str | None:
    """Why namespaced hosts cannot be made here (not root, no ``ip``), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (`ip`)"
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if done.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    """A participant's host: its namespace, its address on the bridge, and the names it answers to."""

    participant: str
    ns: str
    address: str
    hostnames: tuple[str, ...] = ()

    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside this host's namespace (with its /etc/hosts)."""
        return ["ip", "netns", "exec", self.ns, *cmd]


@dataclass
class HostNetwork:
    """Namespaced hosts ``participant -> hostnames`` on ``<subnet>.0/24`` (addresses from .2 up)."""

    hosts_wanted: dict[str, tuple[str, ...]]
    prefix: str = "spl"
    subnet: str = "10.231.7"
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-switch"

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
        stale = [ns for ns in existing_namespaces() if ns.startswith(f"{self.prefix}-")]
        remove_namespaces(stale)  # left by a run that was killed before it could clean up
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        for i, (participant, names) in enumerate(self.hosts_wanted.items(), start=2):
            host = Host(participant, f"{self.prefix}-{i}", f"{self.subnet}.{i}", tuple(names))
            self.hosts[participant] = host
            _ip("netns", "add", host.ns)
            outside, inside = f"{self.prefix}{i}a", f"{self.prefix}{i}b"  # the cable: switch end, host end
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", host.ns, ns=self.switch)
            _ip("link", "set", outside, "master", "br0", ns=self.switch)
            _ip("link", "set", outside, "up", ns=self.switch)
            _ip("addr", "add", f"{host.address}/24", "dev", inside, ns=host.ns)
            _ip("link", "set", inside, "up", ns=host.ns)
            _ip("link", "set", "lo", "up", ns=host.ns)
        lines = ["127.0.0.1 localhost"] + [f"{h.address} {' '.join(h.hostnames)}" for h in self.hosts.values()]
        for host in self.hosts.values():
            (NETNS_ETC / host.ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / host.ns / "hosts").write_text("\n".join(lines) + "\n")

    def link(self, participant: str, up: bool) -> None:
        """Cut a host off the network (its cable pulled) or connect it again."""
        i = list(self.hosts).index(participant) + 2
        _ip("link", "set", f"{self.prefix}{i}a", "up" if up else "down", ns=self.switch)

    def pids(self, participant: str) -> list[int]:
        """Processes running in a host's namespace."""
        return namespace_pids(self.hosts[participant].ns)

    def remove(self) -> list[str]:
        """Kill what runs inside, delete the namespaces (their links go with them) and hosts files; returns the
        namespaces that could not be removed (none, normally)."""
        left = remove_namespaces([h.ns for h in self.hosts.values()] + [self.switch])
        self.hosts = {}
        return left


def namespace_pids(ns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def remove_namespaces(namespaces: list[str]) -> list[str]:
    """Kill the processes inside each namespace, delete it and its hosts file; returns those still there."""
    for ns in namespaces:
        for pid in namespace_pids(ns):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    still = set(existing_namespaces())
    return [ns for ns in namespaces if ns in still]


def existing_namespaces() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
