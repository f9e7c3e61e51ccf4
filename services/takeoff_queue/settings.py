"""Queue service settings (``TAKEOFF_*`` variables, a YAML file, or these defaults)."""

from pydantic import Field

from takeoff_server.config import ServerSettings


class QueueSettings(ServerSettings):
    listen: list[str] = ["127.0.0.1:50052"]
    registry_address: str = "127.0.0.1:50051"
    """Where Enqueue resolves job references."""
    lease_ttl_seconds: float = Field(default=30.0, gt=0)
    """A lease not renewed by a heartbeat within this time expires."""
    heartbeat_interval_seconds: float = Field(default=10.0, gt=0)
    """How often agents are told to heartbeat; keep it well under the TTL."""
    builder_push_registry: str = ""
    """The registry the builder pushes images to (its ``push_registry``). Without one, code and git jobs
    cannot run on kubernetes queues (the cluster could not pull their images), and Enqueue says so."""
