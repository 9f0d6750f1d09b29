"""Data helpers: MSD Task09_Spleen download, synthetic stand-in data and per-site datalists."""

from spleen_tools.data.datalists import make_site_datalists, split_cases
from spleen_tools.data.download import DownloadError, dataset_is_complete, default_data_root, download_spleen
from spleen_tools.data.synthetic import make_synthetic_dataset

__all__ = [
    "DownloadError",
    "dataset_is_complete",
    "default_data_root",
    "download_spleen",
    "make_site_datalists",
    "make_synthetic_dataset",
    "split_cases",
]
