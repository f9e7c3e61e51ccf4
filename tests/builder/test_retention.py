"""The builder's retention (docs/design.md §9, "Retention") on a real builder and registry: real builds fill
the cache, one pass prunes, and what is in use stays. Time moves by the pass's clock, not by waiting."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
import pytest

import takeoff
from takeoff.v1 import build_pb2
from takeoff_builder.images import BUILD_KEY_LABEL
from takeoff_builder.retention import BuilderRetention, PruneReport
from takeoff_builder.settings import BuilderRetentionSettings, BuilderSettings
from takeoff_server.config import ConfigError, load_settings
from tests.builder.conftest import create_job
from tests.builder.served import Served, served_builder
from tests.conftest import DockerSetup
from tests.processes import ServiceProcess


async def prune(served: Served, *, days_later: float, **settings: object) -> PruneReport:
    """One pass as if it ran ``days_later`` days from now."""
    later = datetime.now(UTC) + timedelta(days=days_later)
    retention = BuilderRetention(
        BuilderRetentionSettings.model_validate(settings),
        store=served.parts.store,
        builder=served.parts.builder,
        builds_dir=served.builder.settings.builds_path,
        images=served.parts.images,
        metrics=served.parts.metrics,
        clock=lambda: later,
    )
    return await retention.prune()


@pytest.fixture
async def served(registry: ServiceProcess, tmp_path: Path) -> AsyncIterator[Served]:
    settings = BuilderSettings(
        home=tmp_path / "builder",
        listen=["127.0.0.1:0"],
        registry_address=registry.address,
        # Images of their own: a pass "40 days later" must not touch other tests' images on the engine.
        image_repository=f"takeoff-retention-{uuid.uuid4().hex[:8]}",
    )
    async with served_builder(settings) as running:
        yield running


class Jobs:
    """Processes started as the agent starts a local-process job: the venv's python, in the job's code."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, result: build_pb2.BuildResult) -> None:
        self.started.append(
            subprocess.Popen(
                [result.python_path, "-c", "import sys; sys.stdin.read()"],
                cwd=result.code_path,
                stdin=subprocess.PIPE,
            )
        )

    def stop_all(self) -> None:
        for process in self.started:
            process.kill()
            process.wait()


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    jobs = Jobs()
    yield jobs
    jobs.stop_all()


def exists(path: str | Path) -> bool:
    return Path(path).exists()


def tree_size(path: str) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


async def test_passes_prune_by_size_then_age_and_keep_what_was_just_handed_out_or_a_job_runs_from(
    served: Served, client: takeoff.Client, tmp_path: Path, jobs: Jobs
) -> None:
    builder = served.builder
    code = {"train.py": "print('old')\n"}
    old_version = create_job(client, tmp_path, job="old", files=code, requirements="# old")
    old = await builder.build(old_version, request_id=uuid.uuid4().hex)
    newer = await builder.build(create_job(client, tmp_path, job="newer", requirements="# newer"))
    leftover = builder.settings.builds_path / "venvs" / f"{'0' * 64}.0123456789ab"
    leftover.mkdir()  # what a builder killed mid-build leaves

    # Within the in-use window nothing goes, even over the size limit.
    report = await prune(served, days_later=0, max_bytes=1)
    assert report.removed == {"builds": 0, "request_ids": 0}
    assert report.kept_in_use == 5
    assert exists(old.result.venv_path)
    assert exists(leftover)

    # Two days on: past the in-use window, within the age limit, room for one venv: the older one goes.
    room = tree_size(newer.result.venv_path) + tree_size(newer.result.code_path) + 100_000
    report = await prune(served, days_later=2, max_bytes=room)
    assert report.removed == {"builds": 0, "request_ids": 0, "venvs": 2}
    assert not exists(old.result.venv_path)
    assert not exists(leftover)
    assert exists(newer.result.venv_path)
    assert [link.resolve() for link in builder.published("venvs")] == [Path(newer.result.venv_path)]

    # Forty days on: past max_age_days (30) and request_id_days (7); a job still runs from the venv.
    jobs.start(newer.result)
    report = await prune(served, days_later=40)
    assert report.removed == {"builds": 2, "request_ids": 1, "code": 1}
    assert not exists(old.result.code_path)
    assert report.kept_in_use == 2
    assert exists(newer.result.venv_path)
    assert exists(newer.result.code_path)

    jobs.stop_all()
    report = await prune(served, days_later=40)
    assert report.removed == {"builds": 0, "request_ids": 0, "venvs": 1, "code": 1}
    assert not exists(newer.result.venv_path)
    assert served.parts.metrics.pruned.labels("venvs")._value.get() == 3


def labelled_image(engine: docker.DockerClient, base_image: str, tag: str, build_key: str) -> None:
    dockerfile = f"FROM {base_image}\nLABEL {BUILD_KEY_LABEL}={build_key}\n"
    context = Path(f"/tmp/retention-{uuid.uuid4().hex}")
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile)
    engine.images.build(path=str(context), tag=tag, rm=True)


async def test_old_images_the_builder_made_are_pruned_unless_a_container_uses_them(
    served: Served, docker_setup: DockerSetup
) -> None:
    engine = docker_setup.engine
    prefix = served.builder.settings.image_prefix
    run = uuid.uuid4().hex[:8]
    unused, used, foreign = f"{prefix}/ret-{run}:k1", f"{prefix}/ret-{run}:k2", f"other/ret-{run}:k3"
    for tag in (unused, used, foreign):  # one image each: a label of its own
        labelled_image(engine, docker_setup.base_image, tag, f"{run}-{tag}")
    container = engine.containers.create(used, command=["true"])
    try:
        report = await prune(served, days_later=40)
        tags = {tag for image in engine.images.list() for tag in image.tags}
        assert unused not in tags
        assert used in tags
        assert foreign in tags
        assert report.removed.get("images") == 1
    finally:
        container.remove(force=True)
        for tag in (used, foreign):
            engine.images.remove(tag, force=True)


def test_retention_settings_errors_are_one_readable_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAKEOFF_RETENTION__REQUEST_ID_DAYS", "0.5")
    with pytest.raises(ConfigError) as raised:
        load_settings(BuilderSettings)
    assert str(raised.value) == (
        "invalid configuration: TAKEOFF_RETENTION__REQUEST_ID_DAYS: "
        "Input should be greater than or equal to 1 (got '0.5')"
    )
    monkeypatch.setenv("TAKEOFF_RETENTION__REQUEST_ID_DAYS", "7")
    monkeypatch.setenv("TAKEOFF_RETENTION__MAX_BYTES", "2GiB")
    assert load_settings(BuilderSettings).retention.max_bytes == 2 * 1024**3
