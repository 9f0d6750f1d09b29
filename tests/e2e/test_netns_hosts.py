"""Participants on their own hosts: network namespaces on a bridge, names resolved per namespace, a host cut off
and connected again, and nothing left behind (also after an error). Needs root and iproute2 (skips, saying why).
Only the namespaces' own addresses are used; each check is bounded in time."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from spleen_tools.procs import wait_for
from spleen_tools.systems.netns import HostNetwork, existing_namespaces, unavailable

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


def test_hosts_reach_the_server_by_name_from_their_own_address_and_survive_a_cut():
    with HostNetwork(HOSTS, prefix="spltest") as net:
        server = net.hosts["server"]
        listener = subprocess.Popen(
            server.command([sys.executable, "-c", ECHO, server.address, str(PORT)]), stdout=subprocess.PIPE, text=True
        )
        wait_for(lambda: _connect(net, "site-1", "spleen-server", 1.0) == 0, 20, "the server's port")
        assert _connect(net, "site-2", "spleen-server") == 0
        assert listener.stdout.readline().strip() == net.hosts["site-1"].address  # the wait's connection
        assert listener.stdout.readline().strip() == net.hosts["site-2"].address

        net.link("site-2", up=False)
        assert _connect(net, "site-2", "spleen-server", 1.0) != 0  # cut off
        net.link("site-2", up=True)
        assert _connect(net, "site-2", "spleen-server") == 0
        assert listener.pid in net.pids("server")
    assert not [ns for ns in existing_namespaces() if ns.startswith("spltest")]
    assert listener.wait(timeout=10) is not None  # killed with its namespace


def test_everything_is_removed_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with HostNetwork(HOSTS, prefix="spltest") as net:
            sleeper = subprocess.Popen(net.hosts["site-1"].command(["sleep", "60"]))
            time.sleep(0.5)
            raise RuntimeError("boom")
    assert not [ns for ns in existing_namespaces() if ns.startswith("spltest")]
    assert sleeper.wait(timeout=10) is not None
