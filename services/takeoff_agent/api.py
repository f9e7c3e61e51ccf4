"""gRPC servicer of the agent: its status and its drain, from the agent's own state."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

import takeoff
from takeoff.v1 import agent_pb2, agent_pb2_grpc
from takeoff_agent.agent import Agent
from takeoff_agent.wire import item_state_to_proto, resource_kind_to_proto
from takeoff_agent.work import Attempt, Stop
from takeoff_server.validation import duration_value

Context = grpc.aio.ServicerContext[Any, Any]


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _work_to_proto(attempt: Attempt) -> agent_pb2.ActiveWork:
    assignment = attempt.assignment
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int((time.time() - attempt.assigned_at) * 1e9))
    return agent_pb2.ActiveWork(
        lease_id=assignment.lease_id,
        epoch=assignment.epoch,
        item=assignment.item,
        run=assignment.run,
        job_version=assignment.job_version.name,
        attempt=assignment.attempt,
        state=item_state_to_proto(attempt.state),
        detail=attempt.detail,
        assign_time=_timestamp(attempt.assigned_at),
        start_time=_timestamp(attempt.running_since),
        duration=duration,
        cancel_requested=attempt.stop_reason is Stop.CANCELLED,
    )


class AgentApi(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._started = time.time()
        self._draining: asyncio.Future[None] | None = None

    def _work(self) -> list[agent_pb2.ActiveWork]:
        attempts = sorted(self._agent.attempts.values(), key=lambda attempt: attempt.assigned_at)
        return [_work_to_proto(attempt) for attempt in attempts]

    async def GetStatus(
        self, request: agent_pb2.GetStatusRequest, context: Context
    ) -> agent_pb2.GetStatusResponse:
        agent, identity = self._agent, self._agent.identity
        return agent_pb2.GetStatusResponse(
            agent=f"agents/{identity.agent_id}",
            display_name=identity.display_name,
            session_id=agent.link.session_id if agent.link.connected else "",
            connected=agent.link.connected,
            queues=identity.queues,
            resources=[resource_kind_to_proto(kind) for kind in agent.context.runners],
            capacity=agent.link.capacity,
            draining=identity.draining,
            version=takeoff.__version__,
            start_time=_timestamp(self._started),
            last_heartbeat_ack_time=_timestamp(agent.link.last_heartbeat_ack),
            work=self._work(),
        )

    async def Drain(self, request: agent_pb2.DrainRequest, context: Context) -> agent_pb2.DrainResponse:
        limit = (
            duration_value(request.timeout, field="timeout").total_seconds()
            if request.HasField("timeout")
            else None
        )
        self._draining = self._draining or asyncio.ensure_future(self._agent.drain(limit))
        if request.wait:
            await asyncio.shield(self._draining)
        return agent_pb2.DrainResponse(work=self._work())
