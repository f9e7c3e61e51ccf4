"""Where a local Takeoff lives: ``TAKEOFF_HOME`` and the stack file ``takeoff up`` leaves there; and
which project a client works in unless told: ``TAKEOFF_PROJECT`` (set for every launched job).

Clients find a service as ``TAKEOFF_<SERVICE>_ADDRESS`` (and the registry also as ``TAKEOFF_REGISTRY``,
which every launched job receives), else the address the running stack recorded, else the default port.
(A launched job's ``TAKEOFF_QUEUE`` names its queue, not the queue service.)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_PORTS = {"registry": 50051, "queue": 50052, "builder": 50053, "agent": 50054, "console": 8080}
"""The gRPC services' ports, and the web console's (HTTP)."""
STACK_FILE = "stack.json"
DEFAULT_PROJECT = "default"


def takeoff_home() -> Path:
    return Path(os.environ.get("TAKEOFF_HOME") or "~/.takeoff").expanduser()


def default_project() -> str:
    """``TAKEOFF_PROJECT`` (set for every launched job), else ``default``."""
    return os.environ.get("TAKEOFF_PROJECT") or DEFAULT_PROJECT


@dataclass
class RunningService:
    """One process of a running stack."""

    name: str
    addresses: list[str]
    pid: int
    log: str
    metrics_address: str = ""
    """Where its Prometheus metrics are served (``TAKEOFF_METRICS_LISTEN``); empty when they are not."""

    @property
    def address(self) -> str:
        """The TCP address when there is one: what a client on this machine should dial."""
        return next((a for a in self.addresses if not a.startswith("unix:")), self.addresses[0])


@dataclass
class StackRecord:
    """What ``takeoff up`` records in ``TAKEOFF_HOME/stack.json`` while it runs."""

    supervisor_pid: int
    services: dict[str, RunningService] = field(default_factory=dict)

    def write(self, home: Path) -> None:
        partial = home / (STACK_FILE + ".partial")
        partial.write_text(json.dumps(asdict(self), indent=2))
        partial.replace(home / STACK_FILE)

    @classmethod
    def read(cls, home: Path) -> StackRecord | None:
        try:
            data = json.loads((home / STACK_FILE).read_text())
        except (OSError, ValueError):
            return None
        return cls(
            supervisor_pid=data["supervisor_pid"],
            services={name: RunningService(**s) for name, s in data["services"].items()},
        )


def service_address(service: str, home: Path | None = None) -> str:
    """The address a client should dial for ``service`` (``registry``, ``queue``, ``builder``, ``agent``,
    ``console``)."""
    variables = [
        f"TAKEOFF_{service.upper()}_ADDRESS",
        *(["TAKEOFF_REGISTRY"] if service == "registry" else []),
    ]
    for variable in variables:
        if address := os.environ.get(variable):
            return address
    stack = StackRecord.read(home or takeoff_home())
    if stack is not None and service in stack.services:
        return stack.services[service].address
    return f"127.0.0.1:{DEFAULT_PORTS[service]}"
