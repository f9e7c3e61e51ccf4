"""The host's GPUs shared among the containers of one agent (docs/design.md §7, "Containers").

The agent config lists the host's devices (``runners: local-container: gpus: ["0", "1"]``). A job asking
``gpus: N`` gets N listed devices that no other running job of this agent holds, ``gpus: all`` every listed
device, ``gpus: ["1"]`` those devices. A job whose devices are taken waits, first come first served, rather
than share a device; it holds its devices until its end is known. A restarted agent claims again the devices
of the jobs it takes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

ALL = "all"


@dataclass(frozen=True, slots=True)
class GpuRequest:
    """What a resource config's ``gpus`` asks for: ``count`` devices, or exactly ``devices``."""

    count: int = 0
    devices: tuple[str, ...] = ()
    every: bool = False
    """``gpus: all``."""

    def describe(self) -> str:
        if self.every:
            return "all GPUs"
        if self.devices:
            return f"GPU {', '.join(self.devices)}"
        return f"{self.count} GPU{'s' if self.count != 1 else ''}"


def parse_request(value: object) -> GpuRequest | None:
    """``gpus`` of a resource config (``"all"``, a count, or a list of device ids); None: no GPUs. Raises
    ValueError saying what is wrong."""
    if value == ALL:
        return GpuRequest(every=True)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a GPU count cannot be negative ({value})")
        return GpuRequest(count=value) if value else None
    if isinstance(value, list) and all(isinstance(device, str) and device for device in value):
        if len(set(value)) != len(value):
            raise ValueError("lists a device twice")
        return GpuRequest(devices=tuple(value)) if value else None
    raise ValueError(f'must be "all", a count, or a list of device ids, not {value!r}')


@dataclass(eq=False, slots=True)
class _Waiter:
    holder: str
    request: GpuRequest
    granted: asyncio.Future[tuple[str, ...]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class GpuPool:
    """The listed devices and which job (by lease id) holds each."""

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = tuple(devices)
        self._holders: dict[str, tuple[str, ...]] = {}
        self._waiting: list[_Waiter] = []

    def problem(self, request: GpuRequest) -> str | None:
        """Why ``request`` can never be met on this agent, or None."""
        if not self.devices:
            return "this agent lists no GPUs (runners: local-container: gpus)"
        if request.count > len(self.devices):
            return f"asks for {request.count} GPUs; this agent lists {len(self.devices)}"
        unknown = [device for device in request.devices if device not in self.devices]
        if unknown:
            return f"device {', '.join(unknown)} is not among this agent's GPUs ({', '.join(self.devices)})"
        return None

    def free(self) -> list[str]:
        taken = {device for devices in self._holders.values() for device in devices}
        return [device for device in self.devices if device not in taken]

    def held(self, holder: str) -> tuple[str, ...]:
        return self._holders.get(holder, ())

    async def acquire(
        self,
        holder: str,
        request: GpuRequest,
        waiting: Callable[[str], Awaitable[object]] | None = None,
    ) -> tuple[str, ...]:
        """Devices for ``holder``, once they are free; ``waiting`` hears why it waits, if it must."""
        if (problem := self.problem(request)) is not None:
            raise ValueError(problem)
        if not self._waiting and (devices := self._pick(request)) is not None:
            self._holders[holder] = devices
            return devices
        waiter = _Waiter(holder, request)
        self._waiting.append(waiter)
        try:
            if waiting is not None:
                await waiting(
                    f"waiting for {request.describe()} ({len(self.free())} of {len(self.devices)} free)"
                )
            return await asyncio.shield(waiter.granted)
        except asyncio.CancelledError:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            else:  # granted as it was cancelled: give the devices back
                self.release(holder)
            self._grant()
            raise

    def claim(self, holder: str, devices: Sequence[str]) -> None:
        """``holder`` holds ``devices`` already (a job taken back after an agent restart)."""
        listed = tuple(device for device in devices if device in self.devices)
        if listed:
            self._holders[holder] = listed

    def release(self, holder: str) -> None:
        if self._holders.pop(holder, None) is not None:
            self._grant()

    def _pick(self, request: GpuRequest) -> tuple[str, ...] | None:
        free = self.free()
        if request.every:
            wanted = list(self.devices)
        elif request.devices:
            wanted = list(request.devices)
        else:
            return tuple(free[: request.count]) if len(free) >= request.count else None
        return tuple(wanted) if all(device in free for device in wanted) else None

    def _grant(self) -> None:
        """First come, first served: a job asking for more is not passed by later jobs asking for less."""
        while self._waiting:
            waiter = self._waiting[0]
            devices = self._pick(waiter.request)
            if devices is None:
                return
            self._waiting.pop(0)
            self._holders[waiter.holder] = devices
            waiter.granted.set_result(devices)
