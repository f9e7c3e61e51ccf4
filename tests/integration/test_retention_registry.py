"""The registry's retention (docs/design.md §9, "Retention") against a real registry: code artifacts no job
version references go (their bytes when no project records them), referenced and recent ones stay, old
request ids are forgotten. Time moves by the pass's clock, not by waiting."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

import takeoff
import takeoff_registry
from takeoff.v1 import jobs_pb2, jobs_pb2_grpc
from takeoff_registry.retention import PruneReport, RegistryRetention
from takeoff_registry.store import RegistryStore
from takeoff_rpc.channels import open_channel
from takeoff_server.database import Database
from takeoff_server.retention import RetentionSettings
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, service_process

TRAIN = ["python", "train.py"]
MIGRATIONS = Path(takeoff_registry.__file__).with_name("migrations")


@dataclass
class Registry:
    server: ServiceProcess
    home: Path
    store: RegistryStore

    async def prune(self, *, days_later: float) -> PruneReport:
        """One pass as if it ran ``days_later`` days from now, on the registry's own database and files."""
        later = datetime.now(UTC) + timedelta(days=days_later)
        retention = RegistryRetention(
            RetentionSettings(), self.store, self.home / "artifacts", clock=lambda: later
        )
        return await retention.prune()

    def has_artifact(self, project: str, sha256: str) -> bool:
        with open_channel(self.server.address, api_key=ADMIN_KEY) as channel:
            try:
                jobs_pb2_grpc.JobServiceStub(channel).GetArtifact(
                    jobs_pb2.GetArtifactRequest(name=f"projects/{project}/artifacts/{sha256}"), timeout=10
                )
            except grpc.RpcError as error:
                if error.code() is grpc.StatusCode.NOT_FOUND:
                    return False
                raise
        return True

    def file(self, sha256: str) -> Path:
        return self.home / "artifacts" / sha256[:2] / sha256


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServiceProcess, Path]]:
    home = tmp_path / "registry"
    home.mkdir()
    with service_process("registry", home) as process:
        yield process, home


@pytest.fixture
async def registry(server: tuple[ServiceProcess, Path]) -> AsyncIterator[Registry]:
    process, home = server
    database = Database.for_service("registry", home, None, migrations=MIGRATIONS)
    yield Registry(process, home, RegistryStore(database))
    await database.close()


def code(tmp_path: Path, text: str) -> Path:
    directory = tmp_path / uuid.uuid4().hex[:8]
    directory.mkdir()
    (directory / "train.py").write_text(text)
    return directory


def file_exists(path: Path) -> bool:
    return path.exists()


async def test_unreferenced_code_artifacts_and_old_request_ids_go_referenced_and_recent_ones_stay(
    registry: Registry, tmp_path: Path
) -> None:
    with takeoff.Client(registry.server.address, project="alpha") as alpha:
        kept = alpha.create_job_version(
            "kept", code(tmp_path, "print('kept')\n"), entrypoint=TRAIN, request_id=uuid.uuid4().hex
        )
        deleted = alpha.create_job_version("deleted", code(tmp_path, "print('deleted')\n"), entrypoint=TRAIN)
        alpha.delete_job("deleted")
        shared_code = code(tmp_path, "print('shared')\n")
        never_used = alpha.upload_code(shared_code)
        with takeoff.Client(registry.server.address, project="beta") as beta:
            beta.create_job_version("uses-shared", shared_code, entrypoint=TRAIN)
    assert kept.artifact is not None
    assert deleted.artifact is not None
    kept_sha, deleted_sha = kept.artifact.sha256, deleted.artifact.sha256
    leftover = registry.home / "artifacts" / "staging" / "upload-interrupted"
    leftover.write_bytes(b"half an upload")

    report = await registry.prune(days_later=0)  # everything was uploaded within the in-use window
    assert (report.artifacts, report.files, report.request_ids) == (0, [], 0)

    report = await registry.prune(days_later=8)  # past in_use_hours (24) and request_id_days (7)
    assert report.artifacts == 2
    assert report.request_ids == 1
    assert sorted(report.files) == sorted([f"{deleted_sha[:2]}/{deleted_sha}", "staging/upload-interrupted"])
    assert not registry.has_artifact("alpha", deleted_sha)
    assert not file_exists(registry.file(deleted_sha))
    assert not registry.has_artifact("alpha", never_used.sha256)
    assert registry.has_artifact("beta", never_used.sha256)  # the same bytes, referenced in beta
    assert file_exists(registry.file(never_used.sha256))
    assert registry.has_artifact("alpha", kept_sha)
    assert file_exists(registry.file(kept_sha))
