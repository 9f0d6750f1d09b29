"""One command for the real federated system: data, jobs, POC (or a secure system), MLflow, submit, follow, results.

``run_experiment(settings)`` does, in order: make a run directory ``runs/<timestamp>/`` (and ``runs/latest``);
make or reuse the synthetic dataset (or use ``--data``) and write per-site datalists into the run directory;
prepare a configured job copy; start an MLflow server (SQLite store in the run directory) and the FL system;
submit the job; follow the sites' ``[spleen]`` progress lines; download the job; print the cross-site table;
export the model and scan for secrets; write ``summary.json`` (once, also when a check fails); stop everything it
started (also on error, Ctrl-C, SIGTERM and ``--timeout``).
Every process it starts is recorded in ``<run dir>/pids.json`` (``--stop RUN_DIR`` uses it).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from spleen_flare.contract import DATA_DIR_ENV, DATALIST_ENV, FINAL_GLOBAL_MODEL
from spleen_tools import job_result
from spleen_tools.data.check import check_dataset
from spleen_tools.flare import TERMINAL_OK, FlareError, JobAdmin, is_finished
from spleen_tools.jobs import prepare_job, wandb_from_env
from spleen_tools.mlflow_server import MLflowServer
from spleen_tools.procs import PidFile, ProcessRef
from spleen_tools.run import report, summary
from spleen_tools.run.memory import PeakMemory, recorded_server
from spleen_tools.run.plots import write_run_plots
from spleen_tools.run.progress import LogFollower, Progress, follow
from spleen_tools.run.prune import prune_run
from spleen_tools.run.refusals import policy_refusals
from spleen_tools.run.rundir import make_run_dir, point_latest, prepare_data
from spleen_tools.run.secrets_check import check_no_secret_left, scan_for_secrets
from spleen_tools.run.server_restart import ServerGone, ServerRestarted, ServerWatch, cannot_resume
from spleen_tools.run.settings import ExperimentError, ExperimentSettings, RunTimeout, SettingsError, Terminated
from spleen_tools.run.stats_report import conclude_statistics
from spleen_tools.run.stop import MLFLOW, PIDS_FILE, alive_pids, signals_ignored, sigterm_raises, stop_all_recorded
from spleen_tools.run.summary import Tracking
from spleen_tools.run.tracking import mlflow_runs, tensorboard_dirs, workspace_store
from spleen_tools.run.wandb_files import wandb_info
from spleen_tools.systems.base import FLSystem

STATUS_EVERY = 10.0  # seconds between job status queries
LOST_STATUSES = ("RUNNING", "DISPATCHED")  # a job a restarted server forgot keeps one of these for ever


@dataclass
class Run:
    """What one run holds while it goes: its folder, deadline, pids file, and the servers it started."""

    settings: ExperimentSettings
    run_dir: Path
    started: float
    out: Callable[[str], None]
    mlflow: MLflowServer | None = None
    system: FLSystem | None = None
    server_memory: PeakMemory | None = None
    phase: str = "starting"  # what the run is doing; stopped.json names it when the run ends early
    resumes: list[dict] = field(default_factory=list)  # jobs lost with a restarted server, and their successors

    def enter(self, phase: str) -> None:
        self.phase = phase

    @property
    def deadline(self) -> float:
        return self.started + self.settings.timeout

    @property
    def pid_file(self) -> PidFile:
        return PidFile(self.run_dir / PIDS_FILE)


def run_experiment(settings: ExperimentSettings, out: Callable[[str], None] = print) -> int:
    """The whole run; returns 0 on success. Raises ExperimentError (user-facing), RunTimeout, KeyboardInterrupt."""
    settings.validate()
    check_given_data(settings)
    run = Run(settings, make_run_dir(Path(settings.runs_dir).resolve(), latest=False), time.monotonic(), out)
    run.pid_file.update(runner=ProcessRef.of(os.getpid()))
    (run.run_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=2, default=str) + "\n")
    out(f"run directory: {run.run_dir}")
    keep = False
    try:
        with sigterm_raises():
            run.enter("checking that the FL system can start")
            preflight(settings, out)
            point_latest(run.run_dir)  # a run refused by its preflight leaves runs/latest on the last real run
            run.enter("preparing data")
            dataset, datalists = prepare_data(settings, run.run_dir, out)
            if settings.tracking == "server" and settings.trains:
                run.enter("starting MLflow")
                start_mlflow(run)
            job_folder = prepare_job_copy(run)
            run.enter("starting the FL system")
            start_system(run, {DATA_DIR_ENV: str(dataset), DATALIST_ENV: str(datalists / "{site}.json")})
            admin = JobAdmin(run.system.admin_startup_kit, run.system.env(), run.run_dir / "logs" / "nvflare_cli.log")
            follower = LogFollower(log_roots(run.system).values())
            follower.skip_existing()
            progress = Progress(list(run.system.site_names), settings.rounds)
            job_id, status = run_job(run, admin, job_folder, follower, progress)
            if settings.trains:
                conclude(run, admin, job_id, status, progress)
            else:
                conclude_statistics(run, admin, job_id, status)
            run.enter("done")
            keep = settings.keep_running
            if keep:
                report.report_still_running(
                    run.run_dir, settings.secure, run.mlflow.process.pid if run.mlflow else None, out
                )
    except BaseException as err:
        record_stop(run, err)
        raise
    finally:
        if not keep:
            stop_everything(run)
    if settings.keep == "results":  # a failed run keeps everything: what it left is how to find out why
        pruned = prune_run(run.run_dir)
        out(
            f"--keep results: removed {pruned.files} files of model copies ({pruned.bytes / 1e6:.0f} MB); kept the "
            "model bundle, summary.json, the server's final and best global models and every log"
        )
    return 0


STOPPED_FILE = "stopped.json"


def record_stop(run: Run, err: BaseException) -> None:
    """``stopped.json`` in the run directory: the phase the run was in when it ended early, and why."""
    if isinstance(err, KeyboardInterrupt):
        reason = "interrupted (Ctrl-C / SIGINT)"
    elif isinstance(err, Terminated):
        reason = f"terminated ({err})"
    else:
        reason = f"{type(err).__name__}: {err}"
    record = {"phase": run.phase, "reason": reason, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (run.run_dir / STOPPED_FILE).write_text(json.dumps(record, indent=2) + "\n")


def check_given_data(settings: ExperimentSettings) -> None:
    """A dataset given with ``--data`` is checked before any run directory or process: all problems, a line each."""
    if settings.data is None or not settings.check_data:  # synthetic data is made by the run itself
        return
    problems = check_dataset(Path(settings.data), settings.sites)
    if problems:
        raise SettingsError("\n".join(problems))


def preflight(settings: ExperimentSettings, out: Callable[[str], None] = print) -> None:
    """Fail fast, before data and MLflow, when the FL system cannot start (a fresh clone's secure workspace is
    provisioned here first)."""
    if settings.secure:
        from spleen_tools.systems.secure import NotProvisionedError, SecureError
        from spleen_tools.systems.secure import preflight as secure_preflight
        from spleen_tools.systems.secure_workspace import provision_if_missing

        try:
            provision_if_missing(out)
            secure_preflight(settings.sites)
        except NotProvisionedError as err:
            raise SettingsError(str(err)) from None
        except SecureError as err:
            raise ExperimentError(str(err)) from None
    else:
        from spleen_tools.systems.poc import preflight as poc_preflight

        poc_preflight()


def start_mlflow(run: Run) -> None:
    run.mlflow = MLflowServer(run.run_dir / "mlflow", port=run.settings.mlflow_port)
    run.mlflow.start()
    run.pid_file.update(**{MLFLOW: run.mlflow.ref})
    run.out(f"MLflow: {run.mlflow.url} (store {run.run_dir / 'mlflow'}, log {run.mlflow.log_path})")


def prepare_job_copy(run: Run, resume_from: str | None = None, folder: str = "jobs") -> Path:
    s = run.settings
    job_settings = s.job_settings(tracking_uri=run.mlflow.url if run.mlflow else None, resume_from=resume_from)
    job_folder = prepare_job(s.job_name, run.run_dir / folder, job_settings)
    what = f"{s.rounds} rounds x {s.local_epochs} local epochs, quick={s.quick}" if s.trains else "statistics"
    run.out(f"job: {job_folder} ({what})")
    return job_folder


def start_system(run: Run, env: dict[str, str]) -> None:
    s = run.settings
    if s.secure:
        from spleen_tools.systems.secure import SecureSystem

        # The provisioned kits already hold the TLS certificates and the CKKS context (HE needs no extra flag).
        run.system = SecureSystem(n_sites=s.sites, env=env, pid_file=run.pid_file.path, gpus=s.gpus)
    else:
        from spleen_tools.systems.poc import PocSystem
        from spleen_tools.systems.site_policy import SitePolicy

        policy = SitePolicy(allow_byoc=s.ship_code)
        run.system = PocSystem(
            run.run_dir / "poc",
            s.sites,
            he=s.job == "he",
            env=env,
            pid_file=run.pid_file.path,
            policy=policy,
            gpus=s.gpus,
        )
    run.out(f"starting the FL system ({'secure' if s.secure else 'POC'}, {s.sites} sites) ...")
    run.system.start()
    run.server_memory = PeakMemory(recorded_server(run.pid_file, run.system.kind))
    run.server_memory.start()
    if time.monotonic() > run.deadline:
        raise RunTimeout(f"timed out after {s.timeout:.0f} s while starting the FL system")
    for name, root in log_roots(run.system).items():
        run.out(f"  {name} logs: {root}/log.txt and {root}/<job_id>/log.txt")


def log_roots(system: FLSystem) -> dict[str, Path]:
    """Participant -> the folder of its log.txt (a job's own log is ``<folder>/<job_id>/log.txt``)."""
    return {name: path.parent for name, path in system.log_paths.items()}


def run_job(run: Run, admin: JobAdmin, job_folder: Path, follower: LogFollower, progress: Progress):
    """Submit the job and follow it to its end: ``(job_id, status)`` of the job that ended. A server that restarts
    meanwhile has lost the job: it resumes as a new job (up to ``--max-resumes`` times)."""
    watch = ServerWatch(admin)
    watch.arm()
    job_id = submit(run, admin, job_folder)
    while True:
        try:
            return job_id, follow_job(run, admin, job_id, follower, progress, watch)
        except ServerRestarted as restart:
            job_id = resume(run, admin, restart, watch)
        except ServerGone as err:
            raise ExperimentError(cannot_resume_now(run, job_id, str(err))) from None


def submit(run: Run, admin: JobAdmin, job_folder: Path, resumes: str | None = None) -> str:
    run.enter("submitting the job")
    job_id = admin.submit(job_folder)
    run.pid_file.update(job_id=job_id)
    again = f" (resuming job {resumes})" if resumes else ""
    run.out(f"submitted {run.settings.job_name}: job_id {job_id}{again}")
    run.enter(f"running job {job_id}")
    return job_id


def cannot_resume_now(run: Run, job_id: str, reason: str) -> str:
    s = run.settings
    return cannot_resume(job_id, reason, s.secure, s.job_name, s.rounds)


def resume(run: Run, admin: JobAdmin, restart: ServerRestarted, watch: ServerWatch) -> str:
    """Once every site is back, a copy of the job that goes on from the lost job's last global model."""
    lost = restart.job_id
    if len(run.resumes) >= run.settings.max_resumes:
        reason = f"--max-resumes {run.settings.max_resumes} reached"
        raise ExperimentError(cannot_resume_now(run, lost, reason))
    run.enter(f"resuming job {lost}")
    run.out(
        f"the server restarted while job {lost} ran and has lost it (NVFlare keeps no job snapshot): waiting for "
        "the sites, then a new job goes on from the last global model the server persisted"
    )
    try:
        waited = watch.wait_for_sites(list(run.system.site_names))
    except ServerGone as err:
        raise ExperimentError(cannot_resume_now(run, lost, str(err))) from None
    watch.arm()
    if admin.status(lost) not in LOST_STATUSES:  # not started yet: the restarted server schedules it itself
        run.out(f"job {lost} had not started; the restarted server runs it")
        return lost
    folder = prepare_job_copy(run, resume_from=lost, folder=f"jobs_resume_{len(run.resumes) + 1}")
    job_id = submit(run, admin, folder, resumes=lost)
    noticed = round(restart.noticed_at, 3)
    run.resumes.append({"lost_job": lost, "job_id": job_id, "noticed_at": noticed, "sites_back_s": round(waited, 1)})
    return job_id


def follow_job(
    run: Run, admin: JobAdmin, job_id: str, follower: LogFollower, progress: Progress, watch: ServerWatch
) -> str | None:
    """Print progress until the job ends; abort it and raise RunTimeout past the deadline. Raises ServerRestarted
    when the server restarted (the job is lost), ServerGone when it stays unreachable."""
    next_status = 0.0
    while True:
        follow(follower, progress, run.out)
        now = time.monotonic()
        if now > run.deadline:
            with contextlib.suppress(Exception):
                admin.abort(job_id)
            raise RunTimeout(f"timed out after {run.settings.timeout:.0f} s (job {job_id} aborted)")
        if now >= next_status:
            next_status = now + STATUS_EVERY
            if not watch.runs(job_id):  # not (or no longer) running on the server: ask the job store why
                with contextlib.suppress(FlareError):
                    status = admin.status(job_id)
                    if is_finished(status):
                        follow(follower, progress, run.out)  # the last lines
                        run.out(f"job {job_id} finished: {status}")
                        return status
        time.sleep(run.settings.poll_interval)


def conclude(run: Run, admin: JobAdmin, job_id: str, status: str | None, progress: Progress) -> None:
    """Collect the results and report them, fail the run on their problems, export the model and check for secrets.
    ``summary.json`` is written once, here, when the steps end: also when one fails (the file shows why), then with
    what the steps before it found."""
    run.enter("collecting results")
    result = collect_results(run, admin, job_id, status, progress)
    try:
        report.report(result, list(run.system.site_names), run.out)
        check(run, result)
        run.enter("exporting the model and checking for secrets")
        result = replace(result, model_bundle=export_model(run, result))
        result = replace(result, secrets_scan=scan_for_secrets(run))
        check_no_secret_left(run, result.secrets_scan)
    finally:
        result.save(run.run_dir)


def collect_results(
    run: Run, admin: JobAdmin, job_id: str, status: str | None, progress: Progress
) -> summary.RunSummary:
    """Download the job, query the tracking store, draw the plots: the run's summary (written by ``conclude``)."""
    download_dir = admin.download(job_id, run.run_dir / "job_result")
    found = sorted(download_dir.rglob("cross_val_results.json"))
    cross_site_results = json.loads(found[0].read_text()) if found else None
    if found:
        (run.run_dir / "cross_val_results.json").write_text(found[0].read_text())
    sites = list(run.system.site_names)
    paths = {
        "run_dir": str(run.run_dir),
        "job_result": str(download_dir),
        "cross_val_results": str(found[0]) if found else None,
        "mlflow_store": str(run.run_dir / "mlflow"),
        "logs": str(run.run_dir / "logs"),
        **{f"log_{n}": str(p) for n, p in log_roots(run.system).items()},
    }
    result = summary.build_summary(
        settings=run.settings,
        job_id=job_id,
        status=status,
        sites=sites,
        wall_time_s=time.monotonic() - run.started,
        progress=progress,
        cross_site_results=cross_site_results,
        tracking=tracking_info(run, download_dir, job_id, sites),
        paths=paths,
        param_count=job_result.count_weights(download_dir, out=run.out) if progress.he_events else None,
        model_history=job_result.read_model_history(download_dir),
        # a participant's policy refused the job (no tagged line then): NVFlare's own reason, among the problems
        job_errors=policy_refusals(log_roots(run.system), job_id),
        server_peak_memory_mb=run.server_memory.stop() if run.server_memory else None,
        resumed=resumes_info(run, progress),
    )
    if result.needs_status_note:
        result = replace(result, status_note=job_result.abandoned_upload(download_dir, progress.dropped_sites()))
    # Read back from the MLflow server while it still runs (or the store or event files that came back with the
    # job): the curves show what the tracking holds.
    plots = write_run_plots(run.run_dir, result)
    return replace(result, plots={name: str(path) for name, path in plots.items()})


def resumes_info(run: Run, progress: Progress) -> list[dict]:
    """Each job lost with a restarted server: the job that resumed it, the round it went on from (the server's own
    ``resumed`` line), and where the lost job's metrics are (its own MLflow runs)."""
    out = []
    for entry in run.resumes:
        rounds = [e["round"] for e in progress.resumed if e.get("job") == entry["lost_job"]]
        info = {**entry, "next_round": rounds[-1] if rounds else None}
        if run.mlflow is not None:
            runs = mlflow_runs(run.mlflow.url, run.settings.job_name, entry["lost_job"], list(run.system.site_names))
            info["lost_job_mlflow_run_ids"] = runs["run_ids"]
        out.append(info)
    return out


def tracking_info(run: Run, download_dir: Path, job_id: str, sites: list[str]) -> Tracking:
    """Where the sites' metrics are (summary.json's ``mlflow``, ``tensorboard`` or ``wandb``), per ``--tracking``."""
    if run.settings.tracking == "tensorboard":
        return Tracking(tensorboard={"site_dirs": tensorboard_dirs(download_dir, sites)})
    if run.settings.tracking == "wandb":
        return Tracking(wandb=wandb_info(download_dir, sites, wandb_from_env(dict(os.environ))[1]))
    uri = run.mlflow.url if run.mlflow else workspace_store(download_dir)
    return Tracking(mlflow=mlflow_runs(uri, run.settings.job_name, job_id, sites) if uri else None)


def check(run: Run, result: summary.RunSummary) -> None:
    """A job that did not complete, or an incomplete cross-site table, fails the run (COMPLETED is not enough)."""
    found = summary.problems(result, list(run.system.site_names), TERMINAL_OK)
    if found:
        logs = ", ".join(map(str, log_roots(run.system).values()))
        raise ExperimentError("\n".join(found) + f" (logs: {run.run_dir / 'logs'}, {logs})")


def export_model(run: Run, result: summary.RunSummary) -> dict:
    """The final global model as a verified MONAI bundle in the run directory: summary.json's ``model_bundle``.
    HE job: the server holds only ciphertext, so the weights are the first site's decrypted copy; FedBN: the server's
    model has no trained BatchNorm layer, so the first site's copy with its own."""
    # here, not at the top: MONAI takes seconds to import, and a bad --data must be refused before that
    from spleen_tools.model_bundle import (
        EXPORT_DIR,
        ExportError,
        export_bundle,
        find_job,
        source_from_job,
        verify_bundle,
    )

    try:
        source = source_from_job(find_job(Path(result.paths["job_result"])))
        if run.settings.job == "he" or run.settings.algorithm == "fedbn":
            site = run.system.site_names[0]
            copy = Path(result.paths[f"log_{site}"]) / result.job_id / f"app_{site}" / FINAL_GLOBAL_MODEL
            source = replace(source, checkpoint=copy)
        bundle = export_bundle(source, run.run_dir / EXPORT_DIR)
        info = {"path": str(bundle), **verify_bundle(bundle)}
    except ExportError as err:
        raise ExperimentError(f"model bundle: {err}") from None
    run.out(f"model bundle: {bundle} (verified: metadata, network, TorchScript = state dict)")
    return info


def stop_everything(run: Run) -> None:
    """Stop the system and MLflow (by their objects, then whatever pids.json still names); warn about survivors."""
    with signals_ignored():
        if run.server_memory is not None:
            run.server_memory.stop()
        if run.system is not None:
            run.system.stop()
        if run.mlflow is not None:
            run.mlflow.stop()
        stop_all_recorded(run.pid_file)  # a signal may have landed between starting something and keeping its handle
    left = alive_pids(run.pid_file)
    if left:
        run.out(f"warning: processes still alive after stopping: {left}")
