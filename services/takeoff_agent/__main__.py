"""``python -m takeoff_agent``: hold a Lease session for the configured queues and serve AgentService."""

from collections.abc import Sequence
from contextlib import AsyncExitStack

from takeoff.v1 import agent_pb2, agent_pb2_grpc
from takeoff_agent.agent import Agent
from takeoff_agent.api import AgentApi
from takeoff_agent.identity import AgentIdentity
from takeoff_agent.settings import AgentSettings
from takeoff_server.main import ServiceProgram
from takeoff_server.server import ServiceBinding


async def wire(settings: AgentSettings, resources: AsyncExitStack) -> Sequence[ServiceBinding]:
    agent = Agent(settings, AgentIdentity.from_settings(settings))
    resources.push_async_callback(agent.close)

    async def drain() -> None:
        await agent.drain(settings.drain_timeout_seconds)

    return [
        ServiceBinding.of(
            agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
            agent_pb2_grpc.add_AgentServiceServicer_to_server,
            AgentApi(agent),
            on_shutdown=drain,
            main_loop=agent.run,
        )
    ]


program = ServiceProgram("agent", AgentSettings, wire)

if __name__ == "__main__":
    program.main()
