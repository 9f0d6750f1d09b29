"""Check a dataset before anything starts: every case dataset.json lists, and every site's share of them.

The rules for one case live with the job (``spleen_flare.data_check``: a site checks its own cases at run time);
this adds the dataset listing and the split into sites. Every problem is listed, one line each.
"""

from __future__ import annotations

from pathlib import Path

from spleen_flare.data_check import case_problems
from spleen_tools.data.datalists import _load_cases, split_cases


def check_dataset(dataset_dir: Path, num_sites: int | None = None) -> list[str]:
    """Every problem of the dataset (and of its split into ``num_sites`` sites), one line each; [] when fine."""
    try:
        cases = _load_cases(Path(dataset_dir).resolve())
    except ValueError as err:
        return [str(err)]
    problems = case_problems(cases)
    if num_sites:
        try:
            split_cases(cases, num_sites)
        except ValueError as err:
            problems.append(f"{Path(dataset_dir) / 'dataset.json'}: {err}; add cases or use fewer sites")
    return problems
