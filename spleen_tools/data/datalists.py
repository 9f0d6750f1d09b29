"""Per-site datalists (``site-N.json``) from an MSD-style ``dataset.json``.

Split rule (default, ``shared=False``), deterministic for a seed:

1. Take the ``training`` cases of dataset.json, sorted by image path, and shuffle them with ``seed``.
2. Cut them into ``num_sites`` contiguous shares whose sizes differ by at most one (earlier sites get the extra
   case), so every case belongs to exactly one site.
3. Each site holds out the last ``num_val`` cases of its share for validation; by default 20 % of the share,
   rounded, at least 1 and leaving at least 1 for training.

Sites thus never see each other's images, and each validates on its own cases.

``shared=True`` reproduces the original example: every site gets the same lists, made with the MONAI bundle's
rule (cases sorted by image path, the last ones for validation: 9 of 41 for the real data; smaller datasets
hold out the same fraction, at least 1).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# The bundle holds out 9 of the 41 MSD training cases.
BUNDLE_VAL = 9
BUNDLE_TOTAL = 41
SITE_VAL_FRACTION = 0.2


def load_cases(dataset_dir: Path) -> list[dict[str, str]]:
    """Training cases of dataset.json with absolute paths, sorted by image path; files must exist."""
    meta_path = dataset_dir / "dataset.json"
    if not meta_path.is_file():
        raise ValueError(f"no dataset.json in {dataset_dir}; run spleen-download first or pass --data")
    try:
        training = json.loads(meta_path.read_text())["training"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path} is not an MSD dataset.json with a 'training' list ({e})") from e
    for n, c in enumerate(training if isinstance(training, list) else [training]):
        if not (isinstance(c, dict) and isinstance(c.get("image"), str) and isinstance(c.get("label"), str)):
            raise ValueError(
                f"{meta_path}: training entry {n} is not {{'image': path, 'label': path}} ({str(c)[:80]}); fix it"
            )
    cases = [
        {"image": str((dataset_dir / c["image"]).resolve()), "label": str((dataset_dir / c["label"]).resolve())}
        for c in training
    ]
    missing = [p for c in cases for p in c.values() if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} files listed in {meta_path} are missing (first: {missing[0]})")
    return sorted(cases, key=lambda c: c["image"])


def _shared_split(cases: list[dict[str, str]], num_val: int | None) -> tuple[list, list]:
    n = len(cases)
    if num_val is None:
        num_val = max(1, round(n * BUNDLE_VAL / BUNDLE_TOTAL))
    if not 1 <= num_val < n:
        raise ValueError(f"num_val must be between 1 and {n - 1} for {n} cases, got {num_val}")
    return cases[:-num_val], cases[-num_val:]


def split_cases(
    cases: list[dict[str, str]], num_sites: int, num_val: int | None = None, seed: int = 0
) -> list[tuple[list[dict[str, str]], list[dict[str, str]]]]:
    """Disjoint (training, validation) pairs, one per site, following the module's split rule."""
    n = len(cases)
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    if n < 2 * num_sites:
        raise ValueError(
            f"{num_sites} sites need at least {2 * num_sites} training cases (1 training + 1 validation each), "
            f"the dataset has {n}"
        )
    order = list(cases)
    random.Random(seed).shuffle(order)
    base, extra = divmod(n, num_sites)
    splits, start = [], 0
    for site in range(num_sites):
        share = order[start : start + base + (site < extra)]
        start += len(share)
        n_val = num_val if num_val is not None else max(1, round(len(share) * SITE_VAL_FRACTION))
        if not 1 <= n_val < len(share):
            raise ValueError(
                f"num_val must be between 1 and {len(share) - 1} for a site with {len(share)} cases, got {n_val}"
            )
        splits.append((share[:-n_val], share[-n_val:]))
    return splits


def make_site_datalists(
    dataset_dir: str | Path,
    num_sites: int,
    out_dir: str | Path | None = None,
    num_val: int | None = None,
    shared: bool = False,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``<out_dir>/site-1.json`` .. ``site-N.json`` ({"training": [...], "validation": [...]}, absolute
    paths) and return {site name: path}. ``out_dir`` defaults to ``<dataset_dir>/datalists``.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    dataset_dir = Path(dataset_dir).resolve()
    cases = load_cases(dataset_dir)
    if shared:
        splits = [_shared_split(cases, num_val)] * num_sites
    else:
        splits = split_cases(cases, num_sites, num_val=num_val, seed=seed)
    out = Path(out_dir) if out_dir is not None else dataset_dir / "datalists"
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for i, (train, val) in enumerate(splits, start=1):
        path = out / f"site-{i}.json"
        path.write_text(json.dumps({"training": train, "validation": val}, indent=2) + "\n")
        written[f"site-{i}"] = path
    for stale in out.glob("site-*.json"):  # from an earlier run with more sites
        if stale not in written.values():
            stale.unlink()
    return written
