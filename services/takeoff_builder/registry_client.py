"""The registry as the builder sees it: job versions to build and the code artifacts they name.

A refusal by the registry is answered as the builder's own error (``takeoff_server.remote_errors``), at
once: the agent that asked for the build retries an unavailable registry, not the builder.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import grpc.aio

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
from takeoff_rpc.status import decode_rpc_error
from takeoff_server.remote_errors import domain_error
from takeoff_server.versions import VersionCache, names_a_numbered_version

RESOLVE_TIMEOUT_SECONDS = 10.0
DOWNLOAD_TIMEOUT_SECONDS = 600.0


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
    """JobService of the registry at ``address``, over ``channel`` (which presents the builder's own key:
    ``takeoff_server.peers.peer_channel``)."""

    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self.address = address
        self._channel = channel
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._versions: VersionCache[str, JobSpec] = VersionCache()

    async def job_version(self, reference: str) -> JobSpec:
        """The version a fully qualified job reference names; registry errors become the API's. One named
        by its number (an agent's build, always) is asked for once and kept: it never changes."""
        numbered = names_a_numbered_version(reference)
        if numbered and (kept := self._versions.get(reference)) is not None:
            return kept
        try:
            response = await self._jobs.GetJobVersion(
                jobs_pb2.GetJobVersionRequest(name=reference), timeout=RESOLVE_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            raise domain_error(
                decode_rpc_error(error, target=self.address),
                action=f"the registry at {self.address} resolving {reference!r}",
                field="job_version",
                metadata={"resource": reference},
            ) from None
        spec = job_spec_from_proto(response.version)
        if numbered:
            self._versions.put(reference, spec)
        return spec

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
            failure = decode_rpc_error(error, target=self.address)
            if failure.code is grpc.StatusCode.NOT_FOUND:
                raise BuildFailed(f"the code artifact {name} does not exist in the registry") from None
            raise BuildInfraError(
                f"downloading {name} from the registry at {self.address} failed "
                f"({failure.reason}): {failure.message}"
            ) from None
        if digest.hexdigest() != sha256:
            raise BuildInfraError(f"the download of {name} does not hash to its sha256; try again")

    async def close(self) -> None:
        await self._channel.close()
