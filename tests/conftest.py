"""Fixtures shared by every test: real components, and a clear failure in CI when one is missing.

Tests are marked by the real component they need (``pytest -m "not docker"`` leaves those out) from the
fixtures they use, so a new test gets its marks by using the usual fixture: see ``COMPONENT_FIXTURES``, and
``DATABASE_PARAMS`` for the fixtures parametrised over SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

COMPONENT_FIXTURES = {"docker_setup": "docker"}
"""Fixture name -> the marker of the component it needs (fixtures that use these are covered too)."""
DATABASE_PARAMS = {"postgresql": "postgres"}
"""A fixture parameter with this value (``params=["sqlite", "postgresql"]``) -> the marker of its server."""


def require(component: str, available: bool, how: str) -> None:
    """Skip when ``component`` is missing on a laptop; in CI every skip is a failure (see below)."""
    if not available:
        pytest.skip(f"{component} is not available: {how}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        components = {COMPONENT_FIXTURES[name] for name in item.fixturenames if name in COMPONENT_FIXTURES}
        if hasattr(item, "callspec"):
            components |= {
                DATABASE_PARAMS[value]
                for value in item.callspec.params.values()
                if isinstance(value, str) and value in DATABASE_PARAMS
            }
        for component in sorted(components):
            item.add_marker(component)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, object, object]:
    """In CI a skipped test fails: CI provides every component, so a skip can only hide a broken setup."""
    report = yield
    assert isinstance(report, pytest.TestReport)
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI={os.environ['CI']}), which must run every test: {reason}"
    return report


@pytest.fixture
def takeoff_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> object:
    # Unix socket paths must stay under ~108 bytes, so keep the home short.
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("TAKEOFF_HOME", str(home))
    return home
