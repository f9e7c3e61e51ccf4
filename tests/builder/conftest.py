"""A real registry (a subprocess) and a real builder (served in-process on a loopback port) for the
builder tests; jobs are made with the SDK, as users make them."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

import takeoff
from takeoff.models import Environment, JobSource
from takeoff.v1 import build_pb2, build_pb2_grpc
from takeoff_builder.__main__ import wire
from takeoff_builder.settings import BuilderSettings
from takeoff_rpc.channels import open_aio_channel
from takeoff_server.server import TakeoffServer
from tests.conftest import require
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, service_process

SMALL_REQUIREMENT = "six==1.16.0"
"""Pure Python and tiny: a real pip install that takes a second."""
TRAIN_PY = "import six\nprint('six', six.__version__)\n"
MISSING_PACKAGE = "no-such-package-takeoff-test"
UNINSTALLABLE_REQUIREMENTS = f"--no-index\n{MISSING_PACKAGE}==0.0.1\n"
"""Requirements pip rejects without asking any package index (``--no-index``), so that nobody can make them
install by publishing the name."""

BUILD_DEADLINE_SECONDS = 100
"""How long one build may take: under the tests' 120 s timeout (pyproject), so a slow build fails as such."""

VENV = build_pb2.BUILD_KIND_VENV
IMAGE = build_pb2.BUILD_KIND_IMAGE
NOOP = build_pb2.BUILD_KIND_NOOP


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with service_process("registry", tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture
def project() -> str:
    """A fresh project per test, so tests sharing the registry never see each other's jobs."""
    return f"build-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(registry: ServiceProcess, project: str) -> Iterator[takeoff.Client]:
    with takeoff.Client(registry.address, project=project) as client:
        yield client


def create_job(
    client: takeoff.Client,
    tmp_path: Path,
    *,
    job: str = "train",
    files: dict[str, str] | None = None,
    source: JobSource | None = None,
    entrypoint: tuple[str, ...] = ("python", "train.py"),
    **environment: str,
) -> str:
    """A new version of ``job`` (code from ``files``, or ``source``); returns its full name."""
    if source is None:
        code = tmp_path / f"code-{uuid.uuid4().hex[:8]}"
        for name, text in (files or {"train.py": TRAIN_PY}).items():
            (code / name).parent.mkdir(parents=True, exist_ok=True)
            (code / name).write_text(text)
    created = client.create_job_version(
        job, source or code, entrypoint=list(entrypoint), environment=Environment(**environment)
    )
    return created.version.name


@dataclass
class Outcome:
    """Everything one Build call streamed."""

    responses: list[build_pb2.BuildResponse]

    @property
    def name(self) -> str:
        return self.responses[0].build

    @property
    def queued(self) -> build_pb2.BuildQueued:
        return self.responses[0].queued

    @property
    def kinds(self) -> list[str]:
        return [str(response.WhichOneof("event")) for response in self.responses]

    @property
    def cache(self) -> build_pb2.BuildCacheStatus:
        [cache] = [response.cache for response in self.responses if response.HasField("cache")]
        return cache

    @property
    def log(self) -> list[str]:
        return [
            line for response in self.responses if response.HasField("log") for line in response.log.lines
        ]

    @property
    def result(self) -> build_pb2.BuildResult:
        last = self.responses[-1]
        assert last.HasField("result"), f"the build failed: {last.failure}"
        return last.result

    @property
    def failure(self) -> build_pb2.BuildFailure:
        last = self.responses[-1]
        assert last.HasField("failure"), "the build succeeded"
        return last.failure


@dataclass
class Builder:
    address: str
    stub: build_pb2_grpc.BuildServiceAsyncStub
    settings: BuilderSettings
    calls: list[Outcome] = field(default_factory=list)

    async def build(
        self, job_version: str, kind: build_pb2.BuildKind.ValueType = VENV, **options: Any
    ) -> Outcome:
        request_id = options.pop("request_id", "")
        request = build_pb2.BuildRequest(
            job_version=job_version,
            kind=kind,
            options=build_pb2.BuildOptions(**options),
            request_id=request_id,
        )
        call = self.stub.Build(request, timeout=BUILD_DEADLINE_SECONDS)
        outcome = Outcome([response async for response in call])
        self.calls.append(outcome)
        return outcome

    def published(self, shelf: str) -> list[Path]:
        """The cache entries of ``venvs`` or ``code`` that a build published."""
        root = self.settings.builds_path / shelf
        return sorted(link for link in root.iterdir() if link.is_symlink()) if root.exists() else []

    def unpublished(self, shelf: str) -> list[Path]:
        """Directories of ``shelf`` that no published entry points at: half-built leftovers."""
        root = self.settings.builds_path / shelf
        if not root.exists():
            return []
        used = {link.resolve() for link in self.published(shelf)}
        return sorted(
            path for path in root.iterdir() if path.is_dir() and not path.is_symlink() and path not in used
        )


@asynccontextmanager
async def running_builder(
    home: Path, registry_address: str, *, api_key: str = ADMIN_KEY, **overrides: Any
) -> AsyncIterator[Builder]:
    """A builder served in-process (its own key: the tests' admin key, from TAKEOFF_API_KEY); its stub
    presents ``api_key``."""
    settings = BuilderSettings(
        home=home, listen=["127.0.0.1:0"], registry_address=registry_address, **overrides
    )
    async with AsyncExitStack() as resources:
        wiring = await wire(settings, resources)
        server = TakeoffServer(wiring.services, listen=settings.listen, verifier=wiring.verifier)
        [address] = await server.start()
        try:
            async with open_aio_channel(address, api_key=api_key) as channel:
                yield Builder(address, build_pb2_grpc.BuildServiceStub(channel), settings)
        finally:
            await server.stop(0)


@pytest.fixture
async def builder(registry: ServiceProcess, tmp_path: Path) -> AsyncIterator[Builder]:
    async with running_builder(tmp_path / "builder", registry.address) as running:
        yield running


@dataclass
class Failure:
    code: grpc.StatusCode
    message: str
    reason: str
    fields: list[str]


async def rpc_failure(call: Any) -> Failure:
    """Await ``call`` (a coroutine), which must fail with a Takeoff status, and take the status apart."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    error = raised.value
    trailing = dict(error.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            detail.Unpack(bad_request)
    return Failure(
        error.code(), error.details() or "", info.reason, [v.field for v in bad_request.field_violations]
    )


@pytest.fixture
def git_binary() -> str:
    binary = shutil.which("git")
    require("git", binary is not None, "apt-get install git")
    assert binary is not None
    return binary
