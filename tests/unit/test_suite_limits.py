"""The suite's own limits (tests/conftest.py), run on a small suite of their own in a pytest subprocess: a hung
test fails alone within its limit and the next test runs; under CI=true a skip is a failure, elsewhere a skip."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

CONFTEST = Path(__file__).parents[1] / "conftest.py"
SUITE = textwrap.dedent(
    """
    import time
    import pytest

    @pytest.mark.timeout(2)
    def test_hangs():
        time.sleep(60)

    def test_after_the_hang():
        assert True

    @pytest.mark.skipif(True, reason="needs a tool this machine lacks")
    def test_needs_a_tool():
        assert True

    def test_skips_inside():
        pytest.skip("Chromium not installed")

    def test_unit_limit(request):
        assert request.node.get_closest_marker("timeout").args == ({limit},)
    """
)


def _unit_limit() -> int:
    """tests/conftest.py's unit limit (``import conftest`` here finds tests/e2e's, first on the path)."""
    spec = importlib.util.spec_from_file_location("suite_conftest", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UNIT_LIMIT_S


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_small.py").write_text(SUITE.format(limit=_unit_limit()))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-c", str(tmp_path / "pytest.ini")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,  # far below the hung test's 60 s: only the limit can end it in time
        env=env,
    )


def test_a_hung_test_fails_alone_and_skips_fail_under_ci(tmp_path):
    done = _run(tmp_path, "true")
    out = done.stdout
    assert done.returncode == 1, out
    assert "FAILED test_small.py::test_hangs" in out and "Timeout (>2.0s)" in out, out
    assert "PASSED test_small.py::test_after_the_hang" in out and "PASSED test_small.py::test_unit_limit" in out
    # a skip decided in setup (skipif) fails the setup: pytest counts that as an error, a failure of the run
    assert "ERROR test_small.py::test_needs_a_tool" in out and "needs a tool this machine lacks" in out
    assert "FAILED test_small.py::test_skips_inside" in out and "skipped under CI=true" in out
    assert "2 failed, 2 passed, 1 error" in out, out


def test_outside_ci_a_skip_stays_a_skip(tmp_path):
    done = _run(tmp_path, None)
    assert "1 failed, 2 passed, 2 skipped" in done.stdout, done.stdout
