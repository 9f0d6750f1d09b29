"""The run directory and runs/latest."""

from __future__ import annotations

from spleen_tools.run.rundir import make_run_dir, point_latest


def test_run_dir_and_latest_link(tmp_path):
    first = make_run_dir(tmp_path)
    second = make_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    assert (tmp_path / "latest").resolve() == second.resolve()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latest")], "no temporary link left"


def test_a_run_dir_made_without_latest_leaves_it_on_the_last_run(tmp_path):
    first = make_run_dir(tmp_path)
    refused = make_run_dir(tmp_path, latest=False)
    assert refused.is_dir() and (tmp_path / "latest").resolve() == first.resolve()
    point_latest(refused)
    assert (tmp_path / "latest").resolve() == refused.resolve()
