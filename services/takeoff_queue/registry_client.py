"""The registry as the queue sees it: JobService, the only view of jobs (references pinned to versions) and
of the projects written to through the registry; RunService, to close the runs of attempts the queue
ends without their agent (docs/design.md §16); and KeyService, to register the key this queue signs each
attempt's run token with, and to revoke the tokens once the attempt ends (§13). The channel presents the
queue's own key.

A refusal by the registry while answering a caller is answered as the queue's own error
(``takeoff_server.remote_errors``), at once: the caller of Enqueue retries an unavailable registry, not
the queue. Closing a run answers nobody: its outbox retries it (``takeoff_queue.run_closes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import grpc

from takeoff.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, keys_pb2, keys_pb2_grpc, runs_pb2, runs_pb2_grpc
from takeoff_queue.model import ResolvedJob, SourceKind
from takeoff_queue.run_closes import RunCloseFailed, RunEnd, TokenCallFailed
from takeoff_rpc.channels import open_aio_channel
from takeoff_rpc.status import decode_rpc_error
from takeoff_server.config import ServerSettings
from takeoff_server.peers import peer_channel
from takeoff_server.protovalues import struct_to_dict
from takeoff_server.remote_errors import domain_error
from takeoff_server.run_tokens import RunTokenSigner
from takeoff_server.versions import VersionCache, names_a_numbered_version

logger = logging.getLogger(__name__)

CALL_TIMEOUT_SECONDS = 10.0
CLOSE_TIMEOUT_SECONDS = 5.0
"""One try of a run close; the outbox tries again after a back-off."""
TOKEN_TIMEOUT_SECONDS = 5.0
"""One try of a signer's registration or a mint (the item waits, PENDING, and is tried again) or of a
revocation (its outbox retries)."""
REGISTER_AGAIN_SECONDS = 60.0
"""How long a queue mints every token after a registry answered that it knows no signers; and how often it
registers its signer again."""


class Registry:
    """A ``JobResolver``, ``ProjectLookup`` and ``RunRegistry`` backed by the registry at ``address``."""

    def __init__(self, address: str, settings: ServerSettings | None = None) -> None:
        self.address = address
        # The queue presents its own key (and TLS when configured); without settings, a plain channel.
        self._channel = peer_channel(address, settings) if settings is not None else open_aio_channel(address)
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._runs = runs_pb2_grpc.RunServiceStub(self._channel)
        self._keys = keys_pb2_grpc.KeyServiceStub(self._channel)
        self._versions: VersionCache[tuple[str, str], ResolvedJob] = VersionCache()
        self._signer = RunTokenSigner()
        self._signer_id = ""
        """Set once the registry knows the signer's public key."""
        self._registering = asyncio.Lock()
        self._unsigned_until = 0.0
        """Monotonic time until which tokens are minted, the registry not knowing signers."""
        self._register_again_at = 0.0
        self._registering_again: asyncio.Task[None] | None = None
        self._registering_first: asyncio.Task[None] | None = None

    def _register_signer_soon(self) -> None:
        """Once the registry has answered a call (an Enqueue's job resolved), register the signer on the
        side, so that items are signed in their dispatch pass from the first on, not after a registry call
        each (which also let a pass's round robin move on past the queue of the item that waited). Not at
        start: a registry still starting would put the shared connection in its reconnect back-off, and
        the calls right after would fail. Failing, the first mint registers it, as before."""
        if self._signer_id or self._registering_first is not None:
            return
        # A context of its own: not the trace or request id of the Enqueue that set it off.
        self._registering_first = asyncio.get_running_loop().create_task(
            self._register_first(), context=contextvars.Context()
        )

    async def _register_first(self) -> None:
        try:
            await self._registered_signer()
        except TokenCallFailed as error:
            logger.info("registering the run token signer failed (%s); the first mint tries again", error)

    async def resolve(self, project: str, reference: str) -> ResolvedJob:
        """The version ``reference`` names in ``project``. One named by its number is asked for once and
        kept (:class:`VersionCache`); a job's name or alias is resolved by the registry every time, so
        that an alias moved, or a new ``latest``, is seen by the next Enqueue."""
        numbered = names_a_numbered_version(reference)
        if numbered and (cached := self._versions.get((project, reference))) is not None:
            return cached
        resolved = await self._resolve(project, reference)
        if numbered:
            self._versions.put((project, reference), resolved)
        return resolved

    async def _resolve(self, project: str, reference: str) -> ResolvedJob:
        try:
            response = await self._jobs.GetJobVersion(
                jobs_pb2.GetJobVersionRequest(name=reference, project=project),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as error:
            raise domain_error(
                decode_rpc_error(error, target=self.address),
                action=f"the registry resolving {reference!r}",
                field="job",
                metadata={"job": reference},
            ) from None
        self._register_signer_soon()
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

    async def project_written(self, project: str, *, field: str) -> bool:
        """The cheapest read in ``project`` there is: one job. It is PROJECT_NOT_FOUND exactly when nothing
        (no job, no run) was ever written to the project through the registry."""
        try:
            await self._jobs.ListJobs(
                jobs_pb2.ListJobsRequest(parent=project, page_size=1), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            remote = decode_rpc_error(error, target=self.address)
            if remote.reason == "PROJECT_NOT_FOUND":
                return False
            raise domain_error(
                remote,
                action=f"the registry looking up {project}",
                field=field,
                metadata={"resource": project},
            ) from None
        return True

    async def close_run(self, run: str, message: str) -> RunEnd:
        """FinishRun KILLED. The registry keeps the first final state: FINISHED in its answer means the job
        finished the run first. RUN_NOT_FOUND or PROJECT_NOT_FOUND: the agent never created the run, and
        there is nothing to close."""
        request = runs_pb2.FinishRunRequest(name=run, state=common_pb2.RUN_STATE_KILLED, message=message)
        try:
            response = await self._runs.FinishRun(request, timeout=CLOSE_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return RunEnd(finished=False)
            remote = decode_rpc_error(error, target=self.address)
            raise RunCloseFailed(f"{remote.code.name} {remote.reason}: {remote.message}") from None
        closed = response.run
        return RunEnd(
            finished=closed.state == common_pb2.RUN_STATE_FINISHED,
            exit_code=closed.exit_code if closed.HasField("exit_code") else None,
        )

    def signed_run_token(self, run: str, item: str, job_version: str, secrets: Sequence[str]) -> str | None:
        """The run token of one attempt, signed here with no call; None before the signer is registered
        (:meth:`mint_run_token` registers it) or for a scope too long to travel signed. The signer is
        registered again every :data:`REGISTER_AGAIN_SECONDS` on the side (the same id: a no-op), so that
        a registry restored from a backup taken before the registration knows it again within that time."""
        if not self._signer_id:
            return None
        if time.monotonic() >= self._register_again_at and self._registering_again is None:
            # A context of its own: not the trace or request id of whichever Enqueue or pass signed this.
            self._registering_again = asyncio.get_running_loop().create_task(
                self._register_again(), context=contextvars.Context()
            )
        return self._signer.sign(
            self._signer_id,
            run=run,
            item=item,
            job_version=job_version,
            secrets=list(secrets),
            issue_time=datetime.now(UTC),
        )

    async def mint_run_token(self, run: str, item: str, job_version: str, secrets: Sequence[str]) -> str:
        """The run token of one attempt, handed to its agent and never kept: signed, once the signer is
        registered; minted by the registry (KeyService.MintRunToken) when its scope is too long to travel
        signed."""
        await self._registered_signer()
        if (token := self.signed_run_token(run, item, job_version, secrets)) is not None:
            return token
        request = keys_pb2.MintRunTokenRequest(run=run, item=item, job_version=job_version, secrets=secrets)
        try:
            response = await self._keys.MintRunToken(request, timeout=TOKEN_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            raise self._token_call_failed(error) from None
        return response.secret

    async def _registered_signer(self) -> str:
        """The signer's id, registering its public key first (once: concurrent mints wait for that one).
        Empty while the registry is a version from before signed tokens (UNIMPLEMENTED), which a rolling
        upgrade may leave for a while: tokens are minted there meanwhile, and the registration is tried
        again after :data:`REGISTER_AGAIN_SECONDS`."""
        if self._signer_id or time.monotonic() < self._unsigned_until:
            return self._signer_id
        async with self._registering:
            if not self._signer_id and time.monotonic() >= self._unsigned_until:
                request = keys_pb2.CreateRunTokenSignerRequest(public_key=self._signer.public_key)
                try:
                    response = await self._keys.CreateRunTokenSigner(request, timeout=TOKEN_TIMEOUT_SECONDS)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise self._token_call_failed(error) from None
                    self._unsigned_until = time.monotonic() + REGISTER_AGAIN_SECONDS
                    return ""
                self._signer_id = response.signer.name.removeprefix("runTokenSigners/")
                self._register_again_at = time.monotonic() + REGISTER_AGAIN_SECONDS
        return self._signer_id

    async def _register_again(self) -> None:
        self._register_again_at = time.monotonic() + REGISTER_AGAIN_SECONDS
        request = keys_pb2.CreateRunTokenSignerRequest(public_key=self._signer.public_key)
        try:
            response = await self._keys.CreateRunTokenSigner(request, timeout=TOKEN_TIMEOUT_SECONDS)
            # The same id unless the registry named it otherwise (one from before ids were digests).
            self._signer_id = response.signer.name.removeprefix("runTokenSigners/") or self._signer_id
        except grpc.aio.AioRpcError as error:
            remote = decode_rpc_error(error, target=self.address)
            logger.info("registering the run token signer again failed (%s); again later", remote.reason)
        except Exception:  # whatever it was, tokens go on being signed; the next interval tries again
            logger.exception("registering the run token signer again failed; again later")
        finally:
            self._registering_again = None

    async def revoke_run_tokens(self, runs: Sequence[str]) -> None:
        """KeyService.BatchRevokeRunTokens; run by run (RevokeRunTokens) on a registry of a version
        without it (UNIMPLEMENTED, in a rolling upgrade)."""
        try:
            await self._keys.BatchRevokeRunTokens(
                keys_pb2.BatchRevokeRunTokensRequest(runs=runs), timeout=TOKEN_TIMEOUT_SECONDS
            )
            return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise self._token_call_failed(error) from None
        try:
            for run in runs:
                await self._keys.RevokeRunTokens(
                    keys_pb2.RevokeRunTokensRequest(run=run), timeout=TOKEN_TIMEOUT_SECONDS
                )
        except grpc.aio.AioRpcError as error:
            raise self._token_call_failed(error) from None

    def _token_call_failed(self, error: grpc.aio.AioRpcError) -> TokenCallFailed:
        remote = decode_rpc_error(error, target=self.address)
        return TokenCallFailed(f"{remote.code.name} {remote.reason}: {remote.message}")

    async def close(self) -> None:
        for registering in (self._registering_first, self._registering_again):
            if registering is not None:
                registering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await registering
        await self._channel.close()
