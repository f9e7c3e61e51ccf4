"""A real registry for the registry tests: served in-process on a loopback port, on SQLite and PostgreSQL.

Each PostgreSQL test gets a schema of its own (``search_path`` in the URL), dropped afterwards, so tests
never see each other's rows and the registry's fixed table names never collide; ``start_registry`` checks
that the registry's tables really are in that schema on a PostgreSQL server.

The registry imports the session's admin key (``TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE``, tests/keys.py) and the
stubs present it; :meth:`Registry.channel` opens one presenting another key.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2, status_pb2

from takeoff.v1 import artifacts_pb2_grpc, jobs_pb2, jobs_pb2_grpc, keys_pb2_grpc, runs_pb2_grpc
from takeoff_registry.__main__ import wire
from takeoff_registry.settings import RegistrySettings
from takeoff_rpc.channels import open_aio_channel
from takeoff_server.database import Database
from takeoff_server.server import TakeoffServer
from tests.keys import ADMIN_KEY
from tests.postgres import assert_on_postgresql, postgres_schema_url

T = TypeVar("T")
SMALL_ARTIFACT_LIMIT = 256 * 1024


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    with postgres_schema_url("registry_test") as url:
        yield url


def keyed_channel(address: str, key: str | None) -> grpc.aio.Channel:
    """A channel whose every call presents ``key`` (none: no key at all)."""
    return open_aio_channel(address, api_key=key)


@dataclass
class Registry:
    """A running registry, its stubs (presenting the admin key), and where it keeps things, for checking
    what was stored."""

    address: str
    jobs: jobs_pb2_grpc.JobServiceAsyncStub
    runs: runs_pb2_grpc.RunServiceAsyncStub
    keys: keys_pb2_grpc.KeyServiceAsyncStub
    settings: RegistrySettings
    database: Database
    server: TakeoffServer
    artifacts: artifacts_pb2_grpc.ArtifactServiceAsyncStub

    def channel(self, key: str | None) -> grpc.aio.Channel:
        """A new channel to this registry presenting ``key``; close it (``async with``)."""
        return keyed_channel(self.address, key)

    @property
    def artifact_dir(self) -> Path:
        return self.settings.artifacts_path

    def stored_files(self) -> list[Path]:
        """Every file under the artifact directory, staging area included."""
        if not self.artifact_dir.exists():
            return []
        return sorted(path for path in self.artifact_dir.rglob("*") if path.is_file())

    async def count_rows(self, table: str) -> int:
        async with self.database.engine.connect() as connection:
            return int((await connection.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def start_registry(settings: RegistrySettings) -> AsyncIterator[Registry]:
    async with AsyncExitStack() as resources:
        wiring = await wire(settings, resources)
        server = TakeoffServer(wiring.services, listen=settings.listen, verifier=wiring.verifier)
        [address] = await server.start()
        database = Database("registry", settings.database_url or "")
        resources.push_async_callback(database.close)
        if database.url.startswith("postgresql"):
            # The registry made its tables in the test's schema: it really runs on PostgreSQL.
            assert "registry_jobs" in await assert_on_postgresql(database.engine)
        try:
            async with keyed_channel(address, ADMIN_KEY) as channel:
                yield Registry(
                    address,
                    jobs_pb2_grpc.JobServiceStub(channel),
                    runs_pb2_grpc.RunServiceStub(channel),
                    keys_pb2_grpc.KeyServiceStub(channel),
                    settings,
                    database,
                    server,
                    artifacts_pb2_grpc.ArtifactServiceStub(channel),
                )
        finally:
            await server.stop(0)


def registry_settings(home: Path, database_url: str, **overrides: Any) -> RegistrySettings:
    values: dict[str, Any] = {"max_artifact_bytes": SMALL_ARTIFACT_LIMIT, **overrides}
    return RegistrySettings(home=home, database_url=database_url, listen=["127.0.0.1:0"], **values)


@pytest.fixture
async def registry(database_url: str, tmp_path: Path) -> AsyncIterator[Registry]:
    async for running in start_registry(registry_settings(tmp_path / "home", database_url)):
        yield running


@dataclass
class Failure:
    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    fields: list[str]
    """The BadRequest field violations' fields, in order."""


async def failure(call: Awaitable[Any]) -> Failure:
    """Await ``call``, which must fail with a Takeoff status, and take the status apart."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return failure_of(raised.value)


def failure_of(error: grpc.aio.AioRpcError) -> Failure:
    trailing = dict(error.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            detail.Unpack(bad_request)
    assert info.domain == "takeoff.dev"
    return Failure(
        error.code(),
        error.details() or "",
        info.reason,
        dict(info.metadata),
        [violation.field for violation in bad_request.field_violations],
    )


def make_tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
    return buffer.getvalue()


def upload_messages(
    project: str, data: bytes, *, sha256: str | None = None, size: int | None = None, chunk: int = 64 * 1024
) -> list[jobs_pb2.UploadArtifactRequest]:
    header = jobs_pb2.ArtifactUploadHeader(
        parent=f"projects/{project}",
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size_bytes=len(data) if size is None else size,
    )
    return [
        jobs_pb2.UploadArtifactRequest(header=header),
        *(jobs_pb2.UploadArtifactRequest(chunk=data[at : at + chunk]) for at in range(0, len(data), chunk)),
    ]


async def stream(messages: Iterable[T]) -> AsyncIterator[T]:
    for message in messages:
        yield message


async def upload(registry: Registry, project: str, files: dict[str, bytes] | None = None) -> str:
    """Upload a small tarball to ``project``; returns its sha256."""
    data = make_tarball(files or {"train.py": b"print('training')\n"})
    response = await registry.jobs.UploadArtifact(stream(upload_messages(project, data)))
    return response.artifact.sha256
