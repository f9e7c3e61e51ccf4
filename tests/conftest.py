"""Fixtures shared by every test: real components, and a clear failure in CI when one is missing.

Tests are marked by the real component they need (``pytest -m "not docker"`` leaves those out) from the
fixtures they use, so a new test gets its marks by using the usual fixture (``docker_setup`` for Docker,
``node`` for Node.js, a fixture parametrised ``["sqlite", "postgresql"]`` for PostgreSQL): see
``COMPONENT_FIXTURES`` and ``DATABASE_PARAMS``.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass

import docker
import pytest

from tests.keys import export_admin_key

export_admin_key()  # before any fixture starts a service: every stack a test makes trusts this key

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

COMPONENT_FIXTURES = {
    "docker_setup": "docker",
    "node": "node",
    "slurm_cluster": "slurm",  # tests/slurm/conftest.py
    "ray_cluster": "ray",  # tests/ray/conftest.py
    "browser": "browser",  # tests/browser/conftest.py
}
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


def _docker_engine() -> docker.DockerClient | None:
    try:
        engine = docker.from_env(timeout=10)
        engine.ping()
    except docker.errors.DockerException:
        return None
    return engine


@dataclass(frozen=True)
class DockerSetup:
    """What .ci/docker-setup.sh provides: an engine, a local Python base image, a push registry, and a
    registry that wants a login (htpasswd) holding ``private_image``."""

    engine: docker.DockerClient
    base_image: str
    registry: str
    auth_registry: str
    auth_user: str
    auth_password: str
    private_image: str


@pytest.fixture(scope="session")
def docker_setup() -> DockerSetup:
    how = "run .ci/docker-setup.sh (it installs docker.io, starts dockerd and makes a base image)"
    engine = _docker_engine()
    require("Docker", engine is not None, how)
    assert engine is not None
    base_image = os.environ.get("TAKEOFF_TEST_BASE_IMAGE", "")
    has_base_image = bool(base_image) and bool(engine.images.list(name=base_image))
    require("a local Python base image", has_base_image, f"set TAKEOFF_TEST_BASE_IMAGE; {how}")
    registry = os.environ.get("TAKEOFF_TEST_REGISTRY", "")
    require("a push registry", bool(registry), f"set TAKEOFF_TEST_REGISTRY; {how}")
    auth = {
        name: os.environ.get(f"TAKEOFF_TEST_{name.upper()}", "")
        for name in ("auth_registry", "auth_user", "auth_password", "private_image")
    }
    unset = [f"TAKEOFF_TEST_{name.upper()}" for name, value in auth.items() if not value]
    require("a registry with a login", not unset, f"set {', '.join(unset)}; {how}")
    return DockerSetup(engine, base_image, registry, **auth)


@pytest.fixture
def takeoff_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> object:
    # Unix socket paths must stay under ~108 bytes, so keep the home short.
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("TAKEOFF_HOME", str(home))
    return home
