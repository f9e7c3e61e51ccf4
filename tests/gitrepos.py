"""Git remotes served the way real ones are, on loopback, for the tests of the services that fetch them."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.processes import wait_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def git_daemon(git: str, repository: Path) -> Iterator[str]:
    """`git daemon` serving a bare repository on a loopback port; yields its ``git://`` URL."""
    port = free_port()
    daemon = subprocess.Popen(
        [
            git,
            "daemon",
            "--reuseaddr",
            f"--base-path={repository.parent}",
            "--export-all",
            "--listen=127.0.0.1",
            f"--port={port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def accepting() -> bool:
        assert daemon.poll() is None, "git daemon exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    try:
        wait_for(accepting, timeout=15, what="git daemon")
        yield f"git://127.0.0.1:{port}/{repository.name}"
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
