"""The one exception the Takeoff client raises for an API error, built from the server's rich status.

Servers put a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer, carrying an ``ErrorInfo``
(``reason`` such as ``JOB_NOT_FOUND``, domain ``takeoff.dev``) and, for invalid input, a ``BadRequest`` with
one field violation per problem. :class:`TakeoffError` exposes them as plain attributes, so callers branch
on ``error.reason`` instead of parsing messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Codes that say "try again later": the server is restarting, a deadline passed, a transient failure.
_RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one request field; ``field`` is a dotted path such as ``version.entrypoint``."""

    field: str
    description: str


class TakeoffError(Exception):
    """An error reported by a Takeoff service (or by the transport on the way to it).

    ``reason`` is the UPPER_SNAKE ``ErrorInfo`` reason (``JOB_NOT_FOUND``, ``CONFIG_INVALID``, ...); when
    the server sent none, as when it cannot be reached, it is the gRPC code's name (``UNAVAILABLE``).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)

    def __str__(self) -> str:
        text = f"{self.reason}: {self.message}"
        problems = [f"{v.field}: {v.description}" for v in self.violations]
        # A single violation usually repeats the message; show it only when it adds something.
        if problems and (len(problems) > 1 or self.violations[0].description not in self.message):
            text += " (" + "; ".join(problems) + ")"
        return text

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later without changing it."""
        return self.code in _RETRYABLE_CODES

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, *, target: str = "") -> TakeoffError:
        """Decode a failed call; ``target`` (the address dialled) makes "cannot connect" errors readable."""
        call: grpc.Call = error  # type: ignore[assignment]  # every RpcError grpc raises is also a Call
        code = call.code()
        message = call.details() or code.name.lower()
        status = _rich_status(call.trailing_metadata())
        if status is None:
            if code is grpc.StatusCode.UNAVAILABLE and target:
                message = f"cannot reach {target} ({message})"
            return cls(code, code.name, message)
        reason, metadata, violations = code.name, {}, []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations = [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
        return cls(code, reason, status.message or message, metadata=metadata, violations=violations)


def _rich_status(trailers: Sequence[tuple[str, str | bytes]] | None) -> status_pb2.Status | None:
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None
