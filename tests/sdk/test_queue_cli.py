"""``takeoff queue|launch|items|agents`` as users run them: subprocesses against a real registry and queue,
with a scripted agent taking the work."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from takeoff.v1 import common_pb2
from tests.processes import ServiceProcess
from tests.queue.harness import ScriptedAgent, make_code_job
from tests.sdk.conftest import Takeoff, start_takeoff

THREADS = {"type": "integer", "minimum": 1, "maximum": 8, "default": 2, "description": "worker threads"}
INPUT_SCHEMA = {
    "type": "object",
    "properties": {"lr": {"type": "number", "default": 0.1}, "epochs": {"type": "integer"}},
}


@pytest.fixture
def job(registry: ServiceProcess, project: str, tmp_path: Path) -> str:
    make_code_job(registry.address, project, "train", tmp_path, schema=INPUT_SCHEMA)
    return "train"


@pytest.fixture
def resources_file(tmp_path: Path) -> Path:
    path = tmp_path / "resources.yaml"
    path.write_text("env:\n  THREADS: '{{threads}}'\n")
    return path


def refused_in_one_line(result: subprocess.CompletedProcess[str], *expected: str, exit_code: int = 1) -> None:
    """One line on stderr naming what is wrong; exit 1 for what the service refused, 2 for usage."""
    assert result.returncode == exit_code, result.stdout
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr


def test_queue_create_list_describe_update_pause_resume_delete(
    takeoff: Takeoff, project: str, resources_file: Path
) -> None:
    created = takeoff(
        "queue", "create", "cpu", "--resource", "local-process", "--config", str(resources_file),
        "--var", f"threads={json.dumps(THREADS)}", "--var", "label=string",
        "--prioritize", "--max-attempts", "2", "--concurrency", "4", "--start-timeout", "10m",
        "--max-run-time", "1h30m", "--retry-job-failures", "--retry-delay", "10s",
        "--description", "small jobs",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "created queue cpu for local-process" in created.stdout

    assert [queue["name"] for queue in json.loads(takeoff("queue", "list", "--json").stdout)] == [
        f"projects/{project}/queues/cpu"
    ]
    assert "local-process" in takeoff("queue", "list").stdout
    queue = json.loads(takeoff("queue", "describe", "cpu", "--json").stdout)["queue"]
    assert queue["resource_config"] == {"env": {"THREADS": "{{threads}}"}}
    assert queue["template_variables"]["threads"] == {"schema": THREADS, "description": "worker threads"}
    assert queue["template_variables"]["label"]["schema"] == {"type": "string"}
    assert (queue["start_timeout"], queue["max_run_time"], queue["retry_delay"]) == (600, 5400, 10)
    assert (queue["prioritization"], queue["retry_job_failures"], queue["max_attempts"]) == (True, True, 2)
    shown = takeoff("queue", "describe", "cpu").stdout
    for text in ("worker threads", "1..8", "(required)", "1h30m", "10m", "retrying all failures, after 10s"):
        assert text in shown

    assert "paused queue cpu" in takeoff("queue", "pause", "cpu").stdout
    assert json.loads(takeoff("queue", "describe", "cpu", "--json").stdout)["queue"]["paused"] is True
    assert "resumed queue cpu" in takeoff("queue", "resume", "cpu").stdout
    updated = takeoff(
        "queue", "update", "cpu", "--concurrency", "1", "--no-prioritize", "--max-run-time", "0"
    )
    assert updated.returncode == 0, updated.stderr
    queue = json.loads(takeoff("queue", "describe", "cpu", "--json").stdout)["queue"]
    assert (queue["concurrency_limit"], queue["prioritization"], queue["max_run_time"], queue["paused"]) == (
        1,
        False,
        None,
        False,
    )
    assert queue["max_attempts"] == 2
    refused_in_one_line(takeoff("queue", "update", "cpu"), "nothing to change", exit_code=2)

    assert takeoff("queue", "delete", "cpu", "--yes").returncode == 0
    refused_in_one_line(takeoff("queue", "describe", "cpu"), "QUEUE_NOT_FOUND")


def test_bad_queue_settings_are_refused_readably(takeoff: Takeoff, tmp_path: Path) -> None:
    not_a_span = takeoff("queue", "create", "cpu", "--max-run-time", "soon")
    assert not_a_span.returncode == 2
    assert "'soon' is not a span of time" in not_a_span.stderr

    config = tmp_path / "gpus.yaml"
    config.write_text("gpus: '{{gpus}}'\n")
    refused_in_one_line(
        takeoff("queue", "create", "gpu", "--resource", "local-container", "--config", str(config)),
        "TEMPLATE_VARIABLE_INVALID",
        "queue.resource_config",
    )

    config.write_text("privileged: true\ncpus: 2\n")
    refused_in_one_line(
        takeoff("queue", "create", "root", "--resource", "local-container", "--config", str(config)),
        "RESOURCE_CONFIG_INVALID",
        "privileged",
    )


def test_launch_takes_config_values_files_and_template_variables(
    takeoff: Takeoff, job: str, project: str, resources_file: Path, tmp_path: Path
) -> None:
    takeoff("queue", "create", "cpu", "--paused", "--config", str(resources_file), "--var", "threads=integer")
    config = tmp_path / "config.yaml"
    config.write_text("lr: 0.5\nepochs: 1\n")
    resources = tmp_path / "more-env.yaml"
    resources.write_text("env: {SEED: '7'}\n")

    launched = takeoff(
        "launch", job, "--queue", "cpu", "--config-file", str(config), "--config", "epochs=3",
        "--set-var", "threads=4", "--resource-config", str(resources), "--priority", "HIGH",
        "--name", "first", "--max-run-time", "2h", "--json",
    )  # fmt: skip

    assert launched.returncode == 0, launched.stderr
    item = json.loads(launched.stdout)
    assert item["run_config"] == {"lr": 0.5, "epochs": 3}
    assert item["template_variables"] == {"threads": 4}
    assert item["resource_config"] == {"env": {"THREADS": 4, "SEED": "7"}}
    assert (item["priority"], item["run_display_name"], item["max_run_time"]) == ("high", "first", 7200)
    plain = takeoff("launch", job, "-q", "cpu", "--set-var", "threads=1")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[0].startswith(f"projects/{project}/queues/cpu/items/")
    assert len(plain.stdout.splitlines()) == 1


def test_a_bad_launch_is_one_line_naming_the_field(takeoff: Takeoff, job: str, resources_file: Path) -> None:
    takeoff(
        "queue", "create", "cpu", "--config", str(resources_file), "--var", f"threads={json.dumps(THREADS)}"
    )

    refused_in_one_line(
        takeoff("launch", job, "--queue", "cpu", "--config", "epochs=three"),
        "CONFIG_INVALID",
        "run_config.epochs",
    )
    refused_in_one_line(
        takeoff("launch", job, "--queue", "cpu", "--set-var", "threads=64"),
        "TEMPLATE_VARIABLE_INVALID",
        "template_variables.threads",
    )
    refused_in_one_line(
        takeoff("launch", job, "--queue", "cpu", "--config", "epochs"), "is not KEY=VALUE", exit_code=2
    )
    refused_in_one_line(takeoff("launch", "no-such-job", "--queue", "cpu"), "JOB_NOT_FOUND")
    assert json.loads(takeoff("items", "list", "--json").stdout) == []


@pytest.mark.parametrize(("outcome", "exit_code"), [("SUCCEEDED", 0), ("FAILED", 1), ("CANCELLED", 3)])
async def test_launch_wait_follows_the_item_and_exits_with_its_outcome(
    cli_env: dict[str, str], takeoff: Takeoff, job: str, outcome: str, exit_code: int
) -> None:
    await asyncio.to_thread(takeoff, "queue", "create", "cpu")
    queue = f"projects/{cli_env['TAKEOFF_PROJECT']}/queues/cpu"
    agent = await ScriptedAgent(cli_env["TAKEOFF_QUEUE_ADDRESS"]).connect([queue])
    launch = await start_takeoff(cli_env, "launch", job, "--queue", "cpu", "--wait")
    try:
        assignment = (await agent.next("assignment")).assignment
        await agent.progress(assignment, common_pb2.ITEM_STATE_RUNNING)
        if outcome == "CANCELLED":
            cancel = await asyncio.to_thread(takeoff, "items", "cancel", assignment.item.name)
            assert "cancel requested" in cancel.stdout, cancel.stderr
            await agent.next("cancel")
            await agent.complete(assignment, common_pb2.ITEM_STATE_CANCELLED)
        elif outcome == "FAILED":
            await agent.complete(
                assignment, common_pb2.ITEM_STATE_FAILED, common_pb2.FAILURE_REASON_JOB_FAILED, exit_code=3
            )
        else:
            await agent.complete(assignment, common_pb2.ITEM_STATE_SUCCEEDED, exit_code=0)
        stdout, stderr = (output.decode() for output in await asyncio.wait_for(launch.communicate(), 30))
    finally:
        await agent.close()
        if launch.returncode is None:
            launch.kill()

    assert launch.returncode == exit_code, stderr
    lines = stdout.splitlines()
    assert lines[0] == assignment.item.name
    assert any("LEASED → RUNNING" in line for line in lines)
    assert f"cpu/{assignment.item.name.rsplit('/', 1)[-1]} {outcome}" in stdout
    assert f"takeoff logs {assignment.run.rsplit('/', 1)[-1]}" in stdout
    if outcome == "FAILED":
        assert "JOB_FAILED (exit code 3)" in stdout


def test_items_list_describe_cancel_and_relaunch(takeoff: Takeoff, job: str) -> None:
    takeoff("queue", "create", "cpu", "--paused")
    first, second = (takeoff("launch", job, "-q", "cpu").stdout.strip() for _ in range(2))
    item_id = first.rsplit("/", 1)[-1]

    assert [item["name"] for item in json.loads(takeoff("items", "list", "-q", "cpu", "--json").stdout)] == [
        second,
        first,
    ]
    table = takeoff("items", "list", "--state", "pending").stdout
    assert item_id[:8] in table
    assert "train:v0" in table
    described = takeoff("items", "describe", f"cpu/{item_id}").stdout
    assert "history" in described
    assert "PENDING" in described
    assert (
        json.loads(takeoff("items", "describe", item_id, "--queue", "cpu", "--json").stdout)["name"] == first
    )
    assert json.loads(takeoff("items", "describe", item_id, "--json").stdout)["name"] == first
    refused_in_one_line(takeoff("items", "relaunch", first), "ITEM_NOT_ENDED")

    assert f"cancelled cpu/{item_id}" in takeoff("items", "cancel", item_id, "-q", "cpu").stdout
    cancelled = json.loads(takeoff("items", "list", "--state", "cancelled", "--json").stdout)
    assert [item["name"] for item in cancelled] == [first]
    again = takeoff("items", "relaunch", f"cpu/{item_id}").stdout.strip()
    relaunched = json.loads(takeoff("items", "describe", again, "--json").stdout)
    assert (relaunched["state"], relaunched["relaunched_from"]) == ("PENDING", first)


async def test_agents_shows_who_serves_a_queue(cli_env: dict[str, str], takeoff: Takeoff) -> None:
    await asyncio.to_thread(takeoff, "queue", "create", "cpu")
    queue = f"projects/{cli_env['TAKEOFF_PROJECT']}/queues/cpu"
    agent = await ScriptedAgent(cli_env["TAKEOFF_QUEUE_ADDRESS"]).connect([queue], capacity=2)
    try:
        listed = await asyncio.to_thread(takeoff, "agents", "--queue", "cpu", "--json")
        table = await asyncio.to_thread(takeoff, "agents", "--queue", "cpu")
        described = await asyncio.to_thread(takeoff, "queue", "describe", "cpu")
    finally:
        await agent.close()

    assert [(found["name"], found["capacity"]) for found in json.loads(listed.stdout)] == [
        (f"agents/{agent.agent_id}", 2)
    ]
    for shown in (table.stdout, described.stdout):
        assert agent.agent_id[:8] in shown
        assert "connected" in shown
        assert "0/2" in shown


def test_secure_queues_with_secrets_and_who_launched_an_item(
    takeoff: Takeoff, job: str, project: str, tmp_path: Path
) -> None:
    for secret in ("hf", "db", "extra"):
        assert takeoff("secrets", "set", secret, "--from-env", "HOME").returncode == 0
    created = takeoff(
        "queue", "create", "locked", "--resource", "local-container", "--paused", "--secure",
        "--secret", "hf=HF_TOKEN", "--secret", "db:file=db.txt", "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    queue = json.loads(created.stdout)
    assert queue["secure"] is True
    assert queue["allow_host_paths"] is False
    assert [(m["env"], m["file"]) for m in queue["secrets"]] == [("HF_TOKEN", ""), ("", "db.txt")]
    described = takeoff("queue", "describe", "locked")
    assert "secure: dangerous overrides refused" in described.stdout
    assert "hf=HF_TOKEN" in described.stdout.replace(f"projects/{project}/secrets/", "")

    privileged = tmp_path / "privileged.yaml"
    privileged.write_text("privileged: true\n")
    refused_in_one_line(
        takeoff("launch", job, "-q", "locked", "--resource-config", str(privileged)), "privileged"
    )
    bad = takeoff("launch", job, "-q", "locked", "--secret", "extra")
    assert bad.returncode == 2
    assert "SECRET=ENV" in bad.stderr

    launched = takeoff("launch", job, "-q", "locked", "--secret", "extra=EXTRA", "--json")
    assert launched.returncode == 0, launched.stderr
    item = json.loads(launched.stdout)
    assert [(m["env"], m["file"]) for m in item["secrets"]] == [("EXTRA", "")]
    assert item["creator"].startswith("keys/")
    shown = takeoff("items", "describe", item["name"])
    assert shown.returncode == 0, shown.stderr
    assert "launched by" in shown.stdout
    assert "actor" in shown.stdout
    assert item["creator"].split()[0] in shown.stdout
    history = takeoff("items", "describe", item["name"], "--json")
    assert json.loads(history.stdout)["transitions"][0]["actor"] == item["creator"]

    updated = takeoff("queue", "update", "locked", "--no-secure", "--no-secrets", "--json")
    assert updated.returncode == 0, updated.stderr
    assert (json.loads(updated.stdout)["secure"], json.loads(updated.stdout)["secrets"]) == (False, [])
