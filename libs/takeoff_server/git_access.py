"""Talking to git remotes with configured credentials, for every service that does (registry, builder).

Credentials come from settings, never from requests. They reach git only through its environment (an
``http.extraHeader`` for https tokens, ``GIT_SSH_COMMAND`` for ssh keys), the token only for remotes
under its scope and with redirects off; git may never prompt, nor run remote helpers such as ``ext::``.
Whatever git says is quoted with the token blanked out.
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

import git
from pydantic import BaseModel, SecretStr, field_validator


class GitAccessSettings(BaseModel):
    """The git credential settings a service accepts (mixed into its settings class)."""

    git_https_token: SecretStr | None = None
    """Token sent (HTTP basic auth) to https git remotes under ``git_https_token_scope``; never stored."""
    git_https_username: str = "x-access-token"
    """User name paired with the token; hosts differ (GitHub takes any, Bitbucket wants x-token-auth)."""
    git_https_token_scope: str = "https://"
    """The https remotes that get the token, e.g. ``https://github.com/acme/``: the same host and port and
    a path under these segments (``/acme`` covers ``/acme/repo.git``, not ``/acme-evil/...``); the default,
    ``https://``, covers every https remote."""
    git_ssh_key_path: Path | None = None
    """Private key for ``ssh://`` and ``git@host:path`` remotes; unset means ssh's own configuration."""

    @field_validator("git_https_token_scope")
    @classmethod
    def _check_token_scope(cls, scope: str) -> str:
        TokenScope.parse(scope)
        return scope

    @field_validator("git_ssh_key_path")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def git_credentials(self) -> GitCredentials:
        token = self.git_https_token
        return GitCredentials(
            https_token=token.get_secret_value() if token is not None else None,
            https_username=self.git_https_username,
            https_token_scope=TokenScope.parse(self.git_https_token_scope),
            ssh_key_path=self.git_ssh_key_path,
        )


_HTTPS_PORT = 443


@dataclass(frozen=True, slots=True)
class TokenScope:
    """The https remotes a token may go to: one host and port (or every host) and a path prefix, compared
    by whole segments. A plain string prefix would let ``https://host`` cover ``https://host.evil.example``."""

    host: str | None = None
    """Lower case; None means every host."""
    port: int = _HTTPS_PORT
    segments: tuple[str, ...] = ()

    @classmethod
    def parse(cls, scope: str) -> TokenScope:
        """Raises ValueError saying what is wrong with ``scope``."""
        split = _split(scope)
        if split is None or split[0].scheme != "https":
            raise ValueError("must be an https:// URL (a token is never sent over plain http)")
        parts, port = split
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry user information")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        segments = _segments(parts.path)
        if segments is None:
            raise ValueError("must not contain '.' or '..' path segments")
        if not parts.hostname:
            if parts.netloc or segments:
                raise ValueError("a scope with a path needs a host")
            return cls()
        return cls(parts.hostname, port, segments)

    def covers(self, url: str) -> bool:
        split = _split(url)
        if split is None or split[0].scheme != "https" or not split[0].hostname:
            return False
        parts, port = split
        # A URL's own user information may stand in for the host to a careless reader
        # (https://host@evil.example/): such a URL never gets the token.
        if parts.username is not None or parts.password is not None:
            return False
        segments = _segments(parts.path)
        if segments is None:
            return False
        if self.host is None:
            return True
        return (
            parts.hostname == self.host
            and port == self.port
            and segments[: len(self.segments)] == self.segments
        )


def _split(url: str) -> tuple[SplitResult, int] | None:
    """``url`` taken apart with its port (443 when it names none), or None when its port is not a number."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    return parts, _HTTPS_PORT if port is None else port


def _segments(path: str) -> tuple[str, ...] | None:
    """The non-empty, decoded segments of ``path``; None when one is ``.`` or ``..``, which the server
    would resolve to some other path than the one compared."""
    segments = tuple(unquote(segment) for segment in path.split("/") if segment)
    if any(segment in (".", "..") for segment in segments):
        return None
    return segments


@dataclass(frozen=True, slots=True)
class GitCredentials:
    https_token: str | None = None
    https_username: str = "x-access-token"
    https_token_scope: TokenScope = field(default_factory=TokenScope)
    ssh_key_path: Path | None = None

    def environment(self, url: str) -> dict[str, str]:
        """Environment variables for one git command against ``url``."""
        environment = {
            "GIT_TERMINAL_PROMPT": "0",
            "GCM_INTERACTIVE": "never",
            # No remote helpers such as ext::, which would run commands on this machine.
            "GIT_ALLOW_PROTOCOL": "file:git:http:https:ssh",
        }
        ssh = ["ssh", "-o", "BatchMode=yes"]
        if self.ssh_key_path is not None:
            ssh += ["-o", "IdentitiesOnly=yes", "-i", str(self.ssh_key_path)]
        environment["GIT_SSH_COMMAND"] = shlex.join(ssh)
        if self.https_token and self.https_token_scope.covers(url):
            basic = base64.b64encode(f"{self.https_username}:{self.https_token}".encode()).decode()
            environment |= {
                "GIT_CONFIG_COUNT": "2",
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
                # A redirect could carry the header to another host.
                "GIT_CONFIG_KEY_1": "http.followRedirects",
                "GIT_CONFIG_VALUE_1": "false",
            }
        return environment

    def explain(self, error: git.GitCommandError) -> str:
        """The last thing git said, with the token blanked out."""
        said = error.stderr if isinstance(error.stderr, str) else ""
        lines = [line.strip().removeprefix("stderr: ").strip("'").strip() for line in said.splitlines()]
        lines = [line.removeprefix("fatal: ") for line in lines if line]
        explanation = lines[-1] if lines else f"git exited with status {error.status}"
        if self.https_token:
            explanation = explanation.replace(self.https_token, "***")
        return explanation[:500]
