"""NVFlare's WandBReceiver, with its runs inside the job's workspace and every metric on its own x-axis.

NVFlare 2.9's receiver leaves W&B's files in the server's working directory, where ``nvflare job download`` never
looks; here they go under ``<job workspace>/wandb_runs/`` and come back with the job. Its writer also logs every
point at W&B's one step per run and drops a point whose step is below the last one: a site's per-iteration loss
(steps in the hundreds) would then drop every per-epoch and per-round point after it. Here each metric keeps its
own step in a field ``<metric>_step``, declared as its x-axis (``wandb.define_metric``), so no point is dropped.

Offline (the default) needs no account and sends nothing. Online needs ``WANDB_API_KEY`` in the server's
environment (never in the job); a login that fails is one warning line and the runs stay offline.
"""

from __future__ import annotations

import os

from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.tracking.wandb.wandb_receiver import WandBReceiver, WandBTask

from spleen_flare.contract import WANDB_FAILED_LOGIN, WANDB_FOLDER
from spleen_flare.contract import WANDB_STEP_SUFFIX as STEP_SUFFIX


class JobWandBReceiver(WandBReceiver):
    def __init__(self, wandb_args: dict, mode: str = "offline", login_timeout: float = 10.0, **kwargs) -> None:
        super().__init__(wandb_args, mode=mode, **kwargs)
        self.login_timeout = login_timeout

    def initialize(self, fl_ctx: FLContext) -> None:
        import wandb

        workspace = fl_ctx.get_engine().get_workspace()
        self.wandb_args["dir"] = os.path.join(workspace.get_run_dir(fl_ctx.get_job_id()), WANDB_FOLDER)
        self.wandb_args["tags"] = [fl_ctx.get_job_id()]
        os.makedirs(self.wandb_args["dir"], exist_ok=True)
        if self.mode == "online":
            try:
                wandb.login(timeout=self.login_timeout, verify=True)
            except Exception as e:  # any failure of the login keeps the job going, offline
                reason = " ".join(str(e).split())[:200]
                self.log_warning(fl_ctx, f"{WANDB_FAILED_LOGIN} ({type(e).__name__}: {reason}); runs kept offline")
                self.mode = "offline"
                os.environ["WANDB_MODE"] = "offline"
        super().initialize(fl_ctx)

    def _process_queue_tasks(self, queue) -> None:
        import wandb

        run, axes = None, set()
        try:
            while True:
                task: WandBTask = queue.get()
                if task.task_type == "stop":
                    break
                if task.task_type == "init":
                    run = wandb.init(**task.task_data)
                elif task.task_type == "log" and run is not None:
                    row = dict(task.task_data)
                    if task.step is not None:
                        for name in task.task_data:
                            if name not in axes:
                                run.define_metric(name, step_metric=name + STEP_SUFFIX)
                                axes.add(name)
                            row[name + STEP_SUFFIX] = task.step
                    run.log(row)
        finally:
            if run is not None:
                run.finish()
