"""The provisioned secure workspace: ``nvflare provision`` into it, its kits, the server's job store moved out
of the shared ``/tmp/nvflare``, and the state file of the system started from it (``system.json``).

``provision()`` runs ``nvflare provision`` on ``workspaces/secure_project.yml`` and places the newest ``prod_NN`` in
``workspaces/secure_workspace`` (or ``$SPLEEN_SECURE_WORKSPACE``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spleen_tools.flare import FlareError, nvflare
from spleen_tools.paths import REPO_ROOT, SECURE_PROJECT_YML, WORKSPACES_DIR
from spleen_tools.procs import ProcessRef, process_tree, read_json

WORKSPACE_NAME = "secure_workspace"
STATE_FILE = "system.json"
WORKSPACE_ENV = "SPLEEN_SECURE_WORKSPACE"  # another provisioned workspace (tests use one in a temp folder)
SITE_RE = re.compile(r"^site-(\d+)$")
FIX_PROVISION = "./start_fl_secure.sh provision"
FIX_STOP = "./start_fl_secure.sh --stop"


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


# -- provisioning ---------------------------------------------------------------------------------------------
def provision_if_missing(say: Callable[[str], None]) -> bool:
    """Provision the repo's own workspace when there is none yet (a fresh clone): True if it did. A workspace
    named by ``$SPLEEN_SECURE_WORKSPACE`` is someone's kits: never made here."""
    target = default_workspace()
    if os.environ.get(WORKSPACE_ENV) or target.exists():
        return False
    say(f"no secure workspace yet: provisioning one ({FIX_PROVISION}, from {SECURE_PROJECT_YML.name}) into {target}")
    provision(target.parent, name=target.name)
    return True


def _prod_number(path: Path) -> int:
    match = re.fullmatch(r"prod_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def provision(
    workspace_root: Path = WORKSPACES_DIR,
    project_yml: Path = SECURE_PROJECT_YML,
    name: str = WORKSPACE_NAME,
    timeout: float = 300.0,
) -> Path:
    """``nvflare provision -p SECURE_PROJECT_YML -w WORKSPACE_ROOT/workspace``; the newest ``prod_NN`` becomes
    ``WORKSPACE_ROOT/NAME`` (returned). The provisioning state (root CA) in ``workspace/`` is kept, so provisioning
    again gives new kits under the same CA. Refused while a secure system runs from ``WORKSPACE_ROOT/NAME``."""
    import yaml

    workspace_root = Path(workspace_root).resolve()
    project_yml = Path(project_yml).resolve()
    target = workspace_root / name
    if not project_yml.is_file():
        raise SecureError(f"no provisioning project at {project_yml}")
    if running_pids(target):
        raise SecureBusyError(f"a secure system is running from {target}; stop it first ({FIX_STOP})")
    project = yaml.safe_load(project_yml.read_text()).get("name")
    work = workspace_root / "workspace"
    work.mkdir(parents=True, exist_ok=True)
    # --force: answer the "workspace exists, continue?" prompt with yes (keep the CA, add a prod_NN) without a TTY.
    log = work / "provision.log"
    log.unlink(missing_ok=True)
    failed = None
    try:
        nvflare(
            "provision",
            "-p",
            str(project_yml),
            "-w",
            str(work),
            "--force",
            env=None,
            log_path=log,
            cwd=work,
            timeout=timeout,
        )
    except FlareError as err:
        failed = err
    prods = sorted((work / str(project)).glob("prod_*"), key=_prod_number)
    if failed or not prods:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
        raise SecureError(f"`nvflare provision -p {project_yml}` failed ({failed or 'no kits'}): {' | '.join(tail)}")
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
        raise NotProvisionedError(f"no secure workspace at {workspace}: provision it first ({FIX_PROVISION})")
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
            f"provision it first ({FIX_PROVISION})"
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
            f"{SECURE_PROJECT_YML.relative_to(REPO_ROOT)} and provision again ({FIX_PROVISION})"
        )
    return wanted


_SHARED_STORAGE = {"/tmp/nvflare/jobs-storage": "jobs", "/tmp/nvflare/snapshot-storage": "snapshot"}


def isolate_server_storage(server_kit: Path) -> Path:
    """NVFlare's default server resources keep the job store and snapshots in ``/tmp/nvflare/``, shared by every
    provisioned server on the machine (another workspace would list, and after a crash resume, this one's jobs).
    Point both at ``<server kit>/storage/`` in ``local/resources.json`` (NVFlare reads it instead of
    ``resources.json.default``; provisioning writes it with the server's class allow-list). Only those two paths
    change: a file without them is left as it is."""
    local = Path(server_kit) / "local"
    target = local / "resources.json"

    def swap(node):
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        if isinstance(node, str) and node in _SHARED_STORAGE:
            return str((Path(server_kit) / "storage" / _SHARED_STORAGE[node]).resolve())
        return node

    current = json.loads((target if target.exists() else local / "resources.json.default").read_text())
    resources = swap(current)
    if target.exists() and resources == current:
        return target
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(resources, indent=2) + "\n")
    tmp.replace(target)
    return target


# -- the state file of a running system ----------------------------------------------------------------------------
def state_path(workspace: Path) -> Path:
    return Path(workspace) / STATE_FILE


def read_state(workspace: Path) -> dict:
    return read_json(state_path(workspace))


def recorded_processes(state: dict) -> list[ProcessRef]:
    """The participants' process-group leaders recorded in a state file."""
    return [ProcessRef.from_json(rec) for rec in (state.get("participants") or {}).values() if "pid" in rec]


def running_pids(workspace: Path) -> list[int]:
    """Live processes of the secure system recorded in ``<workspace>/system.json`` (empty when none)."""
    return [p.pid for p in process_tree(recorded_processes(read_state(workspace)))]
