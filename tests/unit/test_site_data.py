"""Where a site's data is: its environment, read once (spleen_flare.site_data)."""

from __future__ import annotations

import json

import pytest

from spleen_flare.contract import DATA_DIR_ENV, DATALIST_ENV
from spleen_flare.site_data import SiteData, site_data


def test_a_sites_data_is_read_from_its_environment_once(tmp_path):
    env = {DATA_DIR_ENV: str(tmp_path)}
    assert site_data("site-1", env) == SiteData(str(tmp_path), None)  # the bundle's own split of the folder
    assert site_data("site-1", {}) == SiteData(None, None)
    (tmp_path / "datalists").mkdir()
    (tmp_path / "datalists" / "site-1.json").write_text("{}")
    assert site_data("site-1", env).datalist == tmp_path / "datalists" / "site-1.json"
    env[DATALIST_ENV] = str(tmp_path / "lists" / "{site}.json")  # named by the site: it must be there
    with pytest.raises(FileNotFoundError, match=r"lists/site-1\.json not found: run `spleen-datalists"):
        site_data("site-1", env)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "site-1.json").write_text(json.dumps({"training": [{"image": "a"}], "validation": []}))
    with pytest.raises(ValueError, match="needs non-empty 'training' and 'validation'"):
        site_data("site-1", env).lists()
