"""The one command's answer to a server that dies mid-job: notice it came back, then resume the job.

NVFlare 2.9 keeps no job snapshot: a restarted server has forgotten the job it ran, which stays ``RUNNING`` in its
job store with nothing behind it, while the sites' job processes are told to end. What survives is the job's
server folder with the last global model (see ``spleen_flare.resume``). The run watches the server's start time
(``nvflare system status``); when it changes, it waits for every site to connect again and submits a copy of the
job with ``resume_from`` = the lost job, which goes on from the round after the last persisted global model.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field

from spleen_tools.flare import FlareError, JobAdmin
from spleen_tools.procs import wait_for

SERVER_GONE_LIMIT = 300.0  # seconds the server may stay unreachable during a job before the run gives up
REJOIN_LIMIT = 300.0  # seconds the sites get to connect to a restarted server


class ServerRestarted(Exception):
    """The server restarted while ``job_id`` ran (it has lost the job)."""

    def __init__(self, job_id: str, noticed_at: float) -> None:
        super().__init__(f"the server restarted while job {job_id} ran")
        self.job_id = job_id
        self.noticed_at = noticed_at  # wall clock


class ServerGone(Exception):
    """The server has not answered for longer than the limit."""


@dataclass
class ServerWatch:
    """The server as ``nvflare system status`` reports it (a command of its own: an interrupted query never leaves
    a half-open admin session behind in this process). A start time other than the first one seen means the
    server restarted."""

    admin: JobAdmin
    gone_limit: float = SERVER_GONE_LIMIT
    started_at: float | None = None
    unreachable_since: float | None = field(default=None, repr=False)

    def status(self) -> dict | None:
        """The server's status reply; None while it cannot be asked."""
        try:
            return self.admin("system", "status", timeout=60)
        except (FlareError, subprocess.TimeoutExpired):
            return None

    def arm(self) -> None:
        """Take the running server's start time (before submitting a job)."""
        reply = self.status() or {}
        self.started_at = reply.get("server_start_time")
        self.unreachable_since = None

    def runs(self, job_id: str) -> bool:
        """Whether the server runs ``job_id`` now. Raises ServerRestarted when its start time changed, ServerGone
        when it stayed unreachable past the limit (unreachable until then: False)."""
        reply = self.status()
        if reply is None:
            self.unreachable_since = self.unreachable_since or time.monotonic()
            down = time.monotonic() - self.unreachable_since
            if down > self.gone_limit:
                raise ServerGone(f"the server has not answered for {down:.0f} s while job {job_id} ran")
            return False
        self.unreachable_since = None
        start = reply.get("server_start_time")
        if self.started_at is None:
            self.started_at = start
        elif start != self.started_at:
            raise ServerRestarted(job_id, time.time())
        jobs = reply.get("jobs") or []
        return any(job_id in (j.get("job_id"), j.get("job")) if isinstance(j, dict) else j == job_id for j in jobs)

    def wait_for_sites(self, sites: list[str], limit: float = REJOIN_LIMIT) -> float:
        """Seconds until every site is connected to the (restarted) server; ServerGone past ``limit``."""
        start, missing = time.monotonic(), set(sites)

        def all_back() -> bool:
            reply = self.status() or {}
            connected = {c.get("client_name") for c in reply.get("clients") or []}
            missing.clear()
            missing.update(set(sites) - connected)
            return not missing

        try:
            wait_for(all_back, limit, "the sites to connect to the restarted server", interval=2.0)
        except TimeoutError:
            raise ServerGone(
                f"{', '.join(sorted(missing))} did not connect to the restarted server within {limit:.0f} s"
            ) from None
        return time.monotonic() - start


def cannot_resume(job_id: str, reason: str, secure: bool, job_name: str, rounds: int) -> str:
    """The one-line error when the run cannot go on, with what to do."""
    if secure:
        todo = (
            f"the provisioned system keeps job {job_id}'s folder: once the server is up, resume it with "
            f"`spleen-prepare-jobs --job {job_name} --out DIR --rounds {rounds} --resume-from {job_id}` and "
            f"`nvflare job submit -j DIR/{job_name}`"
        )
    else:
        todo = "run the command again (this run's POC system is stopped with it)"
    return f"job {job_id} lost its server and cannot be resumed: {reason}; {todo}"
