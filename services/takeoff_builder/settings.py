"""Builder settings (``TAKEOFF_*`` variables, a YAML file, or these defaults)."""

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ByteSize, Field, SecretStr, field_validator

from takeoff_rpc.channels import check_target
from takeoff_server.config import ServerSettings
from takeoff_server.git_access import GitAccessSettings
from takeoff_server.retention import RetentionSettings

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class RegistryAuth(BaseModel):
    """A login to one container registry."""

    username: str
    password: SecretStr


class BuilderRetentionSettings(RetentionSettings):
    max_age_days: float | None = Field(default=30.0, gt=0)
    """Build records, venvs, code and images unused for this long are pruned; unset = no age limit."""
    max_bytes: ByteSize | None = None
    """Above this (``50GiB``, bytes), venvs and code are pruned least recently used first."""
    max_image_bytes: ByteSize | None = None
    """The same for the images the builder made (each counted with its base layers: an over-estimate)."""


class BuilderSettings(ServerSettings, GitAccessSettings):
    listen: list[str] = ["127.0.0.1:50053"]
    registry_address: Annotated[str, AfterValidator(check_target)] = "127.0.0.1:50051"
    """Where job versions are resolved and code artifacts downloaded (``takeoff up`` sets it); a list of
    replicas, ``host:port,host:port`` or ``dns:///name:port``, is failed over in order."""
    builds_dir: Path | None = None
    """Venvs, unpacked code, git mirrors; unset means ``{home}/builds``. Agents using venv builds must
    see the same directory at the same path."""
    max_concurrent_builds: int = Field(default=2, gt=0)
    """Builds that run at once; more wait in QUEUED. Cache hits never wait."""

    default_base_image: str = "python:3.12-slim"
    """Base image of generated Dockerfiles when the job names none; it must have ``python3`` with venv."""
    image_repository: str = "takeoff"
    """Images are tagged ``{push_registry}/{image_repository}/{job}:{build key[:16]}``."""
    push_registry: str | None = None
    """``host[:port]`` of the registry images are pushed to; unset means images stay local."""
    push_username: str | None = None
    push_password: SecretStr | None = None
    """The login to ``push_registry``; it replaces an entry for that host in ``registry_auth``."""
    registry_auth: dict[str, RegistryAuth] = {}
    """Logins by registry host (``host[:port]``; ``docker.io`` for Docker Hub), used to find the images of
    image jobs (noop builds) and to push. The agent's local-container runner has a setting of the same name
    and shape for its pulls."""
    docker_host: str | None = None
    """Docker engine address; unset means ``DOCKER_HOST``, else the local socket. A local-container agent
    must use the same engine (its runner's ``docker_host``, same value): it runs the images built here
    without pulling them."""

    pip_index_url: str | None = None
    """Replaces PyPI for venv and image builds; image builds use it only when it carries no credentials."""
    pip_extra_index_urls: list[str] = []
    pip_ca_bundle: Path | None = None
    """CA certificates pip trusts (for a proxy or a mirror); unset means the host's bundle when it has one.
    Image builds copy it into the build context, as it is public."""

    git_timeout_seconds: float = Field(default=300.0, gt=0)
    """How long one git clone or fetch may take."""

    retention: BuilderRetentionSettings = BuilderRetentionSettings()
    """What is pruned when (``TAKEOFF_RETENTION__MAX_AGE_DAYS`` and so on): docs/design.md §9."""

    @field_validator("builds_dir", "pip_ca_bundle")
    @classmethod
    def _expand_user_in_paths(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("pip_ca_bundle")
    @classmethod
    def _check_ca_bundle(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @property
    def builds_path(self) -> Path:
        return self.builds_dir or self.home / "builds"

    @property
    def ca_bundle(self) -> Path | None:
        """The CA bundle pip is given, if any."""
        if self.pip_ca_bundle is not None:
            return self.pip_ca_bundle
        return HOST_CA_BUNDLE if HOST_CA_BUNDLE.is_file() else None

    @property
    def image_prefix(self) -> str:
        """What image names start with: the repository, behind the push registry when there is one."""
        return (
            f"{self.push_registry}/{self.image_repository}" if self.push_registry else self.image_repository
        )
