"""Where a site's data is: read once from the site's own environment (never from the job), when its training
process starts. ``SPLEEN_DATA_DIR`` names the dataset folder (MSD layout), ``SPLEEN_DATALIST`` the site's datalist
(``{site}`` is replaced by the site's name); without it, ``<data dir>/datalists/<site>.json`` if present. The
bundle's own configs read ``SPLEEN_DATA_DIR`` only as their default when run standalone; in FL the site passes the
folder found here."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from spleen_flare.contract import DATA_DIR_ENV, DATALIST_ENV


@dataclass(frozen=True)
class SiteData:
    """One site's dataset folder and its datalist (None: the bundle's own split of the folder)."""

    data_dir: str | None
    datalist: Path | None

    def lists(self) -> tuple[list[dict], list[dict]] | None:
        """(training, validation) of the datalist, or None without one."""
        return load_site_datalist(self.datalist) if self.datalist else None


def site_data(site: str, env: Mapping[str, str] | None = None) -> SiteData:
    """The site's data as its environment (default: this process's) says."""
    env = os.environ if env is None else env
    data_dir = env.get(DATA_DIR_ENV) or None
    return SiteData(data_dir, find_site_datalist(site, data_dir, env.get(DATALIST_ENV) or None))


def load_site_datalist(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Read a ``{"training": [...], "validation": [...]}`` datalist written by ``spleen-datalists``."""
    with open(path) as f:
        datalist = json.load(f)
    training, validation = datalist.get("training"), datalist.get("validation")
    if not training or not validation:
        raise ValueError(f"datalist {path} needs non-empty 'training' and 'validation' lists")
    return training, validation


def find_site_datalist(site: str, data_dir: str | None, pattern: str | None = None) -> Path | None:
    """``pattern`` (``{site}`` replaced), else ``<data_dir>/datalists/<site>.json`` if present, else None."""
    if pattern:
        candidate = Path(pattern.replace("{site}", site))
        if not candidate.is_file():
            raise FileNotFoundError(f"datalist {candidate} not found: run `spleen-datalists --data DIR --sites N`")
        return candidate
    if data_dir:
        default = Path(data_dir) / "datalists" / f"{site}.json"
        if default.is_file():
            return default
    return None
