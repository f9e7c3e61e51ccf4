"""Cache hits answered from the cache (docs/design.md §6, "Cache layout and single flight"): no write before
the answer, the record stored after it, the leases of what a hit hands out renewed on disk, and retention
that looks at a lease once more before it deletes."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

import takeoff
from takeoff.v1 import build_pb2
from takeoff_builder.retention import BuilderRetention
from takeoff_builder.settings import BuilderRetentionSettings, BuilderSettings
from tests.builder.conftest import IMAGE, Builder, create_job
from tests.builder.served import served_builder
from tests.builder.test_images import own_image_builder
from tests.builder.test_replicas import _builds_of, replica
from tests.conftest import DockerSetup
from tests.postgres import postgres_schema_url
from tests.processes import ServiceProcess, until

DAY_SECONDS = 86400


@contextmanager
def no_writes(builder: Builder) -> Iterator[None]:
    """Another connection holds the builder's SQLite write lock: a commit waits for it (10 s, then fails)."""
    writer = sqlite3.connect(builder.settings.home / "builder.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        writer.execute("ROLLBACK")
        writer.close()


async def test_a_hit_is_answered_while_the_database_takes_no_writes_and_is_recorded_once_it_does(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path)
    made = await builder.build(version)
    with no_writes(builder):
        hit = await builder.build(version, request_id="run-1")
        retried = await builder.build(version, request_id="run-1")
        answered = await builder.stub.GetBuild(build_pb2.GetBuildRequest(name=hit.name))

    assert hit.kinds == ["queued", "cache", "result"]
    assert hit.cache.hit
    assert hit.result.cache_hit
    assert (hit.result.venv_path, hit.result.code_path) == (made.result.venv_path, made.result.code_path)
    assert (retried.name, retried.queued.joined, retried.result) == (hit.name, True, hit.result)
    assert answered.build.state == build_pb2.BUILD_STATE_SUCCEEDED
    assert answered.build.result == hit.result
    listed = await builder.stub.ListBuilds(build_pb2.ListBuildsRequest(job=version))
    assert [build.name for build in listed.builds] == [hit.name, made.name]
    [stored] = [build for build in listed.builds if build.name == hit.name]
    assert (stored.state, stored.cache_hit, stored.result) == (
        build_pb2.BUILD_STATE_SUCCEEDED,
        True,
        hit.result,
    )
    again = await builder.build(version, request_id="run-1")  # from the database now
    assert (again.name, again.result) == (hit.name, hit.result)


async def test_a_hits_record_the_database_refused_is_stored_once_it_takes_writes_again(
    builder: Builder, client: takeoff.Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    version = create_job(client, tmp_path)
    made = await builder.build(version)
    with no_writes(builder):
        hit = await builder.build(version, request_id="run-1")

        async def refused() -> bool:  # SQLite gave up waiting for the lock (busy timeout): tried again later
            return any(f"could not store {hit.name}" in record.getMessage() for record in caplog.records)

        await until(refused, "the hit's first write to fail")
        answered = await builder.stub.GetBuild(build_pb2.GetBuildRequest(name=hit.name))

    async def stored() -> bool:
        listed = await builder.stub.ListBuilds(build_pb2.ListBuildsRequest(job=version))
        return [build.name for build in listed.builds] == [hit.name, made.name]

    await until(stored, "the hit's record to be stored")
    assert hit.result.cache_hit
    assert answered.build.result == hit.result  # from memory meanwhile
    assert (await builder.build(version, request_id="run-1")).name == hit.name


async def test_an_image_hit_is_answered_while_the_database_takes_no_writes(
    registry: ServiceProcess, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path)
    async with own_image_builder(registry, docker_setup, tmp_path) as builder:
        made = await builder.build(version, IMAGE)
        with no_writes(builder):
            hit = await builder.build(version, IMAGE)
        listed = await builder.stub.ListBuilds(build_pb2.ListBuildsRequest(job=version))

    assert hit.kinds == ["queued", "cache", "result"]
    assert hit.cache.detail == f"image {made.result.image} hit"
    assert hit.result.cache_hit
    assert (hit.result.image, hit.result.image_id) == (made.result.image, made.result.image_id)
    assert [build.name for build in listed.builds] == [hit.name, made.name]


async def test_a_hit_renews_the_leases_of_the_venv_and_code_it_hands_out(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path)
    made = await builder.build(version)
    entries = [Path(made.result.venv_path), Path(made.result.code_path)]
    long_ago = time.time() - 40 * DAY_SECONDS
    for entry in entries:
        os.utime(entry, (long_ago, long_ago))

    hit = await builder.build(version)

    assert hit.result.cache_hit
    assert [Path(hit.result.venv_path), Path(hit.result.code_path)] == entries
    assert all(entry.stat().st_mtime > long_ago + 39 * DAY_SECONDS for entry in entries)


async def test_an_entry_handed_out_while_a_pass_unpublishes_it_is_published_again_and_kept(
    registry: ServiceProcess, client: takeoff.Client, tmp_path: Path
) -> None:
    settings = BuilderSettings(
        home=tmp_path / "builder", listen=["127.0.0.1:0"], registry_address=registry.address
    )
    version = create_job(client, tmp_path)
    later = datetime.now(UTC) + timedelta(days=40)
    async with served_builder(settings) as served:
        made = await served.builder.build(version)
        entries = [Path(made.result.venv_path), Path(made.result.code_path)]

        def handed_out_by_another_replica() -> list[str]:
            """Runs once the pass has read every entry's last use: another replica's hit renews both
            leases (at the pass's clock, 40 days on)."""
            for entry in entries:
                os.utime(entry, (later.timestamp(), later.timestamp()))
            return []

        retention = BuilderRetention(
            BuilderRetentionSettings(),
            store=served.parts.store,
            builder=served.parts.builder,
            builds_dir=settings.builds_path,
            images=served.parts.images,
            metrics=served.parts.metrics,
            clock=lambda: later,
            paths_in_use=handed_out_by_another_replica,
        )
        report = await retention.prune()
        published = [
            link.resolve() for shelf in ("venvs", "code") for link in served.builder.published(shelf)
        ]
        hit = await served.builder.build(version)

    assert "venvs" not in report.removed
    assert "code" not in report.removed
    assert report.kept_in_use == 2
    assert all(entry.is_dir() for entry in entries)
    assert published == entries
    assert hit.result.cache_hit
    assert hit.result.venv_path == made.result.venv_path


@pytest.mark.postgres
async def test_a_hit_retried_on_another_replica_before_its_record_is_stored_is_recorded_once(
    registry: ServiceProcess, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path)
    with postgres_schema_url("builder") as database_url:
        async with (
            replica(registry, tmp_path, "a", database_url) as first,
            replica(registry, tmp_path, "b", database_url) as second,
        ):
            made = await first.build(version)
            async with await psycopg.AsyncConnection.connect(database_url) as blocker:
                # No build is stored while this transaction holds the table: the hits' records wait for it.
                await blocker.execute("LOCK TABLE builder_builds IN EXCLUSIVE MODE")
                hit = await first.build(version, request_id="run-1")
                retried = await second.build(version, request_id="run-1")
                await blocker.rollback()
            for replica_builder in (first, second):  # listing waits until the replica's hits are stored
                await replica_builder.stub.ListBuilds(build_pb2.ListBuildsRequest(job=version))
        recorded = await _builds_of(database_url, version)

    assert hit.result.cache_hit
    assert retried.result == hit.result
    assert retried.name == hit.name
    assert [name for name, _ in recorded] == [hit.name, made.name]
