"""The stack file ``takeoff up`` leaves in ``TAKEOFF_HOME`` while it runs: which service listens where.

Apart from :mod:`takeoff._home`, which a launched job imports: it never reads this file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

STACK_FILE = "stack.json"


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
