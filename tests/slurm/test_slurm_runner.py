"""The slurm runner end to end (docs/design.md §7, §12): real registry, queue, builder and agent processes,
and batch jobs on the real one-node Slurm cluster of .ci/slurm-setup.sh. Accounting is off there, as the
runner expects: what it knows of a job comes from squeue, the shim's files and scontrol.
"""

from __future__ import annotations

import json
import re
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from takeoff.client import Client
from takeoff.v1 import common_pb2, queue_pb2
from takeoff_server.protovalues import dict_to_struct
from tests.agent.conftest import PROJECT, AgentProcess, Stack, StartAgent, code_job, running_agent
from tests.processes import wait_for
from tests.slurm.conftest import REPOSITORY, SlurmCluster

SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
CANCELLED = common_pb2.ITEM_STATE_CANCELLED
RUNNING = common_pb2.ITEM_STATE_RUNNING
STARTING = common_pb2.ITEM_STATE_STARTING
LEASE_TTL_SECONDS = 8.0
"""Long enough for a killed agent to come back and keep its lease (the shim fences at its end)."""
EXAMPLE = REPOSITORY / "examples" / "multinode"

TRAIN = """\
import os, takeoff
run = takeoff.init(config={"epochs": 2})
print("hello from slurm job", os.environ["SLURM_JOB_ID"], flush=True)
for i in range(3):
    run.log({"loss": 1 / (i + 1)})
run.summary["best"] = 0.5
"""

WAITER = """\
import os, time, takeoff
run = takeoff.init()
print("slurm job", os.environ["SLURM_JOB_ID"], flush=True)
while not os.path.exists(run.config["go"]):
    time.sleep(0.1)
run.log({"done": 1})
print("done waiting", flush=True)
"""
"""Prints its Slurm job id, then waits for the file named by its ``go`` config."""

FAILING_RANK = """\
import os, sys, time, takeoff
takeoff.init()
print("slurm job", os.environ["SLURM_JOB_ID"], flush=True)
if os.environ["RANK"] == "1":
    print("rank 1 fails", flush=True)
    sys.exit(3)
time.sleep(600)
"""
"""Rank 1 fails at once; rank 0 would run for ten minutes unless stopped."""


@pytest.fixture(scope="module")
def lease_ttl_seconds() -> float:
    return LEASE_TTL_SECONDS


@dataclass
class Slurm:
    """The stack, a client, the cluster, and agents with the slurm runner only."""

    stack: Stack
    client: Client
    cluster: SlurmCluster
    tmp_path: Path
    start_agent: StartAgent

    def agent(self, queues: list[str], **settings: Any) -> AgentProcess:
        return self.start_agent(queues, runners={"slurm": self.cluster.runner_options()}, **settings)

    def running_agent(self, queues: list[str], **settings: Any) -> AbstractContextManager[AgentProcess]:
        return running_agent(
            self.start_agent, queues, runners={"slurm": self.cluster.runner_options()}, **settings
        )

    def queue(self, resource_config: dict[str, Any] | None = None) -> str:
        reply = self.stack.queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent=f"projects/{PROJECT}",
                queue_id=f"q-{uuid.uuid4().hex[:10]}",
                queue=queue_pb2.Queue(
                    resource=common_pb2.RESOURCE_KIND_SLURM,
                    resource_config=dict_to_struct(resource_config or {}),
                ),  # the start timeout a slurm queue has by default: unlimited
            )
        )
        return reply.queue.name

    def waiter(self) -> tuple[str, Path]:
        """The waiting job, and the file that lets one of its items end (its ``go`` config)."""
        go = self.tmp_path / f"go-{uuid.uuid4().hex[:6]}"
        return code_job(self.client, self.tmp_path, f"waiter-{go.name}", WAITER), go

    def slurm_job_id(self, run: str) -> int:
        """The Slurm job id a job printed into its run's log."""

        def find() -> int | None:
            for line in self.stack.logs(run):
                if match := re.fullmatch(r"slurm job (\d+)", line):
                    return int(match.group(1))
            return None

        return wait_for(find, timeout=60, what="the job to print its Slurm job id")

    def wait_slurm_ended(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` of the job once Slurm says it has ended."""

        def ended() -> dict[str, str] | None:
            shown = self.cluster.show_job(job_id)
            return None if shown["JobState"] in ("PENDING", "RUNNING", "COMPLETING") else shown

        return wait_for(
            ended,
            timeout=60,
            what=f"Slurm job {job_id} to end",
        )


@pytest.fixture
def slurm(
    stack: Stack, client: Client, slurm_cluster: SlurmCluster, tmp_path: Path, start_agent: StartAgent
) -> Slurm:
    return Slurm(stack, client, slurm_cluster, tmp_path, start_agent)


def _config(go: Path) -> dict[str, Any]:
    return {"run_config": dict_to_struct({"go": str(go)})}


def test_a_job_runs_on_slurm_with_its_resource_options_and_reports_its_run_and_logs(slurm: Slurm) -> None:
    stack = slurm.stack
    job = code_job(slurm.client, slurm.tmp_path, "train", TRAIN)
    queue = slurm.queue(
        {"cpus_per_task": 1, "mem": 64, "time": 7, "sbatch": {"comment": "from-takeoff", "nice": 3}}
    )
    with slurm.running_agent([queue]):
        item = stack.wait_ended(stack.enqueue(queue, job, max_attempts=1), timeout=90)

    assert (item.state, item.exit_code) == (SUCCEEDED, 0), item.transitions[-1].message
    run = stack.run(item.run)
    assert (run.state, run.summary["best"]) == (common_pb2.RUN_STATE_FINISHED, 0.5)
    [job_id] = [
        int(m.group(1)) for t in stack.logs(item.run) if (m := re.fullmatch(r"hello from slurm job (\d+)", t))
    ]
    shown = slurm.cluster.show_job(job_id)
    item_id = item.name.rsplit("/", 1)[-1]
    assert shown["JobName"].startswith(f"takeoff.{item_id}.1.")
    assert (shown["TimeLimit"], shown["MinMemoryNode"], shown["Comment"], shown["Nice"]) == (
        "00:07:00",
        "64M",
        "from-takeoff",
        "3",
    )
    assert (shown["JobState"], shown["ExitCode"]) == ("COMPLETED", "0:0")


def test_the_batch_job_references_only_paths_under_shared_roots_and_cancel_stops_it(slurm: Slurm) -> None:
    stack = slurm.stack
    job, go = slurm.waiter()
    queue = slurm.queue()
    with slurm.running_agent([queue]) as agent:
        name = stack.enqueue(queue, job, max_attempts=1, **_config(go))
        agent.wait_working_on(name, RUNNING)
        job_id = slurm.slurm_job_id(stack.item(name).run)
        [lease_dir] = (agent.state_dir / "leases").iterdir()
        script = (lease_dir / "batch.sh").read_text()
        spec = json.loads((lease_dir / "spec.json").read_text())
        shown = slurm.cluster.show_job(job_id)
        stack.queues.CancelItem(queue_pb2.CancelItemRequest(name=name))
        item = stack.wait_ended(name, timeout=60)
        ended = slurm.wait_slurm_ended(job_id)

    paths = [
        # the command the script runs (its #! line names the system's /bin/sh)
        *(
            word
            for line in script.splitlines()
            if not line.startswith("#")
            for word in line.split()
            if "/" in word
        ),
        *(argument for argument in spec["argv"] if argument.startswith("/")),
        spec["cwd"],
        spec["env"]["VIRTUAL_ENV"],
        spec["env"]["PYTHONPATH"],
        shown["Command"],
        shown["StdOut"],
        shown["WorkDir"],
    ]
    roots = slurm.cluster.shared_roots
    assert len(paths) >= 9
    assert [path for path in paths if not any(Path(path).is_relative_to(root) for root in roots)] == []
    assert item.state == CANCELLED
    assert stack.run(item.run).state == common_pb2.RUN_STATE_KILLED
    assert ended["JobState"] == "COMPLETED"  # the shim stopped the job and recorded its end


def test_a_pending_jobs_slurm_reason_is_the_starting_detail_and_cancel_removes_it(slurm: Slurm) -> None:
    stack = slurm.stack
    job, go = slurm.waiter()
    queue = slurm.queue({"sbatch": {"begin": "now+1hour"}})  # held by Slurm until then
    with slurm.running_agent([queue]) as agent:
        name = stack.enqueue(queue, job, max_attempts=1, **_config(go))

        def pending_detail() -> str | None:
            work = [work for work in agent.status().work if work.item == name]
            return work[0].detail if work and "pending: BeginTime" in work[0].detail else None

        detail = wait_for(pending_detail, timeout=60, what="the agent to say why Slurm holds the job")
        waiting = stack.wait_until(
            name, lambda item: item.message == detail, "the item to show why Slurm holds its job"
        )
        job_id = int(detail.split()[2])  # "Slurm job N pending: BeginTime"
        stack.queues.CancelItem(queue_pb2.CancelItemRequest(name=name))
        item = stack.wait_ended(name, timeout=60)
        ended = slurm.wait_slurm_ended(job_id)

    assert waiting.state == STARTING
    assert item.state == CANCELLED
    assert ended["JobState"] == "CANCELLED"


def test_a_restarted_agent_finds_its_slurm_job_and_follows_it_to_the_end(slurm: Slurm) -> None:
    stack = slurm.stack
    job, go = slurm.waiter()
    queue = slurm.queue()
    first = slurm.agent([queue])
    name = stack.enqueue(queue, job, max_attempts=1, **_config(go))
    first.wait_working_on(name, RUNNING)
    job_id = slurm.slurm_job_id(stack.item(name).run)
    first.kill()
    with slurm.running_agent([queue], state_dir=first.state_dir) as second:
        second.wait_working_on(name, RUNNING)
        go.touch()
        item = stack.wait_ended(name, timeout=60)

    assert (item.state, item.attempt) == (SUCCEEDED, 1)
    assert "done waiting" in stack.logs(item.run)
    assert slurm.cluster.show_job(job_id)["JobState"] == "COMPLETED"


def test_the_multi_node_example_runs_as_two_slurm_tasks_labelled_by_rank(slurm: Slurm) -> None:
    stack = slurm.stack
    slurm.client.create_job_version("multinode", EXAMPLE, entrypoint=["python", "train.py"])
    queue = slurm.queue({"nodes": 1, "ntasks_per_node": 2})
    with slurm.running_agent([queue]):
        item = stack.wait_ended(stack.enqueue(queue, "multinode", max_attempts=1), timeout=90)

    assert (item.state, item.exit_code) == (SUCCEEDED, 0), item.transitions[-1].message
    run = stack.run(item.run)
    assert (run.state, run.summary["sum_of_ranks"]) == (common_pb2.RUN_STATE_FINISHED, 1)
    lines = {(line.rank, line.text) for line in stack.log_lines(item.run) if line.HasField("rank")}
    assert {(0, "rank 0: sum of ranks 1"), (1, "rank 1: sum of ranks 1")} <= lines


def test_a_failing_rank_fails_the_attempt_and_srun_stops_the_others(slurm: Slurm) -> None:
    stack = slurm.stack
    job = code_job(slurm.client, slurm.tmp_path, "failing-rank", FAILING_RANK)
    queue = slurm.queue({"ntasks_per_node": 2})
    with slurm.running_agent([queue]):
        item = stack.wait_ended(stack.enqueue(queue, job, max_attempts=1), timeout=60)
        ended = slurm.wait_slurm_ended(slurm.slurm_job_id(item.run))

    assert (item.state, item.reason) == (common_pb2.ITEM_STATE_FAILED, common_pb2.FAILURE_REASON_JOB_FAILED)
    assert item.exit_code != 0
    assert (1, "rank 1 fails") in {(line.rank, line.text) for line in stack.log_lines(item.run)}
    assert ended["JobState"] == "COMPLETED"  # the shim recorded srun's end: rank 0 did not run on
