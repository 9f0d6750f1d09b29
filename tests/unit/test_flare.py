"""Talking to NVFlare: job status in the CLI's JSON, and failures that name the command and its log."""

from __future__ import annotations

import pytest

from spleen_tools.flare import FlareError, JobAdmin, find_status, is_finished, nvflare


def test_find_status_anywhere_in_the_reply():
    assert find_status({"job_meta": {"status": "RUNNING", "name": "x"}}) == "RUNNING"
    assert find_status({"data": [1], "meta": {"inner": {"job_status": "FINISHED:COMPLETED"}}}) == "FINISHED:COMPLETED"
    assert find_status({"nothing": 1}) is None


@pytest.mark.parametrize(
    "status, done",
    [("RUNNING", False), (None, False), ("FINISHED:COMPLETED", True), ("FINISHED:ABORTED", True), ("FAILED", True)],
)
def test_is_finished(status, done):
    assert is_finished(status) is done


def test_failed_cli_command_names_the_command_and_the_log(tmp_path):
    log = tmp_path / "logs" / "cli.log"
    with pytest.raises(FlareError, match=f"`nvflare no-such-command` failed \\(exit \\d+\\); see {log}"):
        nvflare("no-such-command", env=None, log_path=log, timeout=120)
    assert log.read_text(), "the output is kept"


def test_job_command_without_a_startup_kit_is_one_clear_error(tmp_path):
    admin = JobAdmin(tmp_path / "no_kit", env=None, log_path=tmp_path / "cli.log")
    with pytest.raises(FlareError, match="`nvflare job list` failed: .*see .*cli.log"):
        admin("job", "list")
    assert "--startup-kit" in (tmp_path / "cli.log").read_text()
