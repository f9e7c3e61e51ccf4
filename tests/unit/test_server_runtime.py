"""The shared server runtime, on a real grpc.aio server on a loopback port: rich statuses, health, and
the access layer (API keys, each method's rule on every request message, revoked streams ended)."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import sqlalchemy
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from takeoff.v1 import jobs_pb2, jobs_pb2_grpc
from takeoff_rpc.channels import open_channel
from takeoff_rpc.retries import TRANSIENT_CODES
from takeoff_server import errors
from takeoff_server.access import (
    CachedVerifier,
    KeyKind,
    KeyScope,
    Permission,
    Principal,
    ProjectRole,
    Rule,
    caller_var,
    grants_for,
    needs,
)
from takeoff_server.interceptors import Context, responses
from takeoff_server.server import ServiceBinding, TakeoffServer

PROBE = "takeoff.test.ProbeService"


def project_key(name: str, role: ProjectRole, *projects: str) -> Principal:
    scope = KeyScope(KeyKind.PROJECT, projects=projects, role=role)
    return Principal(f"keys/{name}", name, KeyKind.PROJECT, grants_for(scope))


KEYS = {
    "sesame": project_key("alice", ProjectRole.WRITE, "projects/a"),
    "peek": project_key("bob", ProjectRole.READ, "projects/a"),
}
"""secret -> the key it is: what the probe server's verifier knows."""


class KeyTable:
    """A real ``KeyVerifier`` over a dict; ``down`` makes it unable to tell, as an unreachable registry."""

    def __init__(self, keys: Mapping[str, Principal]) -> None:
        self.keys = dict(keys)
        self.down = False
        self.asked = 0

    async def verify(self, secret: str) -> Principal | None:
        self.asked += 1
        if self.down:
            raise errors.Unavailable("DEPENDENCY_UNAVAILABLE", "the key registry is unreachable")
        return self.keys.get(secret)


async def current_trace(request: bytes, context: Context) -> bytes:
    span = trace.get_current_span().get_span_context()
    return f"{span.trace_id:032x}-{int(span.trace_flags):02x}".encode()


async def invalid(request: bytes, context: Context) -> bytes:
    raise errors.InvalidArgument(
        "CONFIG_INVALID",
        "run config does not match the job's input schema",
        metadata={"job": "train"},
        violations=[
            errors.FieldViolation("run_config.lr", "must be a number"),
            errors.FieldViolation("run_config.epochs", "must be at least 1"),
        ],
    )


async def echoes_a_huge_name(request: bytes, context: Context) -> bytes:
    name = "é" * 5000
    raise errors.InvalidArgument(
        "NAME_INVALID",
        f"{name!r} is not a job name",
        metadata={"name": name, "job": "j", "more": "m", "again": "a", "dropped": "d"},
        violations=[errors.FieldViolation(f"names[{n}]{name}", f"{name!r} is not a name") for n in range(50)],
    )


async def missing(request: bytes, context: Context) -> bytes:
    raise errors.NotFound("JOB_NOT_FOUND", "job projects/p/jobs/nope does not exist")


async def crash(request: bytes, context: Context) -> bytes:
    raise RuntimeError("secret-internal-detail")


def insert_into_a_locked_database(value: str) -> None:
    """A write that SQLite refuses at once (another connection holds the database's lock), of ``value``:
    SQLAlchemy's error quotes the statement's parameters."""
    with tempfile.TemporaryDirectory() as home:
        path = Path(home) / "locked.db"
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("CREATE TABLE t (secret TEXT)")
        holder.execute("BEGIN EXCLUSIVE")
        engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
        try:
            with engine.begin() as connection:
                connection.execute(sqlalchemy.text("INSERT INTO t VALUES (:v)"), {"v": value})
        finally:
            engine.dispose()
            holder.close()


async def write_to_a_locked_database(request: bytes, context: Context) -> bytes:
    insert_into_a_locked_database("secret-param")
    return b""


async def whoami(request: bytes, context: Context) -> bytes:
    caller = caller_var.get()
    assert caller is not None
    return caller.actor.encode()


def unbuilt(request: bytes, context: Context) -> bytes:
    # What a generated servicer base class does for a method nobody has written yet.
    context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    raise NotImplementedError("Method not implemented!")


async def count_then_fail(request: bytes, context: Context) -> AsyncIterator[bytes]:
    for n in range(3):
        yield str(n).encode()
    raise errors.FailedPrecondition("QUEUE_PAUSED", "queue is paused")


async def echo(request: struct_pb2.Struct, context: Context) -> struct_pb2.Struct:
    return request


RECEIVED: list[struct_pb2.Struct] = []
"""The messages CountMessages has read, across calls (each test that looks clears it first)."""


async def count_messages(requests: AsyncIterator[struct_pb2.Struct], context: Context) -> struct_pb2.Struct:
    received = 0
    async for request in requests:
        RECEIVED.append(request)
        received += 1
    return struct_pb2.Struct(fields={"count": struct_pb2.Value(number_value=received)})


async def first_then_wait(request: bytes, context: Context) -> AsyncIterator[bytes]:
    yield b"first"
    await asyncio.Event().wait()  # open until the client, the deadline or the access layer ends it


def named(request: struct_pb2.Struct) -> Iterable[str]:
    """The resource a probe Struct names in its ``name`` field."""
    return [request.fields["name"].string_value] if "name" in request.fields else []


RULES: dict[str, Rule] = {
    **{
        name: needs(Permission.JOBS_READ)
        for name in (
            "Invalid",
            "Missing",
            "HugeName",
            "Crash",
            "WriteLocked",
            "WhoAmI",
            "Trace",
            "Unbuilt",
            "Count",
            "Echo",
        )
    },
    "CountMessages": needs(Permission.JOBS_WRITE, named),
    "Open": needs(Permission.RUNS_READ),
}
"""Every probe method but ``Unruled``, which no one may call."""


def probe_binding() -> ServiceBinding:
    structs: dict[str, Any] = {
        "request_deserializer": struct_pb2.Struct.FromString,
        "response_serializer": struct_pb2.Struct.SerializeToString,
    }
    unary: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        name: grpc.unary_unary_rpc_method_handler(behavior)
        for name, behavior in {
            "Invalid": invalid,
            "Missing": missing,
            "HugeName": echoes_a_huge_name,
            "Crash": crash,
            "WriteLocked": write_to_a_locked_database,
            "WhoAmI": whoami,
            "Trace": current_trace,
            "Unbuilt": unbuilt,
        }.items()
    }
    handler = grpc.method_handlers_generic_handler(
        PROBE,
        {
            **unary,
            "Count": grpc.unary_stream_rpc_method_handler(count_then_fail),
            "Echo": grpc.unary_unary_rpc_method_handler(echo, **structs),
            "CountMessages": grpc.stream_unary_rpc_method_handler(count_messages, **structs),
            "Open": grpc.unary_stream_rpc_method_handler(first_then_wait),
            "Unruled": grpc.unary_unary_rpc_method_handler(whoami),
        },
    )
    return ServiceBinding(PROBE, lambda server: server.add_generic_rpc_handlers((handler,)), access=RULES)


@pytest.fixture
def keys() -> KeyTable:
    return KeyTable(KEYS)


@pytest.fixture
async def server(keys: KeyTable) -> AsyncIterator[TakeoffServer]:
    # Cached as every service caches: a revoked key's streams must still end within 5 s.
    server = TakeoffServer([probe_binding()], listen=["127.0.0.1:0"], verifier=CachedVerifier(keys))
    await server.start()
    yield server
    await server.stop(0)


def call(
    address: str, method: str, *, api_key: str | None = "sesame", payload: bytes = b"", **kwargs: Any
) -> bytes:
    with open_channel(address, api_key=api_key) as channel:
        stub: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{PROBE}/{method}")
        return stub(payload, timeout=5, **kwargs)


async def failing_call(address: str, method: str, **kwargs: Any) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as raised:
        await asyncio.to_thread(call, address, method, **kwargs)
    return cast(grpc.Call, raised.value)


def details(error: grpc.Call) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest | None]:
    trailing: dict[str, Any] = dict(error.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    assert status.code == error.code().value[0]
    info, bad_request = error_details_pb2.ErrorInfo(), None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
    return info, bad_request


@pytest.mark.parametrize("flags", ["01", "00"])
async def test_a_call_runs_in_its_callers_trace_when_nothing_exports(
    server: TakeoffServer, flags: str
) -> None:
    """Spans nobody exports skip OpenTelemetry's interceptor (telemetry.traced_handler): the servicer's
    context still continues the caller's trace, as the item's traceparent and the log lines need."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller = f"00-{trace_id}-00f067aa0ba902b7-{flags}"
    seen = await asyncio.to_thread(call, server.addresses[0], "Trace", metadata=(("traceparent", caller),))
    assert seen == f"{trace_id}-{flags}".encode()


async def test_domain_error_carries_reason_and_field_violations(server: TakeoffServer) -> None:
    error = await failing_call(server.addresses[0], "Invalid")

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "run config does not match the job's input schema"
    info, bad_request = details(error)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "CONFIG_INVALID",
        "takeoff.dev",
        {"job": "train"},
    )
    assert bad_request is not None
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("run_config.lr", "must be a number"),
        ("run_config.epochs", "must be at least 1"),
    ]


async def test_a_status_quoting_huge_values_still_fits_in_the_trailers(server: TakeoffServer) -> None:
    error = await failing_call(server.addresses[0], "HugeName")

    # Unclipped, the client would see RESOURCE_EXHAUSTED: its 8 KiB trailer limit exceeded.
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad_request = details(error)
    assert info.reason == "NAME_INVALID"
    message = error.details() or ""
    assert message.startswith("'éé")
    assert message.endswith("…")
    assert set(info.metadata) == {"name", "job", "more", "again"}
    assert bad_request is not None
    assert len(bad_request.field_violations) == 5
    assert all(v.field.startswith(f"names[{n}]") for n, v in enumerate(bad_request.field_violations))


async def test_not_found_maps_to_not_found(server: TakeoffServer) -> None:
    error = await failing_call(server.addresses[0], "Missing")

    assert error.code() == grpc.StatusCode.NOT_FOUND
    info, bad_request = details(error)
    assert info.reason == "JOB_NOT_FOUND"
    assert bad_request is None


async def test_unexpected_exception_is_internal_without_traceback(
    server: TakeoffServer, caplog: pytest.LogCaptureFixture
) -> None:
    error = await failing_call(server.addresses[0], "Crash", metadata=[("x-request-id", "req-42")])

    assert error.code() == grpc.StatusCode.INTERNAL
    text = f"{error.details()} {error.trailing_metadata()!r}"
    assert "secret-internal-detail" not in text
    assert "Traceback" not in text
    assert "req-42" in (error.details() or "")
    info, _ = details(error)
    assert (info.reason, info.metadata["request_id"]) == ("INTERNAL", "req-42")
    logged = [r for r in caplog.records if "req-42" in r.getMessage()]
    assert logged
    assert logged[0].exc_info is not None


async def test_a_database_that_fails_is_unavailable_and_retryable_and_logs_no_parameters(
    server: TakeoffServer, caplog: pytest.LogCaptureFixture
) -> None:
    error = await failing_call(server.addresses[0], "WriteLocked", metadata=[("x-request-id", "req-43")])

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.code() in TRANSIENT_CODES
    info, _ = details(error)
    assert (info.reason, info.metadata["dependency"], info.metadata["request_id"]) == (
        "DEPENDENCY_UNAVAILABLE",
        "database",
        "req-43",
    )
    logged = [r.getMessage() for r in caplog.records if "req-43" in r.getMessage()]
    assert logged
    assert any("database is locked" in line for line in logged)
    assert not any("secret-param" in line for line in logged)


async def test_unbuilt_method_is_unimplemented_and_says_which(server: TakeoffServer) -> None:
    error = await failing_call(server.addresses[0], "Unbuilt")

    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert f"/{PROBE}/Unbuilt" in (error.details() or "")
    assert details(error)[0].reason == "NOT_IMPLEMENTED"


async def test_error_after_streamed_messages(server: TakeoffServer) -> None:
    def read_all() -> tuple[list[bytes], grpc.Call]:
        received: list[bytes] = []
        with open_channel(server.addresses[0], api_key="sesame") as channel:
            stub: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{PROBE}/Count")
            try:
                received.extend(stub(b"", timeout=5))
            except grpc.RpcError as error:
                return received, cast(grpc.Call, error)
        raise AssertionError("the stream ended without an error")

    received, error = await asyncio.to_thread(read_all)

    assert received == [b"0", b"1", b"2"]
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(error)[0].reason == "QUEUE_PAUSED"


# Access: keys, rules, revocation


async def test_health_answers_without_a_key_and_every_other_method_needs_one(server: TakeoffServer) -> None:
    async with grpc.aio.insecure_channel(server.addresses[0]) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    error = await failing_call(server.addresses[0], "WhoAmI", api_key=None)

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    info, _ = details(error)
    assert (info.reason, info.domain, info.metadata["method"]) == (
        "KEY_MISSING",
        "takeoff.dev",
        f"/{PROBE}/WhoAmI",
    )
    assert "authorization: Bearer" in (error.details() or "")


async def test_a_known_key_is_admitted_and_its_caller_is_seen_by_the_servicer(server: TakeoffServer) -> None:
    assert await asyncio.to_thread(call, server.addresses[0], "WhoAmI") == b"keys/alice (alice)"
    assert await asyncio.to_thread(call, server.addresses[0], "WhoAmI", api_key="peek") == b"keys/bob (bob)"


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        ("Basic c2VzYW1l", "KEY_MALFORMED"),
        ("Bearer", "KEY_MALFORMED"),
        ("Bearer    ", "KEY_MALFORMED"),
        ("sesame", "KEY_MALFORMED"),
        ("Bearer wrong", "KEY_INVALID"),
        ("Bearer sesame-", "KEY_INVALID"),
    ],
)
async def test_a_malformed_or_unknown_key_is_unauthenticated(
    server: TakeoffServer, authorization: str, reason: str
) -> None:
    error = await failing_call(
        server.addresses[0], "WhoAmI", api_key=None, metadata=[("authorization", authorization)]
    )

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    info, _ = details(error)
    assert (info.reason, info.domain) == (reason, "takeoff.dev")
    assert "sesame" not in f"{error.details()} {error.trailing_metadata()!r}"


def send_structs(address: str, api_key: str, messages: list[struct_pb2.Struct]) -> struct_pb2.Struct:
    with open_channel(address, api_key=api_key) as channel:
        stub: grpc.StreamUnaryMultiCallable[struct_pb2.Struct, struct_pb2.Struct] = channel.stream_unary(
            f"/{PROBE}/CountMessages",
            request_serializer=struct_pb2.Struct.SerializeToString,
            response_deserializer=struct_pb2.Struct.FromString,
        )
        return stub(iter(messages), timeout=5)


def naming(resource: str) -> struct_pb2.Struct:
    return struct_pb2.Struct(fields={"name": struct_pb2.Value(string_value=resource)})


async def test_a_key_lacking_the_permission_is_denied_naming_it(server: TakeoffServer) -> None:
    RECEIVED.clear()
    with pytest.raises(grpc.RpcError) as raised:
        await asyncio.to_thread(send_structs, server.addresses[0], "peek", [naming("projects/a/jobs/x")])

    error = cast(grpc.Call, raised.value)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    info, _ = details(error)
    assert (info.reason, info.metadata["permission"]) == ("PERMISSION_DENIED", "jobs.write")
    assert "keys/bob lacks the permission jobs.write" in (error.details() or "")
    assert RECEIVED == []


async def test_each_message_of_a_request_stream_is_checked_against_the_keys_scope(
    server: TakeoffServer,
) -> None:
    RECEIVED.clear()
    inside = [naming("projects/a/jobs/x"), naming("projects/a")]
    counted = await asyncio.to_thread(send_structs, server.addresses[0], "sesame", inside)
    assert counted["count"] == 2

    RECEIVED.clear()
    with pytest.raises(grpc.RpcError) as raised:
        await asyncio.to_thread(
            send_structs,
            server.addresses[0],
            "sesame",
            [naming("projects/a/jobs/x"), naming("projects/b/jobs/y"), naming("projects/a/jobs/z")],
        )

    error = cast(grpc.Call, raised.value)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    info, _ = details(error)
    assert dict(info.metadata) == {"permission": "jobs.write", "resource": "projects/b/jobs/y"}
    # The servicer read the first message; the second was refused before it reached it.
    assert [naming("projects/a/jobs/x")] == RECEIVED


async def test_a_name_that_only_shares_a_prefix_with_the_scope_is_outside_it(server: TakeoffServer) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        await asyncio.to_thread(send_structs, server.addresses[0], "sesame", [naming("projects/ab/jobs/x")])
    assert cast(grpc.Call, raised.value).code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_method_without_a_rule_is_refused_to_every_caller(server: TakeoffServer) -> None:
    for api_key in ("sesame", None):
        error = await failing_call(server.addresses[0], "Unruled", api_key=api_key)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert details(error)[0].reason == "NO_ACCESS_RULE"


def test_a_service_with_a_method_lacking_a_rule_cannot_be_bound() -> None:
    service = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]
    servicer: Any = object()  # never called: the binding is refused, or never served
    some = {"CreateJob": needs(Permission.JOBS_WRITE)}

    with pytest.raises(ValueError, match=r"takeoff.v1.JobService states no access rule for .*GetJob"):
        ServiceBinding.of(
            service,
            jobs_pb2_grpc.add_JobServiceServicer_to_server,
            servicer,
            access=some,
        )

    every = {method.name: needs(Permission.JOBS_READ) for method in service.methods}
    binding = ServiceBinding.of(
        service,
        jobs_pb2_grpc.add_JobServiceServicer_to_server,
        servicer,
        access=every,
    )
    assert set(binding.full_rules()) == {
        f"/takeoff.v1.JobService/{method.name}" for method in service.methods
    }


async def test_an_open_stream_ends_within_5s_once_its_key_is_revoked(
    server: TakeoffServer, keys: KeyTable
) -> None:
    async with grpc.aio.insecure_channel(server.addresses[0]) as channel:
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{PROBE}/Open")
        call = stream(b"", timeout=30, metadata=(("authorization", "Bearer sesame"),))
        assert await call.read() == b"first"

        del keys.keys["sesame"]
        revoked_at = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call.read()
        ended_after = time.monotonic() - revoked_at

    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(cast(grpc.Call, raised.value))[0].reason == "KEY_REVOKED"
    assert ended_after < 5.0
    # A new call with the revoked key is refused too (the cache has moved on by now).
    assert (await failing_call(server.addresses[0], "WhoAmI")).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_verifier_that_cannot_tell_makes_calls_unavailable_and_retryable() -> None:
    keys = KeyTable(KEYS)
    # No cache between checks (ttl 0), so every call asks; a recent answer still bridges the outage.
    cached = CachedVerifier(keys, ttl=0.0)
    server = TakeoffServer([probe_binding()], listen=["127.0.0.1:0"], verifier=cached)
    [address] = await server.start()
    try:
        assert await asyncio.to_thread(call, address, "WhoAmI") == b"keys/alice (alice)"
        keys.down = True
        asked = keys.asked

        assert await asyncio.to_thread(call, address, "WhoAmI") == b"keys/alice (alice)"
        assert keys.asked == asked + 1  # it did ask, and was served the recent answer
        error = await failing_call(address, "WhoAmI", api_key="peek")  # never verified before

        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error.code() in TRANSIENT_CODES
        assert details(error)[0].reason == "DEPENDENCY_UNAVAILABLE"

        keys.down = False
        assert await asyncio.to_thread(call, address, "WhoAmI", api_key="peek") == b"keys/bob (bob)"
    finally:
        await server.stop(0)


async def test_health_per_service_then_not_serving_during_shutdown() -> None:
    server = TakeoffServer([probe_binding()], listen=["127.0.0.1:0"], verifier=KeyTable(KEYS))
    address = (await server.start())[0]
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", PROBE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="takeoff.v1.NoSuchService"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        watch = health.Watch(health_pb2.HealthCheckRequest(service=PROBE))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(server.stop(5))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        await stopping


async def test_listens_on_tcp_and_unix_socket_at_once(tmp_path_factory: pytest.TempPathFactory) -> None:
    socket = tmp_path_factory.mktemp("sock") / "probe.sock"
    server = TakeoffServer(
        [probe_binding()], listen=["127.0.0.1:0", f"unix:{socket}"], verifier=KeyTable(KEYS)
    )
    tcp, unix = await server.start()
    try:
        assert tcp.startswith("127.0.0.1:")
        assert not tcp.endswith(":0")
        assert unix == f"unix:{socket}"
        for address in (tcp, unix):
            assert await asyncio.to_thread(call, address, "WhoAmI") == b"keys/alice (alice)"
    finally:
        await server.stop(0)
    assert not socket.exists()


async def test_port_in_use_is_a_clear_error() -> None:
    first = TakeoffServer([probe_binding()], listen=["127.0.0.1:0"], verifier=KeyTable(KEYS))
    address = (await first.start())[0]
    try:
        second = TakeoffServer([probe_binding()], listen=[address], verifier=KeyTable(KEYS))
        with pytest.raises(OSError, match="address is in use"):
            await second.start()
    finally:
        await first.stop(0)


def nested_struct_bytes(levels: int) -> bytes:
    """A Struct nested ``levels`` deep, encoded by hand: protobuf refuses to build one it could not parse."""
    encoded = b""
    for _ in range(levels):
        value = b"\x2a" + _varint(len(encoded)) + encoded  # Value.struct_value (field 5)
        entry = b"\x0a\x01a" + b"\x12" + _varint(len(value)) + value  # fields entry: key "a", value
        encoded = b"\x0a" + _varint(len(entry)) + entry  # Struct.fields (field 1)
    return encoded


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


UNDECODABLE = {
    "nested beyond the recursion limit": nested_struct_bytes(60),
    "not a protobuf encoding": b"\xff\xff\xff\xff",
    "invalid UTF-8 in a string": b"\x0a\x06\x0a\x02\xff\xfe\x12\x00",
}


@pytest.mark.parametrize("payload", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
async def test_undecodable_unary_request_is_invalid_argument(server: TakeoffServer, payload: bytes) -> None:
    echoed = await asyncio.to_thread(call, server.addresses[0], "Echo", payload=nested_struct_bytes(3))
    assert echoed == nested_struct_bytes(3)

    error = await failing_call(server.addresses[0], "Echo", payload=payload)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, _ = details(error)
    assert (info.reason, info.domain, info.metadata["method"]) == (
        "REQUEST_INVALID",
        "takeoff.dev",
        f"/{PROBE}/Echo",
    )
    assert "DecodeError" not in (error.details() or "")


async def test_undecodable_message_in_a_request_stream_is_invalid_argument(server: TakeoffServer) -> None:
    def send(messages: list[bytes]) -> bytes:
        with open_channel(server.addresses[0], api_key="sesame") as channel:
            stub: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
                f"/{PROBE}/CountMessages"
            )
            return stub(iter(messages), timeout=5)

    counted = struct_pb2.Struct.FromString(await asyncio.to_thread(send, [b"", b""]))
    assert counted["count"] == 2
    with pytest.raises(grpc.RpcError) as raised:
        await asyncio.to_thread(send, [b"", nested_struct_bytes(60), b""])

    error = cast(grpc.Call, raised.value)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error)[0].reason == "REQUEST_INVALID"


async def test_a_wrapper_passes_each_kind_of_response_stream_on() -> None:
    """``responses``: a servicer's async generator is passed as it is (no extra hop a message); one that
    yields synchronously, or writes with ``context.write()`` and returns nothing, is adapted."""

    no_context = cast(Context, None)  # none of these behaviors reads it

    async def generated(request: Any, context: Any) -> AsyncGenerator[int, None]:
        yield request

    stream = generated(1, None)
    written: list[int] = []

    async def writing(request: Any, context: Any) -> None:
        written.append(request)

    assert responses(lambda request, context: stream, 1, no_context) is stream
    listed = responses(lambda request, context: [request, 2], 1, no_context)
    assert [response async for response in listed] == [1, 2]
    assert [response async for response in responses(writing, 3, no_context)] == []
    assert written == [3]
    await stream.aclose()
