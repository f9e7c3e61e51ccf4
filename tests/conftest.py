"""Fixtures shared by every test: real components, and a clear failure in CI when one is missing."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(component: str, available: bool, how: str) -> None:
    """Skip when ``component`` is missing on a laptop; in CI a missing component is a failure."""
    if available:
        return
    message = f"{component} is not available: {how}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def takeoff_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> object:
    # Unix socket paths must stay under ~108 bytes, so keep the home short.
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("TAKEOFF_HOME", str(home))
    return home
