"""The sites' executor: NVFlare's ``ClientAPIExecutor`` pinned to the training script this site installed.

A job names this class, never ``ClientAPIExecutor`` itself: that one can run any command (``external_process``)
or any script path, so a site's ``class_allow_list`` leaves it out. Here the mode is in-process and the script is
``spleen_flare.client_train`` as installed; the job chooses only the script's arguments, and the script is told the
job's app folder (``--app_root``), which it checks against what is installed before it reads any data.
"""

from __future__ import annotations

import importlib.util
import shlex

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

TRAINING_SCRIPT = "spleen_flare.client_train"


def training_script_path() -> str:
    spec = importlib.util.find_spec(TRAINING_SCRIPT)
    if spec is None or not spec.origin:
        raise RuntimeError(f"{TRAINING_SCRIPT} is not installed at this site: pip install -e . in this repository")
    return spec.origin


class SiteTrainingExecutor(ClientAPIExecutor):
    """In-process Client API over the installed ``client_train.py``; ``task_script_args`` are its options."""

    def __init__(
        self,
        task_script_args: str = "",
        params_transfer_type: str = "FULL",
        train_task_name: str = "train",
        evaluate_task_name: str = "validate",
        submit_model_task_name: str = "submit_model",
        memory_gc_rounds: int = 1,
        cuda_empty_cache: bool = False,
    ) -> None:
        """``memory_gc_rounds``: every N rounds NVFlare's Client API runs ``gc.collect()`` and hands freed heap back to
        the system (``malloc_trim`` under glibc), as the server's workflow does; 0 turns it off. ``cuda_empty_cache``:
        also empty PyTorch's CUDA cache then."""
        super().__init__(
            execution_mode="in_process",
            task_script_path=training_script_path(),
            task_script_args=task_script_args,
            params_exchange_format="pytorch",
            params_transfer_type=params_transfer_type,
            train_task_name=train_task_name,
            evaluate_task_name=evaluate_task_name,
            submit_model_task_name=submit_model_task_name,
            memory_gc_rounds=memory_gc_rounds,
            cuda_empty_cache=cuda_empty_cache,
        )

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            # the backend reads the arguments at START_RUN: the job's app folder is known from then on
            args = shlex.split(self._task_script_args)  # ours last: argparse keeps the last --app_root
            self._task_script_args = shlex.join([*args, "--app_root", str(fl_ctx.get_prop(FLContextKey.APP_ROOT))])
        super().handle_event(event_type, fl_ctx)
