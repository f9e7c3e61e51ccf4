"""`takeoff up` starts the console as its last process and prints a sign-in link that works once; `takeoff
status` checks it over HTTP; stopping the stack stops it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.processes import pid_alive, wait_for

KEY_VARIABLES = (
    "TAKEOFF_API_KEY",
    "TAKEOFF_TOKEN",
    "TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE",
    "TAKEOFF_API_KEY_FILE",
)


def user_environment(home: Path) -> dict[str, str]:
    """A user's shell: TAKEOFF_HOME set, no key anywhere but what ``takeoff up`` writes."""
    inherited = {name: value for name, value in os.environ.items() if name not in KEY_VARIABLES}
    return {**inherited, "TAKEOFF_HOME": str(home), "COLUMNS": "300"}


def test_up_prints_a_one_time_link_and_stops_the_console_with_the_stack(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = subprocess.Popen(
        [sys.executable, "-m", "takeoff.cli", "up", "--base-port", "0"],
        env=user_environment(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert up.stdout is not None
        line = ""
        while "web console:" not in line:  # each read waits for the next line `takeoff up` prints
            line = up.stdout.readline()
            assert line, f"takeoff up ended before printing the link: {up.stderr.read() if up.stderr else ''}"
        link = line.split("web console:", 1)[1].split()[0]
        record = json.loads((home / "stack.json").read_text())
        console = record["services"]["console"]
        assert link.startswith(f"http://{console['addresses'][0]}/signin?code=")

        with httpx.Client(follow_redirects=False, timeout=30) as browser:
            assert browser.get(link).status_code == 303
            assert browser.get(link.rsplit("/", 1)[0] + "/projects/default/jobs").status_code == 200
        with httpx.Client(follow_redirects=False, timeout=30) as other_browser:
            assert other_browser.get(link).status_code == 403
        assert not (home / "run" / "console-signin.code").exists()

        status = subprocess.run(
            [sys.executable, "-m", "takeoff.cli", "status", "--json"],
            env=user_environment(home),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["console"]["health"] == "SERVING"
    finally:
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=60)
    assert up.returncode == 0
    wait_for(lambda: not pid_alive(console["pid"]), what="the console to exit")
