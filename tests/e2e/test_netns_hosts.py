"""Participants on their own hosts: network namespaces on a bridge, names resolved per namespace, a host cut off
and connected again, and nothing left behind (also after an error). A network removes only what it made: a
namespace someone else named like it, and its processes, survive; two networks up at once each work on their own;
a killed run's leftovers go, by its record, once it is gone. Needs root and iproute2 (skips, saying why). Only
the namespaces' own addresses are used; each check is bounded in time."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from spleen_tools.procs import wait_for
from spleen_tools.systems.netns import HostNetwork, existing_namespaces, namespace_pids, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")
HOSTS = {"server": ("spleen-server",), "site-1": ("spleen-site-1",), "site-2": ("spleen-site-2",)}
PORT = 8765
# A one-connection TCP server: prints the address each connection comes from.
ECHO = (
    "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); "
    "[print(s.accept()[1][0], flush=True) for _ in range(10)]"
)


def _connect(net: HostNetwork, participant: str, name: str, timeout: float = 3.0) -> int:
    probe = f"import socket; socket.create_connection(('{name}', {PORT}), timeout={timeout}).close()"
    cmd = net.hosts[participant].command([sys.executable, "-c", probe])
    return subprocess.run(cmd, capture_output=True, timeout=timeout + 10).returncode


def _names(net: HostNetwork) -> list[str]:
    return [net.switch, *(h.ns for h in net.hosts.values())]


def _serve(net: HostNetwork) -> subprocess.Popen:
    """The echo server on the server's host, once site-1 reaches it by name (that connection is printed first)."""
    server = net.hosts["server"]
    cmd = server.command([sys.executable, "-c", ECHO, server.address, str(PORT)])
    listener = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: _connect(net, "site-1", "spleen-server", 1.0) == 0, 20, "the server's port")
    return listener


@pytest.fixture
def foreign():
    """Namespaces made by hand with names this network's prefix would match (the old scheme's own ones among
    them), each with a ``sleep`` inside; removed afterwards."""
    names, sleepers = ["spltest-2", "spltest-switch", "spltest-000000-2"], []
    try:
        for ns in names:
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
            sleepers.append(subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "60"]))
        wait_for(lambda: all(namespace_pids(ns) for ns in names), 10, "the sleeps in the hand-made namespaces")
        yield dict(zip(names, sleepers, strict=True))
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait(timeout=10)
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_hosts_reach_the_server_by_name_from_their_own_address_and_survive_a_cut():
    with HostNetwork(HOSTS, prefix="spltest") as net:
        made = _names(net)
        listener = _serve(net)
        assert _connect(net, "site-2", "spleen-server") == 0
        assert listener.stdout.readline().strip() == net.hosts["site-1"].address  # the wait's connection
        assert listener.stdout.readline().strip() == net.hosts["site-2"].address

        net.link("site-2", up=False)
        assert _connect(net, "site-2", "spleen-server", 1.0) != 0  # cut off
        net.link("site-2", up=True)
        assert _connect(net, "site-2", "spleen-server") == 0
        assert listener.pid in net.pids("server")
    assert not set(made) & set(existing_namespaces())
    assert listener.wait(timeout=10) is not None  # killed with its namespace


def test_everything_is_removed_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with HostNetwork(HOSTS, prefix="spltest") as net:
            made = _names(net)
            sleeper = subprocess.Popen(net.hosts["site-1"].command(["sleep", "60"]))
            time.sleep(0.5)
            raise RuntimeError("boom")
    assert not set(made) & set(existing_namespaces())
    assert sleeper.wait(timeout=10) is not None


def test_a_network_leaves_namespaces_it_did_not_make_and_their_processes_alone(foreign):
    with HostNetwork(HOSTS, prefix="spltest") as net:
        assert set(_names(net)) <= set(existing_namespaces())
    assert set(foreign) <= set(existing_namespaces())
    assert all(sleeper.poll() is None and sleeper.pid in namespace_pids(ns) for ns, sleeper in foreign.items())


def test_two_networks_up_at_once_each_work_and_stopping_one_leaves_the_other():
    with HostNetwork(HOSTS, prefix="spltest") as first:
        first_listener = _serve(first)
        with HostNetwork(HOSTS, prefix="spltest") as second:
            assert not set(_names(first)) & set(_names(second))
            subnets = {net.hosts["server"].address.rsplit(".", 1)[0] for net in (first, second)}
            assert len(subnets) == 2
            second_listener = _serve(second)
            assert first_listener.stdout.readline().strip() == first.hosts["site-1"].address
            assert second_listener.stdout.readline().strip() == second.hosts["site-1"].address
        assert second_listener.wait(timeout=10) is not None  # went with its own network
        assert set(_names(first)) <= set(existing_namespaces())
        assert _connect(first, "site-2", "spleen-server") == 0  # the first still works
        assert first_listener.stdout.readline().strip() == first.hosts["site-2"].address


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed, not reaped (its parent was killed)
    except psutil.NoSuchProcess:
        return True


# A run killed before it cleans up: its network, with a sleep on the server's host, left behind.
KILLED_RUN = (
    "import os, signal, subprocess; from spleen_tools.systems.netns import HostNetwork; "
    "net = HostNetwork({'server': ('spleen-server',)}, prefix='spltest').__enter__(); "
    "quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
    "sleeper = subprocess.Popen(net.hosts['server'].command(['sleep', '60']), **quiet); "
    "print(sleeper.pid, net.switch, net.hosts['server'].ns, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
)


def test_a_killed_runs_leftovers_go_with_the_next_network_and_nothing_else(foreign):
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN], capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    pid, *left = killed.stdout.split()
    try:
        wait_for(lambda: int(pid) in namespace_pids(left[1]), 10, "the killed run's sleep")
        assert set(left) <= set(existing_namespaces())
        with HostNetwork(HOSTS, prefix="spltest"):
            assert not set(left) & set(existing_namespaces())  # removed, by the killed run's record
            assert _gone(int(pid))  # and what ran inside
        assert set(foreign) <= set(existing_namespaces())
        assert all(sleeper.poll() is None for sleeper in foreign.values())
    finally:
        for ns in left:  # if the cleaning failed
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
