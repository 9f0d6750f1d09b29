"""Per-site datalists: disjoint shares, full coverage, own validation cases, shared mode, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spleen_tools.cli.datalists import main
from spleen_tools.data.datalists import make_site_datalists


def _fake_dataset(root: Path, n: int) -> Path:
    """dataset.json plus empty files: the split only needs paths that exist."""
    task = root / "Task09_Spleen"
    for sub in ("imagesTr", "labelsTr"):
        (task / sub).mkdir(parents=True)
    ids = [2 * i + 3 for i in range(n)]  # non-contiguous like MSD
    for i in ids:
        (task / "imagesTr" / f"spleen_{i}.nii.gz").touch()
        (task / "labelsTr" / f"spleen_{i}.nii.gz").touch()
    training = [{"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in ids]
    (task / "dataset.json").write_text(json.dumps({"name": "Spleen", "training": training, "numTraining": n}))
    return task


def _load(paths: dict[str, Path]) -> dict[str, dict]:
    return {site: json.loads(p.read_text()) for site, p in paths.items()}


def _images(cases: list[dict]) -> list[str]:
    return [c["image"] for c in cases]


@pytest.mark.parametrize(("n", "sites"), [(41, 2), (41, 3), (12, 2), (5, 2), (4, 1)])
def test_disjoint_and_covering(tmp_path: Path, n: int, sites: int) -> None:
    task = _fake_dataset(tmp_path, n)
    paths = make_site_datalists(task, sites)
    assert list(paths) == [f"site-{i}" for i in range(1, sites + 1)]
    assert all(p == task / "datalists" / f"{s}.json" for s, p in paths.items())
    lists = _load(paths)
    used: list[str] = []
    for data in lists.values():
        assert set(data) == {"training", "validation"}
        assert data["training"] and data["validation"]
        assert not set(_images(data["training"])) & set(_images(data["validation"]))
        used += _images(data["training"]) + _images(data["validation"])
        for case in data["training"] + data["validation"]:
            assert Path(case["image"]).is_absolute() and Path(case["image"]).is_file()
            assert case["label"] == case["image"].replace("imagesTr", "labelsTr")
    assert len(used) == len(set(used)) == n  # every case exactly once across sites
    sizes = [len(d["training"]) + len(d["validation"]) for d in lists.values()]
    assert max(sizes) - min(sizes) <= 1


def test_validation_share_rule(tmp_path: Path) -> None:
    lists = _load(make_site_datalists(_fake_dataset(tmp_path, 41), 2))
    assert [len(d["validation"]) for d in lists.values()] == [4, 4]  # 20 % of 21 and of 20
    lists = _load(make_site_datalists(_fake_dataset(tmp_path / "b", 12), 2, num_val=2))
    assert [len(d["validation"]) for d in lists.values()] == [2, 2]


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    task = _fake_dataset(tmp_path, 20)
    first = _load(make_site_datalists(task, 3, out_dir=tmp_path / "a"))
    assert first == _load(make_site_datalists(task, 3, out_dir=tmp_path / "b"))
    assert first != _load(make_site_datalists(task, 3, out_dir=tmp_path / "c", seed=1))


def test_shared_mode_reproduces_bundle_split(tmp_path: Path) -> None:
    task = _fake_dataset(tmp_path, 41)
    lists = _load(make_site_datalists(task, 2, shared=True))
    assert lists["site-1"] == lists["site-2"]
    data = lists["site-1"]
    everything = sorted(_images(data["training"]) + _images(data["validation"]))
    assert len(data["validation"]) == 9 and len(data["training"]) == 32
    assert _images(data["validation"]) == everything[-9:]  # sorted images, last 9 for validation
    small = _load(make_site_datalists(_fake_dataset(tmp_path / "small", 12), 2, shared=True))
    assert len(small["site-1"]["validation"]) == 3 and len(small["site-1"]["training"]) == 9


def test_stale_site_files_removed(tmp_path: Path) -> None:
    task = _fake_dataset(tmp_path, 12)
    make_site_datalists(task, 4)
    make_site_datalists(task, 2)
    assert sorted(p.name for p in (task / "datalists").iterdir()) == ["site-1.json", "site-2.json"]


def test_bad_inputs(tmp_path: Path) -> None:
    task = _fake_dataset(tmp_path, 6)
    with pytest.raises(ValueError, match="num_sites must be at least 1"):
        make_site_datalists(task, 0)
    with pytest.raises(ValueError, match="4 sites need at least 8 training cases"):
        make_site_datalists(task, 4)
    with pytest.raises(ValueError, match="no dataset.json"):
        make_site_datalists(tmp_path / "nowhere", 2)
    with pytest.raises(ValueError, match="num_val must be between 1 and 2"):
        make_site_datalists(task, 2, num_val=3)
    (task / "imagesTr" / "spleen_3.nii.gz").unlink()
    with pytest.raises(ValueError, match="1 files listed .* are missing"):
        make_site_datalists(task, 2)


def test_cli(tmp_path: Path, capsys) -> None:
    task = _fake_dataset(tmp_path, 10)
    assert main(["--data", str(task), "--sites", "2", "--out", str(tmp_path / "lists")]) == 0
    assert "site-2" in capsys.readouterr().out
    assert (tmp_path / "lists" / "site-1.json").is_file()
    assert main(["--data", str(task), "--sites", "3", "--shared", "--out", str(tmp_path / "shared")]) == 0
    assert main(["--data", str(tmp_path / "missing"), "--sites", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no dataset.json") and err.count("\n") == 1


def test_on_synthetic_dataset(tmp_path: Path) -> None:
    from spleen_tools.data.synthetic import make_synthetic_dataset

    task = make_synthetic_dataset(tmp_path, num_train=6, num_test=1, shape=(16, 16, 8))
    lists = _load(make_site_datalists(task, 2))
    assert sum(len(d["training"]) + len(d["validation"]) for d in lists.values()) == 6


@pytest.mark.parametrize("entry", ["./imagesTr/spleen_3.nii.gz", {"label": "./labelsTr/spleen_3.nii.gz"}, {"image": 3}])
def test_a_malformed_dataset_entry_is_one_line_naming_it(tmp_path, entry):
    task = _fake_dataset(tmp_path, 4)
    meta = json.loads((task / "dataset.json").read_text())
    meta["training"][2] = entry
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"dataset.json: training entry 2 is not \{'image': path, 'label': path\}"):
        make_site_datalists(task, 2)
