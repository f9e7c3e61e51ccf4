"""The agent: one Lease session, the attempts it holds, its runners, self-fencing and draining.

Attempts run as asyncio tasks, so one stuck build or job never blocks another, nor the heartbeats. Each
attempt keeps its state in ``{state_dir}/leases/{lease_id}``; a restarted agent reports those leases in
its Hello, resumes the ones the queue service keeps and has its runners remove the rest of their work
(docs/design.md §5, §7). Protos stop at this class's Lease handlers: attempts see the domain (``wire.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path

import grpc

import takeoff
from takeoff.v1 import queue_pb2, queue_pb2_grpc
from takeoff_agent.clients import Builder, Runs
from takeoff_agent.domain import FailureReason, ItemState, Outcome, ResourceKind, RunState
from takeoff_agent.identity import AgentIdentity
from takeoff_agent.lease import HelloSpec, LeaseLink, SessionRefused
from takeoff_agent.reachability import Reachability
from takeoff_agent.relay import RunEnds
from takeoff_agent.runners import create_runners
from takeoff_agent.runners.base import RunnerContext
from takeoff_agent.settings import AgentSettings
from takeoff_agent.wire import (
    AssignmentMessage,
    assignment_from_proto,
    complete_request,
    item_state_to_proto,
    record_assignment,
    recorded_assignment,
    resource_kind_to_proto,
    run_state_to_proto,
)
from takeoff_agent.work import AgentContext, Attempt, Stop
from takeoff_server.config import ConfigError
from takeoff_server.errors import ServiceFailed
from takeoff_server.peers import channel_credentials, peer_channel

logger = logging.getLogger(__name__)

LeaseRequest = queue_pb2.LeaseRequest
LeaseResponse = queue_pb2.LeaseResponse
FENCE_CHECK_SECONDS = 0.5
RELEASE_SECONDS = 10.0
"""How long a draining agent keeps sending each Release the queue service has not answered."""
_LOST = (queue_pb2.REJECT_REASON_LEASE_LOST, queue_pb2.REJECT_REASON_LEASE_NOT_FOUND)


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        identity: AgentIdentity,
        *,
        relay: str | None = None,
        run_ends: RunEnds | None = None,
    ) -> None:
        """``relay``: where this agent's run relay listens, as its local-process jobs are given it
        (takeoff_agent.relay); None when it does not run. ``run_ends``: what that relay saw the registry
        answer the jobs about their runs."""
        self.settings = settings
        self.identity = identity
        self.leases_dir = settings.state_path / "leases"
        self.attempts: dict[str, Attempt] = {}
        try:
            runners = create_runners(
                settings.runners,
                RunnerContext(agent_id=identity.agent_id, state_dir=settings.state_path, relay=relay),
            )
        except ValueError as error:
            raise ServiceFailed(f"this agent's config cannot be used: {error}") from None
        try:
            api_key = settings.own_api_key()
        except ConfigError as error:
            raise ServiceFailed(str(error)) from None
        if api_key is None:
            logger.warning(
                "this agent has no API key (TAKEOFF_API_KEY or api_key_file): the services will refuse it"
            )
        self.reachability = Reachability(on_change=self._offer_capacity)
        # Every channel the agent opens presents its own key (a run's calls present that run's token
        # instead: clients.Runs), over TLS when configured.
        registry, builder = settings.registry_address, settings.builder_address
        self.context = AgentContext(
            agent_name=f"agents/{identity.agent_id}",
            runs=Runs(registry, self.reachability, channel=peer_channel(registry, settings)),
            builder=Builder(builder, self.reachability, channel=peer_channel(builder, settings)),
            runners=runners,
            stop_grace_seconds=settings.stop_grace_seconds,
            job_registry_address=settings.job_registry_address or settings.registry_address,
            job_ca_file=settings.job_ca_file,
            run_ends=run_ends if run_ends is not None else RunEnds(),
        )
        self.link = LeaseLink(
            settings.queue_address,
            HelloSpec(
                agent_id=identity.agent_id,
                display_name=identity.display_name,
                queues=identity.queues,
                resources=[resource_kind_to_proto(kind) for kind in runners],
                capacity=identity.capacity,
                version=takeoff.__version__,
            ),
            self,
            api_key=api_key,
            credentials=channel_credentials(settings.tls, settings.queue_address),
        )
        self.renewed_until: float | None = None
        self._drained = asyncio.Event()
        self._swept: asyncio.Task[None] | None = None
        self._refusals: set[asyncio.Task[None]] = set()

    # ----- life ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """The agent's main loop: check its queues, take back what it held, hold the session."""
        await self._check_queues()
        self._recover()
        fencing = asyncio.create_task(self._fence_when_lapsed())
        try:
            await self.link.run()
        except SessionRefused as refused:
            raise ServiceFailed(f"the queue service refused this agent: {refused}") from None
        finally:
            fencing.cancel()

    async def _check_queues(self) -> None:
        """Refuse to start for a queue whose resource kind has no runner here, naming both."""
        async with peer_channel(self.settings.queue_address, self.settings) as channel:
            stub = queue_pb2_grpc.QueueServiceStub(channel)
            for queue in self.identity.queues:
                try:
                    reply = await stub.GetQueue(queue_pb2.GetQueueRequest(name=queue), timeout=10)
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        raise ServiceFailed(f"queue {queue} does not exist") from None
                    logger.warning(
                        "could not check queue %s (%s); the session will", queue, error.code().name
                    )
                    continue
                if _kind_of(reply.queue.resource) not in self.context.runners:
                    configured = ", ".join(kind.config_name for kind in self.context.runners)
                    raise ServiceFailed(
                        f"queue {queue} runs on {_kind_name(reply.queue.resource)}, and this agent has no"
                        f" runner for it (runners: {configured})"
                    )

    def _recover(self) -> None:
        """Attempts left by an earlier run of this agent; the Welcome says which to resume. A lease
        directory it cannot take back (no readable assignment, a kind it has no runner for now) is not
        held: the sweep after the first Welcome stops its work and removes it."""
        if not self.leases_dir.exists():
            return
        for lease_dir in sorted(self.leases_dir.iterdir()):
            assignment = recorded_assignment(lease_dir)
            if assignment is None or assignment.resource not in self.context.runners:
                logger.warning("lease directory %s cannot be taken back: its work will be removed", lease_dir)
                continue
            self.attempts[assignment.lease_id] = Attempt(assignment, lease_dir, self.context, self)
            logger.info("found lease %s (%s) from before a restart", assignment.lease_id, assignment.item)

    async def _sweep(self) -> None:
        """Once the queue has said which leases it keeps: every runner removes its work of any other
        lease, then the agent the lease directories of those (no orphans after a restart). ``held`` is
        the live set of leases, so work assigned while the sweep runs is never taken for an orphan."""
        held = self.attempts.keys()
        results = await asyncio.gather(
            *(runner.sweep(held) for runner in self.context.runners.values()), return_exceptions=True
        )
        failed = [
            (kind, result)
            for kind, result in zip(self.context.runners, results, strict=True)
            if isinstance(result, BaseException)
        ]
        for kind, error in failed:
            logger.warning("the %s runner could not sweep its work", kind.config_name, exc_info=error)
        # A directory may hold what stops its work once the agent is gone (the shim's deadline): it goes
        # only once every runner has removed its work; else the next start of the agent sweeps again.
        if not failed and self.leases_dir.exists():
            for lease_dir in self.leases_dir.iterdir():
                if lease_dir.name not in held:
                    _remove_lease_dir(lease_dir)

    async def drain(self, limit: float | None) -> None:
        """Take no new work, hand back what has not started, let running jobs end (or stop them after
        ``limit`` seconds), then end the session."""
        if self.identity.draining:
            await self._drained.wait()
            return
        self.identity.draining = True
        if self.link.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.link.send(drain=LeaseRequest.Drain()), 5)
        for attempt in list(self.attempts.values()):
            if attempt.task is not None and not attempt.job.started:
                attempt.task.cancel()
                await self._release(attempt)
        running = [a.task for a in self.attempts.values() if a.task is not None]
        if running:
            _, still_running = await asyncio.wait(running, timeout=limit)
            for attempt in self.attempts.values():
                if attempt.task in still_running:
                    attempt.request_stop(Stop.DRAINED)
            if still_running:
                await asyncio.wait(still_running)
        self.link.stop()
        self._drained.set()

    async def _release(self, attempt: Attempt) -> None:
        """Hand back work not yet started; its run, if created, ends KILLED (the next attempt has its own).
        The Release is sent again, as a Complete is, for up to RELEASE_SECONDS; one still unanswered then is
        left to the lease's expiry (AGENT_LOST, a retry after a back-off)."""
        with contextlib.suppress(Exception):
            await self.context.runs.finish(
                attempt.assignment.run,
                run_state_to_proto(RunState.KILLED),
                exit_code=None,
                message="released: agent draining",
                token=attempt.token,
            )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.link.send_until_answered(
                    release=LeaseRequest.Release(
                        lease_id=attempt.lease_id, epoch=attempt.assignment.epoch, message="agent draining"
                    )
                ),
                RELEASE_SECONDS,
            )
        self._forget(attempt)

    async def close(self) -> None:
        await self.reachability.close()  # before the channels it probes
        if self._swept is not None:
            self._swept.cancel()
        for runner in self.context.runners.values():
            try:
                await runner.close()
            except Exception:
                logger.warning("could not close the %s runner", runner.kind.config_name, exc_info=True)
        await self.context.runs.close()
        await self.context.builder.close()

    # ----- the Lease stream (LeaseHandler) ------------------------------------------------------

    def held_leases(self) -> dict[str, int]:
        return {lease_id: attempt.assignment.epoch for lease_id, attempt in self.attempts.items()}

    def draining(self) -> bool:
        return self.identity.draining

    async def on_welcome(self, welcome: LeaseResponse.Welcome) -> None:
        for verdict in welcome.lease_verdicts:
            attempt = self.attempts.get(verdict.lease_id)
            if attempt is None:
                continue
            if verdict.kept:
                if attempt.task is None:
                    logger.info("resuming %s", attempt.assignment.item)
                    self._begin(attempt)
            elif attempt.task is None:
                logger.info("lease %s revoked on reconnect: stopping its job", verdict.lease_id)
                attempt.task = asyncio.create_task(self._discard(attempt))
            else:
                attempt.request_stop(Stop.REVOKED)
        if self._swept is None:  # in the background: the stream goes on answering heartbeats meanwhile
            self._swept = asyncio.create_task(self._sweep())

    async def on_assignment(self, message: AssignmentMessage) -> None:
        try:
            assignment = assignment_from_proto(message)
            if assignment.resource not in self.context.runners:
                raise ValueError(f"this agent has no {assignment.resource.config_name} runner")
        except ValueError as error:  # a queue service newer than this agent, or mistaken: never a crash
            logger.error("cannot run the assignment of lease %s: %s", message.lease_id, error)
            await self._refuse(message, f"the agent cannot run this assignment: {error}")
            return
        lease_dir = self.leases_dir / assignment.lease_id
        record_assignment(message, lease_dir)
        attempt = Attempt(assignment, lease_dir, self.context, self)
        if self.renewed_until is not None:
            attempt.renew_lease(self.renewed_until)
        self.attempts[assignment.lease_id] = attempt
        self._begin(attempt)

    async def _refuse(self, message: AssignmentMessage, explanation: str) -> None:
        """Complete an assignment the agent cannot even begin, FAILED RUNNER_INFRA (another agent may)."""

        async def complete() -> None:
            with contextlib.suppress(Exception):
                await self.link.send_until_answered(
                    complete=complete_request(
                        message.lease_id,
                        message.epoch,
                        Outcome(ItemState.FAILED, FailureReason.RUNNER_INFRA, message=explanation),
                    )
                )

        self._refusals.add(task := asyncio.create_task(complete()))
        task.add_done_callback(self._refusals.discard)

    async def on_cancel(self, cancel: LeaseResponse.Cancel) -> None:
        if (attempt := self.attempts.get(cancel.lease_id)) is not None:
            attempt.request_stop(Stop.CANCELLED)

    async def on_revoke(self, revoke: LeaseResponse.Revoke) -> None:
        if (attempt := self.attempts.get(revoke.lease_id)) is not None:
            logger.info("lease %s revoked: %s", revoke.lease_id, revoke.message)
            attempt.request_stop(Stop.REVOKED)

    def _offer_capacity(self, reachable: bool) -> None:
        """No new work while the builder or the registry is unreachable (docs/design.md §5, §16)."""
        self.link.set_capacity(self.identity.capacity if reachable else 0)

    def on_renewed(self, until: float) -> None:
        self.renewed_until = until
        for attempt in self.attempts.values():
            attempt.renew_lease(until)

    async def _fence_when_lapsed(self) -> None:
        """An agent that could not renew its leases in time stops its work: the queue has given it away."""
        while True:
            await asyncio.sleep(FENCE_CHECK_SECONDS)
            if self.renewed_until is not None and time.time() > self.renewed_until:
                for attempt in self.attempts.values():
                    if attempt.stop_reason is None:
                        logger.warning("lease %s lapsed: stopping its job", attempt.lease_id)
                        attempt.request_stop(Stop.FENCED)

    # ----- attempts (Reporter) -------------------------------------------------------------------

    async def _discard(self, attempt: Attempt) -> None:
        """A lease from before a restart that the queue service gave away: stop its job, if it still runs."""
        try:
            await attempt.abandon()
        except Exception:  # its job may still run: the lease stays, for the next start of the agent to stop
            logger.exception("could not stop the job of revoked lease %s", attempt.lease_id)
            return
        self._forget(attempt)
        logger.info("lease %s dropped: its job is stopped", attempt.lease_id)

    def _begin(self, attempt: Attempt) -> None:
        attempt.task = asyncio.create_task(self._run(attempt))

    async def _run(self, attempt: Attempt) -> None:
        try:
            await attempt.run()
        finally:
            if attempt.stop_reason is Stop.REVOKED or not attempt.lease_dir.exists():
                self._forget(attempt)

    async def progress(self, attempt: Attempt, state: ItemState, detail: str) -> bool:
        answer = await self.link.send_until_answered(
            progress=LeaseRequest.Progress(
                lease_id=attempt.lease_id,
                epoch=attempt.assignment.epoch,
                state=item_state_to_proto(state),
                detail=detail,
            )
        )
        # An invalid transition after a restart (progress already past this state) is harmless.
        return not (answer.HasField("reject") and answer.reject.reason in _LOST)

    async def complete(self, attempt: Attempt, outcome: Outcome) -> None:
        await self.link.send_until_answered(
            complete=complete_request(attempt.lease_id, attempt.assignment.epoch, outcome)
        )
        self._forget(attempt)

    def _forget(self, attempt: Attempt) -> None:
        self.attempts.pop(attempt.lease_id, None)
        _remove_lease_dir(attempt.lease_dir)


def _remove_lease_dir(lease_dir: Path) -> None:
    """Remove ``lease_dir``, saying what is left of it (a lease directory left behind is a lease the agent
    seems to keep): only what is gone already is no failure."""

    def report(
        _function: object, path: str, error: tuple[type[BaseException], BaseException, object]
    ) -> None:
        if not isinstance(error[1], FileNotFoundError):
            logger.warning("could not remove %s of lease directory %s: %s", path, lease_dir, error[1])

    shutil.rmtree(lease_dir, onerror=report)


def _kind_of(resource: int) -> ResourceKind | None:
    try:
        return ResourceKind(resource)
    except ValueError:  # unspecified, or a kind newer than this agent
        return None


def _kind_name(resource: int) -> str:
    """``local-container`` for a queue's resource kind number, as agent configs spell it."""
    kind = _kind_of(resource)
    return kind.config_name if kind is not None else f"resource kind {resource}"
