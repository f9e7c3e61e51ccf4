"""Start Takeoff processes the way users do, and wait for them without sleeping blindly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], *, timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something other than None or False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := probe()) not in (None, False):
            return value  # type: ignore[return-value]
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def eventually(probe: Callable[[], T | None], what: str, *, within: float = 60.0) -> T:
    """``wait_for`` for a test on the event loop: ``probe()`` once it is neither None, False nor empty."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (value := probe()) not in (None, False, []):
            return value  # type: ignore[return-value]
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


async def until(probe: Callable[[], Awaitable[bool]], what: str, *, within: float = 60.0) -> None:
    """``eventually`` for a state an async ``probe`` reads (through the API, from another process)."""
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited but not been reaped by its parent yet: it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class ServiceProcess:
    def __init__(self, process: subprocess.Popen[str], addresses: list[str], log: Path) -> None:
        self.process = process
        self.addresses = addresses
        self.log = log
        """Where the process's output goes (stdout and stderr, appended)."""

    @property
    def address(self) -> str:
        return self.addresses[0]

    def terminate(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@contextmanager
def service_process(
    service: str, home: Path, *, env: dict[str, str] | None = None, listen: list[str] | None = None
) -> Iterator[ServiceProcess]:
    """``python -m takeoff_<service>`` on a free loopback port, ready when its ready file appears. Its output
    goes to ``{home}/{service}.log``, a file, not a pipe: a pipe nobody reads fills after 64 KiB and then
    stalls the service at its next log line (a module's registry stopped answering so)."""
    ready = home / f"{service}.ready"
    ready.unlink(missing_ok=True)
    home.mkdir(parents=True, exist_ok=True)  # the service makes its home; its log is there from the start
    log = home / f"{service}.log"
    output = log.open("a")
    process = subprocess.Popen(
        [sys.executable, "-m", f"takeoff_{service}"],
        env={
            **os.environ,
            "TAKEOFF_HOME": str(home),
            "TAKEOFF_LISTEN": json.dumps(listen or ["127.0.0.1:0"]),
            "TAKEOFF_READY_FILE": str(ready),
            **(env or {}),
        },
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output.close()  # the child holds its own copy
    try:

        def started() -> list[str] | None:
            if process.poll() is not None:
                raise AssertionError(f"{service} exited with {process.returncode}: {log.read_text()}")
            return json.loads(ready.read_text())["addresses"] if ready.exists() else None

        yield ServiceProcess(process, wait_for(started, what=f"{service} to serve"), log)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
