"""Adversarial review of the run relay (docs/design.md §8 "The run relay"; /tmp/tc/REVIEW-relay.md).

Each test forces one case the review found broken (F<n>), now fixed, or checked and found to hold, against
the real relay and a real registry, reusing the relay tests' fixtures and clients. "Another user" is a real
``nobody`` process (those tests skip without root).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from takeoff import _relay, _sender
from takeoff._grpc_run_calls import GrpcRunCalls
from takeoff._relay import RelayRunCalls
from takeoff._run_calls import call_retrying
from takeoff._sender import RunSender
from takeoff.v1 import common_pb2, relay_pb2, runs_pb2
from takeoff_agent.relay import RunRelay, start_relay
from takeoff_rpc.backoff import RetryPolicy
from takeoff_rpc.channels import open_channel, tls_credentials
from takeoff_rpc.status import status_code
from takeoff_server.config import TlsSettings
from takeoff_server.peers import channel_credentials
from takeoff_server.rate_limits import Rate
from tests.agent.test_relay import (  # noqa: F401 (fixtures)
    GET_RUN,
    NOT_FOUND,
    RUN,
    RawClient,
    address_of,
    client,
    relay,
    served,
    token,
)
from tests.conftest import require
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, eventually, service_process
from tests.registry.test_rate_limits import _drain, limited_registry
from tests.sdk.conftest import project, registry  # noqa: F401 (fixtures)
from tests.sdk.test_relayed_calls import RelayThread
from tests.sdk.test_relayed_calls import relay as relay_thread  # noqa: F401 (the SDK tests' relay fixture)
from tests.tls import Certificates, make_certificates


def _relayed_calls(running: RelayThread, registry_address: str) -> RelayRunCalls:
    calls = RelayRunCalls.connect(
        running.address, ADMIN_KEY, fallback=lambda: GrpcRunCalls(registry_address, ADMIN_KEY)
    )
    assert calls is not None
    return calls


def _new_run(calls: RelayRunCalls, in_project: str) -> runs_pb2.Run:
    create = runs_pb2.CreateRunRequest(parent=f"projects/{in_project}", run=runs_pb2.Run())
    return calls.call("CreateRun", create, runs_pb2.CreateRunResponse, timeout=10).run


def _stored(registry_address: str, name: str) -> runs_pb2.Run:
    direct = GrpcRunCalls(registry_address, ADMIN_KEY)
    try:
        return direct.call("GetRun", runs_pb2.GetRunRequest(name=name), runs_pb2.GetRunResponse, 10).run
    finally:
        direct.close()


def _finish(name: str) -> runs_pb2.FinishRunRequest:
    return runs_pb2.FinishRunRequest(name=name, state=common_pb2.RUN_STATE_FINISHED)


class _Hung:
    """The relay's event loop blocked, as in an agent that is stopped (SIGSTOP) or stuck: the kernel
    still accepts connections into the socket's backlog, but nothing reads them."""

    def __init__(self, running: RelayThread) -> None:
        self._release = threading.Event()
        blocked = threading.Event()

        def block() -> None:
            blocked.set()
            self._release.wait()

        running.loop.call_soon_threadsafe(block)
        assert blocked.wait(10)

    def release(self) -> None:
        self._release.set()


SYSTEM_PYTHON = Path("/usr/bin/python3")
NOBODY = 65534
STRANGER = """
import socket, struct, sys
connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
connection.connect(sys.argv[1].replace("@", "\\0", 1))
body = bytes.fromhex(sys.argv[2])
connection.sendall(struct.pack(">I", len(body)) + body)
(length,) = struct.unpack(">I", connection.recv(4, socket.MSG_WAITALL))
print(connection.recv(length, socket.MSG_WAITALL).hex(), flush=True)
"""
"""A process of another user on the agent's host: one call through the relay, its reply printed in hex."""


def _as_another_user(script: str, *args: str) -> subprocess.Popen[str]:
    """``script`` (standard library only) run by ``nobody``, as any other user of the host could run it."""
    require(
        "another user's process",
        os.geteuid() == 0 and SYSTEM_PYTHON.exists(),
        f"run as root (to start it as nobody) with {SYSTEM_PYTHON}",
    )
    command = [str(SYSTEM_PYTHON), "-I", "-S", "-c", script, *args]
    return subprocess.Popen(command, user=NOBODY, group=NOBODY, stdout=subprocess.PIPE, text=True)


# -- F1: the relay lends the agent's mutual-TLS client certificate to any user of the host ------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def mutual_tls_registry(tmp_path: Path, certificates: Certificates) -> Iterator[ServiceProcess]:
    env = certificates.server_env(require_client_cert=True)
    with service_process("registry", tmp_path / "home", env=env) as running:
        yield running


@pytest.fixture
async def agent_relay_under_mutual_tls(
    mutual_tls_registry: ServiceProcess, certificates: Certificates
) -> AsyncIterator[RunRelay]:
    started = await _mutual_tls_relay(f"review-{uuid.uuid4().hex}", mutual_tls_registry.address, certificates)
    yield started
    await started.close()


async def _mutual_tls_relay(agent_id: str, address: str, certificates: Certificates) -> RunRelay:
    """The relay as an agent configured for mutual TLS starts it (__main__.wire)."""
    tls = TlsSettings(
        cert_file=certificates.client.cert_file,
        key_file=certificates.client.key_file,
        ca_file=certificates.ca_file,
        require_client_cert=True,
    )
    started = await start_relay(agent_id, address, channel_credentials(tls, address))
    assert started is not None
    return started


async def test_another_user_without_a_certificate_cannot_reach_a_mutual_tls_registry_through_the_relay(
    mutual_tls_registry: ServiceProcess, agent_relay_under_mutual_tls: RunRelay, certificates: Certificates
) -> None:
    # Directly, a caller holding the admin key but no client certificate is refused by the handshake
    # (design §13: "Jobs get no client certificate: a job cannot reach a registry that requires one").
    request = runs_pb2.GetRunRequest(name="projects/demo/runs/nobody")
    credentials = tls_credentials(certificates.ca_file, None, None)
    with open_channel(mutual_tls_registry.address, api_key=ADMIN_KEY, credentials=credentials) as channel:
        get_run: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(GET_RUN)
        with pytest.raises(grpc.RpcError) as refused:
            get_run(request.SerializeToString(), timeout=10)
    assert status_code(refused.value) is grpc.StatusCode.UNAVAILABLE

    # Through the relay, another user of the host (an abstract socket has no permissions) is answered by the
    # registry under the agent's certificate: NOT_FOUND is the registry deciding on the key it presented.
    call = relay_pb2.RelayCall(
        method=GET_RUN, request=request.SerializeToString(), metadata={"authorization": f"Bearer {ADMIN_KEY}"}
    )
    stranger = _as_another_user(
        STRANGER, address_of(agent_relay_under_mutual_tls), call.SerializeToString().hex()
    )
    answered, _ = await asyncio.to_thread(stranger.communicate, timeout=30)
    reply = relay_pb2.RelayReply.FromString(bytes.fromhex(answered.strip()))
    assert reply.code != NOT_FOUND, "the registry answered a caller that has no client certificate"


# -- F6: another user may take the relay's name while the agent restarts, and collect the jobs' tokens ------

SQUATTER = """
import socket, struct, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1].replace("@", "\\0", 1))
listener.listen()
print("listening", flush=True)
connection, _ = listener.accept()
(length,) = struct.unpack(">I", connection.recv(4, socket.MSG_WAITALL))
print(connection.recv(length, socket.MSG_WAITALL).hex(), flush=True)
connection.sendall(struct.pack(">I", 0))  # an empty RelayReply: code 0, OK
"""
"""Another user's process holding the relay's name: it prints the first call it is sent, in hex."""


def test_a_job_never_hands_its_token_to_a_relay_another_user_bound(
    relay_thread: RelayThread,  # noqa: F811
    registry: ServiceProcess,  # noqa: F811
    project: str,  # noqa: F811
) -> None:
    calls = _relayed_calls(relay_thread, registry.address)
    run = _new_run(calls, project)
    relay_thread.close()  # the agent restarts: its relay is gone for a moment, the name free
    squatter = _as_another_user(SQUATTER, relay_thread.address)
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline() == "listening\n"
        policy = RetryPolicy(initial_delay=0.01, max_attempts=3)
        got = call_retrying(
            calls,
            "GetRun",
            runs_pb2.GetRunRequest(name=run.name),
            runs_pb2.GetRunResponse,
            policy=policy,
            timeout=lambda: 10,
        )
        calls.close()
        captured = squatter.stdout.readline().strip()
    finally:
        squatter.kill()
        squatter.wait()
    seen = relay_pb2.RelayCall.FromString(bytes.fromhex(captured)) if captured else relay_pb2.RelayCall()
    assert ADMIN_KEY not in seen.metadata.get("authorization", ""), "another user's process got the token"
    assert got.run.name == run.name, "another user's process answered the job's call"


# -- F7: the switch to gRPC is for good, even where gRPC cannot reach the registry ---------------------------


async def test_a_job_that_cannot_dial_the_registry_returns_to_its_restarted_agents_relay(
    mutual_tls_registry: ServiceProcess, certificates: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "TAKEOFF_TLS_CA_FILE", str(certificates.ca_file)
    )  # what a job is given: no certificate
    monkeypatch.setattr(_sender, "CALL_TIMEOUT", 1.0)  # short attempts, so that the test is short
    agent_id, address = f"review-{uuid.uuid4().hex}", mutual_tls_registry.address
    first = await _mutual_tls_relay(agent_id, address, certificates)
    calls = RelayRunCalls.connect(
        address_of(first), ADMIN_KEY, fallback=lambda: GrpcRunCalls(address, ADMIN_KEY)
    )
    assert calls is not None
    create = runs_pb2.CreateRunRequest(parent="projects/review", run=runs_pb2.Run())
    run = (await asyncio.to_thread(calls.call, "CreateRun", create, runs_pb2.CreateRunResponse, 10)).run
    sender = RunSender(calls, run.name, first_row_index=0, interval=0.05)
    await first.close()  # the agent restarts while the job logs
    sender.rows.extend((n, time.time_ns(), {"x": float(n)}) for n in range(5))
    # The sender's next round finds no relay to reconnect to and goes to gRPC, which mutual TLS refuses.
    await eventually(lambda: calls._direct is not None, "the run to fall back to gRPC")
    second = await _mutual_tls_relay(agent_id, address, certificates)  # the agent is back, same name
    try:
        # Past the relay's 5 s before it is tried again, with room for a loaded machine: the test is about
        # where the rows go, not how soon.
        await asyncio.to_thread(sender.close, _finish(run.name), 30.0)
        reader = RelayRunCalls.connect(
            address_of(second), ADMIN_KEY, fallback=lambda: GrpcRunCalls(address, ADMIN_KEY)
        )
        assert reader is not None
        request = runs_pb2.GetRunRequest(name=run.name)
        stored = (await asyncio.to_thread(reader.call, "GetRun", request, runs_pb2.GetRunResponse, 10)).run
        reader.close()
    finally:
        await second.close()
    assert (sender.dropped_rows, stored.history_length) == (0, 5)


# -- F2: a relay that accepts but never answers is never given up on ----------------------------------------


def test_a_relay_that_stops_answering_costs_time_not_the_runs_rows(
    relay_thread: RelayThread,  # noqa: F811
    registry: ServiceProcess,  # noqa: F811
    project: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Shorter per-call waits, so that the test is short; the behaviour is the same with the real ones.
    monkeypatch.setattr(_sender, "CALL_TIMEOUT", 1.0)
    monkeypatch.setattr(_relay, "ANSWER_GRACE_SECONDS", 0.5)
    calls = _relayed_calls(relay_thread, registry.address)
    run = _new_run(calls, project)
    sender = RunSender(calls, run.name, first_row_index=0, interval=0.05)
    hung = _Hung(relay_thread)
    try:
        sender.rows.extend((n, time.time_ns(), {"x": float(n)}) for n in range(5))
        sender.close(_finish(run.name), 6.0)
    finally:
        hung.release()
    stored = _stored(registry.address, run.name)
    assert (sender.dropped_rows, len(sender.rows)) == (0, 0)
    assert (stored.history_length, stored.state) == (5, common_pb2.RUN_STATE_FINISHED)


# -- F3: connecting to the relay has no timeout --------------------------------------------------------------


def test_connecting_to_a_relay_that_cannot_accept_gives_up_and_falls_back(
    relay_thread: RelayThread,  # noqa: F811
    registry: ServiceProcess,  # noqa: F811
) -> None:
    name = "\0" + relay_thread.address[1:]
    hung = _Hung(relay_thread)
    queued: list[socket.socket] = []
    connected = threading.Event()
    try:
        while True:  # fill the backlog the hung agent does not drain (any local process can)
            waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waiting.setblocking(False)
            try:
                waiting.connect(name)
            except BlockingIOError:
                waiting.close()
                break
            queued.append(waiting)

        def connect() -> None:
            calls = RelayRunCalls.connect(
                relay_thread.address, ADMIN_KEY, fallback=lambda: GrpcRunCalls(registry.address, ADMIN_KEY)
            )
            if calls is not None:
                calls.close()
            connected.set()

        threading.Thread(target=connect, daemon=True).start()
        # Far longer than any connect to a live relay takes; the SDK's init deadline is 5 s outside a launch.
        assert connected.wait(10), "RelayRunCalls.connect did not return"
    finally:
        hung.release()  # the relay accepts the queue, so the blocked connect returns
        for waiting in queued:
            waiting.close()
        assert connected.wait(30)


# -- F4: a local client may hold a connection mid-frame forever ----------------------------------------------


async def test_a_connection_stalled_mid_frame_is_closed_by_the_relay(client: RawClient) -> None:  # noqa: F811
    # A job's SDK writes each frame whole (sendall); a frame that stops half-way is a broken or hostile
    # client. 2 of the 4 bytes of a length, then nothing:
    client.writer.write(b"\x00\x00")
    await client.writer.drain()
    assert await asyncio.wait_for(client.closed_by_relay(), 10)


# -- checked and found to hold ------------------------------------------------------------------------------


async def test_a_rate_limited_run_delivers_every_row_through_the_relay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RATE_LIMITED's retry_after_seconds crosses the relay in the status details: the sender waits it out
    as over gRPC and drops nothing."""
    database = f"sqlite:///{tmp_path / 'registry.db'}"
    async with limited_registry(
        tmp_path / "home", database, metric_rows=Rate(per_second=500, burst=1000)
    ) as lim:
        run = (await lim.runs.CreateRun(runs_pb2.CreateRunRequest(parent="projects/limits"))).run
        before = await _drain(lim, run, 250)  # the bucket is (about) empty now
        started = await start_relay(f"review-{uuid.uuid4().hex}", lim.address, None)
        assert started is not None
        try:
            calls = RelayRunCalls.connect(
                address_of(started), ADMIN_KEY, fallback=lambda: GrpcRunCalls(lim.address, ADMIN_KEY)
            )
            assert calls is not None
            sender = RunSender(calls, run.name, first_row_index=before, interval=0.02)
            sender.rows.extend((before + n, time.time_ns(), {"x": float(n)}) for n in range(3000))
            await asyncio.to_thread(sender.close, _finish(run.name), 60.0)
        finally:
            await started.close()
        stored = (await lim.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))).run
    assert sender.dropped_rows == 0
    assert stored.history_length == before + 3000
    assert "rate limiting" in capsys.readouterr().err


async def test_a_token_in_an_unsendable_header_is_never_repeated(client: RawClient) -> None:  # noqa: F811
    secret = "secret-token-\n-value"
    reply = await client.call(GET_RUN, runs_pb2.GetRunRequest(name=RUN), secret)
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "secret" not in reply.message


def test_a_relay_that_is_killed_mid_run_loses_no_row(
    relay_thread: RelayThread,  # noqa: F811
    registry: ServiceProcess,  # noqa: F811
    project: str,  # noqa: F811
) -> None:
    """The agent goes away between two batches: the sender's next call is UNAVAILABLE, retried over gRPC."""
    calls = _relayed_calls(relay_thread, registry.address)
    run = _new_run(calls, project)
    sender = RunSender(calls, run.name, first_row_index=0, interval=0.05)
    sender.rows.extend((n, time.time_ns(), {"x": float(n)}) for n in range(100))
    relay_thread.close()
    sender.rows.extend((n, time.time_ns(), {"x": float(n)}) for n in range(100, 200))
    sender.close(_finish(run.name), 30.0)
    stored = _stored(registry.address, run.name)
    assert sender.dropped_rows == 0
    assert (stored.history_length, stored.state) == (200, common_pb2.RUN_STATE_FINISHED)
