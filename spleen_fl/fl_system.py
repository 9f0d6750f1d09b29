"""What a running federated system offers the experiment runner (POC here; a provisioned secure system elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class FLSystem(Protocol):
    """A server plus sites that ``start()`` brings up and ``stop()`` takes down again.

    ``start()`` returns only when the server is up and every site is connected (a readiness check, not a sleep);
    ``stop()`` stops exactly the processes ``start()`` started and is safe to call twice or after a failed start.
    Used as a context manager: ``with system: ...``.
    """

    site_names: list[str]
    admin_startup_kit: Path  # the admin kit to submit jobs with (``nvflare job submit --startup-kit``)
    log_paths: dict[str, Path]  # participant ("server", "site-1", ...) -> its log file (or folder of job logs)

    def start(self) -> FLSystem: ...

    def stop(self) -> None: ...

    def __enter__(self) -> FLSystem: ...

    def __exit__(self, *exc) -> None: ...
