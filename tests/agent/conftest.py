"""Every service a separate process on loopback: registry, queue, builder, and agents started per test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from takeoff.client import Client
from takeoff.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    queue_pb2,
    queue_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
)
from takeoff_rpc.channels import open_channel
from takeoff_server.protovalues import dict_to_struct
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, pid_alive, service_process, wait_for

LEASE_TTL_SECONDS = 3.0
QUEUE_LOG = "queue.log"
"""The default queue service's output, in the module's home, copied as it comes: a pipe nobody reads would
stall the service once it fills (a failing database logs a traceback per refused message)."""
PROJECT = "agenttest"

WAITER = """\
import os, time, takeoff
run = takeoff.init()
print("pid", os.getpid(), flush=True)
while not os.path.exists(run.config["go"]):
    time.sleep(0.1)
print("done waiting", flush=True)
"""
"""Prints its pid, then waits for the file named by its ``go`` config."""

GROUP = """\
import json, os, subprocess, sys, time, takeoff
run = takeoff.init()
# A child that ignores SIGTERM: only stopping the whole process group, SIGKILL included, ends it.
child = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
     " print('ready', flush=True); time.sleep(600)"],
    stdout=subprocess.PIPE,
)
child.stdout.readline()
pids = run.config["pids"]
with open(pids + ".partial", "w") as file:
    json.dump({"job": os.getpid(), "child": child.pid}, file)
os.replace(pids + ".partial", pids)
print("started", flush=True)
time.sleep(600)
"""
"""A job attached to its run, with a child process in its group; it writes both pids to the file named by
its ``pids`` config. Attached first: a run the queue closes once the pids are known (a deleted queue)
must not make the job fail its ``takeoff.init()`` and leave its child behind."""


def group_pids(pids_file: Path) -> dict[str, int]:
    """The pids a GROUP job wrote, once it has."""
    wait_for(pids_file.exists, timeout=90, what="the job to write its pids")
    pids: dict[str, int] = json.loads(pids_file.read_text())
    return pids


def wait_gone(pids: dict[str, int], timeout: float = 30) -> None:
    """Every process in ``pids`` has exited (a zombie counts as exited)."""
    for role, pid in pids.items():

        def gone(pid: int = pid) -> bool:
            return not pid_alive(pid)

        wait_for(gone, timeout=timeout, what=f"the {role} (pid {pid}) to exit")


def job_pid(stack: Stack, run: str) -> int:
    """The pid a job printed as ``pid N`` into its run's log."""

    def find() -> int | None:
        for line in stack.logs(run):
            if match := re.fullmatch(r"pid (\d+)", line):
                return int(match.group(1))
        return None

    return wait_for(find, timeout=60, what="the job to print its pid")


def assignment_message(
    *,
    lease_id: str = "l1",
    job_version: str = f"projects/{PROJECT}/jobs/job/versions/1",
    source: common_pb2.JobSource | None = None,
    resource_config: dict[str, object] | None = None,
    **fields: object,
) -> queue_pb2.LeaseResponse.Assignment:
    """An Assignment as the queue service sends it, for attempt 1 of a local-process item of a code job
    (``source``: its code); ``fields`` set or replace any other field."""
    item = f"projects/{PROJECT}/queues/q/items/i-{lease_id}"
    values: dict[str, object] = {
        "lease_id": lease_id,
        "epoch": 1,
        "item": queue_pb2.Item(name=item),
        "job_version": common_pb2.JobVersion(
            name=job_version,
            source=source or common_pb2.JobSource(code=common_pb2.CodeSource(sha256="0" * 64)),
        ),
        "resource_config": dict_to_struct(resource_config or {}),
        "run": f"projects/{PROJECT}/runs/i-{lease_id}-1",
        "attempt": 1,
        "entrypoint": ["python", "main.py"],
        "queue": f"projects/{PROJECT}/queues/q",
        "resource": common_pb2.RESOURCE_KIND_LOCAL_PROCESS,
        **fields,
    }
    return queue_pb2.LeaseResponse.Assignment(**values)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_pod_log_follow_outlives_its_test() -> Iterator[None]:
    """Every Kubernetes runner a test makes is closed by the end of its teardown, and closing it ends every
    pod log it followed: a follow left behind would try the test's stopped stand-in API server for the rest
    of the run ("cannot read the log of pod ...; trying again" once a second)."""
    before = set(threading.enumerate())
    yield
    left = [t.name for t in threading.enumerate() if t not in before and t.name.startswith("kubernetes-log-")]
    assert not left, f"pod log follows still running after the test: {left}"


@pytest.fixture(scope="module")
def lease_ttl_seconds() -> float:
    """The queue service's lease TTL: short, so that lost agents are noticed quickly. A test module whose
    agents must come back from a restart before it runs out overrides it."""
    return LEASE_TTL_SECONDS


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ahome")


@pytest.fixture(scope="module")
def registry(home: Path) -> Iterator[ServiceProcess]:
    with service_process("registry", home) as process:
        yield process
        process.terminate()


@pytest.fixture(scope="module")
def queue_database_url() -> str | None:
    """The queue service's ``database_url``: None, its SQLite file in the module's home. A test module that
    needs another database overrides it."""
    return None


@pytest.fixture(scope="module")
def queue_service(
    home: Path, registry: ServiceProcess, lease_ttl_seconds: float, queue_database_url: str | None
) -> Iterator[ServiceProcess]:
    env = {
        "TAKEOFF_REGISTRY_ADDRESS": registry.address,
        "TAKEOFF_LEASE_TTL_SECONDS": str(lease_ttl_seconds),
        "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS": "0.5",
        "TAKEOFF_SHUTDOWN_GRACE_SECONDS": "1",
    }
    if queue_database_url is not None:
        env["TAKEOFF_DATABASE_URL"] = queue_database_url
    with service_process("queue", home, env=env) as process:
        yield process
        process.terminate()


@pytest.fixture(scope="module")
def builder(home: Path, registry: ServiceProcess) -> Iterator[ServiceProcess]:
    with service_process("builder", home, env={"TAKEOFF_REGISTRY_ADDRESS": registry.address}) as process:
        yield process
        process.terminate()


@pytest.fixture
def client(registry: ServiceProcess) -> Iterator[Client]:
    with Client(registry.address, project=PROJECT) as client:
        yield client


def code_job(client: Client, tmp_path: Path, name: str, script: str, requirements: str = "") -> str:
    """A code job whose entrypoint runs ``script``; returns the job id."""
    from takeoff.models import Environment

    code = tmp_path / f"code-{name}"
    code.mkdir()
    (code / "main.py").write_text(script)
    client.create_job_version(
        name, code, entrypoint=["python", "main.py"], environment=Environment(requirements=requirements)
    )
    return name


class Stack:
    """The running services, and helpers to drive items through them."""

    def __init__(self, home: Path, registry: str, queue: str, builder: str) -> None:
        self.home = home
        self.registry = registry
        self.queue_address = queue
        self.builder = builder
        self._queue_channel = open_channel(queue, api_key=ADMIN_KEY)
        self.queues = queue_pb2_grpc.QueueServiceStub(self._queue_channel)
        self._registry_channel = open_channel(registry, api_key=ADMIN_KEY)
        self.runs = runs_pb2_grpc.RunServiceStub(self._registry_channel)

    def new_queue(
        self,
        resource: common_pb2.ResourceKind.ValueType = common_pb2.RESOURCE_KIND_LOCAL_PROCESS,
        **settings: object,
    ) -> str:
        reply = self.queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent=f"projects/{PROJECT}",
                queue_id=f"q-{uuid.uuid4().hex[:10]}",
                queue=queue_pb2.Queue(resource=resource, **settings),  # type: ignore[arg-type]
            )
        )
        return reply.queue.name

    def enqueue(self, queue: str, job: str, **fields: object) -> str:
        return self.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=job, **fields)).item.name  # type: ignore[arg-type]

    def item(self, name: str) -> queue_pb2.Item:
        return self.queues.GetItem(queue_pb2.GetItemRequest(name=name)).item

    def wait_until(
        self, name: str, done: Callable[[queue_pb2.Item], bool], what: str, timeout: float = 120
    ) -> queue_pb2.Item:
        found: list[queue_pb2.Item] = []

        def probe() -> bool:
            item = self.item(name)
            found[:] = [item]
            return done(item)

        try:
            wait_for(probe, timeout=timeout, what=f"{name} {what}")
        except AssertionError as late:  # what happened to it instead
            raise AssertionError(f"{late}; its history: {_history(found[0]) if found else None}") from None
        return found[0]

    def wait_ended(self, name: str, timeout: float = 120) -> queue_pb2.Item:
        terminal = {
            common_pb2.ITEM_STATE_SUCCEEDED,
            common_pb2.ITEM_STATE_FAILED,
            common_pb2.ITEM_STATE_CANCELLED,
        }
        return self.wait_until(name, lambda item: item.state in terminal, "to end", timeout)

    def wait_state(self, name: str, state: int, timeout: float = 120) -> queue_pb2.Item:
        return self.wait_until(name, lambda item: item.state == state, f"to be {state}", timeout)

    def run(self, name: str) -> runs_pb2.Run:
        return self.runs.GetRun(runs_pb2.GetRunRequest(name=name)).run

    def logs(self, run: str) -> list[str]:
        return [line.text for line in self.log_lines(run)]

    def log_lines(self, run: str) -> list[runs_pb2.LogLine]:
        batches = self.runs.ReadLogs(runs_pb2.ReadLogsRequest(name=run))
        return [line for batch in batches for line in batch.lines]

    def close(self) -> None:
        self._queue_channel.close()
        self._registry_channel.close()


@pytest.fixture(scope="module")
def stack(
    home: Path, registry: ServiceProcess, queue_service: ServiceProcess, builder: ServiceProcess
) -> Iterator[Stack]:
    stack = Stack(home, registry.address, queue_service.address, builder.address)
    yield stack
    stack.close()


class AgentProcess:
    def __init__(
        self, process: subprocess.Popen[str], state_dir: Path, ready_file: Path, log_file: Path
    ) -> None:
        self.process = process
        self.state_dir = state_dir
        self._ready_file = ready_file
        self.log_file = log_file
        """What the agent writes to stderr."""

    @property
    def address(self) -> str:
        """Where its AgentService listens (known once it serves)."""
        addresses = wait_for(
            lambda: self._ready_file.exists() and json.loads(self._ready_file.read_text())["addresses"],
            what="the agent to serve",
        )
        return str(addresses[0])

    def status(self) -> agent_pb2.GetStatusResponse:
        with open_channel(self.address, api_key=ADMIN_KEY) as channel:
            return agent_pb2_grpc.AgentServiceStub(channel).GetStatus(agent_pb2.GetStatusRequest())

    def wait_working_on(self, item: str, state: int, timeout: float = 120) -> None:
        """Until the agent, connected to the queue service, says it works on ``item`` in ``state``."""

        def working() -> bool:
            status = self.status()
            return status.connected and (item, state) in [(work.item, work.state) for work in status.work]

        wait_for(working, timeout=timeout, what=f"the agent to work on {item} in state {state}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


StartAgent = Callable[..., AgentProcess]


@pytest.fixture
def start_agent(stack: Stack, tmp_path: Path) -> Iterator[StartAgent]:
    """Start ``python -m takeoff_agent`` for some queues; every agent started is stopped afterwards."""
    started: list[AgentProcess] = []

    def start(
        queues: list[str],
        *,
        max_jobs: int = 1,
        state_dir: Path | None = None,
        env: dict[str, str] | None = None,
        **settings: object,
    ) -> AgentProcess:
        """An agent for ``queues``; ``env`` adds to the environment it starts in, ``settings`` to its
        config file."""
        state = state_dir or tmp_path / f"agent-{len(started)}"
        config = tmp_path / f"agent-{uuid.uuid4().hex[:6]}.yaml"
        config.write_text(
            json.dumps(
                {
                    "queues": queues,
                    "max_jobs": max_jobs,
                    "state_dir": str(state),
                    "queue_address": stack.queue_address,
                    "builder_address": stack.builder,
                    "registry_address": stack.registry,
                    "stop_grace_seconds": 2,
                    **settings,
                }
            )
        )
        ready_file = tmp_path / f"agent-{uuid.uuid4().hex[:6]}.ready"
        log_file = tmp_path / f"agent-{len(started)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "takeoff_agent", "--config", str(config)],
            env={
                **os.environ,
                "TAKEOFF_HOME": str(stack.home),
                "TAKEOFF_LISTEN": '["127.0.0.1:0"]',
                "TAKEOFF_READY_FILE": str(ready_file),
                **(env or {}),
            },
            stdout=subprocess.DEVNULL,
            stderr=open(log_file, "w"),  # noqa: SIM115
            text=True,
        )
        agent = AgentProcess(process, state, ready_file, log_file)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.process.poll() is None:
            agent.kill()


@contextmanager
def running_agent(start_agent: StartAgent, queues: list[str], **settings: object) -> Iterator[AgentProcess]:
    agent = start_agent(queues, **settings)
    try:
        yield agent
    finally:
        if agent.process.poll() is None:
            agent.terminate()


def _history(item: queue_pb2.Item) -> list[tuple[str, int, str, str]]:
    return [
        (
            common_pb2.ItemState.Name(t.to_state),
            t.attempt,
            common_pb2.FailureReason.Name(t.reason),
            t.message,
        )
        for t in item.transitions
    ]
