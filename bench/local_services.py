"""Services the benchmarks start for themselves: a real registry (``python -m takeoff_registry``) on a free
loopback port, as a process of its own, so that what a benchmark measures includes gRPC and the process
boundary a job's client sees.

    key = new_admin_key()
    with registry_process(admin_key=key) as registry:
        ...  # a client of registry.address, presenting key
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class RegistryProcess:
    address: str
    """Where it listens, ``127.0.0.1:PORT``."""
    pid: int
    """For reading its CPU time from /proc."""


def new_admin_key() -> str:
    """A fresh admin secret for ``registry_process(admin_key=...)``."""
    # The registry shows a key's ``tko_<id>_`` prefix as its hint, so the key reads as a benchmark's.
    return f"tko_benchadmin_{secrets.token_urlsafe(32)}"


@contextmanager
def registry_process(
    home: Path | None = None,
    *,
    database_url: str | None = None,
    admin_key: str | None = None,
    quiet: bool = False,
) -> Iterator[RegistryProcess]:
    """A registry listening on a free loopback port, stopped on exit.

    ``home``: its TAKEOFF_HOME; default: a temporary folder, removed afterwards. ``database_url``: its
    TAKEOFF_DATABASE_URL; default: SQLite under ``home``. ``admin_key``: a secret it imports at start as
    an admin key (from ``home/admin.key``), for a caller to present; default: none. ``quiet``: its output
    is discarded rather than mixed into the benchmark's.
    """
    with ExitStack() as stack:
        if home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="takeoff-bench-")))
        ready = home / "registry.ready"
        environment = {
            **os.environ,
            "TAKEOFF_HOME": str(home),
            # Port 0: the registry picks a free one and writes it to the ready file.
            "TAKEOFF_LISTEN": json.dumps(["127.0.0.1:0"]),
            "TAKEOFF_READY_FILE": str(ready),
        }
        if database_url:
            environment["TAKEOFF_DATABASE_URL"] = database_url
        if admin_key is not None:
            key_file = home / "admin.key"
            key_file.write_text(admin_key + "\n")
            key_file.chmod(0o600)  # it holds an admin secret
            environment["TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE"] = str(key_file)
        output = subprocess.DEVNULL if quiet else None
        process = subprocess.Popen(
            [sys.executable, "-m", "takeoff_registry"], env=environment, stdout=output, stderr=output
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while not ready.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the registry did not start")
                time.sleep(0.05)
            yield RegistryProcess(json.loads(ready.read_text())["addresses"][0], process.pid)
        finally:
            # Before the temporary home is removed: the registry still has its database open there.
            process.terminate()
            process.wait()


def lift_enqueue_limit() -> None:
    """Let the queue services this process starts take enqueues as fast as they come: a benchmark measures
    the queue, not its per-key rate limit (50 a second by default)."""
    os.environ["TAKEOFF_ENQUEUES_PER_SECOND"] = "1000000"
    os.environ["TAKEOFF_ENQUEUE_BURST"] = "1000000"
