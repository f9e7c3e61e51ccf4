"""Agent settings: the agent.yaml file, overridden by ``TAKEOFF_*`` variables."""

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, field_validator

from takeoff_agent.runners import runner_kind
from takeoff_rpc.channels import check_target
from takeoff_server.config import ServerSettings, readable_file

Target = Annotated[str, AfterValidator(check_target)]


class AgentSettings(ServerSettings):
    listen: list[str] = ["127.0.0.1:50054"]
    name: str = Field(default="", max_length=256)
    """Shown in ``takeoff agents``; empty means the host name."""
    project: str = Field(default="default", min_length=1, max_length=256)
    """The project of queues given as ``{q}`` alone (``TAKEOFF_PROJECT``, as for every command)."""
    queues: list[str] = Field(default=[], max_length=256)
    """Queues to serve, as ``projects/{p}/queues/{q}`` or ``{q}`` in ``project``."""
    max_jobs: int = Field(default=1, ge=1, le=4096)
    """How many items the agent works on at once."""
    queue_address: Target = "127.0.0.1:50052"
    """``host:port``, ``unix:/path``, or the replicas of a service as ``host:port,host:port`` or
    ``dns:///name:port`` (failed over in order, takeoff_rpc.channels.dial_target); the same for the builder
    and the registry."""
    builder_address: Target = "127.0.0.1:50053"
    registry_address: Target = "127.0.0.1:50051"
    job_registry_address: Target | None = Field(default=None, min_length=1, max_length=1024)
    """The registry's address as jobs are given it (TAKEOFF_REGISTRY): ``host:port``, or ``unix:/path``
    (the container runner mounts that socket into containers); unset: ``registry_address``. A cluster's
    jobs need an address the cluster can reach (docs/design.md §16)."""
    job_registry_ca_file: Path | None = None
    """The CA certificate jobs check the registry's TLS certificate against (TAKEOFF_TLS_CA_FILE points at
    a copy the runner gives the job), when the registry jobs are given is a ``host:port``; unset: the
    agent's own ``tls.ca_file`` when it has ``tls``. Jobs given a ``unix:`` address get none."""
    runners: dict[str, dict[str, object]] = Field(default={"local-process": {}}, min_length=1)
    """One entry per resource kind the agent runs (``local-process``, ``local-container``, ``kubernetes``)
    with that runner's options; the runner checks its options when the agent starts, and the agent refuses
    to start with one it does not take, naming it."""
    stop_grace_seconds: float = Field(default=10.0, ge=0, le=86400)
    """Between SIGTERM and SIGKILL when a job is cancelled, revoked or out of time."""
    drain_timeout_seconds: float | None = Field(default=None, ge=0, le=86400)
    """How long a draining agent lets running jobs go on before stopping them; unset: until they end."""
    run_relay: bool = True
    """Relay the RunService calls of local-process jobs through the agent (``TAKEOFF_RUN_RELAY``), so a job
    need not load gRPC for them (takeoff_agent.relay); off: every job calls the registry itself."""
    state_dir: Path | None = None
    """Where the agent keeps its id and its jobs' state; empty means ``{home}/agent``. While another agent
    on this host holds it, an agent takes the first free ``{state_dir}/{n}`` (n = 2, 3, ...) instead
    (identity.claim_state_dir)."""

    @field_validator("queues")
    @classmethod
    def _check_queues(cls, queues: list[str]) -> list[str]:
        for queue in queues:
            if not queue or queue.strip() != queue:
                raise ValueError(f"{queue!r} is not a queue name")
        return queues

    @field_validator("job_registry_ca_file")
    @classmethod
    def _check_ca_file(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @field_validator("runners")
    @classmethod
    def _check_runners(cls, runners: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
        for name in runners:
            runner_kind(name)
        return runners

    @property
    def state_path(self) -> Path:
        return self.state_dir or self.home / "agent"

    @property
    def job_ca_file(self) -> Path | None:
        """The CA certificate jobs are given, if any (``job_registry_ca_file``)."""
        address = self.job_registry_address or self.registry_address
        if address.startswith("unix:"):
            return None  # a Unix socket stays plaintext
        if self.job_registry_ca_file is not None:
            return self.job_registry_ca_file
        return self.tls.ca_file if self.tls is not None else None
