"""Registry settings (``TAKEOFF_*`` variables, a YAML file, or these defaults)."""

from pathlib import Path

from pydantic import SecretStr, field_validator

from takeoff_server.config import ServerSettings

MIB = 1024 * 1024


class RegistrySettings(ServerSettings):
    listen: list[str] = ["127.0.0.1:50051"]
    max_artifact_bytes: int = 512 * MIB
    """Largest code tarball UploadArtifact accepts."""
    artifact_dir: Path | None = None
    """Where artifacts are stored, content-addressed; unset means ``{home}/artifacts``."""
    git_timeout_seconds: float = 60.0
    """How long resolving a git ref may take before the remote counts as unreachable."""
    git_https_token: SecretStr | None = None
    """Token sent (HTTP basic auth) to https git remotes under ``git_https_token_scope``; never stored."""
    git_https_username: str = "x-access-token"
    """User name paired with the token; hosts differ (GitHub takes any, Bitbucket wants x-token-auth)."""
    git_https_token_scope: str = "https://"
    """URL prefix whose remotes get the token, e.g. ``https://github.com/acme/``; default: every https one."""
    git_ssh_key_path: Path | None = None
    """Private key for ``ssh://`` and ``git@host:path`` remotes; unset means ssh's own configuration."""

    @field_validator("max_artifact_bytes")
    @classmethod
    def _check_max_artifact_bytes(cls, size: int) -> int:
        if size <= 0:
            raise ValueError("must be a positive number of bytes")
        return size

    @field_validator("git_timeout_seconds")
    @classmethod
    def _check_git_timeout(cls, seconds: float) -> float:
        if seconds <= 0:
            raise ValueError("must be positive")
        return seconds

    @field_validator("git_https_token_scope")
    @classmethod
    def _check_token_scope(cls, scope: str) -> str:
        if not scope.startswith("https://"):
            raise ValueError("must start with https:// (a token is never sent over plain http)")
        return scope

    @field_validator("artifact_dir", "git_ssh_key_path")
    @classmethod
    def _expand_user_in_paths(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def artifacts_path(self) -> Path:
        return self.artifact_dir or self.home / "artifacts"
