"""Where a local Takeoff lives (``TAKEOFF_HOME``, where ``takeoff up`` leaves its stack file:
:mod:`takeoff._stack_file`), and which project a client works in unless told: ``TAKEOFF_PROJECT`` (set for
every launched job). A launched job imports this module, so it imports little.

Clients find a service as ``TAKEOFF_<SERVICE>_ADDRESS`` (and the registry also as ``TAKEOFF_REGISTRY``,
which every launched job receives), else the address the running stack recorded, else the default port.
(A launched job's ``TAKEOFF_QUEUE`` names its queue, not the queue service.)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_PORTS = {"registry": 50051, "queue": 50052, "builder": 50053, "agent": 50054, "console": 8080}
"""The gRPC services' ports, and the web console's (HTTP)."""
DEFAULT_PROJECT = "default"


def takeoff_home() -> Path:
    from pathlib import Path  # here: a launched job, which never needs it, is spared its import

    return Path(os.environ.get("TAKEOFF_HOME") or "~/.takeoff").expanduser()


def default_project() -> str:
    """``TAKEOFF_PROJECT`` (set for every launched job), else ``default``."""
    return os.environ.get("TAKEOFF_PROJECT") or DEFAULT_PROJECT


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
    # Imported here: every launched job has the registry's address in TAKEOFF_REGISTRY.
    from takeoff._stack_file import StackRecord

    stack = StackRecord.read(home or takeoff_home())
    if stack is not None and service in stack.services:
        return stack.services[service].address
    return f"127.0.0.1:{DEFAULT_PORTS[service]}"
