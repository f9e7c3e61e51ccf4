"""Settings for a server process: defaults < YAML file < ``TAKEOFF_*`` environment variables.

Each service subclasses :class:`ServerSettings` with its own fields and default address. Settings are
validated once at start-up; :func:`load_settings` turns every problem into one readable line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "TAKEOFF_"
CONFIG_FILE_ENV = "TAKEOFF_CONFIG_FILE"


class ConfigError(Exception):
    """A setting is missing or wrong; the message is one line meant for a person."""


def readable_file(value: Path | None) -> Path | None:
    """A settings validator: ``value`` (``~`` expanded) must name a readable file."""
    if value is None:
        return None
    value = value.expanduser()
    if not value.is_file():
        raise ValueError(f"{value} is not a readable file")
    return value


class TlsSettings(BaseModel):
    """TLS for a process's server and for its calls to the other services (``TAKEOFF_TLS__*``).

    The server serves ``cert_file``/``key_file`` on its TCP addresses (Unix sockets stay plaintext: only
    processes on the host reach them); its calls check servers against ``ca_file``. With
    ``require_client_cert`` it is mutual: callers must present a certificate ``ca_file`` signed, and this
    process presents its own when it calls others.
    """

    model_config = {"extra": "forbid"}

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False

    @field_validator("cert_file", "key_file", "ca_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @model_validator(mode="after")
    def _mutual_needs_a_ca(self) -> TlsSettings:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file: the CA that callers' certificates chain to")
        return self


class ServerSettings(BaseSettings):
    """What every server process is configured with."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Path("~/.takeoff")
    """State directory: SQLite files, artifacts, sockets, logs."""
    listen: list[str] = ["127.0.0.1:0"]
    """Addresses to serve on: ``host:port`` (port 0 picks a free one) or ``unix:/path``."""
    database_url: str | None = None
    """SQLAlchemy URL; unset means a SQLite file per service under ``home``."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    shutdown_grace_seconds: float = 5.0
    """How long in-flight calls may run after SIGTERM before they are cancelled."""
    ready_file: Path | None = None
    """When set, the bound addresses are written here as JSON once the server is serving."""
    parent_pid: int | None = None
    """When set (``takeoff up`` does), the server shuts down as soon as that process is gone."""
    page_token_key_file: Path | None = None
    """The key that signs page tokens (created on first use); default ``home/page-token.key``. Replicas
    of one service must share it, so that a page token from one is honoured by the next."""
    api_key: SecretStr | None = None
    """This process's own key, for its calls to the other services (``TAKEOFF_API_KEY``)."""
    api_key_file: Path | None = None
    """A file holding that key instead (``takeoff up`` writes one per service, mode 0600)."""
    tls: TlsSettings | None = None
    """TLS for this server and its calls; unset = plaintext (fine on loopback and Unix sockets only)."""
    metrics_listen: str | None = None
    """``host:port`` serving Prometheus metrics at ``/metrics`` over plain HTTP (port 0 picks a free one,
    written to the ready file); unset or empty = no metrics endpoint."""

    def own_api_key(self) -> str | None:
        """The key this process presents to the others, from ``api_key`` or ``api_key_file``."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file is None:
            return None
        try:
            return self.api_key_file.read_text().strip() or None
        except OSError as error:
            raise ConfigError(f"cannot read the API key file {self.api_key_file}: {error.strerror}") from None

    @field_validator("home", "ready_file", "api_key_file", "page_token_key_file")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, addresses: list[str]) -> list[str]:
        if not addresses:
            raise ValueError("at least one address is needed")
        for address in addresses:
            if address.startswith("unix:"):
                if not address.removeprefix("unix:").lstrip("/"):
                    raise ValueError(f"{address!r} names no socket path")
                continue
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"{address!r} is not host:port or unix:/path")
        return addresses

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, address: str | None) -> str | None:
        if not address:
            return None
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{address!r} is not host:port")
        return address

    @field_validator("shutdown_grace_seconds")
    @classmethod
    def _check_grace(cls, seconds: float) -> float:
        if not 0 <= seconds <= 3600:
            raise ValueError("must be between 0 and 3600")
        return seconds

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init arguments; the environment must win over it.
        return (env_settings, init_settings)


SettingsT = TypeVar("SettingsT", bound=ServerSettings)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {path}{line} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def _describe(error: dict[str, Any], config_file: Path | None) -> str:
    path = [str(part) for part in error["loc"]]
    key = ".".join(path)
    env_name = ENV_PREFIX + "__".join(path).upper()
    where = f"{env_name} or {key!r} in {config_file}" if config_file else env_name
    if error["type"] == "extra_forbidden":
        return f"unknown setting {key!r} in {config_file}" if config_file else f"unknown setting {key!r}"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
    return f"{where}: {message}{shown}"


def load_settings(settings_cls: type[SettingsT], config_file: Path | None = None) -> SettingsT:
    """Settings from defaults, then ``config_file`` (or ``TAKEOFF_CONFIG_FILE``), then the environment."""
    if config_file is None and os.environ.get(CONFIG_FILE_ENV):
        config_file = Path(os.environ[CONFIG_FILE_ENV])
    file_values = _read_yaml(config_file) if config_file is not None else {}
    try:
        return settings_cls(**file_values)
    except ValidationError as error:
        problems = [_describe(dict(e), config_file) for e in error.errors()]
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
