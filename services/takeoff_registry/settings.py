"""Registry settings (``TAKEOFF_*`` variables, a YAML file, or these defaults)."""

from pathlib import Path

from pydantic import Field, field_validator

from takeoff_server.config import ServerSettings
from takeoff_server.git_access import GitAccessSettings
from takeoff_server.retention import RetentionSettings

MIB = 1024 * 1024


class RegistrySettings(ServerSettings, GitAccessSettings):
    listen: list[str] = ["127.0.0.1:50051"]
    max_artifact_bytes: int = 512 * MIB
    """Largest code tarball UploadArtifact accepts."""
    artifact_dir: Path | None = None
    """Where artifacts are stored, content-addressed; unset means ``{home}/artifacts``. Named artifacts'
    blobs are kept in its ``blobs`` folder, per project."""
    max_artifact_version_bytes: int = 1024 * 1024 * MIB
    """Largest named artifact version (all its files together) CreateArtifactVersion accepts."""
    git_timeout_seconds: float = 60.0
    """How long resolving a git ref may take before the remote counts as unreachable."""
    bootstrap_admin_key_file: Path | None = None
    """A file holding the first admin key's secret (at least 32 characters), imported at start unless a
    key with that secret exists (``TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE``)."""
    secrets_key_file: Path | None = None
    """The Fernet key(s) users' secrets are encrypted with, one per line, the first encrypting; unset
    means ``{home}/secrets.key``, made on first start (mode 0600)."""
    log_lines_per_run_per_second: float = Field(10_000, gt=0)
    """Sustained log lines one run may append (per registry process); more is RATE_LIMITED."""
    log_lines_per_run_burst: int = Field(50_000, ge=1)
    metric_rows_per_run_per_second: float = Field(10_000, gt=0)
    """Sustained metric rows one run may log (per registry process); more is RATE_LIMITED."""
    metric_rows_per_run_burst: int = Field(500_000, ge=1)
    """Large, so that a job logging a burst from a tight loop (the SDK batches) is not slowed."""
    retention: RetentionSettings = RetentionSettings()
    """Pruning of code artifacts no job version references and of old request ids (docs/design.md §9,
    "Retention"): ``interval_seconds``, ``in_use_hours``, ``request_id_days``. Named artifacts are kept."""

    @field_validator("max_artifact_bytes", "max_artifact_version_bytes")
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

    @field_validator("artifact_dir", "bootstrap_admin_key_file", "secrets_key_file")
    @classmethod
    def _expand_user_in_paths(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def artifacts_path(self) -> Path:
        return self.artifact_dir or self.home / "artifacts"

    @property
    def artifact_blobs_path(self) -> Path:
        return self.artifacts_path / "blobs"

    @property
    def secrets_key_path(self) -> Path:
        return self.secrets_key_file or self.home / "secrets.key"
