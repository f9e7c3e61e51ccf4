"""Talking to git remotes with configured credentials, for every service that does (registry, builder).

Credentials come from settings, never from requests. They reach git only through its environment (an
``http.extraHeader`` for https tokens, ``GIT_SSH_COMMAND`` for ssh keys), the token only for remotes
under its scope and with redirects off; git may never prompt, nor run remote helpers such as ``ext::``.
Whatever git says is quoted with the token blanked out.
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass
from pathlib import Path

import git
from pydantic import BaseModel, SecretStr, field_validator


class GitAccessSettings(BaseModel):
    """The git credential settings a service accepts (mixed into its settings class)."""

    git_https_token: SecretStr | None = None
    """Token sent (HTTP basic auth) to https git remotes under ``git_https_token_scope``; never stored."""
    git_https_username: str = "x-access-token"
    """User name paired with the token; hosts differ (GitHub takes any, Bitbucket wants x-token-auth)."""
    git_https_token_scope: str = "https://"
    """URL prefix whose remotes get the token, e.g. ``https://github.com/acme/``; default: every https one."""
    git_ssh_key_path: Path | None = None
    """Private key for ``ssh://`` and ``git@host:path`` remotes; unset means ssh's own configuration."""

    @field_validator("git_https_token_scope")
    @classmethod
    def _check_token_scope(cls, scope: str) -> str:
        if not scope.startswith("https://"):
            raise ValueError("must start with https:// (a token is never sent over plain http)")
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
            https_token_scope=self.git_https_token_scope,
            ssh_key_path=self.git_ssh_key_path,
        )


@dataclass(frozen=True, slots=True)
class GitCredentials:
    https_token: str | None = None
    https_username: str = "x-access-token"
    https_token_scope: str = "https://"
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
        if self.https_token and url.startswith(self.https_token_scope):
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
