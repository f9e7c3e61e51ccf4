"""A failed call's rich status, decoded once for every client: the SDK, the services, the agent.

Takeoff's servers put a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer, carrying an
``ErrorInfo`` (``reason`` such as ``JOB_NOT_FOUND``, domain ``takeoff.dev``, metadata) and, for invalid
input, a ``BadRequest`` with one field violation per problem. :func:`decode_rpc_error` turns a sync or a
grpc.aio ``RpcError`` into an :class:`RpcStatus` holding them as plain values; the SDK builds its
``TakeoffError`` from it, the services their domain errors (``takeoff_server.remote_errors``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One problem with one request field; ``field`` is a dotted path such as ``version.entrypoint``."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class RpcStatus:
    """How a call failed. ``reason`` is the ``ErrorInfo`` reason; when the server sent none (it could not
    be reached, or is not a Takeoff server) it is the gRPC code's name, such as ``UNAVAILABLE``."""

    code: grpc.StatusCode
    reason: str
    message: str
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
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
    call = cast(_FailedCall, error)
    code = call.code()
    message = call.details() or code.name.lower()
    status = _rich_status(call.trailing_metadata())
    if status is None:
        if code is grpc.StatusCode.UNAVAILABLE and target:
            message = f"cannot reach {target} ({message})"
        return RpcStatus(code, code.name, message)
    reason, domain, metadata = code.name, "", {}
    violations: tuple[FieldViolation, ...] = ()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason or code.name, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations = tuple(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return RpcStatus(code, reason, status.message or message, domain, metadata, violations)


def _rich_status(trailers: Iterable[tuple[str, str | bytes]] | None) -> status_pb2.Status | None:
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None
