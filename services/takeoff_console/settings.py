"""Console settings (``TAKEOFF_*`` variables, a YAML file, or these defaults).

The console is a client of the services like any other: it presents the signed-in user's key on every call
and has none of its own, so the key settings every server has are refused here rather than ignored. It
reads no database: ``database_url``, shared by a whole deployment's environment, means nothing to it.
"""

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, field_validator, model_validator

from takeoff_rpc.channels import check_target
from takeoff_server.config import ServerSettings, readable_file

DEFAULT_PORT = 8080


class ConsoleSettings(ServerSettings):
    listen: list[str] = Field(default=[f"127.0.0.1:{DEFAULT_PORT}"], min_length=1, max_length=1)
    """One ``host:port`` to serve the pages on (port 0 picks a free one)."""
    registry_address: Annotated[str, AfterValidator(check_target)] = "127.0.0.1:50051"
    queue_address: Annotated[str, AfterValidator(check_target)] = "127.0.0.1:50052"
    """Either may name a service's replicas, ``host:port,host:port`` or ``dns:///name:port``, failed over in
    order (takeoff_rpc.channels.dial_target)."""
    tls_ca_file: Path | None = None
    """The CA that signed the services' certificates (``TAKEOFF_TLS_CA_FILE``, as for the CLI): calls to a
    ``host:port`` use TLS when it is set. ``tls`` also serves the pages over HTTPS with its certificate."""
    allowed_hosts: list[str] = []
    """``host:port`` values the Host header may carry; empty: ``127.0.0.1:{port}`` and ``localhost:{port}``.
    Any other Host is refused, so a web page whose name a DNS rebinding points at 127.0.0.1 cannot reach
    the console with the browser's cookie."""
    signin_code_file: Path | None = None
    """A file holding a one-time sign-in code (``takeoff up`` writes one, mode 0600). The console reads it at
    start and deletes it; ``/signin?code=...`` then signs in once with the admin key of ``home``."""
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    """How long a signed-in browser stays signed in without signing in again."""

    @field_validator("listen")
    @classmethod
    def _tcp_only(cls, addresses: list[str]) -> list[str]:
        if addresses[0].startswith("unix:"):
            raise ValueError("the console serves on host:port, not a Unix socket")
        return addresses

    @field_validator("tls_ca_file")
    @classmethod
    def _readable_ca(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @model_validator(mode="after")
    def _no_key_of_its_own(self) -> "ConsoleSettings":
        given = [
            name for name in ("api_key", "api_key_file", "database_url") if getattr(self, name) is not None
        ]
        if given:
            raise ValueError(
                f"{' and '.join(given)}: the console calls the services with each signed-in user's key, never"
                " one of its own"
            )
        return self

    @property
    def host(self) -> str:
        return self.listen[0].rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.listen[0].rpartition(":")[2])
