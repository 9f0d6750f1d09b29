"""The run directory and runs/latest."""

from __future__ import annotations

from spleen_tools.run.rundir import make_run_dir


def test_run_dir_and_latest_link(tmp_path):
    first = make_run_dir(tmp_path)
    second = make_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    assert (tmp_path / "latest").resolve() == second.resolve()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latest")], "no temporary link left"
