"""Container registries as the builder and the agent's container runner both meet them: which registry an
image reference names, and the login used for it (docs/design.md §6, §7)."""

from __future__ import annotations

from dataclasses import dataclass

DOCKER_HUB = "docker.io"


@dataclass(frozen=True, slots=True)
class RegistryLogin:
    username: str
    password: str

    def auth_config(self) -> dict[str, str]:
        """The docker SDK's ``auth_config`` for this login."""
        return {"username": self.username, "password": self.password}


def registry_host(reference: str) -> str:
    """The registry an image reference names: its first component when that is a host (it has a dot or a
    port, or is ``localhost``), else Docker Hub (``docker.io``)."""
    first, slash, _ = reference.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return DOCKER_HUB
