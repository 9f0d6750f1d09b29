"""Benchmark results as JSON with what produced them: the command, date, machine and package versions.

``save(name, result)`` writes ``benchmarks/results/<name>.json``; ``write_benchmarks_md.py`` renders them all into
``docs/BENCHMARKS.md``, so every figure there names the command behind it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "monai", "nvflare", "mlflow", "tenseal")


def machine() -> dict:
    model = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(memory_gb, 1), "os": platform.platform()}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def save(name: str, result: dict, argv: list[str] | None = None, command: str | None = None) -> Path:
    """Write the result with its provenance (this script's command line unless ``command`` names another)."""
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(Path(argv[0]).resolve(), Path.cwd()) if argv else ""
    command = command or shlex.join([".venv/bin/python", script, *argv[1:]])
    record = {
        "name": name,
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "result": result,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
