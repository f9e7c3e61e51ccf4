"""The console's calls to the services, the registry (jobs, runs, artifacts) and the queue, with the
user's key.

One grpc.aio channel per service is shared by every browser; each call carries its user's key as
``authorization: Bearer``, so the services decide what each person may see and do, exactly as for the CLI.
A failed call becomes :class:`CallFailed` holding the decoded rich status (reason, permission, field
violations) for the page to explain. Reads are retried briefly while a service restarts; changes are not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from takeoff.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    common_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    queue_pb2,
    queue_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
)
from takeoff_rpc.backoff import RetryPolicy
from takeoff_rpc.channels import open_aio_channel, tls_credentials
from takeoff_rpc.retries import TRANSIENT_CODES, call_with_retries_async
from takeoff_rpc.status import RpcStatus, decode_rpc_error, status_code

T = TypeVar("T")
R = TypeVar("R")
Unary = grpc.aio.UnaryUnaryMultiCallable

CALL_TIMEOUT_SECONDS = 10.0
READ_RETRIES = RetryPolicy(initial_delay=0.1, max_delay=1.0, deadline=3.0)
"""A page waits at most about this long for a restarting service before it says the service is away."""
MAX_ATTEMPTS_SHOWN = 32
"""Earlier attempts a run page follows back through ``resumed_from`` (an item has its max_attempts)."""
MAX_CODE_ARCHIVE_BYTES = 64 * 1024 * 1024
"""The largest code tarball the file browser downloads; a bigger one is described, not opened."""


class CallFailed(Exception):
    """A call to a service failed; ``status`` says how, ``service`` which one."""

    def __init__(self, service: str, status: RpcStatus) -> None:
        super().__init__(f"{service}: {status.reason}: {status.message}")
        self.service = service
        self.status = status

    @property
    def code(self) -> grpc.StatusCode:
        return self.status.code


@dataclass(frozen=True)
class ServiceChannels:
    """The console's channels to the services, opened once at start."""

    registry: grpc.aio.Channel
    queue: grpc.aio.Channel
    registry_address: str
    queue_address: str

    @classmethod
    def open(cls, registry_address: str, queue_address: str, ca_file: Path | None = None) -> ServiceChannels:
        """Channels to both services; a ``host:port`` one checks the server against ``ca_file`` when given."""

        def channel(target: str) -> grpc.aio.Channel:
            secure = ca_file is not None and not target.startswith("unix:")
            credentials = tls_credentials(ca_file) if secure else None
            return open_aio_channel(target, credentials=credentials)

        return cls(channel(registry_address), channel(queue_address), registry_address, queue_address)

    async def close(self) -> None:
        await self.registry.close()
        await self.queue.close()

    def as_user(self, key: str) -> UserClient:
        return UserClient(self, key)


@dataclass(frozen=True)
class ArtifactDownload:
    """One file of an artifact version on its way: its entry (path, sha256, size), then its bytes."""

    file: artifacts_pb2.ArtifactFile
    chunks: AsyncIterator[bytes]
    cancel: Callable[[], object]
    """Ends the download without reading its bytes (a HEAD request); reading them to the end, or
    stopping part way, ends it too."""


FileCall = grpc.aio.UnaryStreamCall[
    artifacts_pb2.ReadArtifactFileRequest, artifacts_pb2.ReadArtifactFileResponse
]
OpenFile = Callable[[int], Awaitable[tuple[artifacts_pb2.ArtifactFile, FileCall]]]
"""Opens a file's stream at a byte offset: its entry and the call."""


def _protocol_error(message: str) -> RpcStatus:
    return RpcStatus("PROTOCOL_ERROR", message, code=grpc.StatusCode.INTERNAL)


class UserClient:
    """Every call the console makes, on behalf of one signed-in user (their key on each call)."""

    def __init__(self, channels: ServiceChannels, key: str) -> None:
        self._channels = channels
        self._metadata = (("authorization", f"Bearer {key}"),)
        self._jobs = jobs_pb2_grpc.JobServiceStub(channels.registry)
        self._runs = runs_pb2_grpc.RunServiceStub(channels.registry)
        self._artifacts = artifacts_pb2_grpc.ArtifactServiceStub(channels.registry)
        self._queues = queue_pb2_grpc.QueueServiceStub(channels.queue)

    def __repr__(self) -> str:  # the key stays out of any log or traceback
        return "UserClient(<key>)"

    async def _read(self, service: str, method: Unary[R, T], request: R) -> T:
        """A read, tried again while the service is briefly away (a restart)."""
        return await self._failing_as(
            service, call_with_retries_async(lambda: self._call(method, request), READ_RETRIES)
        )

    async def _list(self, service: str, method: Unary[R, T], request: R, *, empty: T) -> T:
        """A list; a project never written to holds nothing (the services answer PROJECT_NOT_FOUND)."""
        try:
            return await self._read(service, method, request)
        except CallFailed as failure:
            if failure.status.reason == "PROJECT_NOT_FOUND":
                return empty
            raise

    async def _change(self, service: str, method: Unary[R, T], request: R) -> T:
        """A change, sent once: a page never repeats what the user asked for once."""
        return await self._failing_as(service, self._call(method, request))

    def _call(self, method: Unary[R, T], request: R) -> Awaitable[T]:
        return method(request, metadata=self._metadata, timeout=CALL_TIMEOUT_SECONDS)

    async def _failing_as(self, service: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.RpcError as error:
            raise CallFailed(service, decode_rpc_error(error, target=self._target(service))) from None

    def _target(self, service: str) -> str:
        return self._channels.registry_address if service == "registry" else self._channels.queue_address

    # Sign-in: whether the registry takes the key at all. A key that may not read this project's jobs is
    # still a key (PERMISSION_DENIED, NOT_FOUND): only UNAUTHENTICATED means it is not one.
    async def key_is_valid(self, project: str) -> bool:
        try:
            await self.list_jobs(project, page_size=1)
        except CallFailed as failure:
            if failure.code is grpc.StatusCode.UNAUTHENTICATED:
                return False
            if failure.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
        return True

    # Registry: jobs.
    async def list_jobs(self, project: str, *, page_size: int = 200) -> list[jobs_pb2.Job]:
        request = jobs_pb2.ListJobsRequest(parent=f"projects/{project}", page_size=page_size)
        answer = await self._list("registry", self._jobs.ListJobs, request, empty=jobs_pb2.ListJobsResponse())
        return list(answer.jobs)

    async def get_job(self, name: str) -> jobs_pb2.Job:
        request = jobs_pb2.GetJobRequest(name=name)
        return (await self._read("registry", self._jobs.GetJob, request)).job

    async def list_versions(self, job: str, *, page_size: int = 100) -> list[common_pb2.JobVersion]:
        request = jobs_pb2.ListJobVersionsRequest(parent=job, page_size=page_size)
        answer = await self._read("registry", self._jobs.ListJobVersions, request)
        return list(answer.versions)

    async def get_version(self, name: str) -> common_pb2.JobVersion:
        request = jobs_pb2.GetJobVersionRequest(name=name)
        answer = await self._read("registry", self._jobs.GetJobVersion, request)
        return answer.version

    async def download_artifact(self, name: str) -> bytes | None:
        """The artifact's bytes, or None when it is larger than :data:`MAX_CODE_ARCHIVE_BYTES`."""
        request = jobs_pb2.DownloadArtifactRequest(name=name)

        async def download() -> bytes | None:
            chunks: list[bytes] = []
            stream = self._jobs.DownloadArtifact(request, metadata=self._metadata, timeout=60)
            async for part in stream:
                if part.HasField("artifact") and part.artifact.size_bytes > MAX_CODE_ARCHIVE_BYTES:
                    stream.cancel()
                    return None
                chunks.append(part.chunk)
            return b"".join(chunks)

        return await self._failing_as("registry", call_with_retries_async(download, READ_RETRIES))

    # Registry: runs.
    async def list_runs(
        self, project: str, *, page_size: int = 50, page_token: str = ""
    ) -> runs_pb2.ListRunsResponse:
        request = runs_pb2.ListRunsRequest(
            parent=f"projects/{project}", page_size=page_size, page_token=page_token
        )
        return await self._list("registry", self._runs.ListRuns, request, empty=runs_pb2.ListRunsResponse())

    async def get_run(self, name: str) -> runs_pb2.Run:
        request = runs_pb2.GetRunRequest(name=name)
        return (await self._read("registry", self._runs.GetRun, request)).run

    async def read_metrics(
        self, name: str, *, max_points: int, follow: bool, start_index: int = 0
    ) -> AsyncIterator[list[runs_pb2.MetricRow]]:
        request = runs_pb2.ReadMetricsRequest(
            name=name, max_points=max_points, follow=follow, start_index=start_index
        )
        async for answer in self._stream(
            "registry", self._runs.ReadMetrics(request, metadata=self._metadata)
        ):
            yield list(answer.rows)

    async def read_logs(self, name: str, *, tail: int, follow: bool) -> AsyncIterator[list[runs_pb2.LogLine]]:
        request = runs_pb2.ReadLogsRequest(name=name, tail=tail, follow=follow)
        async for answer in self._stream("registry", self._runs.ReadLogs(request, metadata=self._metadata)):
            yield list(answer.lines)

    async def run_attempts(self, run: runs_pb2.Run) -> tuple[list[runs_pb2.Run], list[runs_pb2.Run]]:
        """The runs ``run`` continues (``resumed_from``, back to the first), oldest first and ending with
        ``run``; and the runs that continue ``run``. An item's runs come in one ListRuns; a GetRun only for
        a run it lacks."""
        if not run.queue_item:
            return [run], []
        project = run.name.split("/")[1]
        request = runs_pb2.ListRunsRequest(
            parent=f"projects/{project}", queue_item=run.queue_item, page_size=1000
        )
        siblings = {r.name: r for r in (await self._read("registry", self._runs.ListRuns, request)).runs}
        chain = [run]
        while chain[-1].resumed_from and len(chain) < MAX_ATTEMPTS_SHOWN:
            earlier = chain[-1].resumed_from
            chain.append(siblings[earlier] if earlier in siblings else await self.get_run(earlier))
        resumed_by = sorted(
            (r for r in siblings.values() if r.resumed_from == run.name), key=lambda r: r.attempt
        )
        return chain[::-1], resumed_by

    # Registry: named artifacts.
    async def list_artifact_collections(
        self, project: str, *, page_token: str = ""
    ) -> artifacts_pb2.ListArtifactCollectionsResponse:
        request = artifacts_pb2.ListArtifactCollectionsRequest(
            parent=f"projects/{project}", page_size=100, page_token=page_token
        )
        empty = artifacts_pb2.ListArtifactCollectionsResponse()
        return await self._list("registry", self._artifacts.ListArtifactCollections, request, empty=empty)

    async def get_artifact_collection(self, name: str) -> artifacts_pb2.ArtifactCollection:
        request = artifacts_pb2.GetArtifactCollectionRequest(name=name)
        return (await self._read("registry", self._artifacts.GetArtifactCollection, request)).collection

    async def list_artifact_versions(
        self,
        parent: str,
        *,
        logged_by: str = "",
        used_by: str = "",
        page_size: int = 100,
        page_token: str = "",
    ) -> artifacts_pb2.ListArtifactVersionsResponse:
        """Versions of ``parent`` (an artifact, or ``projects/{p}/artifactCollections/-`` for all), newest
        first, optionally only those a run logged or used."""
        request = artifacts_pb2.ListArtifactVersionsRequest(
            parent=parent, logged_by=logged_by, used_by=used_by, page_size=page_size, page_token=page_token
        )
        empty = artifacts_pb2.ListArtifactVersionsResponse()
        return await self._list("registry", self._artifacts.ListArtifactVersions, request, empty=empty)

    async def get_artifact_version(self, name: str) -> artifacts_pb2.ArtifactVersion:
        request = artifacts_pb2.GetArtifactVersionRequest(name=name)
        return (await self._read("registry", self._artifacts.GetArtifactVersion, request)).version

    async def read_artifact_file(self, version: str, path: str) -> ArtifactDownload:
        """The file's entry, read before anything goes to the browser (so a refusal is a page, and the
        answer's length is known), and its bytes as they come. A version never changes, so a stream broken
        by a restarting registry is opened again at the byte where it stopped, within the reads' retries."""

        async def open_at(offset: int) -> tuple[artifacts_pb2.ArtifactFile, FileCall]:
            request = artifacts_pb2.ReadArtifactFileRequest(name=version, path=path, offset=offset)
            call: FileCall = self._artifacts.ReadArtifactFile(request, metadata=self._metadata)
            try:
                first = await call.read()
            except BaseException:
                call.cancel()
                raise
            if not isinstance(first, artifacts_pb2.ReadArtifactFileResponse) or not first.HasField("file"):
                call.cancel()
                raise CallFailed("registry", _protocol_error("ReadArtifactFile sent no file entry first"))
            return first.file, call

        def reopen(offset: int) -> Awaitable[tuple[artifacts_pb2.ArtifactFile, FileCall]]:
            opened = call_with_retries_async(lambda: open_at(offset), READ_RETRIES)
            return self._failing_as("registry", opened)

        entry, call = await reopen(0)
        return ArtifactDownload(entry, self._file_bytes(call, reopen), call.cancel)

    async def _file_bytes(self, call: FileCall, reopen: OpenFile) -> AsyncIterator[bytes]:
        """The bytes of an opened file. A stream that breaks is opened again where it stopped, unless it
        had been opened there already and broke before sending a byte (no progress: the break is said)."""
        received, reopened_at = 0, None
        try:
            while True:
                try:
                    part = await call.read()
                except grpc.RpcError as error:
                    if status_code(error) not in TRANSIENT_CODES or received == reopened_at:
                        status = decode_rpc_error(error, target=self._target("registry"))
                        raise CallFailed("registry", status) from None
                    call.cancel()
                    _, call = await reopen(received)
                    reopened_at = received
                    continue
                if not isinstance(part, artifacts_pb2.ReadArtifactFileResponse):  # grpc.aio.EOF
                    return
                received += len(part.chunk)
                yield part.chunk
        finally:
            call.cancel()

    # Queue service.
    async def list_queues(self, project: str) -> list[queue_pb2.Queue]:
        request = queue_pb2.ListQueuesRequest(parent=f"projects/{project}", page_size=1000)
        answer = await self._list(
            "queue", self._queues.ListQueues, request, empty=queue_pb2.ListQueuesResponse()
        )
        return list(answer.queues)

    async def get_queue(self, name: str) -> queue_pb2.Queue:
        request = queue_pb2.GetQueueRequest(name=name)
        return (await self._read("queue", self._queues.GetQueue, request)).queue

    async def set_paused(self, name: str, paused: bool) -> queue_pb2.Queue:
        request = queue_pb2.UpdateQueueRequest(queue=queue_pb2.Queue(name=name, paused=paused))
        request.update_mask.paths.append("paused")
        answer = await self._change("queue", self._queues.UpdateQueue, request)
        return answer.queue

    async def enqueue(self, request: queue_pb2.EnqueueRequest) -> queue_pb2.Item:
        return (await self._change("queue", self._queues.Enqueue, request)).item

    async def get_item(self, name: str) -> queue_pb2.Item:
        request = queue_pb2.GetItemRequest(name=name)
        return (await self._read("queue", self._queues.GetItem, request)).item

    async def cancel_item(self, name: str) -> queue_pb2.Item:
        request = queue_pb2.CancelItemRequest(name=name, message="cancelled in the console")
        return (await self._change("queue", self._queues.CancelItem, request)).item

    async def relaunch_item(self, name: str, request_id: str) -> queue_pb2.Item:
        request = queue_pb2.RelaunchItemRequest(name=name, request_id=request_id)
        answer = await self._change("queue", self._queues.RelaunchItem, request)
        return answer.item

    async def watch_item(self, name: str) -> AsyncIterator[queue_pb2.WatchItemResponse]:
        request = queue_pb2.WatchItemRequest(name=name)
        async for answer in self._stream("queue", self._queues.WatchItem(request, metadata=self._metadata)):
            yield answer

    async def watch_queue(self, name: str) -> AsyncIterator[queue_pb2.WatchQueueResponse]:
        request = queue_pb2.WatchQueueRequest(name=name)
        async for answer in self._stream("queue", self._queues.WatchQueue(request, metadata=self._metadata)):
            yield answer

    async def _stream(self, service: str, call: grpc.aio.UnaryStreamCall[Any, T]) -> AsyncIterator[T]:
        """A server stream's messages; the call is cancelled when the reader stops (the browser left)."""
        try:
            async for message in call:
                yield message
        except grpc.RpcError as error:
            raise CallFailed(service, decode_rpc_error(error, target=self._target(service))) from None
        finally:
            call.cancel()
