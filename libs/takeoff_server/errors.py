"""Domain errors: what went wrong, in words the API can carry, without any gRPC in sight.

Domain code raises these; the server's error interceptor turns them into a gRPC status whose details hold
a ``google.rpc.ErrorInfo`` (``reason``, domain ``takeoff.dev``) and, for invalid input, a
``google.rpc.BadRequest`` with one field violation per problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ERROR_DOMAIN = "takeoff.dev"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One problem with one request field; ``field`` is a dotted path such as ``job.entrypoint[0]``."""

    field: str
    description: str


class TakeoffError(Exception):
    """Base of every error the API reports on purpose.

    ``reason`` is an UPPER_SNAKE constant clients may branch on (``JOB_NOT_FOUND``); ``message`` is for
    people; ``metadata`` adds machine-readable context to the ``ErrorInfo``.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        violations: Iterable[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)


class InvalidArgument(TakeoffError):
    """The request itself is wrong, whatever the state of the system."""


class NotFound(TakeoffError):
    """A named resource does not exist."""


class AlreadyExists(TakeoffError):
    """A resource with that name exists already."""


class FailedPrecondition(TakeoffError):
    """The request is well formed but the system is not in a state to carry it out."""


class ResourceExhausted(TakeoffError):
    """A size or quota limit was reached."""


class Unauthenticated(TakeoffError):
    """The caller did not say who it is, or said it wrongly."""


class PermissionDenied(TakeoffError):
    """The caller is known but may not do this."""


class Aborted(TakeoffError):
    """The call lost a race with another (e.g. a newer session of the same agent); start over."""


class Unavailable(TakeoffError):
    """A dependency (another service, the Docker engine) cannot be reached; retrying may help."""


class ServiceFailed(Exception):
    """A service process cannot go on (e.g. the agent's queues refuse it); the message says why."""
