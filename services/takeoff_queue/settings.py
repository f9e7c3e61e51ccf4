"""Queue service settings (``TAKEOFF_*`` variables, a YAML file, or these defaults)."""

from typing import Annotated

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from takeoff_queue.retention import QueueRetentionSettings
from takeoff_rpc.channels import check_target
from takeoff_server.config import ServerSettings
from takeoff_server.database import SqliteSynchronous

MAX_LEASE_SECONDS = 86400.0
"""A day: longer leases would hide a lost agent for longer than anyone waits, and far larger numbers
overflow the date arithmetic of lease expiry."""


class QueueSettings(ServerSettings):
    listen: list[str] = ["127.0.0.1:50052"]
    registry_address: Annotated[str, AfterValidator(check_target)] = "127.0.0.1:50051"
    """Where Enqueue resolves job references."""
    lease_ttl_seconds: float = Field(default=30.0, gt=0, le=MAX_LEASE_SECONDS)
    """A lease not renewed by a heartbeat within this time expires."""
    heartbeat_interval_seconds: float = Field(default=10.0, gt=0, le=MAX_LEASE_SECONDS)
    """How often agents are told to heartbeat; keep it well under the TTL."""
    builder_push_registry: str = ""
    """The registry the builder pushes images to (its ``push_registry``). Without one, code and git jobs
    cannot run on kubernetes queues (the cluster could not pull their images), and Enqueue says so."""
    enqueues_per_second: float = Field(default=50.0, gt=0)
    """Enqueues each key may make per second, per queue replica (RESOURCE_EXHAUSTED ``RATE_LIMITED``
    beyond); bursts of up to ``enqueue_burst``."""
    enqueue_burst: float = Field(default=200.0, ge=1)
    retention: QueueRetentionSettings = QueueRetentionSettings()
    """What the queue forgets and when (``TAKEOFF_RETENTION__*``): ended items with their history, request
    ids (services/takeoff_queue/retention.py)."""
    sqlite_synchronous: SqliteSynchronous = "FULL"
    """On SQLite: FULL syncs the WAL at every (group) commit, so an item acknowledged survives power loss;
    NORMAL only at checkpoints (a process kill loses nothing either way). PostgreSQL syncs every commit."""

    pending_window: int = Field(default=1000, ge=0, le=10_000)
    """How many PENDING items of each queue the service holds in memory, in dispatch order; the rest stay
    in the database and are read in as dispatch reaches them, so memory and start-up stay bounded however
    deep a queue is (docs/design.md §9). 0: hold them all. Replicas always hold them all. At most 10,000: a
    page is read by its ids, one bound parameter each (PostgreSQL's driver takes 65,535)."""

    replicas: bool = False
    """Several queue processes share one PostgreSQL database (``database_url``) and serve any call and any
    agent: docs/design.md §5 "Several queue replicas". Refused on SQLite, which one process owns."""

    @field_validator("heartbeat_interval_seconds")
    @classmethod
    def _heartbeat_within_ttl(cls, seconds: float, info: ValidationInfo) -> float:
        # An agent that heartbeats only as often as its leases expire loses them between two beats.
        ttl = info.data.get("lease_ttl_seconds")
        if ttl is not None and seconds >= ttl:
            raise ValueError(f"must be less than lease_ttl_seconds ({ttl:g})")
        return seconds
