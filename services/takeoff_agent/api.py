"""gRPC servicer of the agent: its status (and, with the agent core, drain).

Thin by design: domain state becomes protos. Methods not written yet are inherited from the generated
base, which the error interceptor answers with UNIMPLEMENTED.
"""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

import takeoff
from takeoff.v1 import agent_pb2, agent_pb2_grpc
from takeoff_agent.identity import AgentIdentity


class AgentApi(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, identity: AgentIdentity) -> None:
        self._identity = identity

    async def GetStatus(
        self,
        request: agent_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[agent_pb2.GetStatusRequest, agent_pb2.GetStatusResponse],
    ) -> agent_pb2.GetStatusResponse:
        identity = self._identity
        start_time = Timestamp()
        start_time.FromDatetime(identity.started_at)
        return agent_pb2.GetStatusResponse(
            agent=f"agents/{identity.agent_id}",
            display_name=identity.display_name,
            queues=identity.queues,
            capacity=identity.capacity,
            draining=identity.draining,
            version=takeoff.__version__,
            start_time=start_time,
        )
