"""Check a dataset before anything starts: every case dataset.json lists, and every site's share of them.

The rules for one case live with the job (``spleen_flare.data_check``: a site checks its own cases at run time);
this adds the dataset listing and the split into sites. Every problem is listed, one line each.
"""

from __future__ import annotations

import json
from pathlib import Path

from spleen_flare.data_check import case_problems
from spleen_tools.data.datalists import load_cases, split_cases


def listing_problems(meta_path: Path) -> list[str]:
    """Each training entry of dataset.json that is not ``{"image": path, "label": path}``, one line each: the
    split and the site datalists need both paths. [] also where the file itself is unreadable (said elsewhere)."""
    try:
        training = json.loads(meta_path.read_text())["training"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(training, list):
        return [f"{meta_path}: 'training' is not a list of cases; list {{'image': path, 'label': path}} entries"]
    problems = []
    for n, entry in enumerate(training):
        paths = [entry.get(key) for key in ("image", "label")] if isinstance(entry, dict) else []
        if len(paths) != 2 or not all(isinstance(p, str) and p for p in paths):
            shown = repr(entry) if len(repr(entry)) <= 60 else repr(entry)[:57] + "..."
            problems.append(
                f"{meta_path}: training entry {n} ({shown}) is not {{'image': path, 'label': path}}; give every case"
                " both paths, as MSD's dataset.json does"
            )
    return problems


def check_dataset(dataset_dir: Path, num_sites: int | None = None) -> list[str]:
    """Every problem of the dataset (and of its split into ``num_sites`` sites), one line each; [] when fine."""
    listing = listing_problems(Path(dataset_dir).resolve() / "dataset.json")
    if listing:
        return listing
    try:
        cases = load_cases(Path(dataset_dir).resolve())
    except ValueError as err:
        return [str(err)]
    problems = case_problems(cases)
    if num_sites:
        try:
            split_cases(cases, num_sites)
        except ValueError as err:
            problems.append(f"{Path(dataset_dir) / 'dataset.json'}: {err}; add cases or use fewer sites")
    return problems
