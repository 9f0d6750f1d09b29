"""Marks by folder, and the suite's own limits.

- Everything under tests/e2e is slow (real NVFlare, MLflow and browser processes).
- Every test has a time limit (pytest-timeout, signal method: the hung test fails with its stack, its fixtures
  tear down, and the suite goes on): UNIT_LIMIT_S for unit and HE tests, E2E_LIMIT_S for end-to-end tests, unless
  a test sets its own ``@pytest.mark.timeout``. The limit covers the test's fixtures too (a module fixture that
  starts a system counts in its first test).
- Under CI (``CI=true``) a skipped test is a failure: a missing Chromium, ``ip``, namespace support or user
  namespaces must not turn the run green with the tests that need them left out.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

E2E = Path(__file__).parent / "e2e"
UNIT_LIMIT_S = 60  # the slowest unit test takes about 15 s on 2 cores
E2E_LIMIT_S = 900  # the slowest end-to-end test takes about 5 min on 2 cores, its module's system start included


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def pytest_collection_modifyitems(config, items):
    for item in items:
        e2e = E2E in Path(item.fspath).parents
        if e2e:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(E2E_LIMIT_S if e2e else UNIT_LIMIT_S))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run every test: {reason}"
