"""Who this agent is: a stable id kept in the state directory it holds, and what it says about itself."""

from __future__ import annotations

import fcntl
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from takeoff_agent.settings import AgentSettings
from takeoff_server.errors import ServiceFailed

LOCK_FILE = "agent.lock"
MAX_AGENTS_PER_STATE_DIR = 64


@dataclass
class HeldStateDir:
    """A state directory this process holds an exclusive lock on, until :meth:`release` or its exit."""

    path: Path
    _lock: IO[str] = field(repr=False)

    def release(self) -> None:
        self._lock.close()


def claim_state_dir(base: Path) -> HeldStateDir:
    """The state directory this agent works in: ``base``, else (another agent on this host holds it) the
    first free ``base/2``, ``base/3``, ... Each has its own agent id, so two agents started alike on one
    host are two agents rather than one id whose second session supersedes the first; each restarted
    agent takes the first free one again, with the id and leases kept there."""
    for slot in range(1, MAX_AGENTS_PER_STATE_DIR + 1):
        path = base if slot == 1 else base / str(slot)
        path.mkdir(parents=True, exist_ok=True)
        lock = (path / LOCK_FILE).open("a")  # not inherited by jobs (PEP 446), which outlive a killed agent
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        return HeldStateDir(path, lock)
    raise ServiceFailed(
        f"{MAX_AGENTS_PER_STATE_DIR} agents already run with the state directory {base}; give this one"
        " another (state_dir)"
    )


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


def queue_resource_name(queue: str, project: str) -> str:
    """``q`` -> ``projects/{project}/queues/q``; full names pass through."""
    return queue if queue.startswith("projects/") else f"projects/{project}/queues/{queue}"


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
            queues=[queue_resource_name(q, settings.project) for q in settings.queues],
            capacity=settings.max_jobs,
        )
