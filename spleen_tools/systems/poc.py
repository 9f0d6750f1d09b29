"""An NVFlare POC system (server + N sites on 127.0.0.1) in a folder we choose, started and stopped by PID.

Why the care:
- ``nvflare poc`` keeps its CLI state in ``$HOME/.nvflare/config.conf``; we give the nvflare commands a
  ``HOME`` inside our workspace so a run never rewrites the user's (or another developer's) POC settings.
- POC ports 8002/8003 are fixed, so only one POC may run on a machine. We hold an exclusive lock on
  ``/tmp/spleen-poc-8002.lock`` (one lock per server port) for as long as the system runs; a second run fails at
  once with a message naming the holder.
- ``start.sh`` runs the participants with ``python3`` from ``PATH``: we put this interpreter's folder first.
- ``nvflare poc start`` is started in its own session, so server, clients and their job processes share one
  process group; after ``nvflare poc stop`` we terminate that group, every recorded PID and their descendants.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from spleen_tools.flare import FlareError, connected_sites, nvflare, nvflare_command
from spleen_tools.paths import LOCK_DIR
from spleen_tools.procs import (
    HostLock,
    PidFile,
    ProcessRef,
    busy_ports,
    start_group,
    stop_started,
    terminate,
    wait_for,
)
from spleen_tools.systems.base import GPU_ENV, gpu_assignment, participant_env
from spleen_tools.systems.he_kits import fingerprint_kits, sign_kits_again
from spleen_tools.systems.site_policy import SitePolicy, write_poc_policies

KIND = "poc"
ADMIN = "admin@nvidia.com"
PROJECT = "example_project"
SERVER_PORTS = (8002, 8003)
LOOPBACK = "127.0.0.1"  # where the POC server listens (bind_server_to_loopback)
STARTER = "poc_group"  # the pids entry of `nvflare poc start`, the leader of the participants' process group


def bind_server_to_loopback(server_kit: Path) -> Path:
    """NVFlare 2.9 listens on every interface unless the server's service host is a loopback address; the POC's is
    ``server``. The sites and admins connect to ``localhost`` anyway, so nothing but this machine needs the ports."""
    path = Path(server_kit) / "startup" / "fed_server.json"
    config = json.loads(path.read_text())
    for server in config["servers"]:
        port = str(server["service"]["target"]).rsplit(":", 1)[1]
        server["service"]["target"] = f"{LOOPBACK}:{port}"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


class PocBusyError(RuntimeError):
    """Another POC run holds the lock or the fixed POC ports."""


def poc_lock(owner: str, port: int = SERVER_PORTS[0]) -> HostLock:
    """The machine-wide lock of the POC on ``port``."""

    def busy(holder: str) -> PocBusyError:
        return PocBusyError(
            f"another POC run is active ({holder}); wait for it, or stop it "
            f"(`./run_experiment.sh --stop RUN_DIR`), then retry (lock: {LOCK_DIR / f'spleen-poc-{port}.lock'})"
        )

    return HostLock(LOCK_DIR / f"spleen-poc-{port}.lock", owner, busy)


def check_ports() -> None:
    busy = busy_ports(SERVER_PORTS)
    if busy:
        raise PocBusyError(
            f"port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use: another NVFlare POC or server is "
            "running; stop it first"
        )


def write_site_gpus(prod_dir: Path, assignment: dict[str, str]) -> None:
    """Each site's GPU, set where its host would set it: in the environment its ``startup/sub_start.sh`` runs with
    (so ``restart_site`` keeps it). ``poc start -gpu`` cannot say which site gets which: it shuffles the clients."""
    for site, gpu in assignment.items():
        script = prod_dir / site / "startup" / "sub_start.sh"
        shebang, _, rest = script.read_text().partition("\n")
        rest = "\n".join(line for line in rest.splitlines() if not line.startswith(f"export {GPU_ENV}="))
        script.write_text(f"{shebang}\nexport {GPU_ENV}={shlex.quote(gpu)}  # spleen: this site's GPU\n{rest}\n")


def preflight(owner: str = "preflight") -> None:
    """Fail fast (before data and MLflow are set up) when another POC holds the lock or the ports."""
    poc_lock(owner).acquire().release()
    check_ports()


def poc_env(
    workspace: Path, home: Path, extra: dict[str, str] | None = None, sites: int | None = None
) -> dict[str, str]:
    env = participant_env(extra, sites)
    env["HOME"] = str(home)
    env["NVFLARE_POC_WORKSPACE"] = str(workspace)
    return env


def stop_poc(
    workspace: Path, home: Path, processes: dict[str, ProcessRef], logs_dir: Path, grace: float = 10.0
) -> list[int]:
    """``nvflare poc stop`` while a participant lives, then terminate every recorded process, the group of
    ``poc start`` and all their descendants; returns the PIDs still alive (none on success)."""
    if any(ref.alive() for key, ref in processes.items() if key != STARTER):
        try:
            nvflare("poc", "stop", env=poc_env(workspace, home), log_path=logs_dir / "poc_stop.log", timeout=90)
        except (FlareError, subprocess.TimeoutExpired, OSError):
            pass  # terminate() finishes the job
    return terminate(processes.values(), grace=grace)


def stop_recorded(record: dict) -> list[int]:
    """Stop a POC from its entry in a run's ``pids.json`` (``./run_experiment.sh --stop``)."""
    processes = {k: ProcessRef.from_json(v) for k, v in (record.get("processes") or {}).items()}
    workspace = Path(record["workspace"])
    return stop_poc(workspace, Path(record["home"]), processes, workspace.parent / "logs")


class PocSystem:
    """``with PocSystem(workspace, 2) as poc: poc.admin_startup_kit`` prepares, starts, waits, and stops.

    ``env`` adds variables for the participants (e.g. ``SPLEEN_DATA_DIR``): jobs inherit the clients' env.
    ``pid_file`` (optional) gets the processes under ``"poc"`` as soon as they are known.
    """

    kind = KIND

    def __init__(
        self,
        workspace: Path,
        n_sites: int,
        he: bool = False,
        env: dict[str, str] | None = None,
        start_timeout: float = 180.0,
        pid_file: Path | None = None,
        policy: SitePolicy | None = None,
        gpus: tuple[int, ...] = (),
    ) -> None:
        if n_sites < 1:
            raise ValueError(f"n_sites must be at least 1, got {n_sites}")
        self.workspace = Path(workspace).resolve()
        self.n_sites = n_sites
        self.he = he
        self.extra_env = dict(env or {})
        self.policy = policy or SitePolicy()
        self.start_timeout = start_timeout
        self.pid_file = PidFile(pid_file) if pid_file is not None else None
        self.site_names = [f"site-{i}" for i in range(1, n_sites + 1)]
        self.gpu_of = gpu_assignment(self.site_names, tuple(gpus))
        self._lock = poc_lock(owner=f"workspace {self.workspace}")
        self._starter: subprocess.Popen | None = None
        self._restarts: list[subprocess.Popen] = []  # sites started again (restart_site)
        self.processes: dict[str, ProcessRef] = {}

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
        return poc_env(self.workspace, self.home, self.extra_env, self.n_sites)

    def _nvflare(self, *args: str, log_name: str, timeout: float = 300.0) -> None:
        nvflare(*args, env=self.env(), log_path=self.logs_dir / log_name, timeout=timeout)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> PocSystem:
        self._lock.acquire()
        try:
            check_ports()
            self.home.mkdir(parents=True, exist_ok=True)
            self._nvflare(
                "poc",
                "prepare",
                "-n",
                str(self.n_sites),
                "--force",
                *(["-he"] if self.he else []),
                log_name="poc_prepare.log",
            )
            if not (self.admin_startup_kit / "startup").is_dir():
                raise RuntimeError(f"`nvflare poc prepare` made no admin kit at {self.admin_startup_kit}")
            if self.he:
                fingerprint_kits(self.prod_dir)
            write_poc_policies(self.prod_dir, self.site_names, self.policy)
            bind_server_to_loopback(self.prod_dir / "server")
            write_site_gpus(self.prod_dir, self.gpu_of)
            sign_kits_again(self.prod_dir)
            cmd = nvflare_command("poc", "start", "-ex", ADMIN, "--timeout", str(int(self.start_timeout)))
            # Own session: server, clients and job processes all land in this process group.
            self._starter = start_group(cmd, self.logs_dir / "poc_start.log", env=self.env())
            self.processes[STARTER] = ProcessRef.of(self._starter.pid)
            self._record()
            try:
                rc = self._starter.wait(timeout=self.start_timeout + 60)
            except subprocess.TimeoutExpired:
                rc = None
            self._read_pid_files()
            if rc != 0:
                raise RuntimeError(
                    f"POC did not become ready (nvflare poc start exit {rc}); see {self.logs_dir / 'poc_start.log'}"
                )
            missing = [p for p in self.participants if p not in self.processes]
            if missing:
                raise RuntimeError(f"POC started but wrote no pid file for {', '.join(missing)}")
        except BaseException:
            self.stop()
            raise
        return self

    def restart_site(self, name: str, timeout: float = 120.0) -> None:
        """Start a site that died again, as its host would after a reboot: its kit's ``startup/start.sh``, in its own
        process group, recorded like the first start; returns once the server lists the site as connected."""
        if name not in self.site_names:
            raise ValueError(f"unknown site {name!r}: this POC has {', '.join(self.site_names)}")
        start_sh = self.prod_dir / name / "startup" / "start.sh"
        self._restarts.append(
            start_group(["bash", str(start_sh)], self.logs_dir / f"restart_{name}.log", env=self.env())
        )
        wait_for(
            lambda: name in self.connected_sites(),
            timeout,
            f"{name} to connect again after its restart",
            interval=2.0,
        )
        self._read_pid_files()

    def connected_sites(self) -> list[str]:
        """The sites the server lists as connected; none while it cannot be asked."""
        try:
            return connected_sites(ADMIN, self.admin_startup_kit)
        except Exception:  # the admin API raises many kinds while the server is busy or starting
            return []

    def _read_pid_files(self) -> None:
        """The participants' and their daemons' PIDs, from the files NVFlare's start scripts write."""
        for name in self.participants:
            for suffix, fname in (("", "pid.fl"), ("_daemon", "daemon_pid.fl")):
                key = f"{name}{suffix}"
                try:
                    pid = int((self.prod_dir / name / fname).read_text().strip())
                except (OSError, ValueError):
                    continue
                if self.processes.get(key, ProcessRef(-1)).pid != pid:
                    self.processes[key] = ProcessRef.of(pid)
        self._record()

    def _record(self) -> None:
        if self.pid_file is not None:
            processes = {k: v.to_json() for k, v in self.processes.items()}
            self.pid_file.update(
                **{KIND: {"workspace": str(self.workspace), "home": str(self.home), "processes": processes}}
            )

    def alive_pids(self) -> list[int]:
        return [ref.pid for ref in self.processes.values() if ref.alive()]

    def stop(self) -> None:
        """``nvflare poc stop``, then make sure by process group and PID that nothing we started is left."""
        try:
            if self._starter is not None or self.processes:
                self._read_pid_files()
                stop_poc(self.workspace, self.home, self.processes, self.logs_dir)
                if self._starter is not None:
                    stop_started(self._starter, grace=5.0)
                    self._starter = None
                for restart in self._restarts:
                    stop_started(restart, grace=5.0)
                self._restarts = []
        finally:
            self._lock.release()

    def __enter__(self) -> PocSystem:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
