"""The one command's settings and the errors it reports to the user."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from spleen_tools.algorithms import DEFAULT_ALGORITHM, algorithm_names, check_under_he
from spleen_tools.jobs import JOB_VARIANTS, TRACKING_MODES, DPOptions, JobSettings, wandb_from_env
from spleen_tools.paths import JOBS_DIR, RUNS_DIR
from spleen_tools.run.prune import KEEP_CHOICES


class ExperimentError(RuntimeError):
    """A failure with a message meant for the user (printed as one line)."""


class SettingsError(ExperimentError):
    """Bad options or a missing job/module: the command line is at fault (exit status 2)."""


class RunTimeout(ExperimentError):
    pass


class Terminated(BaseException):
    """SIGTERM turned into an exception so that cleanup runs (BaseException, like KeyboardInterrupt)."""


# methods whose site side bypasses DP-SGD's per-case clipping (the sites refuse them too: spleen_flare.client_train)
DP_REFUSED_METHODS = {
    "fedprox": "the proximal term's gradient would reach the weights unclipped; use fedavg, fedopt or scaffold",
    "fedbn": "FedBN keeps BatchNorm layers, which DP-SGD cannot train (DP uses instance norm); use another method",
}


@dataclass(frozen=True)
class ExperimentSettings:
    job: str = "local"  # "local" or "he"
    sites: int = 2
    min_clients: int | None = None  # sites a round needs (None: all); the others may drop out
    site_timeout: int | None = None  # how long the server waits for a site (None: the job's, 3600 s for training)
    max_resumes: int = 2  # jobs a run submits again after the server restarted and lost the running one
    rounds: int = 10  # the default demo segments the synthetic data (Dice >= 0.8) in a few minutes on 2 cores
    local_epochs: int = 5
    quick: bool = True
    data: Path | None = None  # a real MSD Task09_Spleen folder; None = synthetic data
    check_data: bool = True  # check --data before anything starts (the sites check their own cases anyway)
    synthetic_cases: int = 16
    synthetic_shape: tuple[int, int, int] = (96, 96, 24)
    synthetic_seed: int = 0
    runs_dir: Path = RUNS_DIR
    keep_running: bool = False
    keep: str = "all"  # "results": drop the model copies a finished run no longer needs (spleen_tools.run.prune)
    secure: bool = False
    ship_code: bool = False  # development only, POC only: the code in the job (bring-your-own-code)
    timeout: float = 1800.0
    mlflow_port: int | None = None
    gpus: tuple[int, ...] = ()  # GPU per site (spleen_tools.systems.base.gpu_assignment); empty: CUDA's default
    tracking: str = "server"  # server | workspace | tensorboard | wandb (spleen_tools.jobs.TRACKING_MODES)
    poll_interval: float = 2.0

    stats_min_count: int | None = None  # --job stats: the job's minimum count of cases (sites may ask more)
    algorithm: str = DEFAULT_ALGORITHM  # the FL method (jobs/algorithms/<name>.json), training jobs only
    dp: DPOptions | None = None  # DP-SGD at the sites (spleen_flare.dp), training jobs only

    @property
    def job_name(self) -> str:
        return JOB_VARIANTS[self.job]

    @property
    def trains(self) -> bool:
        """A training job (local, he), not the statistics job (no model, no MLflow, no cross-site table)."""
        return self.job != "stats"

    def job_settings(
        self, tracking_uri: str | None = None, resume_from: str | None = None, env: dict[str, str] | None = None
    ) -> JobSettings:
        """What of these settings goes into the job copy (the one conversion): the MLflow server's URI once it
        runs, the job a resumed run goes on from, and the W&B project and mode from ``env`` (W&B's own
        variables, default: this process's environment)."""
        wandb_project, wandb_mode = wandb_from_env(dict(os.environ if env is None else env))
        return JobSettings(
            rounds=self.rounds,
            local_epochs=self.local_epochs,
            min_clients=self.min_clients or self.sites,
            site_timeout=self.site_timeout,
            quick=self.quick,
            tracking=self.tracking,
            tracking_uri=tracking_uri,
            experiment_name=self.job_name,
            wandb_project=wandb_project,
            wandb_mode=wandb_mode,
            resume_from=resume_from,
            ship_code=self.ship_code,
            stats_min_count=self.stats_min_count,
            algorithm=self.algorithm if self.trains else None,
            dp=self.dp,
        )

    def validate(self) -> None:
        if self.job not in JOB_VARIANTS:
            raise SettingsError(f"--job must be one of {', '.join(JOB_VARIANTS)}, got {self.job!r}")
        for name, value in (("--sites", self.sites), ("--rounds", self.rounds), ("--local-epochs", self.local_epochs)):
            if value < 1:
                raise SettingsError(f"{name} must be at least 1, got {value}")
        if self.min_clients is not None and not 1 <= self.min_clients <= self.sites:
            raise SettingsError(f"--min-clients must be between 1 and --sites {self.sites}, got {self.min_clients}")
        if self.site_timeout is not None and self.site_timeout < 1:
            raise SettingsError(f"--site-timeout must be at least 1 s, got {self.site_timeout}")
        if self.stats_min_count is not None and (self.trains or self.stats_min_count < 1):
            raise SettingsError(
                f"--stats-min-count {self.stats_min_count}: a number of cases, at least 1, for --job stats only"
            )
        if self.algorithm not in algorithm_names():
            raise SettingsError(f"--algorithm must be one of {', '.join(algorithm_names())}, got {self.algorithm!r}")
        if self.algorithm != DEFAULT_ALGORITHM and not self.trains:
            raise SettingsError(f"--algorithm {self.algorithm} is for the training jobs (local, he), not --job stats")
        try:
            check_under_he(self.algorithm, he=self.job == "he")
        except ValueError as err:
            raise SettingsError(str(err)) from None
        if self.dp is not None:
            problems = self.dp.problems()
            if not self.trains:
                problems.insert(0, "--dp is for the training jobs (local, he), not --job stats")
            if self.algorithm in ("fedprox", "fedbn"):
                problems.insert(0, f"--dp with --algorithm {self.algorithm}: " + DP_REFUSED_METHODS[self.algorithm])
            if problems:
                raise SettingsError(problems[0])
        if self.max_resumes < 0:
            raise SettingsError(f"--max-resumes must be 0 or more, got {self.max_resumes}")
        if self.tracking not in TRACKING_MODES:
            raise SettingsError(f"--tracking must be one of {', '.join(TRACKING_MODES)}, got {self.tracking!r}")
        if self.ship_code and self.secure:
            raise SettingsError(
                "--ship-code is for development on POC only: a provisioned site refuses jobs that carry code; "
                "drop --ship-code (the sites run the spleen_flare they installed)"
            )
        if self.gpus and len(self.gpus) not in (1, self.sites):
            raise SettingsError(
                f"--gpus {','.join(map(str, self.gpus))}: give one GPU id for all sites or one per site ({self.sites})"
            )
        if any(g < 0 for g in self.gpus):
            raise SettingsError(f"--gpus {','.join(map(str, self.gpus))}: GPU ids are 0 or more")
        if self.keep not in KEEP_CHOICES:
            raise SettingsError(f"--keep must be one of {', '.join(KEEP_CHOICES)}, got {self.keep!r}")
        if self.keep == "results" and self.keep_running:
            raise SettingsError("--keep results removes files the running system still uses: drop --keep-running")
        if self.timeout <= 0:
            raise SettingsError(f"--timeout must be positive, got {self.timeout}")
        if self.data is not None and not (Path(self.data) / "dataset.json").is_file():
            raise SettingsError(f"--data {self.data}: no dataset.json there (expected an MSD Task09_Spleen folder)")
        if self.data is None and self.synthetic_cases < 2 * self.sites:
            raise SettingsError(
                f"--synthetic-cases {self.synthetic_cases} is too few for {self.sites} sites "
                f"(need at least {2 * self.sites}: one training and one validation case per site)"
            )
        if not (JOBS_DIR / self.job_name / "meta.json").is_file():
            raise SettingsError(
                f"job {self.job_name} not found under {JOBS_DIR} (--job {self.job} needs it; the HE job comes with "
                "the HE work)"
            )
