"""UploadArtifact / GetArtifact / DownloadArtifact: the bytes that come back are the bytes that went in,
and a failed upload leaves no file and no row behind."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from takeoff.v1 import jobs_pb2
from tests.processes import wait_for
from tests.registry.conftest import (
    SMALL_ARTIFACT_LIMIT,
    Registry,
    failure,
    make_tarball,
    registry_settings,
    start_registry,
    stream,
    upload_messages,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def assert_nothing_stored(registry: Registry) -> None:
    assert registry.stored_files() == []
    assert await registry.count_rows("registry_artifacts") == 0


def incompressible_tarball(size: int) -> bytes:
    return make_tarball({"weights.bin": os.urandom(size)})


@pytest.fixture
async def roomy_registry(database_url: str, tmp_path: Path) -> AsyncIterator[Registry]:
    settings = registry_settings(tmp_path / "home", database_url, max_artifact_bytes=8 * 1024 * 1024)
    async for running in start_registry(settings):
        yield running


async def test_upload_then_download_returns_the_same_bytes_in_chunks(roomy_registry: Registry) -> None:
    registry = roomy_registry
    data = incompressible_tarball(3 * 1024 * 1024)
    sha256 = hashlib.sha256(data).hexdigest()

    uploaded = await registry.jobs.UploadArtifact(stream(upload_messages("demo", data, chunk=1024 * 1024)))

    assert uploaded.artifact.name == f"projects/demo/artifacts/{sha256}"
    assert (uploaded.artifact.sha256, uploaded.artifact.size_bytes, uploaded.already_existed) == (
        sha256,
        len(data),
        False,
    )
    assert registry.stored_files() == [registry.artifact_dir / sha256[:2] / sha256]
    got = await registry.jobs.GetArtifact(jobs_pb2.GetArtifactRequest(name=uploaded.artifact.name))
    assert got.artifact == uploaded.artifact

    messages = [
        message
        async for message in registry.jobs.DownloadArtifact(
            jobs_pb2.DownloadArtifactRequest(name=uploaded.artifact.name)
        )
    ]
    assert messages[0].artifact == uploaded.artifact
    chunks = [message.chunk for message in messages[1:]]
    assert b"".join(chunks) == data
    assert max(len(chunk) for chunk in chunks) == 1024 * 1024

    offset = len(data) - 1000
    resumed = [
        message.chunk
        async for message in registry.jobs.DownloadArtifact(
            jobs_pb2.DownloadArtifactRequest(name=uploaded.artifact.name, offset=offset)
        )
    ]
    assert b"".join(resumed) == data[offset:]


async def test_uploading_an_existing_artifact_stores_nothing_new(registry: Registry) -> None:
    data = make_tarball({"train.py": b"print(1)\n"})
    first = await registry.jobs.UploadArtifact(stream(upload_messages("demo", data)))

    again = await registry.jobs.UploadArtifact(stream(upload_messages("demo", data)))
    elsewhere = await registry.jobs.UploadArtifact(stream(upload_messages("other", data)))

    assert again.already_existed
    assert again.artifact == first.artifact
    assert not elsewhere.already_existed
    assert len(registry.stored_files()) == 1  # one file, content-addressed, for both projects
    assert await registry.count_rows("registry_artifacts") == 2


async def test_wrong_digest_is_refused_and_nothing_is_kept(registry: Registry) -> None:
    data = make_tarball({"train.py": b"print(1)\n"})

    problem = await failure(
        registry.jobs.UploadArtifact(stream(upload_messages("demo", data, sha256="0" * 64)))
    )

    assert (problem.code, problem.reason, problem.fields) == (
        INVALID,
        "ARTIFACT_DIGEST_MISMATCH",
        ["header.sha256"],
    )
    assert problem.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    await assert_nothing_stored(registry)


async def test_an_upload_ending_short_of_its_declared_size_is_refused(registry: Registry) -> None:
    data = make_tarball({"train.py": b"print(1)\n"})
    declared = len(data) + 100
    sha256 = hashlib.sha256(data).hexdigest()

    problem = await failure(
        registry.jobs.UploadArtifact(stream(upload_messages("demo", data, sha256=sha256, size=declared)))
    )

    assert (problem.code, problem.reason) == (INVALID, "ARTIFACT_SIZE_MISMATCH")
    assert str(declared) in problem.message
    await assert_nothing_stored(registry)


async def test_oversize_uploads_are_refused_whether_declared_or_sent(registry: Registry) -> None:
    big = incompressible_tarball(SMALL_ARTIFACT_LIMIT + 1024)

    declared = await failure(registry.jobs.UploadArtifact(stream(upload_messages("demo", big))))
    assert (declared.code, declared.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "ARTIFACT_TOO_LARGE")
    assert declared.metadata["limit_bytes"] == str(SMALL_ARTIFACT_LIMIT)

    # The client claims a size within the limit, then keeps sending.
    sent = await failure(
        registry.jobs.UploadArtifact(stream(upload_messages("demo", big, size=SMALL_ARTIFACT_LIMIT)))
    )
    assert (sent.code, sent.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "ARTIFACT_TOO_LARGE")
    await assert_nothing_stored(registry)


async def test_an_upload_cancelled_by_the_client_mid_stream_leaves_nothing(registry: Registry) -> None:
    data = incompressible_tarball(100 * 1024)
    messages = upload_messages("demo", data, chunk=16 * 1024)
    hold = asyncio.Event()

    async def cut_off() -> AsyncIterator[jobs_pb2.UploadArtifactRequest]:
        for message in messages[:3]:
            yield message
        await hold.wait()  # never set: the client goes away instead

    call = registry.jobs.UploadArtifact(cut_off())
    staging = registry.artifact_dir / "staging"
    await asyncio.to_thread(
        wait_for, lambda: staging.exists() and any(staging.iterdir()), what="staged bytes"
    )

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    await asyncio.to_thread(
        wait_for, lambda: not registry.stored_files(), timeout=10, what="the staging file to go"
    )
    await assert_nothing_stored(registry)


def tarball_with(member: tarfile.TarInfo) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("train.py"), io.BytesIO(b""))
        tar.addfile(member, io.BytesIO(b"") if member.isreg() else None)
    return buffer.getvalue()


def symlink(name: str, target: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = tarfile.SYMTYPE
    member.linkname = target
    return member


@pytest.mark.parametrize(
    "member",
    [tarfile.TarInfo("../escape.py"), tarfile.TarInfo("/etc/evil"), symlink("data", "../../etc")],
    ids=["dot-dot", "absolute", "escaping-symlink"],
)
async def test_unsafe_tarballs_are_refused_naming_the_member(
    registry: Registry, member: tarfile.TarInfo
) -> None:
    data = tarball_with(member)

    problem = await failure(registry.jobs.UploadArtifact(stream(upload_messages("demo", data))))

    assert (problem.code, problem.reason) == (INVALID, "ARCHIVE_UNSAFE")
    assert problem.metadata["member"] == member.name
    await assert_nothing_stored(registry)


async def test_bytes_that_are_not_a_gzipped_tarball_are_archive_invalid(registry: Registry) -> None:
    problem = await failure(registry.jobs.UploadArtifact(stream(upload_messages("demo", b"just some text"))))

    assert (problem.code, problem.reason) == (INVALID, "ARCHIVE_INVALID")
    await assert_nothing_stored(registry)


async def test_upload_streams_must_start_with_one_header(registry: Registry) -> None:
    data = make_tarball({"train.py": b""})
    header, *chunks = upload_messages("demo", data)

    no_header = await failure(registry.jobs.UploadArtifact(stream(chunks)))
    two_headers = await failure(registry.jobs.UploadArtifact(stream([header, header, *chunks])))
    empty = await failure(registry.jobs.UploadArtifact(stream([])))

    for problem in (no_header, two_headers, empty):
        assert (problem.code, problem.reason, problem.fields) == (INVALID, "ARGUMENT_INVALID", ["header"])
    bad_digest = jobs_pb2.UploadArtifactRequest(
        header=jobs_pb2.ArtifactUploadHeader(parent="projects/demo", sha256="ABC", size_bytes=len(data))
    )
    malformed = await failure(registry.jobs.UploadArtifact(stream([bad_digest, *chunks])))
    assert (malformed.reason, malformed.fields) == ("ARGUMENT_INVALID", ["header.sha256"])
    bad_parent = await failure(registry.jobs.UploadArtifact(stream(upload_messages("Demo!", data))))
    assert (bad_parent.reason, bad_parent.fields) == ("NAME_INVALID", ["header.parent"])
    await assert_nothing_stored(registry)


async def test_unknown_artifacts_and_offsets_out_of_range(registry: Registry) -> None:
    data = make_tarball({"train.py": b""})
    uploaded = await registry.jobs.UploadArtifact(stream(upload_messages("demo", data)))

    missing = await failure(
        registry.jobs.GetArtifact(jobs_pb2.GetArtifactRequest(name=f"projects/demo/artifacts/{'0' * 64}"))
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "ARTIFACT_NOT_FOUND")

    beyond = registry.jobs.DownloadArtifact(
        jobs_pb2.DownloadArtifactRequest(name=uploaded.artifact.name, offset=len(data))
    )
    problem = await failure(beyond.read())
    assert (problem.code, problem.reason, problem.fields) == (INVALID, "ARGUMENT_INVALID", ["offset"])

    malformed = await failure(
        registry.jobs.GetArtifact(jobs_pb2.GetArtifactRequest(name="projects/demo/artifacts/xyz"))
    )
    assert (malformed.code, malformed.reason) == (INVALID, "NAME_INVALID")
