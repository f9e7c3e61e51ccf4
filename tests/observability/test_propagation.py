"""Every channel passes the caller's trace context on (docs/design.md §9): calls of every kind, through
sync and grpc.aio channels, carry the current span's ``traceparent``, and none when tracing is off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace import TracerProvider

from takeoff_rpc.channels import open_aio_channel, open_channel, propagate_trace_context
from takeoff_server.telemetry import current_trace_context

SERVICE = "test.Seen"
FIXED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OWN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _traceparent(context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return str(dict(context.invocation_metadata() or ()).get("traceparent", "")).encode()


async def _unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return _traceparent(context)


async def _stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
    yield _traceparent(context)


async def _collect(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    async for _ in requests:
        pass
    return _traceparent(context)


async def _chat(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield _traceparent(context)


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(_stream),
                    "Collect": grpc.stream_unary_rpc_method_handler(_collect),
                    "Chat": grpc.stream_stream_rpc_method_handler(_chat),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
def propagating() -> Iterator[None]:
    propagate_trace_context(lambda: (("traceparent", FIXED),))
    yield
    propagate_trace_context(None)


async def aio_seen(address: str, **call: object) -> list[bytes]:
    """The ``traceparent`` the server saw on one call of each kind, through a grpc.aio channel."""
    async with open_aio_channel(address) as channel:
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/Unary")
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{SERVICE}/Stream")
        collect: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(f"/{SERVICE}/Collect")
        chat: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(f"/{SERVICE}/Chat")
        return [
            await unary(b"", timeout=10, **call),  # type: ignore[arg-type]
            *[reply async for reply in stream(b"", timeout=10, **call)],  # type: ignore[arg-type]
            await collect(iter([b""]), timeout=10, **call),  # type: ignore[arg-type]
            *[reply async for reply in chat(iter([b""]), timeout=10, **call)],  # type: ignore[arg-type]
        ]


def sync_seen(address: str, **call: object) -> list[bytes]:
    """:func:`aio_seen` through a sync channel."""
    with open_channel(address) as channel:
        unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/Unary")
        stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{SERVICE}/Stream")
        collect: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(f"/{SERVICE}/Collect")
        chat: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(f"/{SERVICE}/Chat")
        return [
            unary(b"", timeout=10, **call),  # type: ignore[arg-type]
            *stream(b"", timeout=10, **call),  # type: ignore[arg-type]
            collect(iter([b""]), timeout=10, **call),  # type: ignore[arg-type]
            *chat(iter([b""]), timeout=10, **call),  # type: ignore[arg-type]
        ]


async def seen(address: str, client: str, **call: object) -> list[bytes]:
    if client == "aio":
        return await aio_seen(address, **call)
    return await asyncio.to_thread(sync_seen, address, **call)


@pytest.mark.parametrize("client", ["aio", "sync"])
async def test_calls_of_every_kind_carry_the_trace_context(
    address: str, client: str, propagating: None
) -> None:
    assert await seen(address, client) == [FIXED.encode()] * 4


@pytest.mark.parametrize("client", ["aio", "sync"])
async def test_a_call_that_brings_its_own_trace_context_keeps_it(
    address: str, client: str, propagating: None
) -> None:
    own = {"metadata": (("traceparent", OWN),)}
    assert await seen(address, client, **own) == [OWN.encode()] * 4


@pytest.mark.parametrize("client", ["aio", "sync"])
async def test_without_tracing_calls_carry_none(address: str, client: str) -> None:
    assert await seen(address, client) == [b""] * 4


async def test_a_servers_context_is_the_current_open_telemetry_span(address: str) -> None:
    propagate_trace_context(current_trace_context)
    try:
        tracer = TracerProvider().get_tracer("test")
        outside = await aio_seen(address)
        with tracer.start_as_current_span("caller") as span:
            inside = await aio_seen(address)
            context = span.get_span_context()
    finally:
        propagate_trace_context(None)

    assert outside == [b""] * 4
    flags = f"{context.trace_flags:02x}"
    assert inside == [f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags}".encode()] * 4
