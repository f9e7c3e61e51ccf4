"""Two registry processes on one PostgreSQL database are replicas (docs/design.md §5 "Clients and agents
fail over"): what one stores, the other serves, given what they must share besides the database — the
artifact directory (a shared disk), the secrets key and the page-token key. Each has a home of its own.
A client given both addresses goes on after kill -9 of the first.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from takeoff.client import Client
from takeoff.v1 import jobs_pb2, jobs_pb2_grpc, keys_pb2, keys_pb2_grpc, secrets_pb2, secrets_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.keys import ADMIN_KEY
from tests.postgres import assert_service_wrote_tables, postgres_schema_url
from tests.processes import ServiceProcess, service_process

pytestmark = pytest.mark.postgres

PROJECT = "replicated"


@pytest.fixture
def registries(tmp_path: Path) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    shared = tmp_path / "shared"
    shared.mkdir()
    secrets_key = shared / "secrets.key"
    secrets_key.write_bytes(Fernet.generate_key())
    secrets_key.chmod(0o600)
    with postgres_schema_url("registry_replicas") as url, contextlib.ExitStack() as processes:
        env = {
            "TAKEOFF_DATABASE_URL": url,
            "TAKEOFF_ARTIFACT_DIR": str(shared / "artifacts"),
            "TAKEOFF_SECRETS_KEY_FILE": str(secrets_key),
            "TAKEOFF_PAGE_TOKEN_KEY_FILE": str(shared / "page-token.key"),
        }
        started = []
        for name in ("a", "b"):
            (home := tmp_path / name).mkdir()
            started.append(processes.enter_context(service_process("registry", home, env=env)))
        assert_service_wrote_tables(url, "registry_")
        yield started[0], started[1]


def client_of(address: str) -> Client:
    return Client(address, project=PROJECT, api_key=ADMIN_KEY)


def downloaded(address: str, artifact: str) -> bytes:
    """The bytes of the code artifact ``artifact`` as the registry at ``address`` sends them."""
    with open_channel(address, api_key=ADMIN_KEY) as channel:
        parts = jobs_pb2_grpc.JobServiceStub(channel).DownloadArtifact(
            jobs_pb2.DownloadArtifactRequest(name=artifact)
        )
        return b"".join(part.chunk for part in parts)


def secret_value(address: str, secret: str) -> bytes:
    """``secret``'s value read at ``address`` the one way there is: with a run token that lists it."""
    with open_channel(address, api_key=ADMIN_KEY) as channel:
        token = (
            keys_pb2_grpc.KeyServiceStub(channel)
            .MintRunToken(
                keys_pb2.MintRunTokenRequest(
                    run=f"projects/{PROJECT}/runs/r1",
                    item=f"projects/{PROJECT}/queues/q/items/i1",
                    job_version=f"projects/{PROJECT}/jobs/train/versions/0",
                    secrets=[secret],
                )
            )
            .secret
        )
    with open_channel(address, api_key=token) as channel:
        request = secrets_pb2.AccessSecretRequest(name=secret)
        return secrets_pb2_grpc.SecretServiceStub(channel).AccessSecret(request).value


def job_pages(address: str, page_token: str = "") -> jobs_pb2.ListJobsResponse:
    with open_channel(address, api_key=ADMIN_KEY) as channel:
        request = jobs_pb2.ListJobsRequest(parent=f"projects/{PROJECT}", page_size=1, page_token=page_token)
        return jobs_pb2_grpc.JobServiceStub(channel).ListJobs(request)


def test_what_one_registry_stores_the_other_serves_and_a_client_of_both_outlives_the_first(
    registries: tuple[ServiceProcess, ServiceProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = registries
    monkeypatch.setenv("TAKEOFF_CACHE_DIR", str(tmp_path / "cache"))  # downloads come from a registry
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text("print('trained')\n")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x00weights\xff" * 1000)
    with client_of(a.address) as through_a:
        created = through_a.create_job_version("train", code, entrypoint=["python", "train.py"])
        through_a.create_job_version("evaluate", code, entrypoint=["python", "train.py"])
        logged = through_a.log_artifact(weights, "weights", type="model")
        secret = through_a.set_secret("HF_TOKEN", b"hf-secret-value").name
    assert created.artifact is not None

    with client_of(b.address) as through_b:
        version = through_b.get_job_version("train:latest")
        assert (version.name, version.entrypoint) == (created.version.name, ["python", "train.py"])
        tarball = downloaded(b.address, created.artifact.name)
        assert hashlib.sha256(tarball).hexdigest() == created.artifact.sha256
        root, fetched = through_b.fetch_artifact(f"weights:v{logged.version}", tmp_path / "from-b")
        assert fetched == weights.stat().st_size
        assert (root / "weights.bin").read_bytes() == weights.read_bytes()
    assert secret_value(b.address, secret) == b"hf-secret-value"  # decrypted with the shared key

    first_page = job_pages(a.address)
    second_page = job_pages(b.address, first_page.next_page_token)  # signed by A, honoured by B
    assert [job.name for job in (*first_page.jobs, *second_page.jobs)] == [
        f"projects/{PROJECT}/jobs/evaluate",
        f"projects/{PROJECT}/jobs/train",
    ]

    with client_of(f"{a.address},{b.address}") as through_both:
        assert {job.id for job in through_both.list_jobs()} == {"evaluate", "train"}
        a.process.kill()
        a.process.wait()
        assert {job.id for job in through_both.list_jobs()} == {"evaluate", "train"}
        assert through_both.get_job_version("train:latest").name == created.version.name
