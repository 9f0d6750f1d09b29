"""``--keep results``: the copies of the model a finished run no longer needs, removed once everything stopped.

A run keeps what each participant would keep in a real deployment (about 20 copies of the 19 MB network, README
"Outputs"). After a successful run a user needs the exported bundle, summary.json, the server's final and best
global models and the logs; the rest are copies: NVFlare's job store (a zip of the server's job folder), each
site's job folder (its best local model, the bundle's checkpoint, the last global model and its last update), and
the models of cross-site validation in the downloaded job. Only files inside the run directory are removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KEEP_CHOICES = ("all", "results")
# relative to the run directory; each names copies (see the module docstring)
PRUNED_COPIES = (
    "poc/jobs-storage/*/workspace",
    "poc/*/*/site-*/*/app_site-*/**/*.pt",
    "job_result/*/workspace/cross_site_val/model_shareables/*",
)


@dataclass(frozen=True)
class Pruned:
    files: int
    bytes: int


def prunable(run_dir: Path) -> list[Path]:
    """The regular files the patterns name, none reached through a link and none outside ``run_dir``."""
    root = run_dir.resolve()
    found: set[Path] = set()
    for pattern in PRUNED_COPIES:
        for path in root.glob(pattern):
            if path.is_symlink() or not path.is_file():
                continue
            if any((root / folder).is_symlink() for folder in list(path.relative_to(root).parents)[:-1]):
                continue  # a linked folder may lead out of the run directory
            if path.resolve().is_relative_to(root):
                found.add(path)
    return sorted(found)


def prune_run(run_dir: Path) -> Pruned:
    files = prunable(run_dir)
    size = sum(f.stat().st_size for f in files)
    for f in files:
        f.unlink()
    return Pruned(len(files), size)
