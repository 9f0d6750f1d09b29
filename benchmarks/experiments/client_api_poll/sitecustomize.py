"""Benchmark experiment, never part of a job: NVFlare 2.9's in-process Client API at another polling interval.

The in-process Client API checks every 0.5 s whether the site's script has a new task and whether its result is
ready (``_RESULT_POLL_INTERVAL`` in ``in_process_backend``; 2.9 removed the knob). With this folder on
``PYTHONPATH`` and ``SPLEEN_BENCH_CLIENT_API_POLL`` set (seconds), every Python process of a run starts with the
interval replaced, so that ``round_cost.py`` can show what those two polls cost per round.
"""

import os

_poll = os.environ.get("SPLEEN_BENCH_CLIENT_API_POLL")
if _poll:
    try:
        from nvflare.app_common.executors.client_api import in_process_backend
    except ImportError:  # a process without NVFlare (the MLflow server)
        pass
    else:
        in_process_backend._RESULT_POLL_INTERVAL = float(_poll)
