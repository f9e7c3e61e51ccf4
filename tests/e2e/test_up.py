"""`takeoff up` end to end: real child processes, real health checks, nothing left behind; the admin and
service keys it makes in TAKEOFF_HOME/keys, found by the CLI as a user's shell would (no key in the
environment: the session's admin key and bootstrap file are removed from it)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff.stack import agent_defaults
from tests.processes import pid_alive, wait_for

TAKEOFF = [sys.executable, "-m", "takeoff.cli"]
KEY_VARIABLES = (
    "TAKEOFF_API_KEY",
    "TAKEOFF_TOKEN",
    "TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE",
    "TAKEOFF_API_KEY_FILE",
)


def user_environment(home: Path, **extra: str) -> dict[str, str]:
    """A user's shell on this machine: TAKEOFF_HOME set, no key anywhere but what ``takeoff up`` writes."""
    inherited = {name: value for name, value in os.environ.items() if name not in KEY_VARIABLES}
    return {**inherited, "TAKEOFF_HOME": str(home), "COLUMNS": "200", **extra}


def takeoff(
    home: Path, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TAKEOFF, *args],
        env=user_environment(home, **(env or {})),
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )


def stack_record(home: Path) -> dict[str, object] | None:
    try:
        return json.loads((home / "stack.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


@pytest.fixture
def agent_config(takeoff_home: Path) -> Path:
    config = takeoff_home / "agent.yaml"
    config.write_text("name: test-agent\nqueues: []\nmax_jobs: 2\n")
    return config


def start_up(home: Path, agent_config: Path) -> subprocess.Popen[str]:
    """`takeoff up --agent` in a user's environment, once its stack is recorded as started."""
    process = subprocess.Popen(
        [*TAKEOFF, "up", "--base-port", "0", "--agent", str(agent_config)],
        env=user_environment(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Past LocalStack.start's own 60 s, so that a slow start is reported by the stack, not by this wait.
    wait_for(lambda: stack_record(home) or process.poll() is not None, timeout=90, what="the stack to start")
    assert process.poll() is None, process.communicate()
    return process


@pytest.fixture
def stack(takeoff_home: Path, agent_config: Path) -> Iterator[subprocess.Popen[str]]:
    process = start_up(takeoff_home, agent_config)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def key_files(home: Path) -> dict[str, str]:
    return {path.name: path.read_text().strip() for path in sorted((home / "keys").glob("*.key"))}


def test_up_makes_an_admin_key_and_a_key_per_service_and_a_restart_reuses_them(
    takeoff_home: Path, agent_config: Path
) -> None:
    first = start_up(takeoff_home, agent_config)
    try:
        keys = key_files(takeoff_home)
        assert set(keys) == {"admin.key", "queue.key", "builder.key"}
        assert keys["admin.key"].startswith("tko_admin_")
        assert stat.S_IMODE((takeoff_home / "keys").stat().st_mode) == 0o700
        for name in keys:
            assert stat.S_IMODE((takeoff_home / "keys" / name).stat().st_mode) == 0o600, name

        # The CLI finds the admin key in TAKEOFF_HOME; the agent presents it too, so it connects.
        listed = takeoff(takeoff_home, "keys", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        services = {
            key["service"]: key["name"] for key in json.loads(listed.stdout) if key["kind"] == "service"
        }
        assert set(services) == {"queue", "builder"}
        agents = wait_for(
            lambda: json.loads(takeoff(takeoff_home, "agents", "--json").stdout) or None, what="the agent"
        )
        assert agents[0]["display_name"] == "test-agent"
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert not [name for name, key in keys.items() if key in out + err + listed.stdout]

    second = start_up(takeoff_home, agent_config)
    try:
        assert key_files(takeoff_home) == keys
        again = json.loads(takeoff(takeoff_home, "keys", "list", "--json").stdout)
        assert {key["service"]: key["name"] for key in again if key["kind"] == "service"} == services
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=60)


def child_pids(home: Path) -> dict[str, int]:
    record = stack_record(home)
    assert record is not None
    return {name: service["pid"] for name, service in record["services"].items()}  # type: ignore[attr-defined]


def test_up_serves_every_service_and_sigterm_stops_them_all(
    stack: subprocess.Popen[str], takeoff_home: Path
) -> None:
    pids = child_pids(takeoff_home)
    assert set(pids) == {"registry", "queue", "builder", "agent", "console"}

    status = takeoff(takeoff_home, "status", "--json")
    assert status.returncode == 0, status.stderr
    reported = json.loads(status.stdout)
    assert {name: s["health"] for name, s in reported.items()} == dict.fromkeys(pids, "SERVING")
    assert any(a.startswith("unix:") for a in reported["registry"]["addresses"])

    table = takeoff(takeoff_home, "status")
    assert table.returncode == 0
    assert "SERVING" in table.stdout

    stack.send_signal(signal.SIGTERM)
    out, err = stack.communicate(timeout=60)
    assert stack.returncode == 0, err
    assert "stack stopped" in out
    assert not any(pid_alive(pid) for pid in pids.values())
    assert stack_record(takeoff_home) is None
    assert takeoff(takeoff_home, "status").returncode == 1


def test_a_crashed_service_is_reported_and_the_rest_stopped(
    stack: subprocess.Popen[str], takeoff_home: Path
) -> None:
    pids = child_pids(takeoff_home)

    os.kill(pids["queue"], signal.SIGKILL)
    _, err = stack.communicate(timeout=60)

    assert stack.returncode == 1
    assert "queue exited unexpectedly" in err
    assert not any(pid_alive(pid) for pid in pids.values())


def test_killing_the_supervisor_leaves_no_service_behind(
    stack: subprocess.Popen[str], takeoff_home: Path
) -> None:
    pids = child_pids(takeoff_home)

    stack.kill()
    stack.wait()

    wait_for(lambda: not any(pid_alive(pid) for pid in pids.values()), what="the services to exit")


def test_a_second_stack_in_the_same_home_is_refused(stack: subprocess.Popen[str], takeoff_home: Path) -> None:
    second = takeoff(takeoff_home, "up", "--base-port", "0")

    assert second.returncode == 1
    assert "already running" in second.stderr
    assert "Traceback" not in second.stderr
    assert stack.poll() is None


def test_status_without_a_stack(takeoff_home: Path) -> None:
    result = takeoff(takeoff_home, "status")

    assert result.returncode == 1
    assert "no stack is running" in result.stderr


@pytest.mark.timeout(300)  # the demo builds the example's venv (pip install) before its two runs
def test_demo_runs_the_example_job_twice_and_stops_the_stack(takeoff_home: Path) -> None:
    result = takeoff(takeoff_home, "demo", timeout=280)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("FINISHED") == 2
    assert "best_loss" in result.stdout
    assert key_files(takeoff_home)["admin.key"] not in result.stdout + result.stderr
    assert "stack stopped" in result.stdout
    assert stack_record(takeoff_home) is None


def test_the_stacks_agent_gets_the_runners_this_machine_offers_and_the_registry_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    config = tmp_path / "agent.yaml"
    config.write_text("queues: [local]\n")

    defaults = agent_defaults(config, "unix:/run/registry.sock")

    assert json.loads(defaults["TAKEOFF_RUNNERS"]) == {"local-process": {}}
    assert defaults["TAKEOFF_JOB_REGISTRY_ADDRESS"] == "unix:/run/registry.sock"


def test_what_the_agent_config_or_the_environment_gives_wins_over_the_stacks_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("runners: {local-process: {}}\n")
    monkeypatch.setenv("TAKEOFF_JOB_REGISTRY_ADDRESS", "127.0.0.1:50051")

    assert agent_defaults(config, "unix:/run/registry.sock") == {}
