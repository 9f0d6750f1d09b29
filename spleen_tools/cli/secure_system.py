"""Provision, start, inspect and stop the secure (TLS, certificates, HE) NVFlare system on this machine.

start_fl_secure.sh provision   nvflare provision on workspaces/secure_project.yml -> workspaces/secure_workspace
start_fl_secure.sh N           start the server and site-1..N, return when all N sites are connected
start_fl_secure.sh --status    what runs, and which sites the server sees
start_fl_secure.sh --stop      stop exactly what start_fl_secure.sh started
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from spleen_flare.contract import DATA_DIR_ENV, DATALIST_ENV
from spleen_tools.cli import OneLineParser
from spleen_tools.flare import connected_sites
from spleen_tools.paths import SECURE_PROJECT_YML
from spleen_tools.run.settings import Terminated
from spleen_tools.run.stop import sigterm_raises
from spleen_tools.systems.secure import SecureSystem, preflight, stop_system
from spleen_tools.systems.secure_workspace import (
    WORKSPACE_ENV,
    SecureError,
    default_workspace,
    provision,
    read_kits,
    read_state,
    running_pids,
)

_SHORTHANDS = {"--stop": "stop", "--status": "status", "--provision": "provision", "--start": "start"}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of sites like 2, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"the number of sites must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--workspace",
        type=Path,
        default=None,
        help=f"the provisioned workspace (default: ${WORKSPACE_ENV} or workspaces/secure_workspace)",
    )
    p = OneLineParser(
        prog="start_fl_secure.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    pr = sub.add_parser("provision", parents=[common], help="provision the secure workspace")
    pr.add_argument(
        "--project", type=Path, default=SECURE_PROJECT_YML, help="provisioning project (default: %(default)s)"
    )
    st = sub.add_parser("start", parents=[common], help="start the server and N sites, wait until connected")
    st.add_argument("sites", type=_positive, help="number of sites (site-1..N, as provisioned)")
    st.add_argument("--data", type=Path, help=f"dataset folder for the sites (sets ${DATA_DIR_ENV})")
    st.add_argument("--datalists", type=Path, help=f"folder of per-site datalists site-N.json (sets ${DATALIST_ENV})")
    st.add_argument("--timeout", type=float, default=300.0, help="give up (and stop) after seconds (default: 300)")
    sub.add_parser("status", parents=[common], help="show what runs and which sites are connected")
    sub.add_parser("stop", parents=[common], help="stop what start started")
    return p


def normalize(argv: list[str]) -> list[str]:
    """``N ...`` -> ``start N ...``; ``--stop`` / ``--status`` / ``--provision`` -> the subcommand."""
    if argv and argv[0] in _SHORTHANDS:
        return [_SHORTHANDS[argv[0]], *argv[1:]]
    if argv and argv[0].lstrip("-").isdigit():
        return ["start", *argv]
    return list(argv)


def _workspace(args) -> Path:
    return (args.workspace or default_workspace()).resolve()


def _start(args) -> int:
    env = {}
    if args.data is not None:
        if not (args.data / "dataset.json").is_file():
            raise SecureError(f"--data {args.data}: no dataset.json there (expected an MSD Task09_Spleen folder)")
        env[DATA_DIR_ENV] = str(args.data.resolve())
    if args.datalists is not None:
        env[DATALIST_ENV] = str(args.datalists.resolve() / "{site}.json")
    preflight(args.sites, _workspace(args))  # one-line errors before anything starts
    system = SecureSystem(_workspace(args), args.sites, env=env, start_timeout=args.timeout, out=print)
    print(f"starting the secure system from {system.workspace}: server and {', '.join(system.site_names)} ...")
    unset = {
        DATA_DIR_ENV: "not set: the bundle's default data path applies",
        DATALIST_ENV: f"not set: sites use ${DATA_DIR_ENV}/datalists/<site>.json if there",
    }
    for key, why in unset.items():
        value = env.get(key, os.environ.get(key))
        print(f"  {key}={value}" if value else f"  {key} {why}")
    system.start()
    system.detach()
    kits = system.kits
    print(f"server: localhost:{kits.fl_port} (FL), localhost:{kits.admin_port} (admin), mutual TLS")
    print("logs (NVFlare log; console output):")
    for name in system.participants:
        print(f"  {name}: {system.log_paths[name]}; {system.console_logs[name]}")
    print(f"  a job's own log: <kit>/<job_id>/log.txt, e.g. {system.kit_dir('site-1')}/<job_id>/log.txt")
    print(f"admin kit: {kits.admin}")
    print(f"  submit: .venv/bin/nvflare job submit -j JOB_FOLDER --startup-kit {kits.admin}")
    print("stop: ./start_fl_secure.sh --stop")
    return 0


def _status(args) -> int:
    workspace = _workspace(args)
    kits = read_kits(workspace)
    state = read_state(workspace)
    live = running_pids(workspace)
    if not live:
        print(f"no secure system runs from {workspace} (provisioned sites: {', '.join(kits.sites)})")
        return 1
    print(f"secure system from {workspace}, started {state.get('started')}, {len(live)} processes (PIDs {live})")
    try:
        print(f"connected sites: {', '.join(connected_sites(kits.admin_user, kits.admin)) or 'none'}")
    except Exception as err:
        print(f"admin API not answering: {type(err).__name__}: {err}")
        return 1
    return 0


def _stop(args) -> int:
    workspace = _workspace(args)
    if not read_state(workspace):
        print(f"nothing to stop: no secure system recorded in {workspace}")
        return 0
    left = stop_system(workspace)
    if left:
        print(f"error: still alive after SIGKILL: {left}", file=sys.stderr)
        return 1
    print(f"stopped the secure system started from {workspace}")
    return 0


def _provision(args) -> int:
    target = _workspace(args)
    path = provision(workspace_root=target.parent, project_yml=args.project, name=target.name)
    kits = read_kits(path)
    print(f"provisioned {args.project} -> {path}")
    print(f"  server kit: {kits.server} (ports {kits.fl_port}/{kits.admin_port})")
    print(f"  site kits: {', '.join(kits.sites)}; admin kit: {kits.admin}")
    print("next: ./start_fl_secure.sh N")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("error: give the number of sites (./start_fl_secure.sh 2), or provision, --status, --stop (see --help)")
        return 2
    args = build_parser().parse_args(normalize(argv))
    commands = {"provision": _provision, "start": _start, "status": _status, "stop": _stop}
    try:
        with sigterm_raises():  # SIGTERM during start: stop what was started, as on Ctrl-C (the one command's way)
            return commands[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: stopped what was started", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: stopped what was started", file=sys.stderr)
        return 143
    except (SecureError, RuntimeError, TimeoutError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
