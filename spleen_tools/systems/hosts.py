"""The provisioned (TLS + HE) system with every participant on its own host: a network namespace each (see
``netns``), the server under a DNS name instead of ``localhost``, each site with only its own kit and data.

What a real deployment does on separate machines, on one: provision with the server's DNS name
(:func:`host_project`), give each host its kit, start each kit's ``startup/sub_start.sh`` on its host, submit
from the admin's host. The server's log names each site with the address it connected from.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

from spleen_flare.contract import DATA_DIR_ENV
from spleen_tools.flare import JobAdmin
from spleen_tools.procs import start_group, stop_started, wait_for
from spleen_tools.systems.base import participant_env
from spleen_tools.systems.netns import HostNetwork
from spleen_tools.systems.secure_workspace import Kits, isolate_server_storage, read_kits

SERVER_NAME = "spleen-server"  # the server's DNS name in the host project (and in its certificate)
ADMIN_HOST = "admin"
# NVFlare's server log, per connection: "Connection [CN00004 10.231.0.2:8102 <= 10.231.0.3:55452 SSL site-1] ..."
CONNECTED = re.compile(r"Connection \[CN\d+ \S+ <= ([\d.]+):\d+ SSL (site-\d+)\] is created")


def hide_folders_script(folders: Sequence[Path]) -> str:
    """A ``sh -c`` script that covers each of ``folders`` with an empty file system, then runs its arguments
    (``exec "$@"``); each path quoted, so no folder name is ever read as shell."""
    mounts = [f"mount -t tmpfs -o size=1m spleen-elsewhere {shlex.quote(str(d))} && " for d in folders]
    return "".join(mounts) + 'exec "$@"'


def without_folders(folders: Sequence[Path], cmd: Sequence[str]) -> list[str]:
    """``cmd`` in a mount namespace of its own where ``folders`` are empty (the machine's mounts untouched)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide_folders_script(folders), "sh", *cmd]


def host_project(project_yml: Path, out: Path, server_name: str = SERVER_NAME) -> Path:
    """``project_yml`` with the server renamed to ``server_name`` (the name sites and admins connect to)."""
    project = yaml.safe_load(Path(project_yml).read_text())
    server = next(p for p in project["participants"] if p["type"] == "server")
    server["name"] = server_name
    out.write_text(yaml.safe_dump(project, sort_keys=False))
    return out


class HostSystem:
    """Server, sites and admin on namespaced hosts; ``site_env`` gives each site its own data settings."""

    kind = "hosts"

    def __init__(self, workspace: Path, site_env: dict[str, dict[str, str]], logs: Path, prefix: str = "sph") -> None:
        self.workspace = Path(workspace).resolve()
        self.kits: Kits = read_kits(self.workspace)
        self.site_names = list(site_env)
        self.site_env = site_env
        # each site's data folder (its dataset's parent): hidden from every other site
        self.data_roots = {s: Path(env[DATA_DIR_ENV]).resolve().parent for s, env in site_env.items()}
        self.logs = logs
        wanted = {"server": (self.kits.server.name,), **{s: (s,) for s in self.site_names}, ADMIN_HOST: ("admin",)}
        self.network = HostNetwork(wanted, prefix=prefix)
        self._groups: list[subprocess.Popen] = []

    @property
    def admin_startup_kit(self) -> Path:
        return self.kits.admin

    @property
    def log_paths(self) -> dict[str, Path]:
        return {"server": self.kits.server / "log.txt", **{s: self.kits.sites[s] / "log.txt" for s in self.site_names}}

    def admin(self, log_path: Path) -> JobAdmin:
        """Job commands from the admin's host (they reach the server by its name)."""
        return JobAdmin(self.kits.admin, participant_env(), log_path, prefix=self.network.hosts[ADMIN_HOST].command([]))

    def site_command(self, site: str, cmd: list[str]) -> list[str]:
        """``cmd`` on a site's host, seeing only its own data: the other sites' data folders are covered by empty
        file systems in a mount namespace of its own (on real hosts they are simply elsewhere)."""
        hide = [self.data_roots[s] for s in self.site_names if s != site]
        return self.network.hosts[site].command(without_folders(hide, cmd))

    def start(self, timeout: float = 180.0) -> HostSystem:
        self.network.__enter__()
        try:
            isolate_server_storage(self.kits.server)
            kits = {"server": self.kits.server, **{s: self.kits.sites[s] for s in self.site_names}}
            for name, kit in kits.items():
                env = participant_env(self.site_env.get(name), sites=len(self.site_names))
                start_sh = ["bash", str(kit / "startup" / "sub_start.sh")]
                host = self.network.hosts[name]
                cmd = self.site_command(name, start_sh) if name in self.site_env else host.command(start_sh)
                self._groups.append(start_group(cmd, self.logs / f"{name}.console.log", env=env))
            wait_for(lambda: set(self.joined()) >= set(self.site_names), timeout, "every site to join the server")
        except BaseException:
            self.stop()
            raise
        return self

    def joined(self) -> dict[str, str]:
        """Site -> the address its latest connection to the server came from (the server's own log)."""
        log = self.kits.server / "log.txt"
        text = log.read_text(errors="replace") if log.is_file() else ""
        return {site: address for address, site in CONNECTED.findall(text)}

    def stop(self) -> None:
        for group in self._groups:
            stop_started(group, grace=5.0)
        self._groups = []
        self.network.remove()  # and whatever still runs on the hosts
