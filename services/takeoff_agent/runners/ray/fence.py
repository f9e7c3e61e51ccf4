"""Runs a Ray job's command and stops it once the agent's leases lapse: the job's self-fence.

Ray has no deadline of its own to keep ahead of the lease (as a Kubernetes Job's activeDeadlineSeconds), so
the entrypoint the ray runner submits is ``python fence.py LEASE_UNTIL GRACE FENCED SECRETS -- COMMAND...``,
run with the job's venv Python on the filesystem the cluster shares with the agent. SECRETS is a JSON file
(mode 0600) of the job's secret variables (its run token, user secrets), which the command gets in its
environment: Ray keeps and shows a job's runtime environment, so they never travel in it. Standard library
only: it must run in any venv. As the shim's fence (docs/design.md §7): the command runs in a process group of
its own; ``LEASE_UNTIL`` holds the UNIX time the agent renews; once it is past (or the lease directory is
gone: the attempt is over), the group gets SIGTERM, SIGKILL after GRACE seconds, the file FENCED is made and
the fence exits 143. A SIGTERM from Ray (the Jobs API's stop) is passed on to the group. The fence exits with
the command's status (128 + n for a signal n), after ending what is left of the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

CHECK_SECONDS = 0.5


def _lapsed(lease_until: str) -> bool:
    """Past the deadline, or the lease directory gone (the agent has ended the attempt)."""
    try:
        with open(lease_until) as file:
            return time.time() > float(file.read())
    except (OSError, ValueError):
        # Not written yet, or being replaced: the agent still renews.
        return not os.path.isdir(os.path.dirname(lease_until))


def _signal_group(pgid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, number)


def main(argv: list[str]) -> int:
    lease_until, grace, fenced, secrets, separator, *command = argv
    if separator != "--" or not command:
        print("usage: fence.py LEASE_UNTIL GRACE FENCED SECRETS -- COMMAND...", file=sys.stderr)
        return 2
    with open(secrets) as file:
        environment = {**os.environ, **json.load(file)}
    child = subprocess.Popen(command, start_new_session=True, env=environment)
    signal.signal(signal.SIGTERM, lambda number, frame: _signal_group(child.pid, signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda number, frame: _signal_group(child.pid, signal.SIGINT))
    while child.poll() is None:
        if _lapsed(lease_until):
            print("[takeoff] the agent's leases lapsed: stopping the job", file=sys.stderr, flush=True)
            _signal_group(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=float(grace))
            except subprocess.TimeoutExpired:
                _signal_group(child.pid, signal.SIGKILL)
                child.wait()
            with contextlib.suppress(OSError):  # the lease directory may be gone
                open(fenced, "w").close()
            _signal_group(child.pid, signal.SIGKILL)
            return 128 + signal.SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=CHECK_SECONDS)
    _signal_group(child.pid, signal.SIGKILL)  # what the command left behind ends with it
    status = child.returncode
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
