"""TLS and mutual TLS end to end: service processes configured with ``TAKEOFF_TLS__*`` and certificates
made in the test; clients with and without the CA, with and without a certificate; the queue calling a TLS
registry (key verification and job resolution) over TLS.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from takeoff.client import Client
from takeoff.errors import TakeoffError
from takeoff.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, keys_pb2, keys_pb2_grpc, queue_pb2, queue_pb2_grpc
from takeoff_rpc.channels import open_channel, tls_credentials
from takeoff_rpc.status import decode_rpc_error
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, service_process, wait_for
from tests.tls import Certificates, KeyPair, make_certificates

TIMEOUT = 10.0
PROJECT = "projects/tls"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@contextlib.contextmanager
def tls_registry(home: Path, certificates: Certificates, *, mutual: bool = False) -> Iterator[ServiceProcess]:
    with service_process(
        "registry", home, env=certificates.server_env(require_client_cert=mutual)
    ) as registry:
        yield registry


def tls_channel(
    address: str, ca_file: Path, client: KeyPair | None = None, *, api_key: str | None = ADMIN_KEY
) -> grpc.Channel:
    credentials = tls_credentials(
        ca_file, client.cert_file if client else None, client.key_file if client else None
    )
    return open_channel(address, api_key=api_key, credentials=credentials)


def list_keys(channel: grpc.Channel) -> keys_pb2.ListKeysResponse:
    return keys_pb2_grpc.KeyServiceStub(channel).ListKeys(keys_pb2.ListKeysRequest(), timeout=TIMEOUT)


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    """The code a call on ``channel`` fails with (it must fail)."""
    with channel, pytest.raises(grpc.RpcError) as raised:
        list_keys(channel)
    status = decode_rpc_error(raised.value)
    return status.code


def test_a_tls_client_with_the_ca_is_served_by_address_and_by_name(
    certificates: Certificates, takeoff_home: Path
) -> None:
    with tls_registry(takeoff_home, certificates) as registry:
        port = registry.address.rsplit(":", 1)[1]
        for target in (registry.address, f"localhost:{port}"):
            with tls_channel(target, certificates.ca_file) as channel:
                assert any(key.kind == keys_pb2.KEY_KIND_ADMIN for key in list_keys(channel).keys)
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=TIMEOUT
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING

        # TLS carries the key; it does not replace it.
        with tls_channel(registry.address, certificates.ca_file, api_key=None) as channel:
            assert refused(channel) == grpc.StatusCode.UNAUTHENTICATED


def test_a_plaintext_client_and_one_that_does_not_trust_the_ca_are_refused(
    certificates: Certificates, takeoff_home: Path
) -> None:
    with tls_registry(takeoff_home, certificates) as registry:
        assert refused(open_channel(registry.address, api_key=ADMIN_KEY)) == grpc.StatusCode.UNAVAILABLE
        stranger = tls_channel(registry.address, certificates.stranger_ca_file)
        assert refused(stranger) == grpc.StatusCode.UNAVAILABLE
        # Health is public, but not over plaintext either.
        with open_channel(registry.address) as plain, pytest.raises(grpc.RpcError) as raised:
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert decode_rpc_error(raised.value).code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_admits_a_client_certificate_the_ca_signed_only(
    certificates: Certificates, takeoff_home: Path
) -> None:
    with tls_registry(takeoff_home, certificates, mutual=True) as registry:
        with tls_channel(registry.address, certificates.ca_file, certificates.client) as channel:
            assert list_keys(channel).keys

        no_certificate = tls_channel(registry.address, certificates.ca_file)
        assert refused(no_certificate) == grpc.StatusCode.UNAVAILABLE
        strangers = tls_channel(registry.address, certificates.ca_file, certificates.stranger)
        assert refused(strangers) == grpc.StatusCode.UNAVAILABLE
        assert refused(open_channel(registry.address, api_key=ADMIN_KEY)) == grpc.StatusCode.UNAVAILABLE


def seed_job(registry: grpc.Channel) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(registry)
    jobs.CreateJob(jobs_pb2.CreateJobRequest(parent=PROJECT, job_id="img"), timeout=TIMEOUT)
    jobs.CreateJobVersion(
        jobs_pb2.CreateJobVersionRequest(
            parent=f"{PROJECT}/jobs/img",
            version=common_pb2.JobVersion(
                source=common_pb2.JobSource(image=common_pb2.ImageSource(reference="python:3.12-slim"))
            ),
            aliases=["prod"],
        ),
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_the_queue_verifies_keys_and_resolves_jobs_through_a_tls_registry(
    certificates: Certificates, takeoff_home: Path, mutual: bool
) -> None:
    env = certificates.server_env(require_client_cert=mutual)
    client = certificates.client if mutual else None
    with tls_registry(takeoff_home, certificates, mutual=mutual) as registry:
        with tls_channel(registry.address, certificates.ca_file, client) as channel:
            seed_job(channel)
        queue_env = {**env, "TAKEOFF_REGISTRY_ADDRESS": registry.address}
        with (
            service_process("queue", takeoff_home, env=queue_env) as queue,
            tls_channel(queue.address, certificates.ca_file, client) as channel,
        ):
            queues = queue_pb2_grpc.QueueServiceStub(channel)
            # Every call to the queue is verified by the registry (VerifyKey over TLS) ...
            queues.CreateQueue(
                queue_pb2.CreateQueueRequest(
                    parent=PROJECT,
                    queue_id="q",
                    queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_CONTAINER, paused=True),
                ),
                timeout=TIMEOUT,
            )
            # ... and an Enqueue resolves its job there (GetJobVersion over TLS).
            item = queues.Enqueue(
                queue_pb2.EnqueueRequest(queue=f"{PROJECT}/queues/q", job="img:prod"), timeout=TIMEOUT
            ).item

            assert item.job_version == f"{PROJECT}/jobs/img/versions/0"
            assert item.state == common_pb2.ITEM_STATE_PENDING
            with pytest.raises(grpc.RpcError) as raised:
                queues.Enqueue(
                    queue_pb2.EnqueueRequest(queue=f"{PROJECT}/queues/q", job="nope"), timeout=TIMEOUT
                )
            assert decode_rpc_error(raised.value).code == grpc.StatusCode.NOT_FOUND


def start_failure(home: Path, env: dict[str, str]) -> tuple[int, str]:
    """The exit status and error output of a registry that must refuse to start; a registry that serves
    instead (its ready file appears) fails the test at once."""
    ready = home / "registry.ready"
    with subprocess.Popen(
        [sys.executable, "-m", "takeoff_registry"],
        env={
            **os.environ,
            "TAKEOFF_HOME": str(home),
            "TAKEOFF_LISTEN": '["127.0.0.1:0"]',
            "TAKEOFF_READY_FILE": str(ready),
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            wait_for(lambda: process.poll() is not None or ready.exists(), what="the registry to exit")
            assert not ready.exists(), "the registry started serving with this configuration"
        finally:
            process.kill()
        _, stderr = process.communicate()
    return process.returncode, stderr


@pytest.mark.parametrize(
    ("change", "named"),
    [
        # Asking for mutual TLS without the CA that client certificates must chain to would serve plain
        # TLS to any client: it must not start.
        ({"TAKEOFF_TLS__CA_FILE": ""}, "TAKEOFF_TLS"),
        ({"TAKEOFF_TLS__KEY_FILE": "/nonexistent/server.key"}, "TAKEOFF_TLS__KEY_FILE"),
    ],
    ids=["mutual-without-ca", "missing-key-file"],
)
def test_a_tls_configuration_that_cannot_hold_is_refused_at_start(
    certificates: Certificates, takeoff_home: Path, change: dict[str, str], named: str
) -> None:
    env = {**certificates.server_env(require_client_cert=True), **change}
    env = {name: value for name, value in env.items() if value}

    returncode, stderr = start_failure(takeoff_home, env)

    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert named in lines[0]


def test_the_sdk_reaches_a_mutual_tls_registry_from_its_tls_variables(
    certificates: Certificates, takeoff_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tls_registry(takeoff_home, certificates, mutual=True) as registry:
        monkeypatch.setenv("TAKEOFF_TLS_CA_FILE", str(certificates.ca_file))
        monkeypatch.setenv("TAKEOFF_TLS_CERT_FILE", str(certificates.client.cert_file))
        monkeypatch.setenv("TAKEOFF_TLS_KEY_FILE", str(certificates.client.key_file))
        with Client(registry.address, api_key=ADMIN_KEY, project="tls") as client:
            client.create_job("over-tls")
            assert [job.name for job in client.list_jobs()] == ["projects/tls/jobs/over-tls"]

        monkeypatch.delenv("TAKEOFF_TLS_CERT_FILE")
        monkeypatch.delenv("TAKEOFF_TLS_KEY_FILE")
        with (
            Client(registry.address, api_key=ADMIN_KEY, project="tls") as client,
            pytest.raises(TakeoffError) as raised,
        ):
            list(client.list_jobs())
        assert raised.value.code == "UNAVAILABLE"  # the handshake failed: no certificate
