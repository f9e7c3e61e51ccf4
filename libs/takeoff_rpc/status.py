"""A failed call's rich status, decoded once for every client: the SDK, the services, the agent.

Takeoff's servers put a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer, carrying an
``ErrorInfo`` (``reason`` such as ``JOB_NOT_FOUND``, domain ``takeoff.dev``, metadata) and, for invalid
input, a ``BadRequest`` with one field violation per problem. :func:`decode_rpc_error` turns a sync or a
grpc.aio ``RpcError`` into an :class:`RpcStatus` holding them as plain values; the SDK builds its
``TakeoffError`` from it, the services their domain errors (``takeoff_server.remote_errors``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple, Protocol, cast

from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    import grpc

STATUS_DETAILS_KEY = "grpc-status-details-bin"
_NO_METADATA: Mapping[str, str] = MappingProxyType({})

# Named tuples, not dataclasses: a launched job decodes its relayed calls' errors with these, and importing
# dataclasses (with the inspect module it loads) would cost every job about 20 ms of CPU at start-up.


class FieldViolation(NamedTuple):
    """One problem with one request field; ``field`` is a dotted path such as ``version.entrypoint``."""

    field: str
    description: str


class StatusDetails(NamedTuple):
    """What a ``google.rpc.Status`` (the ``grpc-status-details-bin`` trailer) says beyond its code.
    ``reason`` is the ``ErrorInfo`` reason; when the server sent none (it could not be reached, or is not
    a Takeoff server) it is the code's name, such as ``UNAVAILABLE``."""

    reason: str
    message: str
    domain: str = ""
    metadata: Mapping[str, str] = _NO_METADATA
    violations: tuple[FieldViolation, ...] = ()


class RpcStatus(NamedTuple):
    """How a gRPC call failed: its code and the details (the fields of :class:`StatusDetails`)."""

    reason: str
    message: str
    code: grpc.StatusCode
    domain: str = ""
    metadata: Mapping[str, str] = _NO_METADATA
    violations: tuple[FieldViolation, ...] = ()


class _FailedCall(Protocol):
    """What both a sync ``grpc.RpcError`` (also a ``grpc.Call``) and a ``grpc.aio.AioRpcError`` offer."""

    def code(self) -> grpc.StatusCode: ...

    def details(self) -> str | None: ...

    def trailing_metadata(self) -> Iterable[tuple[str, str | bytes]] | None: ...


def status_code(error: grpc.RpcError) -> grpc.StatusCode:
    """The code of an error a sync or a grpc.aio call raised (the ``RpcError`` type has no ``code``)."""
    return cast(_FailedCall, error).code()


def decode_rpc_error(error: grpc.RpcError, *, target: str = "") -> RpcStatus:
    """Decode a failed call; ``target`` (the address dialled) makes "cannot connect" errors readable."""
    import grpc  # loaded already: the error came from it

    call = cast(_FailedCall, error)
    code = call.code()
    message = call.details() or code.name.lower()
    raw = _details_trailer(call.trailing_metadata())
    if raw is None and code is grpc.StatusCode.UNAVAILABLE and target:
        message = f"cannot reach {target} ({message})"
    details = parse_status_details(raw, code.name, message)
    return RpcStatus(
        details.reason, details.message, code, details.domain, details.metadata, details.violations
    )


def parse_status_details(raw: bytes | None, code_name: str, message: str) -> StatusDetails:
    """The reason, message, metadata and field violations in ``raw`` (a serialized ``google.rpc.Status``),
    or, without one, the code's name as the reason and ``message``. Free of gRPC: the SDK reads a relayed
    call's status with it (docs/design.md §8 "The run relay")."""
    if not raw:
        return StatusDetails(code_name, message)
    status = status_pb2.Status.FromString(raw)
    reason, domain, metadata = code_name, "", {}
    violations: tuple[FieldViolation, ...] = ()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason or code_name, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations = tuple(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return StatusDetails(reason, status.message or message, domain, metadata, violations)


def _details_trailer(trailers: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return value
    return None
