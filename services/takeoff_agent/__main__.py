"""``python -m takeoff_agent``: serve AgentService next to the agent's work."""

from collections.abc import Sequence
from contextlib import AsyncExitStack

from takeoff.v1 import agent_pb2, agent_pb2_grpc
from takeoff_agent.api import AgentApi
from takeoff_agent.identity import AgentIdentity
from takeoff_agent.settings import AgentSettings
from takeoff_server.main import ServiceProgram
from takeoff_server.server import ServiceBinding


async def wire(settings: AgentSettings, resources: AsyncExitStack) -> Sequence[ServiceBinding]:
    return [
        ServiceBinding.of(
            agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
            agent_pb2_grpc.add_AgentServiceServicer_to_server,
            AgentApi(AgentIdentity.from_settings(settings)),  # type: ignore[abstract]
        )
    ]


program = ServiceProgram("agent", AgentSettings, wire)

if __name__ == "__main__":
    program.main()
