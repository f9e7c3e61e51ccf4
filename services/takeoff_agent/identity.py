"""Who this agent is: a stable id kept in its state directory, and what it says about itself."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from takeoff_agent.settings import AgentSettings

DEFAULT_PROJECT = "default"


def load_or_create_agent_id(state_dir: Path) -> str:
    """The agent's id, the same across restarts so the queue service can hand back its leases."""
    path = state_dir / "agent_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    agent_id = uuid.uuid4().hex
    partial = path.with_name("agent_id.partial")
    partial.write_text(agent_id)
    partial.replace(path)
    return agent_id


def queue_resource_name(queue: str) -> str:
    """``q`` -> ``projects/default/queues/q``; full names pass through."""
    return queue if queue.startswith("projects/") else f"projects/{DEFAULT_PROJECT}/queues/{queue}"


@dataclass
class AgentIdentity:
    agent_id: str
    display_name: str
    queues: list[str]
    capacity: int
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    draining: bool = False

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> AgentIdentity:
        return cls(
            agent_id=load_or_create_agent_id(settings.state_path),
            display_name=settings.name or socket.gethostname(),
            queues=[queue_resource_name(q) for q in settings.queues],
            capacity=settings.max_jobs,
        )
