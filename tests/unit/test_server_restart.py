"""What the one command says when a job lost with its server cannot be resumed (the resume itself: e2e)."""

from __future__ import annotations

import time

import pytest

from spleen_tools.flare import JobAdmin
from spleen_tools.run.server_restart import ServerGone, ServerWatch, cannot_resume
from spleen_tools.systems.base import participant_env


def test_cannot_resume_says_what_to_do_on_each_system():
    poc = cannot_resume("job-a", "--max-resumes 0 reached", False, "spleen_ct_segmentation_local", 3)
    assert poc == (
        "job job-a lost its server and cannot be resumed: --max-resumes 0 reached; run the command again (this "
        "run's POC system is stopped with it)"
    )
    secure = cannot_resume("job-a", "gone", True, "spleen_ct_segmentation_he", 3)
    assert (
        "--rounds 3 --resume-from job-a" in secure and "nvflare job submit -j DIR/spleen_ct_segmentation_he" in secure
    )
    assert "\n" not in poc + secure


def test_a_server_that_never_answers_is_given_up_after_the_limit(tmp_path):
    # no server behind this kit: `nvflare system status` fails from the first look
    admin = JobAdmin(tmp_path / "no-kit", participant_env(), tmp_path / "admin.log")
    watch = ServerWatch(admin, gone_limit=1.0)
    watch.arm()
    assert watch.started_at is None
    assert watch.runs("job-a") is False  # unreachable: not known to run; the limit starts now
    time.sleep(1.1)
    with pytest.raises(ServerGone, match="has not answered .* while job job-a ran"):
        watch.runs("job-a")
