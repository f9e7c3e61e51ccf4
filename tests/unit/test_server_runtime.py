"""The shared server runtime, on a real grpc.aio server on a loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from takeoff_rpc.channels import open_channel
from takeoff_server import errors
from takeoff_server.interceptors import ANONYMOUS, Context, Principal, principal_var
from takeoff_server.server import ServiceBinding, TakeoffServer

PROBE = "takeoff.test.ProbeService"


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


async def whoami(request: bytes, context: Context) -> bytes:
    return principal_var.get().subject.encode()


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


async def count_messages(requests: AsyncIterator[struct_pb2.Struct], context: Context) -> struct_pb2.Struct:
    received = [request async for request in requests]
    return struct_pb2.Struct(fields={"count": struct_pb2.Value(number_value=len(received))})


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
            "WhoAmI": whoami,
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
        },
    )
    return ServiceBinding(PROBE, lambda server: server.add_generic_rpc_handlers((handler,)))


class KeyAuthenticator:
    """Admits callers that present the one key it knows."""

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal:
        if method.startswith("/grpc.health."):
            return ANONYMOUS
        if metadata.get("authorization") != "Bearer sesame":
            raise errors.Unauthenticated("API_KEY_INVALID", "present a valid API key")
        return Principal(subject="alice")


@pytest.fixture
async def server() -> AsyncIterator[TakeoffServer]:
    server = TakeoffServer([probe_binding()], listen=["127.0.0.1:0"], authenticator=KeyAuthenticator())
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


async def test_authentication_hook_sees_call_metadata(server: TakeoffServer) -> None:
    assert await asyncio.to_thread(call, server.addresses[0], "WhoAmI") == b"alice"

    error = await failing_call(server.addresses[0], "WhoAmI", api_key=None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(error)[0].reason == "API_KEY_INVALID"

    error = await failing_call(server.addresses[0], "WhoAmI", api_key="wrong")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_per_service_then_not_serving_during_shutdown() -> None:
    server = TakeoffServer([probe_binding()], listen=["127.0.0.1:0"])
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
    server = TakeoffServer([probe_binding()], listen=["127.0.0.1:0", f"unix:{socket}"])
    tcp, unix = await server.start()
    try:
        assert tcp.startswith("127.0.0.1:")
        assert not tcp.endswith(":0")
        assert unix == f"unix:{socket}"
        for address in (tcp, unix):
            assert await asyncio.to_thread(call, address, "WhoAmI") == b"anonymous"
    finally:
        await server.stop(0)
    assert not socket.exists()


async def test_port_in_use_is_a_clear_error() -> None:
    first = TakeoffServer([probe_binding()], listen=["127.0.0.1:0"])
    address = (await first.start())[0]
    try:
        second = TakeoffServer([probe_binding()], listen=[address])
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
