"""The one exception the Takeoff client raises for an API error, built from the server's rich status.

Servers put a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer, carrying an ``ErrorInfo``
(``reason`` such as ``JOB_NOT_FOUND``, domain ``takeoff.dev``) and, for invalid input, a ``BadRequest`` with
one field violation per problem. ``takeoff_rpc`` decodes them; :class:`TakeoffError` exposes them as plain
attributes, so callers branch on ``error.reason`` instead of parsing messages.

A call without a key (``UNAUTHENTICATED`` ``KEY_MISSING``) says how to get one; a refused one
(``PERMISSION_DENIED``) names the permission it lacked. No message holds a key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc

from takeoff_rpc.retries import TRANSIENT_CODES
from takeoff_rpc.status import FieldViolation, decode_rpc_error

__all__ = ["FieldViolation", "TakeoffError"]


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
        """Whether the same call may succeed later without changing it (``takeoff_rpc.TRANSIENT_CODES``)."""
        return self.code in TRANSIENT_CODES

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, *, target: str = "") -> TakeoffError:
        """Decode a failed call; ``target`` (the address dialled) makes "cannot connect" errors readable."""
        status = decode_rpc_error(error, target=target)
        message = status.message
        if status.code is grpc.StatusCode.UNAUTHENTICATED and status.reason == "KEY_MISSING":
            # Imported here: the hint reads TAKEOFF_HOME, which plain error handling never needs.
            from takeoff._auth import missing_key_hint

            message = f"no API key was found: {missing_key_hint()}"
        return cls(
            status.code, status.reason, message, metadata=status.metadata, violations=status.violations
        )
