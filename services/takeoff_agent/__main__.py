"""``python -m takeoff_agent``: hold a Lease session for the configured queues and serve AgentService."""

import logging
from contextlib import AsyncExitStack

from takeoff.v1 import agent_pb2, agent_pb2_grpc
from takeoff_agent.access import RULES
from takeoff_agent.agent import Agent
from takeoff_agent.api import AgentApi
from takeoff_agent.identity import AgentIdentity, claim_state_dir
from takeoff_agent.relay import start_relay
from takeoff_agent.settings import AgentSettings
from takeoff_server.config import ConfigError
from takeoff_server.errors import ServiceFailed
from takeoff_server.main import ServiceProgram
from takeoff_server.peers import channel_credentials, registry_verifier
from takeoff_server.server import ServiceBinding, Wiring

logger = logging.getLogger(__name__)


async def wire(settings: AgentSettings, resources: AsyncExitStack) -> Wiring:
    try:
        verifier = registry_verifier(settings, settings.registry_address, resources)
    except ConfigError as error:
        raise ServiceFailed(str(error)) from None
    held = claim_state_dir(settings.state_path)
    resources.callback(held.release)
    if held.path != settings.state_path:
        logger.warning(
            "another agent on this host holds the state directory %s: this one works in %s",
            settings.state_path,
            held.path,
        )
        settings = settings.model_copy(update={"state_dir": held.path})
    identity = AgentIdentity.from_settings(settings)
    relay = None
    if settings.run_relay:
        registry = settings.registry_address
        relay = await start_relay(identity.agent_id, registry, channel_credentials(settings.tls, registry))
        if relay is not None:
            # Closed after the agent (the stack unwinds in reverse): its jobs may call until it has drained.
            resources.push_async_callback(relay.close)
    agent = Agent(
        settings,
        identity,
        relay=relay.address if relay is not None else None,
        run_ends=relay.ends if relay is not None else None,
    )
    resources.push_async_callback(agent.close)

    async def drain() -> None:
        await agent.drain(settings.drain_timeout_seconds)

    return Wiring(
        services=[
            ServiceBinding.of(
                agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
                agent_pb2_grpc.add_AgentServiceServicer_to_server,
                AgentApi(agent),
                access=RULES,
                on_shutdown=drain,
                main_loop=agent.run,
            )
        ],
        verifier=verifier,
    )


program = ServiceProgram("agent", AgentSettings, wire)

if __name__ == "__main__":
    program.main()
