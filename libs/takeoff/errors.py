"""The exceptions the Takeoff client raises for an API error, built from the server's rich status.

Servers put a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer, carrying an ``ErrorInfo``
(``reason`` such as ``JOB_NOT_FOUND``, domain ``takeoff.dev``) and, for invalid input, a ``BadRequest`` with
one field violation per problem. ``takeoff_rpc`` decodes them; :class:`TakeoffError` exposes them as plain
attributes (no gRPC types), so callers branch on the class or on ``error.reason`` instead of parsing
messages::

    try:
        client.get_job("train")
    except takeoff.NotFoundError:
        ...

Each gRPC status code has its subclass (``NotFoundError``, ``InvalidArgumentError``...); a code without
one (``INTERNAL``, ``UNIMPLEMENTED``...) raises :class:`TakeoffError` itself.

A call without a key (``UNAUTHENTICATED`` ``KEY_MISSING``) says how to get one; a refused one
(``PERMISSION_DENIED``) names the permission it lacked. No message holds a key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from takeoff_rpc.backoff import TRANSIENT_CODE_NAMES
from takeoff_rpc.status import FieldViolation, RpcStatus, StatusDetails, decode_rpc_error

if TYPE_CHECKING:
    import grpc

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TakeoffError",
    "UnauthenticatedError",
    "UnavailableError",
]


class TakeoffError(Exception):
    """An error reported by a Takeoff service (or by the transport on the way to it).

    ``code`` is the gRPC status code's name (``NOT_FOUND``); ``reason`` the UPPER_SNAKE ``ErrorInfo``
    reason (``JOB_NOT_FOUND``, ``CONFIG_INVALID``, ...), or the code's name when the server sent none, as
    when it cannot be reached; ``violations`` one :class:`FieldViolation` per invalid field; ``metadata``
    the ``ErrorInfo`` metadata (``retry_after_seconds``, ``permission``...).
    """

    def __init__(
        self,
        code: str,
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
        """Whether the same call may succeed later without changing it
        (``takeoff_rpc.backoff.TRANSIENT_CODE_NAMES``)."""
        return self.code in TRANSIENT_CODE_NAMES

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, *, target: str = "") -> TakeoffError:
        """Decode a failed call into the subclass for its code; ``target`` (the address dialled) makes
        "cannot connect" errors readable."""
        status = decode_rpc_error(error, target=target)
        return cls.from_status(status.code.name, status)

    @classmethod
    def from_status(cls, code: str, status: StatusDetails | RpcStatus) -> TakeoffError:
        """The subclass for ``code`` (its name) carrying ``status``: a failed call's details, from gRPC or
        from the run relay (docs/design.md §8)."""
        message = status.message
        if code == "UNAUTHENTICATED" and status.reason == "KEY_MISSING":
            # Imported here: the hint reads TAKEOFF_HOME, which plain error handling never needs.
            from takeoff._auth import missing_key_hint

            message = f"no API key was found: {missing_key_hint()}"
        return error_for(code, status.reason, message, metadata=status.metadata, violations=status.violations)


class InvalidArgumentError(TakeoffError):
    """The request is invalid whatever the state (``INVALID_ARGUMENT``, ``OUT_OF_RANGE``); ``violations``
    names each bad field."""


class NotFoundError(TakeoffError):
    """A resource the request names does not exist (``NOT_FOUND``)."""


class AlreadyExistsError(TakeoffError):
    """The resource to create exists already (``ALREADY_EXISTS``)."""


class PermissionDeniedError(TakeoffError):
    """The key lacks the permission (``PERMISSION_DENIED``); ``metadata["permission"]`` names it."""


class UnauthenticatedError(TakeoffError):
    """No key, or one that is malformed, unknown or revoked (``UNAUTHENTICATED``)."""


class FailedPreconditionError(TakeoffError):
    """The resource is not in a state that allows the call (``FAILED_PRECONDITION``)."""


class AbortedError(TakeoffError):
    """The call lost a race with another and may be retried from the start (``ABORTED``)."""


class ResourceExhaustedError(TakeoffError):
    """Over a limit (``RESOURCE_EXHAUSTED``); for ``RATE_LIMITED``, ``metadata["retry_after_seconds"]``."""


class UnavailableError(TakeoffError):
    """The service cannot be reached or is shutting down (``UNAVAILABLE``); retrying may succeed."""


class DeadlineExceededError(TakeoffError):
    """No answer before the call's deadline (``DEADLINE_EXCEEDED``)."""


_CLASS_FOR_CODE: dict[str, type[TakeoffError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "OUT_OF_RANGE": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "ALREADY_EXISTS": AlreadyExistsError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "ABORTED": AbortedError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
}


def error_for(
    code: str,
    reason: str,
    message: str,
    *,
    metadata: Mapping[str, str] | None = None,
    violations: Sequence[FieldViolation] = (),
) -> TakeoffError:
    """The error of the class that ``code`` (a gRPC status code's name) calls for."""
    kind = _CLASS_FOR_CODE.get(code, TakeoffError)
    return kind(code, reason, message, metadata=metadata, violations=violations)
