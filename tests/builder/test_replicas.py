"""Builder replicas sharing one PostgreSQL database and one builds directory: a flight is carried out once,
followed live from the other replica, and carried on there when its holder dies.

Builds are held where the test wants them by a package index of its own: pip's request for the package's
page, then for its wheel, waits until the test lets it go, and every request is counted (one page request
per pip run).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.server
import io
import threading
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
import psycopg
import pytest

import takeoff
from takeoff.v1 import build_pb2, build_pb2_grpc, common_pb2
from takeoff_builder.flights import Flights
from takeoff_builder.model import BuildQuery, BuildState
from takeoff_builder.settings import BuilderSettings
from takeoff_builder.store import BuildStore
from takeoff_rpc.channels import open_aio_channel
from takeoff_server.database import Database
from takeoff_server.pagination import PageRequest
from tests.builder.conftest import (
    BUILD_DEADLINE_SECONDS,
    TRAIN_PY,
    VENV,
    Builder,
    Outcome,
    create_job,
    running_builder,
)
from tests.builder.served import served_builder
from tests.builder.test_retention import prune
from tests.keys import ADMIN_KEY
from tests.postgres import postgres_schema_url, postgres_url
from tests.processes import ServiceProcess, service_process, until

pytestmark = pytest.mark.postgres

CARRIED_ON = "the builder that carried this build out stopped: carrying it on here"
GATE_SECONDS = 60
"""How long the index holds a request at most: a test that never lets go fails instead of hanging."""


def _wheel(distribution: str) -> tuple[str, bytes]:
    """A minimal pure-Python wheel of ``distribution`` 1.0: its file name and bytes."""
    module = distribution.replace("-", "_")
    info = f"{module}-1.0.dist-info"
    files = {
        f"{module}/__init__.py": b"",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
        f"{len(data)}\n"
        for name, data in files.items()
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{info}/RECORD", record + f"{info}/RECORD,,\n")
    return f"{module}-1.0-py3-none-any.whl", buffer.getvalue()


class GatedIndex:
    """A find-links page and a wheel over HTTP, each held until its gate opens."""

    def __init__(self) -> None:
        self.distribution = f"takeoff-gate-{uuid.uuid4().hex[:8]}"
        self.wheel_name, self.wheel = _wheel(self.distribution)
        self.page_requests = 0
        self._asked = threading.Condition()
        self.wheel_asked = threading.Event()
        self.open_page = threading.Event()
        self.open_wheel = threading.Event()
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.endswith(".whl"):  # headers first: pip logs the download, then waits for it
                    self._answer("application/octet-stream", index.wheel, gate=index.open_wheel)
                else:
                    with index._asked:
                        index.page_requests += 1
                        index._asked.notify_all()
                    index.open_page.wait(GATE_SECONDS)
                    link = f'<a href="{index.wheel_name}">{index.wheel_name}</a>'
                    self._answer("text/html", f"<html><body>{link}</body></html>".encode())

            def _answer(self, content_type: str, body: bytes, *, gate: threading.Event | None = None) -> None:
                with contextlib.suppress(ConnectionError):  # a pip killed with its builder
                    self.send_response(200)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if gate is not None:
                        index.wheel_asked.set()
                        gate.wait(GATE_SECONDS)
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def requirements(self) -> str:
        """Requirements that install the package from this index only (``--no-index``)."""
        return f"--no-index\n--find-links http://{self.host}/\n{self.distribution}==1.0\n"

    async def wait(self, event: threading.Event, what: str) -> None:
        assert await asyncio.to_thread(event.wait, GATE_SECONDS), f"pip never asked for {what}"

    async def pip_runs(self, count: int) -> None:
        """Wait until ``count`` pip runs have asked for the package's page."""

        def asked() -> bool:
            with self._asked:
                return self._asked.wait_for(lambda: self.page_requests >= count, GATE_SECONDS)

        assert await asyncio.to_thread(asked), f"{self.page_requests} pip runs asked, not {count}"

    def __enter__(self) -> GatedIndex:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.open_page.set()
        self.open_wheel.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def index() -> Iterator[GatedIndex]:
    with GatedIndex() as gated:
        yield gated


@pytest.fixture
def database_url() -> Iterator[str]:
    with postgres_schema_url("builder") as url:
        yield url


def replica(
    registry: ServiceProcess, tmp_path: Path, name: str, database_url: str
) -> AbstractAsyncContextManager[Builder]:
    """A builder served in-process, its home ``tmp_path / name``, sharing the database and the builds
    directory (``tmp_path / "builds"``) with the test's other replicas."""
    return running_builder(
        tmp_path / name, registry.address, database_url=database_url, builds_dir=tmp_path / "builds"
    )


def replica_settings(
    registry: ServiceProcess, tmp_path: Path, name: str, database_url: str
) -> BuilderSettings:
    """The settings of ``replica``, for a builder served with its parts in reach."""
    return BuilderSettings(
        home=tmp_path / name,
        listen=["127.0.0.1:0"],
        registry_address=registry.address,
        database_url=database_url,
        builds_dir=tmp_path / "builds",
    )


class Following:
    """A Build call read as it streams, so that a test can wait for what it has seen so far."""

    def __init__(self, stub: build_pb2_grpc.BuildServiceAsyncStub, job_version: str) -> None:
        self.responses: list[build_pb2.BuildResponse] = []
        self._seen = asyncio.Event()
        self._call = stub.Build(
            build_pb2.BuildRequest(job_version=job_version, kind=VENV), timeout=BUILD_DEADLINE_SECONDS
        )
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> Outcome:
        async for response in self._call:
            self.responses.append(response)
            self._seen.set()
        self._seen.set()
        return Outcome(self.responses)

    async def until_logged(self, text: str) -> None:
        """Wait until a streamed log line contains ``text``."""
        while not any(text in line for line in Outcome(self.responses).log):
            assert not self._task.done(), f"the stream ended without logging {text!r}"
            self._seen.clear()
            await self._seen.wait()

    async def outcome(self) -> Outcome:
        return await self._task


async def _builds_of(database_url: str, version: str) -> list[tuple[str, BuildState]]:
    """The builds of ``version`` recorded in the shared database: names and states."""
    database = Database("builder", database_url)
    try:
        builds, _ = await BuildStore(database).list(BuildQuery(job=version), PageRequest(size=10, after=None))
        return [(build.name, build.state) for build, _ in builds]
    finally:
        await database.close()


async def _stored_log(database_url: str, build_name: str) -> list[str]:
    database = Database("builder", database_url)
    try:
        return await BuildStore(database).log_lines(build_name.removeprefix("builds/"))
    finally:
        await database.close()


async def _assert_carried_on(followed: Outcome, index: GatedIndex, database_url: str, version: str) -> None:
    """The build the second replica joined ended well, carried on there after the first's own pip run:
    one build, two pip runs, the log of both."""
    assert followed.queued.joined
    assert followed.result.venv_path
    pip_runs = [number for number, line in enumerate(followed.log) if "-m pip install" in line]
    assert len(pip_runs) == 2
    assert pip_runs[0] < followed.log.index(CARRIED_ON) < pip_runs[1]
    assert index.page_requests == 2
    assert await _builds_of(database_url, version) == [(followed.name, BuildState.SUCCEEDED)]
    assert await _stored_log(database_url, followed.name) == followed.log


async def test_two_replicas_build_one_venv_once_and_the_second_follows_it_live_from_its_start(
    registry: ServiceProcess, client: takeoff.Client, tmp_path: Path, index: GatedIndex, database_url: str
) -> None:
    version = create_job(client, tmp_path, requirements=index.requirements)
    async with replica(registry, tmp_path, "a", database_url) as first:
        carrying = Following(first.stub, version)
        await index.pip_runs(1)
        # The second starts while the first's build is under way: its recovery must leave that build alone.
        async with replica(registry, tmp_path, "b", database_url) as second:
            following = Following(second.stub, version)
            await following.until_logged("pip install")  # stored by the first, read back by the second
            index.open_page.set()
            await index.wait(index.wheel_asked, "the wheel")
            # pip logs this once it has the page, which it got after the second joined: followed live.
            await following.until_logged(f"Downloading http://{index.host}/{index.wheel_name}")
            index.open_wheel.set()
            carried, followed = await carrying.outcome(), await following.outcome()

    assert not carried.queued.joined
    assert followed.queued.joined
    assert followed.name == carried.name
    assert followed.result == carried.result
    assert carried.result.venv_path
    assert not carried.result.cache_hit
    assert followed.kinds[:2] == ["queued", "cache"]
    assert set(followed.kinds[2:-1]) == {"log"}
    assert followed.log == carried.log
    assert await _stored_log(database_url, carried.name) == carried.log
    assert index.page_requests == 1
    assert await _builds_of(database_url, version) == [(carried.name, BuildState.SUCCEEDED)]


async def test_a_replica_carries_on_the_build_of_one_that_was_killed(
    registry: ServiceProcess, client: takeoff.Client, tmp_path: Path, index: GatedIndex, database_url: str
) -> None:
    version = create_job(client, tmp_path, requirements=index.requirements)
    env = {
        "TAKEOFF_REGISTRY_ADDRESS": registry.address,
        "TAKEOFF_DATABASE_URL": database_url,
        "TAKEOFF_BUILDS_DIR": str(tmp_path / "builds"),
    }
    with service_process("builder", tmp_path / "a", env=env) as first_process:
        async with (
            replica(registry, tmp_path, "b", database_url) as second,
            open_aio_channel(first_process.address, api_key=ADMIN_KEY) as channel,
        ):
            carrying = Following(build_pb2_grpc.BuildServiceStub(channel), version)
            await index.pip_runs(1)
            following = Following(second.stub, version)
            await following.until_logged("pip install")
            first_process.process.kill()
            await index.pip_runs(2)  # the second's own
            index.open_page.set()
            index.open_wheel.set()
            followed = await following.outcome()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await carrying.outcome()
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE

    await _assert_carried_on(followed, index, database_url, version)


async def test_a_replica_that_stops_hands_its_build_over_to_the_one_following_it(
    registry: ServiceProcess, client: takeoff.Client, tmp_path: Path, index: GatedIndex, database_url: str
) -> None:
    version = create_job(client, tmp_path, requirements=index.requirements)
    async with replica(registry, tmp_path, "b", database_url) as second:
        async with served_builder(replica_settings(registry, tmp_path, "a", database_url)) as first:
            carrying = Following(first.builder.stub, version)
            await index.pip_runs(1)
            following = Following(second.stub, version)
            await following.until_logged("pip install")
            await first.parts.builder.stop()  # what SIGTERM does first (a rolling restart)
            stopped = await carrying.outcome()
        await index.pip_runs(2)  # the second's own: the build is not failed but carried on there
        index.open_page.set()
        index.open_wheel.set()
        followed = await following.outcome()

    assert stopped.failure.reason == common_pb2.FAILURE_REASON_BUILD_INFRA
    assert stopped.name == followed.name
    await _assert_carried_on(followed, index, database_url, version)


async def _waits_for_lock(database_url: str, kind: str, value: str) -> bool:
    """Whether a session waits for the builders' advisory lock on ``value`` (``flights.Flights.key``)."""
    flights = Flights(database_url)
    await flights.open()
    key = flights.key(kind, value) & 0xFFFF_FFFF_FFFF_FFFF  # pg_locks shows a bigint key as two oids
    async with await psycopg.AsyncConnection.connect(postgres_url()) as connection:
        cursor = await connection.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1"
            " AND classid::bigint = %s AND objid::bigint = %s",
            (key >> 32, key & 0xFFFF_FFFF),
        )
        row = await cursor.fetchone()
    return bool(row and row[0])


async def test_replicas_needing_one_venv_at_once_make_it_once(
    registry: ServiceProcess, client: takeoff.Client, tmp_path: Path, index: GatedIndex, database_url: str
) -> None:
    """Two versions with the same requirements but different code: two flights, one environment key. The
    venv's lock holds across replicas, so the second waits for the first's venv and takes it."""
    versions = [
        create_job(
            client, tmp_path, files={"train.py": f"{TRAIN_PY}# {n}\n"}, requirements=index.requirements
        )
        for n in range(2)
    ]
    async with (
        replica(registry, tmp_path, "a", database_url) as first,
        replica(registry, tmp_path, "b", database_url) as second,
    ):
        making = Following(first.stub, versions[0])
        await index.pip_runs(1)
        environment_key = Outcome(making.responses).cache.environment_key
        waiting = Following(second.stub, versions[1])
        await until(
            lambda: _waits_for_lock(database_url, "venv", environment_key), "the second to wait for the venv"
        )
        index.open_page.set()
        index.open_wheel.set()
        made, found = await making.outcome(), await waiting.outcome()
        published, unpublished = first.published("venvs"), first.unpublished("venvs")

    assert found.name != made.name
    assert found.result.build_key != made.result.build_key
    assert not found.cache.hit  # it looked before the venv was made ...
    assert f"venv {environment_key[:16]} is cached" in found.log  # ... and found it made once it could
    assert found.result.venv_path == made.result.venv_path
    assert index.page_requests == 1
    assert [link.resolve() for link in published] == [Path(made.result.venv_path)]
    assert unpublished == []
    module = index.distribution.replace("-", "_")
    process = await asyncio.create_subprocess_exec(found.result.python_path, "-c", f"import {module}")
    assert await process.wait() == 0


async def test_a_replicas_retention_leaves_alone_what_another_replica_is_building(
    registry: ServiceProcess, client: takeoff.Client, tmp_path: Path, index: GatedIndex, database_url: str
) -> None:
    version = create_job(client, tmp_path, requirements=index.requirements)
    async with (
        replica(registry, tmp_path, "a", database_url) as first,
        served_builder(replica_settings(registry, tmp_path, "b", database_url)) as second,
    ):
        building = Following(first.stub, version)
        await index.pip_runs(1)
        # 40 days on, the code and the half-made venv are old and nothing on the second uses them.
        report = await prune(second, days_later=40, max_age_days=30)
        index.open_page.set()
        index.open_wheel.set()
        made = await building.outcome()

    assert "venvs" not in report.removed
    assert "code" not in report.removed
    assert report.kept_in_use == 2  # the code and the venv, both held by the first's build
    module = index.distribution.replace("-", "_")
    process = await asyncio.create_subprocess_exec(made.result.python_path, "-c", f"import {module}")
    assert await process.wait() == 0
    assert await asyncio.to_thread(Path(made.result.code_path, "train.py").read_text) == TRAIN_PY
