"""The one command's answer to a server that dies mid-job: notice it came back, then resume the job.

NVFlare 2.9 keeps no job snapshot: a restarted server has forgotten the job it ran, which stays ``RUNNING`` in its
job store with nothing behind it, while the sites' job processes are told to end. What survives is the job's
server folder with the last global model (see ``spleen_flare.resume``). The run watches the server's start time
(admin API); when it changes, it waits for every site to connect again and submits a copy of the job with
``resume_from`` = the lost job, which goes on from the round after the last persisted global model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from spleen_tools.flare import connected_sites, server_started_at

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
    """The server's start time, as first seen; a later, different one means the server restarted."""

    admin_user: str
    admin_kit: Path
    gone_limit: float = SERVER_GONE_LIMIT
    started_at: float | None = None
    unreachable_since: float | None = field(default=None, repr=False)

    def arm(self) -> None:
        """Take the running server's start time (before submitting a job)."""
        self.started_at = server_started_at(self.admin_user, self.admin_kit)
        self.unreachable_since = None

    def check(self, job_id: str) -> None:
        """Raise ServerRestarted when the server's start time changed, ServerGone when it stayed unreachable."""
        now_start = server_started_at(self.admin_user, self.admin_kit)
        if now_start is None:
            self.unreachable_since = self.unreachable_since or time.monotonic()
            down = time.monotonic() - self.unreachable_since
            if down > self.gone_limit:
                raise ServerGone(f"the server has not answered for {down:.0f} s while job {job_id} ran")
            return
        self.unreachable_since = None
        if self.started_at is None:
            self.started_at = now_start
        elif now_start != self.started_at:
            raise ServerRestarted(job_id, time.time())


def wait_for_sites(admin_user: str, admin_kit: Path, sites: list[str], limit: float = REJOIN_LIMIT) -> float:
    """Seconds until every site is connected to the (restarted) server; ServerGone past ``limit``."""
    start = time.monotonic()
    while True:
        try:
            connected = set(connected_sites(admin_user, admin_kit))
        except Exception:  # the server is still starting
            connected = set()
        if connected >= set(sites):
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            missing = ", ".join(sorted(set(sites) - connected))
            raise ServerGone(f"{missing} did not connect to the restarted server within {limit:.0f} s")
        time.sleep(2.0)


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
