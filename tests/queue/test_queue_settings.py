"""The queue's lease timing settings are bounded: a bad value stops the process at start-up with one
readable line (exit status 2), before anything could overflow lease expiry arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from takeoff_queue.settings import MAX_LEASE_SECONDS, QueueSettings
from takeoff_server.config import load_settings


@pytest.mark.parametrize(
    ("env", "variable", "expected"),
    [
        pytest.param(
            {"TAKEOFF_LEASE_TTL_SECONDS": "1e12"},
            "TAKEOFF_LEASE_TTL_SECONDS",
            "less than or equal to 86400",
            id="ttl beyond a day",
        ),
        pytest.param(
            {"TAKEOFF_LEASE_TTL_SECONDS": "inf"},
            "TAKEOFF_LEASE_TTL_SECONDS",
            "less than or equal to 86400",
            id="infinite ttl",
        ),
        pytest.param(
            {"TAKEOFF_LEASE_TTL_SECONDS": "0"}, "TAKEOFF_LEASE_TTL_SECONDS", "greater than 0", id="zero ttl"
        ),
        pytest.param(
            {"TAKEOFF_LEASE_TTL_SECONDS": "5", "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS": "1e300"},
            "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS",
            "less than or equal to 86400",
            id="heartbeat beyond a day",
        ),
        pytest.param(
            {"TAKEOFF_LEASE_TTL_SECONDS": "5", "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS": "5"},
            "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS",
            "must be less than lease_ttl_seconds (5)",
            id="heartbeat as long as the ttl",
        ),
    ],
)
def test_a_bad_lease_timing_stops_the_queue_with_one_readable_line(
    tmp_path: Path, env: dict[str, str], variable: str, expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "takeoff_queue"],
        env={**os.environ, "TAKEOFF_HOME": str(tmp_path), "TAKEOFF_LISTEN": '["127.0.0.1:0"]', **env},
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert expected in lines[0]


def test_the_longest_lease_allowed_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAKEOFF_LEASE_TTL_SECONDS", str(MAX_LEASE_SECONDS))
    monkeypatch.setenv("TAKEOFF_HEARTBEAT_INTERVAL_SECONDS", str(MAX_LEASE_SECONDS - 1))

    settings = load_settings(QueueSettings)

    assert (settings.lease_ttl_seconds, settings.heartbeat_interval_seconds) == (
        MAX_LEASE_SECONDS,
        MAX_LEASE_SECONDS - 1,
    )
