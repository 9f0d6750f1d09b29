"""Why a participant refused a job, from NVFlare's own logs: its authorization policy (a job that carries code)
or its class allow-list (a class it does not list). NVFlare reports the first in the server's log, as a deploy
failure per site, and the second in the participant's job log; the one command prints each as one line."""

from __future__ import annotations

import re
from pathlib import Path

# 'site-1: NVFLARE_ERROR: BYOC not permitted' inside the server's "deploy failure" line of a job
_DEPLOY_REFUSAL = re.compile(r"'([\w.@-]+): NVFLARE_ERROR: ([^']*)'")
# Component 'x.y.Z' at config path 'executors.#0.executor' is not in allow_list
_NOT_ALLOWED = re.compile(r"Component '([\w.]+)' at config path '[^']*' is not in allow_list")
FIXES = {
    "BYOC not permitted": "the job carries code (app/custom) and its policy refuses that; prepare it without "
    "--ship-code",
}


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def deploy_refusals(server_log: Path, job_id: str) -> list[str]:
    """Sites that refused to deploy ``job_id``, as the server logged it."""
    found = []
    for line in _lines(server_log):
        if job_id in line and "deploy failure" in line:
            for site, reason in _DEPLOY_REFUSAL.findall(line):
                fix = FIXES.get(reason.strip(), "see its log.txt")
                found.append(f"{site} refused the job: {reason.strip()} ({fix})")
    return list(dict.fromkeys(found))


def allow_list_refusals(job_logs: dict[str, Path]) -> list[str]:
    """Participants whose class allow-list refused a component of the job (one line each, the first class)."""
    found = []
    for name, log in job_logs.items():
        classes = [m.group(1) for line in _lines(log) if (m := _NOT_ALLOWED.search(line))]
        if classes:
            found.append(
                f"{name} refused the job: {classes[0]} is not in its class_allow_list (local/resources.json); "
                "jobs name only the classes our kits allow (spleen-site-policy KIT --show)"
            )
    return found


def policy_refusals(log_roots: dict[str, Path], job_id: str) -> list[str]:
    """Every refusal of ``job_id`` by a participant's policy; ``log_roots``: participant -> folder of its log.txt."""
    server = log_roots.get("server")
    deploy = deploy_refusals(server / "log.txt", job_id) if server else []
    return deploy + allow_list_refusals({name: root / job_id / "log.txt" for name, root in log_roots.items()})
