"""The registry as the builder sees it: job versions to build and the code artifacts they name."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

from takeoff.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from takeoff_builder.model import (
    BuildFailed,
    BuildInfraError,
    CodeSource,
    Environment,
    GitSource,
    ImageSource,
    JobSpec,
    Source,
)
from takeoff_server.errors import FieldViolation, InvalidArgument, NotFound, TakeoffError, Unavailable

RESOLVE_TIMEOUT_SECONDS = 10.0
DOWNLOAD_TIMEOUT_SECONDS = 600.0


def _error_reason(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return ""


def _source(message: common_pb2.JobSource) -> Source:
    match message.WhichOneof("source"):
        case "code":
            return CodeSource(message.code.sha256)
        case "git":
            return GitSource(message.git.url, message.git.commit)
        case "image":
            return ImageSource(message.image.reference)
    raise BuildFailed("the job version has no source")


def job_spec_from_proto(version: common_pb2.JobVersion) -> JobSpec:
    environment = version.environment
    return JobSpec(
        version_name=version.name,
        source=_source(version.source),
        entrypoint=tuple(version.entrypoint),
        environment=Environment(
            python_version=environment.python_version,
            requirements=environment.requirements,
            base_image=environment.base_image,
            dockerfile=environment.dockerfile,
            build_context=environment.build_context,
        ),
    )


class RegistryClient:
    """JobService of the registry at ``address``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address)
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)

    async def job_version(self, reference: str) -> JobSpec:
        """The version a fully qualified job reference names; registry errors become the API's."""
        try:
            response = await self._jobs.GetJobVersion(
                jobs_pb2.GetJobVersionRequest(name=reference), timeout=RESOLVE_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            raise self._resolve_error(error, reference) from None
        return job_spec_from_proto(response.version)

    def _resolve_error(self, error: grpc.aio.AioRpcError, reference: str) -> TakeoffError:
        reason = _error_reason(error)
        message = error.details() or "the registry refused the job reference"
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return NotFound(reason or "JOB_NOT_FOUND", message, metadata={"resource": reference})
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(
                reason or "NAME_INVALID", message, violations=[FieldViolation("job_version", message)]
            )
        return Unavailable(
            "DEPENDENCY_UNAVAILABLE",
            f"the registry at {self.address} could not resolve {reference!r} "
            f"({error.code().name}): {message}",
        )

    async def download_artifact(self, project: str, sha256: str, destination: Path) -> None:
        """Write the artifact's bytes to ``destination``, checking they hash to ``sha256``."""
        name = f"projects/{project}/artifacts/{sha256}"
        digest = hashlib.sha256()
        try:
            with destination.open("wb") as file:
                async for message in self._jobs.DownloadArtifact(
                    jobs_pb2.DownloadArtifactRequest(name=name), timeout=DOWNLOAD_TIMEOUT_SECONDS
                ):
                    if message.WhichOneof("part") == "chunk":
                        digest.update(message.chunk)
                        await asyncio.to_thread(file.write, message.chunk)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise BuildFailed(f"the code artifact {name} does not exist in the registry") from None
            raise BuildInfraError(
                f"downloading {name} from the registry at {self.address} failed "
                f"({error.code().name}): {error.details()}"
            ) from None
        if digest.hexdigest() != sha256:
            raise BuildInfraError(f"the download of {name} does not hash to its sha256; try again")

    async def close(self) -> None:
        await self._channel.close()
