"""Channels to Takeoff services: one set of options for the SDK (sync gRPC) and the services (grpc.aio).

A target is ``host:port``, ``unix:/path``, ``dns:///name:port``, or a list ``host:port,host:port`` of a
service's replicas to fail over between (:func:`dial_target`). Every channel gets :data:`CHANNEL_OPTIONS`;
``metadata`` (an API key, later a run token) is added to every call by an interceptor, and ``credentials``
make the channel a TLS one, so adding authentication later changes the callers' arguments, not this
plumbing.

The same interceptor adds the caller's W3C trace context (``traceparent``, ``tracestate``) to every call
once the process's tracing has named where to read it (:func:`propagate_trace_context`), so the server's
span continues the caller's trace and no caller can forget to pass it on (docs/design.md §9).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
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
    # Not `grpc.min_reconnect_backoff_ms`: gRPC's core takes it as the least time a connection attempt is
    # given (default 20 s), and at 100 ms a server slower than that to send its SETTINGS (a loaded machine,
    # a TLS handshake across a WAN) failed every call UNAVAILABLE "timed out before receiving SETTINGS".
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


TARGET_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")
"""Targets in gRPC's own naming, passed on unchanged; ``dns:///name:port`` gives every address the name
resolves to (all its A records) to pick_first, which makes one DNS name a list of replicas."""
TARGET_FORMS = "host:port, [ipv6]:port, a list host:port,host:port, unix:/path or dns:///name:port"


class TargetError(ValueError):
    """A target that cannot be dialled as written: a malformed list, or one mixing address families."""


class UnresolvedTarget(OSError):
    """A host of a list that does not resolve now (an OSError, as getaddrinfo's own errors are: a process
    that cannot start for it says so in one line, and one already running may try again later)."""


@dataclass(frozen=True, slots=True)
class DialTarget:
    """What gRPC dials for a configured target, and the name the server's TLS certificate is checked
    against (None: gRPC's own, the target's host)."""

    target: str
    authority: str | None = None


def dial_target(target: str) -> DialTarget:
    """What gRPC dials for ``target``, which may list several replicas of one service as
    ``host:port,host:port`` (``[v6]:port`` too); one ``host:port`` and gRPC's own targets
    (:data:`TARGET_SCHEMES`) pass through unchanged. Raises TargetError naming a malformed entry, and
    UnresolvedTarget naming a host that does not resolve.

    A list becomes one ``ipv4:`` (or ``ipv6:``) target holding each entry's addresses in order: gRPC's
    pick_first policy connects to the first that answers and, once that connection breaks, starts again
    from the top, so the caller's next call (a retried one, the agent's next Lease session) goes to the
    first replica still up. Pick_first, not round_robin: a Lease session is one stream on one replica
    either way, and round_robin would hold a connection from every client to every replica and spread
    each client's calls over them for no gain (any replica answers any call), so that one replica's
    failure would reach every client's calls, not only those of the clients using it.

    Names are resolved once, here (getaddrinfo); a name whose addresses change belongs in ``dns:///``,
    which gRPC resolves again itself. IPv4 is used when every entry has an IPv4 address (the services'
    default listen addresses), else IPv6: gRPC takes one family per target.

    The certificate is checked against the first entry's host (the authority), so under TLS every
    replica's certificate must name it: give replicas a shared name, or use ``dns:///``."""
    entries = _entries(target)
    if entries is None:
        return DialTarget(target.strip())
    resolved = [(entry, _resolve(target, index, entry)) for index, entry in enumerate(entries, 1)]
    for family, scheme in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        if all(any(f == family for f, _ in addresses) for _, addresses in resolved):
            picked = [address for _, addresses in resolved for f, address in addresses if f == family]
            return DialTarget(f"{scheme}:{','.join(dict.fromkeys(picked))}", entries[0])
    v4 = [entry for entry, addresses in resolved if any(f == socket.AF_INET for f, _ in addresses)]
    v6 = [entry for entry in entries if entry not in v4]
    raise TargetError(
        f"{target!r} mixes IPv4-only hosts ({', '.join(v4)}) with IPv6-only ones ({', '.join(v6)}); "
        "a list must share one address family"
    )


def check_target(target: str) -> str:
    """``target`` unchanged if :func:`dial_target` can take it apart, else TargetError naming the entry;
    nothing is resolved (for settings, checked before any name service is asked)."""
    _entries(target)
    return target


def _entries(target: str) -> list[str] | None:
    """The entries of a list target, each checked to be ``host:port``; None for a target passed on
    unchanged."""
    stripped = target.strip()
    if not stripped:
        raise TargetError(f"a channel needs a target: {TARGET_FORMS}")
    if "," not in stripped or stripped.startswith(TARGET_SCHEMES):
        return None
    entries = [entry.strip() for entry in stripped.split(",")]
    for index, entry in enumerate(entries, 1):
        _host_port(target, index, entry)
    return entries


def _host_port(target: str, index: int, entry: str) -> tuple[str, int]:
    """Entry ``index`` (1-based) of the list ``target``: its host (brackets gone) and port."""
    where = f"entry {index} of {target!r}"
    if not entry:
        raise TargetError(f"{where} is empty; a list is host:port,host:port")
    if entry.startswith(TARGET_SCHEMES):
        raise TargetError(f"{where} ({entry!r}) names a scheme; a list holds host:port entries only")
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        sep, port = rest[:1], rest[1:]
        valid_host = bool(bracket) and _is_ipv6(host)
    else:
        host, sep, port = entry.rpartition(":")
        valid_host = bool(host) and ":" not in host
    if not (sep == ":" and valid_host and port.isdigit() and 0 < int(port) < 65536):
        raise TargetError(f"{where} ({entry!r}) is not host:port or [ipv6]:port with a port of 1-65535")
    return host, int(port)


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def _resolve(target: str, index: int, entry: str) -> list[tuple[int, str]]:
    """Entry ``index`` of the list ``target`` as (family, address for an ipv4:/ipv6: target) pairs, in
    the order getaddrinfo gives them (a numeric host is taken as it is)."""
    host, port = _host_port(target, index, entry)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UnresolvedTarget(
            f"entry {index} of {target!r}: cannot resolve {host!r} ({error.strerror})"
        ) from None
    addresses: list[tuple[int, str]] = []
    for family, _, _, _, sockaddr in infos:
        if family == socket.AF_INET:
            addresses.append((family, f"{sockaddr[0]}:{port}"))
        elif family == socket.AF_INET6:
            addresses.append((family, f"[{sockaddr[0]}]:{port}"))
    return addresses


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
    """A sync channel to ``target`` (a list of replicas too, :func:`dial_target`); ``options`` override or
    extend :data:`CHANNEL_OPTIONS`."""
    dial = dial_target(target)
    merged = _options(dial, options)
    if credentials is None:
        channel = grpc.insecure_channel(dial.target, options=merged)
    else:
        channel = grpc.secure_channel(dial.target, credentials, options=merged)
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
    dial = dial_target(target)
    merged = _options(dial, options)
    interceptors = _aio_interceptors(_call_metadata(api_key=api_key, metadata=metadata))
    if credentials is None:
        return grpc.aio.insecure_channel(dial.target, options=merged, interceptors=interceptors)
    return grpc.aio.secure_channel(dial.target, credentials, options=merged, interceptors=interceptors)


def _options(dial: DialTarget, overrides: ChannelOptions) -> list[tuple[str, Any]]:
    merged: dict[str, Any] = dict(CHANNEL_OPTIONS)
    if dial.authority is not None:
        # An ipv4:/ipv6: target's own authority would be its list of addresses; the certificate names the
        # host the operator wrote.
        merged["grpc.default_authority"] = dial.authority
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
