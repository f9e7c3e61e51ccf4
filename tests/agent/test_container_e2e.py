"""The agent end to end on the local-container runner: real registry, queue, builder and agent processes and
the real Docker engine (docs/design.md §7, §12).

Jobs reach the registry through its Unix socket, mounted into their containers (a container on the bridge
network cannot reach the host's loopback). The two code jobs share their image (same code, same build
key), and every image shares the builder's SDK layer. Multi-node launches (``nodes: 2``) run the example of
``examples/multinode`` and the waiting job on two ranks (the runner's own multi-node cases are in
``test_container_multinode.py``).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from takeoff.client import Client
from takeoff.models import GitSource, ImageSource
from takeoff.v1 import build_pb2, build_pb2_grpc, common_pb2, queue_pb2
from takeoff_rpc.channels import open_channel
from takeoff_server.protovalues import dict_to_struct
from tests.agent.conftest import PROJECT, AgentProcess, Stack, StartAgent, code_job, running_agent
from tests.conftest import DockerSetup
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, service_process, wait_for

SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
FAILED = common_pb2.ITEM_STATE_FAILED
CANCELLED = common_pb2.ITEM_STATE_CANCELLED
RUNNING = common_pb2.ITEM_STATE_RUNNING
LEASE_TTL_SECONDS = 15.0
"""Long enough for a killed agent to come back and keep its lease on a loaded machine (CI, at 6 s, saw a
restarted agent come back too late: its job's container fenced, the item run again); short enough for the
test of an agent killed for good, which waits for it."""
STOP_GRACE_SECONDS = 2  # the agent fixture's stop_grace_seconds
SOCKET = "registry.sock"
"""The registry's Unix socket, in the stack's home."""
EXAMPLE = Path(__file__).parents[2] / "examples" / "multinode"

TRAIN = """\
import os
os.environ["TAKEOFF_SYSTEM_METRICS"] = "0"  # the tests count the job's own rows; a slow start would add one
import takeoff
run = takeoff.init(config={"epochs": 2})
print("hello from the container", run.config["epochs"], os.getcwd())
for i in range(5):
    run.log({"loss": 1 / (i + 1)})
run.summary["best"] = 0.2
"""

WAITER = """\
import os, time
os.environ["TAKEOFF_SYSTEM_METRICS"] = "0"  # the tests count the job's own rows; its wait would add some
import takeoff
run = takeoff.init()
print("waiting", flush=True)
while not os.path.exists("/tmp/go"):
    time.sleep(0.1)
run.log({"done": 1})
print("done", flush=True)
"""
"""Waits until the test creates /tmp/go inside its container (``go``)."""


@pytest.fixture(scope="module")
def lease_ttl_seconds() -> float:
    return LEASE_TTL_SECONDS


@pytest.fixture(scope="module")
def registry(home: Path) -> Iterator[ServiceProcess]:
    """The registry on loopback (for the tests and services) and on a Unix socket (for the jobs)."""
    with service_process("registry", home, listen=["127.0.0.1:0", f"unix:{home / SOCKET}"]) as process:
        yield process
        process.terminate()


@pytest.fixture(scope="module")
def builder(home: Path, registry: ServiceProcess, docker_setup: DockerSetup) -> Iterator[ServiceProcess]:
    login = {"username": docker_setup.auth_user, "password": docker_setup.auth_password}
    env = {
        "TAKEOFF_REGISTRY_ADDRESS": registry.address,
        "TAKEOFF_DEFAULT_BASE_IMAGE": docker_setup.base_image,
        "TAKEOFF_IMAGE_REPOSITORY": "takeoff-e2e",
        "TAKEOFF_REGISTRY_AUTH": json.dumps({docker_setup.auth_registry: login}),
    }
    with service_process("builder", home, env=env) as process:
        yield process
        process.terminate()


@dataclass
class Containers:
    """The stack, a client, the Docker engine, and agents with the local-container runner only, whose jobs
    are given the registry's socket."""

    stack: Stack
    client: Client
    docker: DockerSetup
    tmp_path: Path
    start_agent: StartAgent

    @property
    def settings(self) -> dict[str, Any]:
        login = {"username": self.docker.auth_user, "password": self.docker.auth_password}
        return {
            "runners": {"local-container": {"registry_auth": {self.docker.auth_registry: login}}},
            "job_registry_address": f"unix:{self.stack.home / SOCKET}",
        }

    def agent(self, queues: list[str], **settings: Any) -> AgentProcess:
        return self.start_agent(queues, **self.settings, **settings)

    def running_agent(self, queues: list[str], **settings: Any) -> AbstractContextManager[AgentProcess]:
        return running_agent(self.start_agent, queues, **self.settings, **settings)

    def queue(self, **settings: Any) -> str:
        reply = self.stack.queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent=f"projects/{PROJECT}",
                queue_id=f"q-{uuid.uuid4().hex[:10]}",
                queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_CONTAINER, **settings),
            )
        )
        return reply.queue.name

    def containers_of(self, item: str) -> list[Any]:
        return list(
            self.docker.engine.containers.list(
                all=True, sparse=True, filters={"label": f"takeoff.item={item}"}
            )
        )

    def running_container(self, item: str) -> Any:
        def found() -> Any:
            containers = [c for c in self.containers_of(item) if c.status == "running"]
            return containers[0] if containers else None

        return wait_for(found, timeout=60, what=f"the container of {item} to run")

    def running_ranks(self, item: str, nodes: int) -> list[Any]:
        """The containers of every rank of ``item``, in rank order, once all run."""

        def found() -> list[Any] | None:
            ranks = [c for c in self.containers_of(item) if c.status == "running"]
            return (
                sorted(ranks, key=lambda c: int(c.attrs["Labels"]["takeoff.rank"]))
                if len(ranks) == nodes
                else None
            )

        return wait_for(found, timeout=60, what=f"the {nodes} ranks of {item} to run")

    def wait_removed(self, item: str, timeout: float = 60) -> None:
        wait_for(lambda: not self.containers_of(item), timeout=timeout, what=f"the container of {item} to go")

    def go(self, item: str) -> None:
        """Let a WAITER job of ``item`` finish."""
        exit_code, _ = self.running_container(item).exec_run(["touch", "/tmp/go"])
        assert exit_code == 0


@pytest.fixture
def containers(
    stack: Stack,
    client: Client,
    docker_setup: DockerSetup,
    tmp_path: Path,
    start_agent: StartAgent,
) -> Containers:
    return Containers(stack, client, docker_setup, tmp_path, start_agent)


def built_image(stack: Stack, job: str) -> str:
    """The image the builder made (or has) for the newest version of ``job``."""
    with open_channel(stack.builder, api_key=ADMIN_KEY) as channel:
        events = build_pb2_grpc.BuildServiceStub(channel).Build(
            build_pb2.BuildRequest(
                job_version=f"projects/{PROJECT}/jobs/{job}:latest", kind=build_pb2.BUILD_KIND_IMAGE
            )
        )
        results = [event.result for event in events if event.WhichOneof("event") == "result"]
    assert results, "the build has no result"
    return results[0].image


def assert_succeeded_with_metrics(stack: Stack, item: queue_pb2.Item, history: int) -> None:
    assert (item.state, item.exit_code) == (SUCCEEDED, 0)
    run = stack.run(item.run)
    assert run.state == common_pb2.RUN_STATE_FINISHED
    assert run.history_length == history


def test_a_code_job_runs_in_a_container_and_reports_its_metrics(containers: Containers) -> None:
    stack = containers.stack
    job = code_job(containers.client, containers.tmp_path, "train", TRAIN)
    queue = containers.queue()
    with containers.running_agent([queue]):
        item = stack.wait_ended(stack.enqueue(queue, job), timeout=300)

    assert_succeeded_with_metrics(stack, item, history=5)
    assert stack.run(item.run).summary["best"] == 0.2
    assert "hello from the container 2 /app" in stack.logs(item.run)
    assert containers.containers_of(item.name) == []


def test_a_git_job_runs_in_a_container(containers: Containers) -> None:
    stack = containers.stack
    source = containers.tmp_path / "repo"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git[:1], "init", "-q", "-b", "main", str(source)], check=True)
    (source / "main.py").write_text(TRAIN.replace("hello from the container", "hello from git"))
    subprocess.run([*git, "-C", str(source), "add", "main.py"], check=True)
    subprocess.run([*git, "-C", str(source), "commit", "-q", "-m", "first"], check=True)
    containers.client.create_job_version(
        "from-git", GitSource(f"file://{source}", "main"), entrypoint=["python", "main.py"]
    )
    queue = containers.queue()
    with containers.running_agent([queue]):
        item = stack.wait_ended(stack.enqueue(queue, "from-git"), timeout=300)

    assert_succeeded_with_metrics(stack, item, history=5)
    assert "hello from git 2 /app" in stack.logs(item.run)


def test_an_image_job_pulled_with_the_agents_registry_login_succeeds(containers: Containers) -> None:
    """The image of the code job, pushed to the registry that wants a login and absent from the engine:
    the agent pulls it with the login of its config."""
    stack, docker = containers.stack, containers.docker
    engine = docker.engine
    code_job(containers.client, containers.tmp_path, "train", TRAIN)
    private = f"{docker.auth_registry}/takeoff-e2e/train:{uuid.uuid4().hex[:8]}"
    repository, tag = private.rsplit(":", 1)
    engine.images.get(built_image(stack, "train")).tag(repository, tag)
    login = {"username": docker.auth_user, "password": docker.auth_password}
    for line in engine.images.push(repository, tag, auth_config=login, stream=True, decode=True):
        assert "error" not in line, line
    engine.images.remove(private)
    containers.client.create_job_version("from-image", ImageSource(private), entrypoint=["python", "main.py"])
    queue = containers.queue()
    try:
        with containers.running_agent([queue]):
            item = stack.wait_ended(stack.enqueue(queue, "from-image"), timeout=180)
    finally:
        if engine.images.list(name=private):
            engine.images.remove(private, force=True)

    assert_succeeded_with_metrics(stack, item, history=5)
    assert "hello from the container 2 /app" in stack.logs(item.run)


def test_an_image_job_without_the_sdk_that_exits_0_is_no_run(containers: Containers) -> None:
    stack = containers.stack
    containers.client.create_job_version(
        "no-sdk",
        ImageSource(containers.docker.base_image),
        entrypoint=["python3", "-c", "print('no sdk in this image')"],
    )
    queue = containers.queue()
    with containers.running_agent([queue]):
        item = stack.wait_ended(stack.enqueue(queue, "no-sdk", max_attempts=1), timeout=120)

    assert (item.state, item.reason) == (FAILED, common_pb2.FAILURE_REASON_NO_RUN)
    assert "no sdk in this image" in stack.logs(item.run)
    assert containers.containers_of(item.name) == []


def test_cancel_stops_and_removes_the_container(containers: Containers) -> None:
    stack = containers.stack
    job = code_job(containers.client, containers.tmp_path, "waiter", WAITER)
    queue = containers.queue()
    with containers.running_agent([queue]) as agent:
        name = stack.enqueue(queue, job)
        stack.wait_state(name, RUNNING, timeout=300)
        running = containers.running_container(name)
        config = containers.docker.engine.containers.get(running.id).attrs["Config"]
        stack.queues.CancelItem(queue_pb2.CancelItemRequest(name=name))
        item = stack.wait_ended(name, timeout=60)
        containers.wait_removed(name)

    assert item.state == CANCELLED
    assert stack.run(item.run).state == common_pb2.RUN_STATE_KILLED
    # The run token is in the container's environment (§16: Docker access is root on the host anyway),
    # and in no label, no line of the agent's and none of the run's log.
    token = dict(entry.split("=", 1) for entry in config["Env"])["TAKEOFF_TOKEN"]
    assert token
    assert token not in json.dumps(config["Labels"])
    assert token not in agent.log_file.read_text()
    assert token not in "\n".join(stack.logs(item.run))


def test_max_run_time_stops_and_removes_the_container(containers: Containers) -> None:
    stack = containers.stack
    job = code_job(containers.client, containers.tmp_path, "waiter", WAITER)
    queue = containers.queue()
    with containers.running_agent([queue]):
        name = stack.enqueue(queue, job, max_run_time={"seconds": 2}, max_attempts=1)
        item = stack.wait_ended(name, timeout=300)
        containers.wait_removed(name)

    assert (item.state, item.reason) == (FAILED, common_pb2.FAILURE_REASON_MAX_RUN_TIME_EXCEEDED)
    assert stack.run(item.run).state == common_pb2.RUN_STATE_KILLED


def test_an_agent_killed_and_restarted_resumes_its_container(containers: Containers) -> None:
    stack = containers.stack
    job = code_job(containers.client, containers.tmp_path, "waiter", WAITER)
    queue = containers.queue()
    first = containers.agent([queue])
    name = stack.enqueue(queue, job)
    running = stack.wait_state(name, RUNNING, timeout=300)
    container = containers.running_container(name)
    first.kill()

    with containers.running_agent([queue], state_dir=first.state_dir) as again:
        again.wait_working_on(name, RUNNING, timeout=60)
        assert containers.running_container(name).id == container.id  # the same container, taken back
        containers.go(name)
        item = stack.wait_ended(name, timeout=60)
        containers.wait_removed(name)

    assert_succeeded_with_metrics(stack, item, history=1)
    assert (item.attempt, item.run) == (1, running.run)
    assert [t.to_state for t in item.transitions].count(SUCCEEDED) == 1
    assert stack.logs(item.run).count("done") == 1


def test_a_container_whose_agent_is_killed_for_good_stops_within_ttl_and_grace(
    containers: Containers,
) -> None:
    stack = containers.stack
    job = code_job(containers.client, containers.tmp_path, "waiter", WAITER)
    queue = containers.queue()
    agent = containers.agent([queue])
    name = stack.enqueue(queue, job)
    stack.wait_state(name, RUNNING, timeout=300)
    containers.running_container(name)
    agent.kill()

    # The shim alone stops it: the lease lapses at most a TTL after the last renewal, then SIGTERM, grace.
    containers.wait_removed(name, timeout=LEASE_TTL_SECONDS + STOP_GRACE_SECONDS + 10)
    [lease_dir] = (agent.state_dir / "leases").iterdir()
    exit_file = lease_dir / "exit.json"  # written once the container is removed
    wait_for(exit_file.exists, timeout=30, what="the shim to record the end")
    ended = json.loads(exit_file.read_text())
    assert (ended["fenced"], ended["exit_code"]) == (True, 143)


def two_nodes(containers: Containers) -> str:
    return containers.queue(resource_config=dict_to_struct({"nodes": 2}))


def test_the_multi_node_example_runs_on_two_ranks_labelled_in_the_runs_log(containers: Containers) -> None:
    stack = containers.stack
    containers.client.create_job_version("multinode", EXAMPLE, entrypoint=["python", "train.py"])
    queue = two_nodes(containers)
    with containers.running_agent([queue]):
        item = stack.wait_ended(stack.enqueue(queue, "multinode", max_attempts=1), timeout=300)

    assert (item.state, item.exit_code) == (SUCCEEDED, 0)
    run = stack.run(item.run)
    assert (run.state, run.summary["sum_of_ranks"]) == (common_pb2.RUN_STATE_FINISHED, 1)
    lines = {(line.rank, line.text) for line in stack.log_lines(item.run)}
    assert {(0, "rank 0: sum of ranks 1"), (1, "rank 1: sum of ranks 1")} <= lines
    assert containers.containers_of(item.name) == []


def test_a_rank_that_dies_fails_the_attempt_and_cancel_removes_every_rank(containers: Containers) -> None:
    stack = containers.stack
    job = code_job(containers.client, containers.tmp_path, "waiter", WAITER)
    queue = two_nodes(containers)
    with containers.running_agent([queue]):
        dying, cancelled = (stack.enqueue(queue, job, max_attempts=1) for _ in range(2))
        _, rank_1 = containers.running_ranks(dying, 2)
        rank_1.kill()  # as a crash would: the shim stops rank 0, and the attempt fails
        failed = stack.wait_ended(dying, timeout=60)
        containers.wait_removed(dying)
        containers.running_ranks(cancelled, 2)
        stack.queues.CancelItem(queue_pb2.CancelItemRequest(name=cancelled))
        item = stack.wait_ended(cancelled, timeout=60)
        containers.wait_removed(cancelled)

    assert (failed.state, failed.reason, failed.exit_code) == (
        FAILED,
        common_pb2.FAILURE_REASON_JOB_FAILED,
        137,
    )
    assert failed.message.startswith("rank 1: exit code 137")  # the rank that died, not rank 0 stopped for it
    assert item.state == CANCELLED
    assert stack.run(item.run).state == common_pb2.RUN_STATE_KILLED
