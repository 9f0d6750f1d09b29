"""A participant's refusal of a job, read from NVFlare's own log lines (as NVFlare 2.9 writes them)."""

from __future__ import annotations

from spleen_tools.run.refusals import policy_refusals

JOB = "2149cfcd-718f-4a81-b729-81c2249f5aec"
DEPLOY = (
    "2026-12-04 14:30:50,551 - JobRunner - ERROR - [identity=server, run=?] - Failed to run the Job ("
    f"{JOB}): RuntimeError: ('deploy failure', ['server: OK', 'site-1: NVFLARE_ERROR: BYOC not permitted', "
    "'site-2: NVFLARE_ERROR: BYOC not permitted', 'num_ok_sites 0 < required_min_sites 2'])"
)
NOT_ALLOWED = (
    "nvflare.fuel.common.excepts.ComponentNotAuthorized: component not authorized: Component "
    "'nvflare.app_common.executors.client_api_executor.ClientAPIExecutor' at config path 'executors.#0.executor' "
    "is not in allow_list"
)


def test_byoc_refused_at_deployment_names_each_site_and_the_fix(tmp_path):
    server = tmp_path / "server"
    server.mkdir()
    (server / "log.txt").write_text(f"other line\n{DEPLOY}\n{DEPLOY.replace(JOB, 'another-job')}\n")
    found = policy_refusals({"server": server, "site-1": tmp_path / "site-1"}, JOB)
    assert found == [
        f"site-{n} refused the job: BYOC not permitted (the job carries code (app/custom) and its policy refuses "
        "that; prepare it without --ship-code)"
        for n in (1, 2)
    ]


def test_a_class_outside_the_allow_list_names_the_participant_and_the_class(tmp_path):
    job_log = tmp_path / "site-2" / JOB / "log.txt"
    job_log.parent.mkdir(parents=True)
    job_log.write_text(f"{NOT_ALLOWED}\n{NOT_ALLOWED}\n")
    (found,) = policy_refusals({"server": tmp_path / "server", "site-2": tmp_path / "site-2"}, JOB)
    assert found.startswith(
        "site-2 refused the job: nvflare.app_common.executors.client_api_executor.ClientAPIExecutor"
    )
    assert "class_allow_list" in found


def test_no_refusal_no_line(tmp_path):
    assert policy_refusals({"server": tmp_path}, JOB) == []
