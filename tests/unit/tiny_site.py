"""One site's tiny synthetic data and a private copy of the bundle with its overrides, for tests that build a
BundleRunner (the runner writes models/ into the bundle it is given)."""

from __future__ import annotations

import shutil
from pathlib import Path

from spleen_flare.site_data import load_site_datalist
from spleen_tools.data import make_site_datalists, make_synthetic_dataset
from spleen_tools.paths import BUNDLE_SRC

QUICK = ["configs/train.json", "../overrides/cpu_quick.json"]


def tiny_site(root: Path, num_train: int, shape: tuple[int, int, int], seed: int = 2) -> tuple[Path, str, list, list]:
    """(bundle root, data folder, training cases, validation cases) of site-1 of a one-site split."""
    data_dir = make_synthetic_dataset(root / "data", num_train=num_train, num_test=0, shape=shape, seed=seed)
    training, validation = load_site_datalist(make_site_datalists(data_dir, num_sites=1)["site-1"])
    shutil.copytree(BUNDLE_SRC, root / "bundle" / BUNDLE_SRC.name)
    shutil.copytree(BUNDLE_SRC.parent / "overrides", root / "bundle" / "overrides")
    return root / "bundle" / BUNDLE_SRC.name, str(data_dir), training, validation
