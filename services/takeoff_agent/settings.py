"""Agent settings: the agent.yaml file, overridden by ``TAKEOFF_*`` variables."""

from pathlib import Path

from pydantic import Field, field_validator

from takeoff_server.config import ServerSettings


class AgentSettings(ServerSettings):
    listen: list[str] = ["127.0.0.1:50054"]
    name: str = ""
    """Shown in ``takeoff agents``; empty means the host name."""
    queues: list[str] = []
    """Queues to serve, as ``projects/{p}/queues/{q}`` or ``{q}`` in the ``default`` project."""
    max_jobs: int = Field(default=1, ge=1)
    """How many items the agent works on at once."""
    queue_address: str = "127.0.0.1:50052"
    builder_address: str = "127.0.0.1:50053"
    registry_address: str = "127.0.0.1:50051"
    state_dir: Path | None = None
    """Where the agent keeps its id and its jobs' state; empty means ``{home}/agent``."""

    @field_validator("queues")
    @classmethod
    def _check_queues(cls, queues: list[str]) -> list[str]:
        for queue in queues:
            if not queue or queue.strip() != queue:
                raise ValueError(f"{queue!r} is not a queue name")
        return queues

    @property
    def state_path(self) -> Path:
        return self.state_dir or self.home / "agent"
