"""gRPC channels to Takeoff services, with the caller's credentials on every call."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

Metadata = Sequence[tuple[str, str]]


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (an API key, later a run token) to every call."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = tuple(metadata)

    def _with_metadata(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=(*(details.metadata or ()), *self._metadata))  # type: ignore[attr-defined, no-any-return]

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


def open_channel(
    address: str,
    *,
    api_key: str | None = None,
    metadata: Metadata = (),
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to ``address`` (``host:port`` or ``unix:/path``) sending ``api_key`` as a bearer token.

    ``options`` are gRPC channel arguments, e.g. ``("grpc.max_reconnect_backoff_ms", 2000)``.
    """
    extra = [*metadata, *((("authorization", f"Bearer {api_key}"),) if api_key else ())]
    channel = grpc.insecure_channel(address, options=list(options))
    if extra:
        channel = grpc.intercept_channel(channel, _MetadataInterceptor(extra))
    return channel
