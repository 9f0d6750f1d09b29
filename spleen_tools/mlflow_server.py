"""A local MLflow tracking server: SQLite store and artifacts inside a run directory, bound to 127.0.0.1."""

from __future__ import annotations

import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from spleen_tools.paths import MLFLOW
from spleen_tools.procs import ProcessRef, free_port, port_in_use, start_group, stop_started, wait_for

HOST = "127.0.0.1"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class MLflowServer:
    """``with MLflowServer(store_dir) as server: server.url`` starts, waits for /health, and stops the group."""

    store_dir: Path
    port: int | None = None
    startup_timeout: float = 120.0
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self.store_dir) / "mlflow_server.log"

    def start(self) -> MLflowServer:
        store = Path(self.store_dir).resolve()
        store.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(HOST)
        elif port_in_use(self.port, HOST):
            raise RuntimeError(f"port {self.port} on {HOST} is taken: choose another with --mlflow-port")
        cmd = [
            str(MLFLOW),
            "server",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--workers",
            "1",
        ]
        self.process = start_group(cmd, self.log_path)
        try:
            wait_for(
                lambda: _healthy(self.url),
                self.startup_timeout,
                f"MLflow server on {self.url}",
                alive=lambda: self.process.poll() is None,
            )
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def ref(self) -> ProcessRef | None:
        """The server's process-group leader (it starts about nine processes: workers among them)."""
        return ProcessRef.of(self.process.pid) if self.process is not None else None

    def stop(self) -> None:
        if self.process is not None:
            stop_started(self.process)
            self.process = None

    def __enter__(self) -> MLflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
