"""The local-container runner against the real Docker engine, without the services: options, exits, OOM,
stop, sweep, the shim's fence, image pulls, GPU sharing (docs/design.md §7, §12).

Every job runs the CI base image (it has python3) with a ``python3 -c`` entrypoint: no image is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import pytest

from takeoff_agent.domain import (
    Assignment,
    BuildKind,
    Built,
    FailureReason,
    JobExit,
    JobVersion,
    ResourceKind,
    SourceKind,
)
from takeoff_agent.runners.base import Launch, RunnerContext, RunnerRefused
from takeoff_agent.runners.container import (
    ContainerJob,
    ContainerRunner,
    container_settings,
    create,
    create_options,
)
from takeoff_agent.runners.gpus import GpuPool, GpuRequest
from tests.conftest import DockerSetup
from tests.processes import eventually

WAIT_SECONDS = 60

WAITER = "import time; print('ready', flush=True); time.sleep(600)"
"""Prints ``ready``, then sleeps until stopped (it ends on SIGTERM)."""


class Harness:
    """A runner for one agent of its own, and jobs started on it."""

    def __init__(self, docker_setup: DockerSetup, tmp_path: Path, runner: ContainerRunner) -> None:
        self.engine = docker_setup.engine
        self.image = docker_setup.base_image
        self.tmp_path = tmp_path
        self.runner = runner

    @property
    def agent_id(self) -> str:
        return self.runner.context.agent_id

    def assignment(self, script: str = WAITER, *, image: str = "", **resource_config: Any) -> Assignment:
        lease = uuid.uuid4().hex
        return Assignment(
            lease_id=lease,
            epoch=3,
            item=f"projects/p/queues/q/items/{lease[:8]}",
            queue="projects/p/queues/q",
            run=f"projects/p/runs/{lease[:8]}-1",
            attempt=1,
            job_version=JobVersion(
                "projects/p/jobs/j/versions/1", SourceKind.IMAGE, image=image or self.image
            ),
            resource=ResourceKind.LOCAL_CONTAINER,
            entrypoint=("python3", "-c", script),
            resource_config=resource_config,
        )

    def launch(self, assignment: Assignment, **fields: Any) -> Launch:
        return Launch(
            assignment=assignment,
            built=Built(BuildKind.NOOP, image=assignment.job_version.image),
            env=fields.pop("env", {"TAKEOFF_RUN_ID": assignment.run_id}),
            secrets=fields.pop("secrets", {}),
            registry_address=fields.pop("registry_address", "127.0.0.1:50051"),
            stop_grace_seconds=fields.pop("stop_grace_seconds", 5.0),
        )

    def job(self, assignment: Assignment) -> ContainerJob:
        lease_dir = self.tmp_path / "leases" / assignment.lease_id
        lease_dir.mkdir(parents=True, exist_ok=True)
        return self.runner.job(assignment, lease_dir)

    async def started(self, script: str = WAITER, **resource_config: Any) -> ContainerJob:
        assignment = self.assignment(script, **resource_config)
        job = self.job(assignment)
        await job.renew_lease(time.time() + 3600)
        await job.start(self.launch(assignment))
        return job

    def container(self, job: ContainerJob) -> Any:
        return self.engine.containers.get(job.name)

    def gone(self, job: ContainerJob) -> bool:
        return not self.engine.containers.list(all=True, sparse=True, filters={"name": job.name})

    def output(self, job: ContainerJob, stream: str = "stdout") -> str:
        path = job.lease_dir / f"{stream}.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
async def harness(docker_setup: DockerSetup, tmp_path: Path) -> AsyncIterator[Harness]:
    agent = f"test-{uuid.uuid4().hex[:10]}"
    runner = create({"gpus": ["0", "1"]}, RunnerContext(agent_id=agent, state_dir=tmp_path))
    yield Harness(docker_setup, tmp_path, runner)
    await runner.sweep(())  # whatever a failed test left
    await runner.close()


@pytest.fixture
def volume(docker_setup: DockerSetup) -> Iterator[str]:
    """A named volume's name; the volume (the engine makes it for the container) is removed afterwards."""
    name = f"takeoff-test-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(docker.errors.NotFound):
        docker_setup.engine.volumes.get(name).remove(force=True)


async def test_each_option_reaches_the_labelled_container(harness: Harness, volume: str) -> None:
    assignment = harness.assignment(
        cpus=0.5,
        mem_limit="256m",
        memswap_limit="512m",
        shm_size="32m",
        ulimits=[{"name": "nofile", "soft": 1024, "hard": 2048}],
        user="nobody",
        ipc_mode="shareable",
        volumes={volume: {"bind": "/data", "mode": "ro"}},
        env={"FROM_CONFIG": "yes"},
    )
    job = harness.job(assignment)
    launch = harness.launch(assignment, env={"FROM_CONFIG": "yes"}, secrets={"TAKEOFF_TOKEN": "secret"})
    await job.start(launch)
    await eventually(lambda: "ready" in harness.output(job), "the job to start")
    attrs = harness.container(job).attrs

    host = attrs["HostConfig"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 256 * 2**20
    assert host["MemorySwap"] == 512 * 2**20
    assert host["ShmSize"] == 32 * 2**20
    assert host["Ulimits"] == [{"Name": "nofile", "Soft": 1024, "Hard": 2048}]
    assert host["IpcMode"] == "shareable"
    assert host["Init"] is True
    assert [(m["Type"], m["Source"], m["Target"], m["ReadOnly"]) for m in host["Mounts"]] == [
        ("volume", volume, "/data", True)
    ]
    assert attrs["Config"]["User"] == "nobody"
    env = dict(variable.split("=", 1) for variable in attrs["Config"]["Env"])
    assert (env["FROM_CONFIG"], env["TAKEOFF_TOKEN"], env["TAKEOFF_REGISTRY"]) == (
        "yes",
        "secret",
        "127.0.0.1:50051",
    )
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "TAKEOFF_MODE"} & set(env)  # one container: no ranks
    assert {key: value for key, value in attrs["Config"]["Labels"].items() if key.startswith("takeoff.")} == {
        "takeoff.item": assignment.item,
        "takeoff.agent": harness.agent_id,
        "takeoff.epoch": "3",
        "takeoff.run": assignment.run,
        "takeoff.lease": assignment.lease_id,
    }

    await job.stop(5)
    assert harness.gone(job)
    ended = job.exit()
    assert ended is not None
    assert (ended.exit_code, ended.signal) == (143, 15)


@pytest.mark.parametrize(("gpus", "expected"), [("all", ["0", "1"]), (1, ["0"]), (["1"], ["1"])])
async def test_gpus_become_device_requests(harness: Harness, gpus: object, expected: list[str]) -> None:
    """Create and inspect only: this engine has no NVIDIA runtime, so a container asking for GPUs cannot
    start here."""
    assignment = harness.assignment(gpus=gpus)
    settings = container_settings(assignment.resource_config)
    assert settings.gpus is not None
    devices = await harness.runner.gpus.acquire(assignment.lease_id, settings.gpus)
    options = create_options(
        harness.launch(assignment),
        settings.create,
        devices,
        agent=harness.agent_id,
        name=f"takeoff-{assignment.lease_id}",
    )
    container = harness.engine.containers.create(**options)
    try:
        requests = container.attrs["HostConfig"]["DeviceRequests"]
        assert [(r["DeviceIDs"], r["Capabilities"]) for r in requests] == [(expected, [["gpu"]])]
        assert container.labels["takeoff.gpus"] == ",".join(expected)
    finally:
        container.remove(force=True)


def test_options_it_cannot_take_are_refused_by_name(harness: Harness) -> None:
    assignment = harness.assignment(
        privileged=True, network_mode="host", ipc_mode="container:other", cpus="x"
    )
    with pytest.raises(RunnerRefused) as refused:
        harness.runner.check(assignment)
    message = str(refused.value)
    for name in ("privileged", "network_mode", "ipc_mode", "cpus"):
        assert f"{name}:" in message


@pytest.mark.parametrize("volumes", [{"./data": "/d"}, ["~/data:/d"], {"data dir": "/d"}])
def test_a_source_that_is_neither_a_volume_nor_an_absolute_path_is_refused(
    harness: Harness, volumes: object
) -> None:
    with pytest.raises(
        RunnerRefused, match=r"volumes: .* is neither a volume name nor an absolute host path"
    ):
        harness.runner.check(harness.assignment(volumes=volumes))


async def test_an_absolute_host_path_is_bind_mounted_as_the_queue_allowed_it(
    harness: Harness, tmp_path: Path
) -> None:
    # Only a queue with allow_host_paths lets one through (the queue's check, docs/design.md §13).
    (tmp_path / "data.txt").write_text("from the host\n")
    script = "print(open('/data/data.txt').read().strip())"
    job = await harness.started(script, volumes=[f"{tmp_path}:/data:ro"])
    ended = await job.wait()

    assert ended.exit_code == 0
    assert next(output.source.read_lines(final=True) for output in job.log_sources()) == ["from the host"]


def test_more_gpus_than_the_agent_lists_are_refused(harness: Harness) -> None:
    with pytest.raises(RunnerRefused, match="gpus: asks for 3 GPUs; this agent lists 2"):
        harness.runner.check(harness.assignment(gpus=3))


async def test_an_exit_code_and_the_output_are_reported(harness: Harness) -> None:
    job = await harness.started("import sys; print('out'); print('err', file=sys.stderr); sys.exit(1)")
    ended = await job.wait()

    assert (ended.exit_code, ended.signal, ended.oom_killed, ended.failure) == (1, None, False, None)
    assert [output.source.read_lines(final=True) for output in job.log_sources()] == [["out"], ["err"]]
    assert [output.rank for output in job.log_sources()] == [None, None]
    assert harness.gone(job)


async def test_a_command_the_container_cannot_execute_is_the_jobs_exit_127(harness: Harness) -> None:
    assignment = replace(harness.assignment(), entrypoint=("no-such-command",))
    job = harness.job(assignment)
    await job.start(harness.launch(assignment))
    ended = await job.wait()

    assert (ended.exit_code, ended.failure) == (127, None)
    assert "no-such-command" in harness.output(job, "stderr")
    assert harness.gone(job)


async def test_a_user_the_image_does_not_have_is_refused(harness: Harness) -> None:
    assignment = harness.assignment(user="no-such-user")
    job = harness.job(assignment)
    with pytest.raises(RunnerRefused, match="no-such-user"):
        await job.start(harness.launch(assignment))
    await job.stop(5)
    assert harness.gone(job)


async def test_an_oom_kill_is_reported(harness: Harness) -> None:
    job = await harness.started(
        "hog = bytearray(256 * 2**20); print('survived')", mem_limit="32m", memswap_limit="32m"
    )
    ended = await job.wait()

    assert ended.oom_killed
    assert ended.exit_code == 137
    assert "survived" not in harness.output(job)


async def test_stop_ends_and_removes_the_container(harness: Harness) -> None:
    job = await harness.started()
    await eventually(lambda: "ready" in harness.output(job), "the job to start")

    await job.stop(30)

    assert harness.gone(job)
    assert job.exit() == JobExit(exit_code=143, signal=15)


async def test_sweep_removes_the_containers_of_leases_not_held(harness: Harness) -> None:
    kept, swept = await harness.started(), await harness.started()

    await harness.runner.sweep({kept.assignment.lease_id})

    assert harness.gone(swept)
    assert harness.container(kept).status == "running"
    ended = await swept.wait()
    assert ended.exit_code == 137


async def test_the_shim_fences_a_container_whose_agent_stopped_renewing(harness: Harness) -> None:
    job = await harness.started()
    await eventually(lambda: "ready" in harness.output(job), "the job to start")

    await job.renew_lease(time.time() - 1)  # the agent's leases ran out

    ended = await eventually(job.exit, "the shim to fence the job")
    assert (ended.exit_code, ended.fenced) == (143, True)
    assert harness.gone(job)


async def test_a_restarted_agent_takes_the_job_back_from_its_lease_directory(
    docker_setup: DockerSetup, harness: Harness
) -> None:
    job = await harness.started("import os, time; print('ready', flush=True); time.sleep(600)")
    await eventually(lambda: "ready" in harness.output(job), "the job to start")
    restarted = create({}, harness.runner.context)

    again = restarted.job(job.assignment, job.lease_dir)
    assert again.started
    assert again.exit() is None
    await again.stop(5)

    assert (await again.wait()).exit_code == 143
    assert harness.gone(job)
    await restarted.close()


TAKEN_OVER = """
import signal, sys, time
def stop(*_):
    print("stopping", flush=True)
    sys.exit(7)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(600)
"""


async def test_a_running_job_whose_shim_died_is_taken_over_by_a_new_shim(harness: Harness) -> None:
    job = await harness.started(TAKEN_OVER)
    await eventually(lambda: "ready" in harness.output(job), "the job to start")
    dead_shim = json.loads((job.lease_dir / "shim.json").read_text())["shim_pid"]
    os.kill(dead_shim, signal.SIGKILL)  # as when the agent's container, which holds the shims, is killed
    waiting = asyncio.create_task(job.wait())

    def new_shim() -> bool:
        return bool(json.loads((job.lease_dir / "shim.json").read_text())["shim_pid"] != dead_shim)

    await eventually(new_shim, "a new shim to take the running container over")
    assert harness.container(job).status == "running"  # the job went on, unharmed
    await job.stop(5)

    ended = await waiting
    assert (ended.exit_code, ended.signal) == (7, None)  # its own end, seen by the new shim
    assert harness.output(job) == "ready\nstopping\n"  # followed on, nothing copied twice
    assert harness.gone(job)


async def test_an_image_is_pulled_with_the_configured_login(
    docker_setup: DockerSetup, tmp_path: Path
) -> None:
    image = docker_setup.private_image
    login = {"username": docker_setup.auth_user, "password": docker_setup.auth_password}
    agent = f"test-{uuid.uuid4().hex[:10]}"
    with_login = create(
        {"registry_auth": {docker_setup.auth_registry: login}}, RunnerContext(agent, tmp_path)
    )
    without_login = create({}, RunnerContext(agent, tmp_path))
    harness = Harness(docker_setup, tmp_path, without_login)
    refused = harness.assignment("print('hello')", image=image)
    with_image = harness.assignment("print('hello')", image=image)
    if docker_setup.engine.images.list(name=image):
        docker_setup.engine.images.remove(image, force=True)
    try:
        job = harness.job(refused)
        await job.start(harness.launch(refused))
        ended = await job.wait()
        assert ended.failure is not None
        assert ended.failure.reason is FailureReason.BUILD_FAILED

        harness.runner = with_login
        job = harness.job(with_image)
        await job.start(harness.launch(with_image))
        ended = await job.wait()
        assert (ended.exit_code, ended.failure) == (0, None)
        assert harness.output(job) == "hello\n"
    finally:
        await with_login.sweep(())
        if docker_setup.engine.images.list(name=image):
            docker_setup.engine.images.remove(image, force=True)
        await with_login.close()
        await without_login.close()


async def test_a_job_waits_for_its_gpus_saying_so_and_a_cancelled_wait_leaves_nothing(
    harness: Harness,
) -> None:
    await harness.runner.gpus.acquire("running-elsewhere", GpuRequest(every=True))
    assignment = harness.assignment(gpus=1)
    job = harness.job(assignment)
    details: list[str] = []

    async def report(detail: str) -> None:
        details.append(detail)

    starting = asyncio.create_task(job.start(replace(harness.launch(assignment), report=report)))
    await eventually(lambda: len(details) == 1, "the job to wait for a GPU")
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting

    assert details == ["waiting for 1 GPU (0 of 2 free)"]
    assert not job.started
    assert harness.gone(job)
    harness.runner.gpus.release("running-elsewhere")
    assert harness.runner.gpus.free() == ["0", "1"]


async def test_jobs_asking_for_a_gpu_each_get_different_devices_and_a_third_waits() -> None:
    pool = GpuPool(["0", "1"])
    one = GpuRequest(count=1)
    first = await pool.acquire("a", one)
    second = await pool.acquire("b", one)
    waits: list[str] = []

    async def waiting(detail: str) -> None:
        waits.append(detail)

    third = asyncio.create_task(pool.acquire("c", one, waiting))
    await eventually(lambda: len(waits) == 1, "the third job to wait")

    assert sorted(first + second) == ["0", "1"]
    assert waits == ["waiting for 1 GPU (0 of 2 free)"]
    assert not third.done()
    pool.release("b")
    assert await third == second


async def test_all_gpus_wait_for_every_device_and_are_not_passed_by_later_jobs() -> None:
    pool = GpuPool(["0", "1"])
    await pool.acquire("a", GpuRequest(count=1))
    waits: list[str] = []

    async def waiting(detail: str) -> None:
        waits.append(detail)

    every = asyncio.create_task(pool.acquire("all", GpuRequest(every=True), waiting))
    later = asyncio.create_task(pool.acquire("later", GpuRequest(count=1), waiting))
    await eventually(lambda: len(waits) == 2, "both to wait")

    pool.release("a")

    assert await every == ("0", "1")
    assert not later.done()
    pool.release("all")
    assert await later == ("0",)


async def test_a_cancelled_wait_holds_no_device() -> None:
    pool = GpuPool(["0"])
    await pool.acquire("a", GpuRequest(count=1))
    waits: list[str] = []

    async def waiting(detail: str) -> None:
        waits.append(detail)

    waiter = asyncio.create_task(pool.acquire("b", GpuRequest(count=1), waiting))
    await eventually(lambda: len(waits) == 1, "b to wait")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    pool.release("a")
    assert pool.free() == ["0"]


def test_a_job_taken_back_after_a_restart_claims_its_devices_again(tmp_path: Path) -> None:
    runner = create({"gpus": ["0", "1"]}, RunnerContext(agent_id="restarted", state_dir=tmp_path))
    assignment = Assignment(
        lease_id="l1",
        epoch=1,
        item="projects/p/queues/q/items/i",
        queue="projects/p/queues/q",
        run="projects/p/runs/i-1",
        attempt=1,
        job_version=JobVersion("projects/p/jobs/j/versions/1", SourceKind.IMAGE, image="img"),
        resource=ResourceKind.LOCAL_CONTAINER,
        entrypoint=(),
        resource_config={"gpus": 1},
    )
    (tmp_path / "spec.json").write_text(json.dumps({"mode": "container", "container": "c", "devices": ["1"]}))

    runner.job(assignment, tmp_path)

    assert runner.gpus.free() == ["0"]
