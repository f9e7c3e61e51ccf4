"""Channels to Takeoff services: one set of options for the SDK (sync gRPC) and the services (grpc.aio).

A target is ``host:port`` or ``unix:/path``. Every channel gets :data:`CHANNEL_OPTIONS`; ``metadata``
(an API key, later a run token) is added to every call by an interceptor, and ``credentials`` make the
channel a TLS one, so adding authentication later changes the callers' arguments, not this plumbing.

The same interceptor adds the caller's W3C trace context (``traceparent``, ``tracestate``) to every call
once the process's tracing has named where to read it (:func:`propagate_trace_context`), so the server's
span continues the caller's trace and no caller can forget to pass it on (docs/design.md §9).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

Metadata = Sequence[tuple[str, str]]
ChannelOptions = Sequence[tuple[str, Any]]
TraceContext = Callable[[], Metadata]
"""The current span's ``traceparent`` (and ``tracestate``) as metadata entries; empty outside a span."""


class _Propagation:
    source: TraceContext | None = None


def propagate_trace_context(source: TraceContext | None) -> None:
    """Have every call of every channel, opened before or after, carry what ``source`` returns (calls
    that set ``traceparent`` themselves keep theirs). The process's tracing sets it once: the server
    runtime's OpenTelemetry context, or a traced job's own spans (``takeoff._trace``). ``None`` (the
    default): calls carry no trace context, at the cost of one global read each."""
    _Propagation.source = source


MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Largest message either way. It is gRPC's default receive limit, which the servers keep and which
other languages' clients have: a request over it fails here before it is sent, and a reply over it is a
server breaking its promise to keep every answer under that default."""

KEEPALIVE_SECONDS = 300
"""Idle seconds before a channel with calls in flight pings its server (then 20 s for the answer). Not
less: a gRPC server by default sends GOAWAY to a client pinging more often than every 5 minutes."""

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # A restarted service is found again within a couple of seconds rather than gRPC's default of minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def _call_metadata(*, api_key: str | None = None, metadata: Metadata = ()) -> tuple[tuple[str, str], ...]:
    """What every call carries: ``metadata``, and ``api_key`` as a bearer token."""
    return (*metadata, *((("authorization", f"Bearer {api_key}"),) if api_key else ()))


def open_channel(
    target: str,
    *,
    api_key: str | None = None,
    metadata: Metadata = (),
    credentials: grpc.ChannelCredentials | None = None,
    options: ChannelOptions = (),
) -> grpc.Channel:
    """A sync channel to ``target``; ``options`` override or extend :data:`CHANNEL_OPTIONS`."""
    merged = _options(target, options)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=merged)
    else:
        channel = grpc.secure_channel(target, credentials, options=merged)
    return grpc.intercept_channel(
        channel, _MetadataInterceptor(_call_metadata(api_key=api_key, metadata=metadata))
    )


def open_aio_channel(
    target: str,
    *,
    api_key: str | None = None,
    metadata: Metadata = (),
    credentials: grpc.ChannelCredentials | None = None,
    options: ChannelOptions = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target``, set up as :func:`open_channel` sets up a sync one."""
    merged = _options(target, options)
    interceptors = _aio_interceptors(_call_metadata(api_key=api_key, metadata=metadata))
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=merged, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=merged, interceptors=interceptors)


def _options(target: str, overrides: ChannelOptions) -> list[tuple[str, Any]]:
    if not target or target.isspace():
        raise ValueError("a channel needs a target: host:port or unix:/path")
    merged = dict(CHANNEL_OPTIONS)
    merged.update(overrides)
    return list(merged.items())


def _missing(fixed: Metadata, given: Sequence[tuple[str, Any]]) -> tuple[tuple[str, str], ...]:
    """The channel's fixed entries, then the caller's trace context, each unless the call sets that key
    itself: a call that brings its own ``authorization`` (the agent writing a run with that run's token)
    keeps it."""
    source = _Propagation.source
    added = (*fixed, *source()) if source is not None else fixed
    if not given:
        return tuple(added)
    keys = {key for key, _ in given}
    return tuple((key, value) for key, value in added if key not in keys)


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata and the trace context to every call of a sync channel."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = tuple(metadata)

    def _with_metadata(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        given = tuple(details.metadata or ())
        added = _missing(self._metadata, given)
        if not added:
            return details
        return details._replace(metadata=(*given, *added))  # type: ignore[attr-defined, no-any-return]

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_metadata(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_metadata(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Iterator[Any]
    ) -> Any:
        return continuation(self._with_metadata(details), requests)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Iterator[Any]
    ) -> Any:
        return continuation(self._with_metadata(details), requests)


class _AioMetadata:
    """Adds fixed metadata and the trace context to every call of a grpc.aio channel. grpc.aio files an
    interceptor under the first call kind it implements only, hence one class per kind below."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = tuple(metadata)

    def _with_metadata(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        given = tuple(details.metadata or ())
        added = _missing(self._metadata, given)
        if not added:
            return details
        return details._replace(metadata=grpc.aio.Metadata(*given, *added))  # type: ignore[attr-defined, no-any-return]


class _AioUnaryUnary(_AioMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_metadata(details), request)


class _AioUnaryStream(_AioMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_metadata(details), request)


class _AioStreamUnary(_AioMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, details: Any, requests: AsyncIterable[Any] | Iterable[Any]
    ) -> Any:
        return await continuation(self._with_metadata(details), requests)


class _AioStreamStream(_AioMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, details: Any, requests: AsyncIterable[Any] | Iterable[Any]
    ) -> Any:
        return await continuation(self._with_metadata(details), requests)


def _aio_interceptors(metadata: Metadata) -> list[grpc.aio.ClientInterceptor]:
    return [kind(metadata) for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


def tls_credentials(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials that check the server against ``ca_file`` (else the system's roots) and, for
    mutual TLS, present ``cert_file`` with ``key_file``."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both its certificate file and its key file")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes() if ca_file else None,
        private_key=key_file.read_bytes() if key_file else None,
        certificate_chain=cert_file.read_bytes() if cert_file else None,
    )
