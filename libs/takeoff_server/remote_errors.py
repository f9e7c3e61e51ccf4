"""A dependency's refusal, decoded by ``takeoff_rpc``, as this service's own domain error.

When a service calls another on its caller's behalf (the queue resolving a job at the registry), an answer
about the request itself keeps its code and reason: the caller named a job that does not exist, or wrote
its name wrongly. Anything else (the dependency is down, slow, failing, or refuses this service) is not
the caller's doing: it becomes ``DEPENDENCY_UNAVAILABLE``, which a caller may retry. The service does not
retry itself (``takeoff_rpc.retries`` says why).
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from takeoff_rpc.status import RpcStatus
from takeoff_server import errors

_ABOUT_THE_REQUEST: dict[grpc.StatusCode, type[errors.TakeoffError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
}


def domain_error(
    remote: RpcStatus, *, action: str, field: str, metadata: Mapping[str, str] | None = None
) -> errors.TakeoffError:
    """The error to answer with after ``remote`` failed ``action`` (e.g. "the registry at X resolving
    'train:v3'"). ``field`` is the caller's request field the remote call came from: the remote's field
    violations are reported on it, since the caller never saw the remote request's fields (an invalid
    argument without any gets one made of the message). ``metadata`` is added to the remote's."""
    error_type = _ABOUT_THE_REQUEST.get(remote.code)
    if error_type is None:
        return errors.Unavailable(
            "DEPENDENCY_UNAVAILABLE",
            f"{action} failed ({remote.code.name}): {remote.message}",
            metadata=metadata,
        )
    violations = [errors.FieldViolation(field, v.description) for v in remote.violations]
    if not violations and remote.code is grpc.StatusCode.INVALID_ARGUMENT:
        violations = [errors.FieldViolation(field, remote.message)]
    return error_type(
        remote.reason, remote.message, metadata={**remote.metadata, **(metadata or {})}, violations=violations
    )
