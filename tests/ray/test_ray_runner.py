"""The ray runner end to end: real registry, queue, builder and agent processes, and a real Ray head on
loopback (``ray_cluster``), which shares this host's filesystem with the agent (``shared_roots``)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from takeoff.client import Client
from takeoff.v1 import common_pb2, queue_pb2
from tests.agent.conftest import (
    WAITER,
    AgentProcess,
    Stack,
    StartAgent,
    code_job,
    job_pid,
    running_agent,
)
from tests.processes import pid_alive, wait_for
from tests.queue.harness import struct
from tests.ray.conftest import SLOT_RESOURCE, RayCluster

pytestmark = pytest.mark.timeout(
    300
)  # the first test also starts the Ray head (up to 3 minutes on a loaded machine)

SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
FAILED = common_pb2.ITEM_STATE_FAILED
CANCELLED = common_pb2.ITEM_STATE_CANCELLED
STARTING = common_pb2.ITEM_STATE_STARTING
RUNNING = common_pb2.ITEM_STATE_RUNNING

TRAIN = """\
import os, takeoff
run = takeoff.init()
print("hello from", os.environ["GREETING"], "under Ray:", "RAY_ADDRESS" in os.environ)
print("token given:", bool(os.environ.get("TAKEOFF_TOKEN")))
for i in range(3):
    run.log({"loss": 1 / (i + 1)})
run.finish()
"""


@pytest.fixture(scope="module")
def lease_ttl_seconds() -> float:
    """Long enough for an agent killed and started again to come back within it; short enough for a job
    whose agent is gone for good to fence itself soon."""
    return 8.0


@pytest.fixture
def ray_agent(
    ray_cluster: RayCluster, start_agent: StartAgent, tmp_path_factory: pytest.TempPathFactory
) -> StartAgent:
    """``start_agent`` with a ray runner whose shared roots are the tests' temporary directories (the
    builder's venvs and code, the agent's state) and the agent's own Python (the SDK the jobs import)."""
    roots = [str(tmp_path_factory.getbasetemp()), sys.prefix]

    def start(queues: list[str], **settings: object) -> AgentProcess:
        runner = {"address": ray_cluster.address, "shared_roots": roots, "poll_seconds": 0.1}
        return start_agent(queues, runners={"ray": runner}, **settings)

    return start


def ray_queue(stack: Stack, **settings: object) -> str:
    return stack.new_queue(resource=common_pb2.RESOURCE_KIND_RAY, **settings)


def submission_id(stack: Stack, run: str) -> str:
    """The Ray job the agent named in the run's log."""

    def find() -> str | None:
        for line in stack.logs(run):
            if match := re.search(r"submitted Ray job (\S+)", line):
                return match.group(1)
        return None

    return wait_for(find, timeout=60, what="the agent to say which Ray job it submitted")


def test_a_code_job_runs_on_ray_with_its_resources_and_reports(
    stack: Stack, client: Client, ray_agent: StartAgent, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "train", TRAIN)
    holder = code_job(client, tmp_path, "holder", WAITER)
    queue = ray_queue(
        stack,
        resource_config=struct({"entrypoint_resources": {SLOT_RESOURCE: 1}, "env": {"GREETING": "ray"}}),
    )
    go = tmp_path / "go"
    with running_agent(ray_agent, [queue], max_jobs=2):
        holding = stack.enqueue(queue, holder, run_config=struct({"go": str(go)}))
        stack.wait_state(holding, RUNNING)
        # The head has one slot, which the first job holds: the second waits for it, and says so.
        name = stack.enqueue(queue, job)
        pending = stack.wait_until(
            name, lambda item: "Ray job pending" in item.message, "to wait for the slot"
        )
        assert pending.state == STARTING
        go.touch()
        item = stack.wait_ended(name)
        assert stack.wait_ended(holding).state == SUCCEEDED

    assert (item.state, item.exit_code) == (SUCCEEDED, 0), item.message
    run = stack.run(item.run)
    assert (run.state, run.history_length) == (common_pb2.RUN_STATE_FINISHED, 3)
    logs = stack.logs(item.run)
    ray_job = ray_cluster.job(submission_id(stack, item.run))
    assert "hello from ray under Ray: True" in logs, logs
    assert "token given: True" in logs
    # Ray keeps and shows a job's runtime environment: the token reaches the job by a file, never through it
    assert "TAKEOFF_TOKEN" not in json.dumps(ray_job)
    assert ray_job["status"] == "SUCCEEDED"
    assert ray_job["metadata"]["takeoff.item"] == name


def test_a_failing_job_fails_its_item_with_the_exit_code_and_last_lines(
    stack: Stack, client: Client, ray_agent: StartAgent, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "fails", "import sys\nprint('about to fail', flush=True)\nsys.exit(3)\n")
    queue = ray_queue(stack, max_attempts=1)
    with running_agent(ray_agent, [queue]):
        item = stack.wait_ended(stack.enqueue(queue, job))

    assert (item.state, item.reason, item.exit_code) == (FAILED, common_pb2.FAILURE_REASON_JOB_FAILED, 3), (
        item.message
    )
    assert "about to fail" in item.message
    assert (stack.run(item.run).state, stack.run(item.run).exit_code) == (common_pb2.RUN_STATE_FAILED, 3)
    assert ray_cluster.job(submission_id(stack, item.run))["driver_exit_code"] == 3


def test_cancel_stops_the_ray_job(
    stack: Stack, client: Client, ray_agent: StartAgent, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "cancelled", WAITER)
    queue = ray_queue(stack)
    with running_agent(ray_agent, [queue]):
        name = stack.enqueue(queue, job, run_config=struct({"go": str(tmp_path / "never")}))
        running = stack.wait_state(name, RUNNING)
        pid = job_pid(stack, running.run)
        stack.queues.CancelItem(queue_pb2.CancelItemRequest(name=name))
        item = stack.wait_ended(name, timeout=60)

    assert item.state == CANCELLED
    assert stack.run(item.run).state == common_pb2.RUN_STATE_KILLED
    assert ray_cluster.job(submission_id(stack, item.run))["status"] == "STOPPED"
    assert not pid_alive(pid)


def test_a_restarted_agent_finds_its_ray_job_and_follows_it_on(
    stack: Stack, client: Client, ray_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "survivor", WAITER)
    queue = ray_queue(stack)
    go = tmp_path / "go"
    first = ray_agent([queue])
    name = stack.enqueue(queue, job, run_config=struct({"go": str(go)}))
    running = stack.wait_state(name, RUNNING)
    pid = job_pid(stack, running.run)

    first.kill()
    with running_agent(ray_agent, [queue], state_dir=first.state_dir) as second:
        second.wait_working_on(name, RUNNING)
        assert pid_alive(pid)  # the same job, not a new one
        go.touch()
        item = stack.wait_ended(name, timeout=60)

    assert (item.state, item.attempt) == (SUCCEEDED, 1), item.message
    logs = stack.logs(item.run)
    assert [line for line in logs if line.startswith("pid ")] == [f"pid {pid}"]  # each line once
    assert logs.count("done waiting") == 1


def test_a_job_whose_agent_is_gone_fences_itself(
    stack: Stack, client: Client, ray_agent: StartAgent, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "orphan", WAITER)
    queue = ray_queue(stack)
    agent = ray_agent([queue])
    name = stack.enqueue(queue, job, run_config=struct({"go": str(tmp_path / "never")}))
    running = stack.wait_state(name, RUNNING)
    pid = job_pid(stack, running.run)
    ray_job = submission_id(stack, running.run)

    agent.kill()
    # Nothing renews the lease deadline: the job's fence stops it once it passes.
    ended = wait_for(
        lambda: (details := ray_cluster.job(ray_job))["status"] != "RUNNING" and details,
        timeout=60,
        what="the orphaned Ray job to stop",
    )
    assert (ended["status"], ended["driver_exit_code"]) == ("FAILED", 143)
    assert not pid_alive(pid)
    lease_dirs = list((agent.state_dir / "leases").iterdir())
    assert [json.loads((d / "ray.json").read_text())["submission_id"] for d in lease_dirs] == [ray_job]
    assert all((d / "fenced").exists() for d in lease_dirs)
