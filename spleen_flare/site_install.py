"""What a participant has installed, checked against what a job asks for, before the job touches any data.

A job carries no code: its classes come from the ``spleen_flare`` each participant installed (the version in the
job's ``meta.json`` must be that one). The bundle's configs are code as well (MONAI evaluates their ``$``
expressions), so a participant runs a job's bundle only when it is, file for file, the bundle it installed itself:
``bundles/`` beside this package, or the folder ``$SPLEEN_BUNDLES_DIR`` names (a site admin's choice, e.g. the
official model-zoo bundle). Each problem is one line naming both sides and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from nvflare.lighter.tool_consts import NVFLARE_PREFIX

from spleen_flare import __version__
from spleen_flare.contract import BUNDLE_NAME, BUNDLES_DIR_ENV, JOB_VERSION_KEY, OVERRIDES_NAME

# Run-time outputs of a bundle: never part of what is compared (nor copied into a job).
BUNDLE_IGNORED = ("models", "eval", "__pycache__")
# NVFlare's own files in a submitted job's folders (the signature of their files, the submitter's certificate).
DEPLOYMENT_PREFIX = NVFLARE_PREFIX
BUNDLE_IGNORED_SUFFIXES = (".pyc",)
JOB_META = "meta.json"


def installed_bundles_dir() -> Path:
    """The folder with this participant's bundle and override files."""
    env = os.environ.get(BUNDLES_DIR_ENV)
    return Path(env).resolve() if env else Path(__file__).resolve().parent.parent / "bundles"


def folder_digests(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` but the run-time outputs; {} if there is none."""
    root = Path(root)
    digests = {}
    for path in sorted(root.rglob("*")) if root.is_dir() else []:
        rel = path.relative_to(root)
        ignored = set(rel.parts) & set(BUNDLE_IGNORED) or path.suffix in BUNDLE_IGNORED_SUFFIXES
        if ignored or path.name.startswith(DEPLOYMENT_PREFIX) or not path.is_file():
            continue
        digests[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def job_version(app_root: Path) -> str | None:
    """The job side's version the job was written for (its ``meta.json``, next to the app folder)."""
    try:
        meta = json.loads((Path(app_root).parent / JOB_META).read_text())
    except (OSError, ValueError):
        return None
    version = meta.get(JOB_VERSION_KEY) if isinstance(meta, dict) else None
    return str(version) if version is not None else None


def version_problem(app_root: Path, who: str) -> str | None:
    wanted = job_version(app_root)
    if wanted == __version__:
        return None
    asked = f"asks for spleen_flare {wanted}" if wanted else f"names no {JOB_VERSION_KEY} in its {JOB_META}"
    return (
        f"{who} has spleen_flare {__version__} installed, the job {asked}: install the job's version at {who} "
        f"(pip install -e . in a checkout of that version) or prepare the job with this one (spleen-prepare-jobs)"
    )


def bundle_problem(app_root: Path, who: str) -> str | None:
    """The job's copy of the bundle and overrides (``app/config/``) against the installed ones."""
    installed = installed_bundles_dir()
    for name in (BUNDLE_NAME, OVERRIDES_NAME):
        job_copy, own = Path(app_root) / "config" / name, installed / name
        mine = folder_digests(own)
        if not mine:
            return f"{who} has no bundle installed at {own}: install this repository there or set ${BUNDLES_DIR_ENV}"
        theirs = folder_digests(job_copy)
        if theirs != mine:
            differ = sorted(set(theirs) ^ set(mine) | {k for k in set(theirs) & set(mine) if theirs[k] != mine[k]})
            return (
                f"{who}: the job's {name} ({job_copy}) differs from the one installed at {own} "
                f"({len(differ)} file(s), first {differ[0]}): bundle configs run as code, so {who} runs only its own; "
                f"prepare the job from the same bundle, or install the job's bundle and point ${BUNDLES_DIR_ENV} at it"
            )
    return None


def job_problems(app_root: Path, who: str) -> list[str]:
    """Everything that keeps ``who`` from running this job with what it installed (empty: go)."""
    return [p for p in (version_problem(app_root, who), bundle_problem(app_root, who)) if p]


def confined_path(root: Path, name: str) -> Path:
    """``root/name`` when it stays inside ``root`` (no absolute path, no ``..`` out of it); ValueError otherwise."""
    root = Path(os.path.normpath(Path(root).absolute()))
    path = Path(os.path.normpath(root / name))  # by name: the installed bundle itself may be a link
    if not path.is_relative_to(root):
        raise ValueError(f"{name!r} is outside {root}: a job may only name files of the installed bundles")
    return path
