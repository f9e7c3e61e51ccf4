"""Pins job references through the registry's JobService: the queue's only view of jobs."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from takeoff.v1 import jobs_pb2, jobs_pb2_grpc
from takeoff_queue.model import ResolvedJob, SourceKind
from takeoff_server.errors import FieldViolation, InvalidArgument, NotFound, TakeoffError, Unavailable
from takeoff_server.protovalues import struct_to_dict

RESOLVE_TIMEOUT_SECONDS = 10.0


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


def _as_domain_error(error: grpc.aio.AioRpcError, reference: str) -> TakeoffError:
    info = _error_info(error)
    reason = info.reason if info is not None else ""
    message = error.details() or "the registry refused the job reference"
    code = error.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(reason or "JOB_NOT_FOUND", message, metadata={"job": reference})
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(reason or "NAME_INVALID", message, violations=[FieldViolation("job", message)])
    return Unavailable(
        "DEPENDENCY_UNAVAILABLE",
        f"the registry could not resolve {reference!r} ({code.name}): {message}",
        metadata={"job": reference},
    )


class RegistryJobs:
    """A ``JobResolver`` backed by the registry at ``address``."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)

    async def resolve(self, project: str, reference: str) -> ResolvedJob:
        try:
            response = await self._jobs.GetJobVersion(
                jobs_pb2.GetJobVersionRequest(name=reference, project=project),
                timeout=RESOLVE_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as error:
            raise _as_domain_error(error, reference) from None
        version = response.version
        inputs = version.inputs
        return ResolvedJob(
            version_name=version.name,
            source_kind=SourceKind(version.source.WhichOneof("source") or "code"),
            entrypoint=list(version.entrypoint),
            input_schema=struct_to_dict(inputs.schema) if inputs.HasField("schema") else None,
            default_config=struct_to_dict(inputs.defaults) if inputs.HasField("defaults") else {},
            version_proto=version.SerializeToString(),
        )

    async def close(self) -> None:
        await self._channel.close()
