"""Multi-node launches on the local-container runner against the real Docker engine, without the services
(docs/design.md §7, §12): ``nodes: N`` starts N containers, ranks 1..N-1 in rank 0's network namespace,
all owned by one shim. Every job runs a ``python3 -c`` script in the CI base image.

The multi-node example end to end, a rank that dies and a cancel through the services are in
``test_container_e2e.py``, whose registry and builder they share (starting them again would double the
time these cases take).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from takeoff_agent.runners.base import RunnerContext, RunnerRefused
from takeoff_agent.runners.container import ContainerJob, container_settings, create, job_create_options
from tests.agent.test_container_runner import Harness
from tests.conftest import DockerSetup
from tests.processes import eventually

RANKED = """
import os, signal, sys, time
def stop(*_):
    print("stopping", flush=True)
    sys.exit(7)
signal.signal(signal.SIGTERM, stop)
print("rank", os.environ["RANK"], "ready", flush=True)
if os.environ["RANK"] == os.environ.get("FAILING_RANK"):
    sys.exit(3)
time.sleep(600)
"""
"""Each rank says it is ready and waits, saying ``stopping`` and exiting 7 on SIGTERM; the rank that
``FAILING_RANK`` names exits 3 at once instead."""


@pytest.fixture
async def local(docker_setup: DockerSetup, tmp_path: Path) -> AsyncIterator[Harness]:
    """A runner of an agent of its own (listing GPUs 0 and 1), without the services."""
    runner = create({"gpus": ["0", "1"]}, RunnerContext(f"test-{uuid.uuid4().hex[:10]}", tmp_path))
    yield Harness(docker_setup, tmp_path, runner)
    await runner.sweep(())  # whatever a failed test left
    await runner.close()


def ranks_of(local: Harness, job: ContainerJob) -> list[Any]:
    """The job's containers, in rank order."""
    found = local.engine.containers.list(
        all=True, filters={"label": f"takeoff.lease={job.assignment.lease_id}"}
    )
    return sorted(found, key=lambda container: int(container.labels["takeoff.rank"]))


def output(job: ContainerJob, rank: int) -> list[str]:
    """What ``rank`` printed on stdout, through the job's log sources."""
    return [
        line for out in job.log_sources() if out.rank == rank for line in out.source.read_lines(final=True)
    ]


def printed(job: ContainerJob, rank: int, text: str) -> bool:
    log = job.lease_dir / f"stdout.rank{rank}.log"
    return log.exists() and text in log.read_text()


async def started(local: Harness, nodes: int = 2, **env: str) -> ContainerJob:
    """A RANKED job on ``nodes`` ranks, once every rank has said it is ready (``env`` added to the job's)."""
    assignment = local.assignment(RANKED, nodes=nodes)
    job = local.job(assignment)
    await job.renew_lease(time.time() + 3600)
    await job.start(local.launch(assignment, env={"TAKEOFF_RUN_ID": assignment.run_id, **env}))
    await eventually(
        lambda: all(printed(job, rank, f"rank {rank} ready") for rank in range(nodes)), "every rank to start"
    )
    return job


async def test_each_rank_runs_in_rank_0s_network_with_its_environment_and_label(local: Harness) -> None:
    job = await started(local, nodes=3)
    zero, one, two = ranks_of(local, job)

    assert [zero.name, one.name, two.name] == [job.name, f"{job.name}-1", f"{job.name}-2"]
    assert [c.attrs["HostConfig"]["NetworkMode"] for c in (one, two)] == [f"container:{zero.id}"] * 2
    envs = [dict(entry.split("=", 1) for entry in c.attrs["Config"]["Env"]) for c in (zero, one, two)]
    for rank, env in enumerate(envs):
        assert (env["RANK"], env["NODE_RANK"], env["LOCAL_RANK"]) == (str(rank), str(rank), "0")
        assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("3", "1")
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29500")
        assert env["TAKEOFF_RUN_ID"] == job.assignment.run_id
    assert [env.get("TAKEOFF_MODE") for env in envs] == [None, "disabled", "disabled"]
    assert [(out.stream.name, out.rank) for out in job.log_sources()] == [
        (stream, rank) for rank in range(3) for stream in ("STDOUT", "STDERR")
    ]

    await job.stop(5)  # what a cancel does

    assert ranks_of(local, job) == []
    assert [output(job, rank) for rank in range(3)] == [
        [f"rank {rank} ready", "stopping"] for rank in range(3)
    ]
    ended = job.exit()
    assert ended is not None
    assert (ended.exit_code, ended.fenced) == (7, False)


async def test_a_failing_rank_stops_the_others_and_ends_the_job_with_its_exit(local: Harness) -> None:
    job = await started(local, FAILING_RANK="1")

    ended = await job.wait()

    assert (ended.exit_code, ended.rank) == (3, 1)
    assert output(job, 0) == ["rank 0 ready", "stopping"]  # stopped by the shim, not left running
    assert ranks_of(local, job) == []


async def test_rank_0_failing_at_once_ends_the_job_as_it_ended(local: Harness) -> None:
    """Rank 0 may have ended before rank 1 can join its network: the job's failure, not the engine's."""
    assignment = local.assignment("import sys; sys.exit(5)", nodes=2)
    job = local.job(assignment)
    await job.start(local.launch(assignment))

    ended = await job.wait()

    assert (ended.exit_code, ended.failure) == (5, None)
    assert ranks_of(local, job) == []


async def test_the_shim_fences_every_rank_when_the_agent_stops_renewing(local: Harness) -> None:
    job = await started(local)

    await job.renew_lease(time.time() - 1)  # the agent's leases ran out

    ended = await eventually(job.exit, "the shim to fence the job")
    assert ended.fenced
    assert [output(job, rank)[-1] for rank in range(2)] == ["stopping", "stopping"]
    assert ranks_of(local, job) == []


async def test_a_restarted_agent_takes_every_rank_back(local: Harness) -> None:
    job = await started(local)
    restarted = create({}, local.runner.context)

    again = restarted.job(job.assignment, job.lease_dir)
    assert (again.started, again.exit()) == (True, None)
    assert [out.rank for out in again.log_sources()] == [0, 0, 1, 1]
    await again.stop(5)

    assert (await again.wait()).exit_code == 7
    assert ranks_of(local, job) == []
    await restarted.close()


async def test_a_new_shim_takes_every_running_rank_over_from_one_that_died(local: Harness) -> None:
    job = await started(local)
    dead_shim = json.loads((job.lease_dir / "shim.json").read_text())["shim_pid"]
    os.kill(dead_shim, signal.SIGKILL)
    waiting = asyncio.create_task(job.wait())

    def new_shim() -> bool:
        return bool(json.loads((job.lease_dir / "shim.json").read_text())["shim_pid"] != dead_shim)

    await eventually(new_shim, "a new shim to take the ranks over")
    assert [c.status for c in ranks_of(local, job)] == ["running", "running"]
    await job.stop(5)

    assert (await waiting).exit_code == 7
    assert [output(job, rank) for rank in range(2)] == [
        [f"rank {rank} ready", "stopping"] for rank in range(2)
    ]
    assert ranks_of(local, job) == []


async def test_sweep_removes_every_rank_of_a_lease_not_held(local: Harness) -> None:
    kept, swept = await started(local), await started(local)

    await local.runner.sweep({kept.assignment.lease_id})

    assert ranks_of(local, swept) == []
    assert [c.status for c in ranks_of(local, kept)] == ["running", "running"]
    assert (await swept.wait()).exit_code == 137


def test_a_rank_that_cannot_start_removes_the_ranks_started(local: Harness, tmp_path: Path) -> None:
    """The shim starts rank 0, then rank 1, which the engine refuses (a user its image lacks): rank 0 is
    removed too, and the job refused as configured."""
    engine, lease_dir = local.engine, tmp_path / "lease"
    lease_dir.mkdir()
    name = f"takeoff-test-{uuid.uuid4().hex[:8]}"
    command = ["python3", "-c", "import time; time.sleep(600)"]
    zero = engine.containers.create(local.image, command, name=name, init=True)
    one = engine.containers.create(
        local.image, command, name=f"{name}-1", user="no-such-user", network_mode=f"container:{zero.id}"
    )
    spec = {"mode": "container", "container": zero.id, "ranks": [zero.id, one.id], "stop_grace_seconds": 1}
    (lease_dir / "spec.json").write_text(json.dumps(spec))

    subprocess.run([sys.executable, "-m", "takeoff_agent.shim", str(lease_dir)], check=True, timeout=60)

    ended = json.loads((lease_dir / "exit.json").read_text())
    assert ended["failure"]["reason"] == "CONFIG_INVALID"
    assert "no-such-user" in ended["failure"]["message"]
    assert json.loads((lease_dir / "shim.json").read_text())["started"] is False
    assert engine.containers.list(all=True, filters={"name": name}) == []


async def test_each_rank_gets_the_gpus_asked_for_and_no_rank_shares_one(local: Harness) -> None:
    """Create and inspect only: this engine has no NVIDIA runtime."""
    assignment = local.assignment(gpus=1, nodes=2)
    settings = container_settings(assignment.resource_config)
    assert settings.gpus is not None
    devices = await local.runner.gpus.acquire(assignment.lease_id, settings.gpus)
    created = []
    try:
        for options in job_create_options(local.launch(assignment), settings, devices, agent=local.agent_id):
            created.append(local.engine.containers.create(**options))
        assert [c.attrs["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] for c in created] == [["0"], ["1"]]
        assert [c.labels["takeoff.gpus"] for c in created] == ["0", "1"]
    finally:
        for container in reversed(created):
            container.remove(force=True)


@pytest.mark.parametrize(
    ("gpus", "refusal"),
    [
        (2, r"gpus: asks for 4 GPUs; this agent lists 2 \(2 for each of 2 ranks\)"),
        ("all", "gpus: with nodes, give a count of GPUs for each rank"),
        (["0"], "gpus: with nodes, give a count of GPUs for each rank"),
    ],
)
def test_gpus_a_multi_node_launch_cannot_have_are_refused(local: Harness, gpus: object, refusal: str) -> None:
    with pytest.raises(RunnerRefused, match=refusal):
        local.runner.check(local.assignment(gpus=gpus, nodes=2))
