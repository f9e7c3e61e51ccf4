"""The agent's calls outlive restarts of the services it calls, and it takes no new work while it cannot reach
the builder or the registry (docs/design.md §5, §16).

Registry, queue service and builder are separate processes listening on Unix sockets in the module's home,
so one killed (-9) and started again is found where its callers look. Each test forces its outage by what it
does (a service killed before the call that needs it) and waits on states, never on time.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from takeoff.client import Client
from takeoff.v1 import build_pb2, common_pb2, queue_pb2, queue_pb2_grpc
from takeoff_agent import lease
from takeoff_agent.clients import BUILD_SERVICE, MAX_REBUILDS, Builder
from takeoff_agent.reachability import Reachability
from takeoff_rpc.channels import open_channel
from takeoff_server.protovalues import dict_to_struct
from tests.agent.conftest import PROJECT, AgentProcess, Stack, StartAgent, code_job
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, pid_alive, service_process, wait_for

SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
PENDING = common_pb2.ITEM_STATE_PENDING
BUILDING = common_pb2.ITEM_STATE_BUILDING
LIVE = {
    common_pb2.ITEM_STATE_LEASED,
    common_pb2.ITEM_STATE_BUILDING,
    common_pb2.ITEM_STATE_STARTING,
    common_pb2.ITEM_STATE_RUNNING,
}
MAX_JOBS = 2

HELLO = """\
import takeoff
takeoff.init()
print("hello", flush=True)
"""


class RestartableService:
    """``python -m takeoff_<name>`` on ``unix:{home}/{name}.sock``, killed and started again there."""

    def __init__(self, name: str, home: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.home = home
        self.env = env or {}
        self.address = f"unix:{home / f'{name}.sock'}"
        self._running: ExitStack | None = None
        self._process: ServiceProcess | None = None

    def start(self) -> None:
        running = ExitStack()
        self._process = running.enter_context(
            service_process(self.name, self.home, env=self.env, listen=[self.address])
        )
        self._running = running

    def kill(self) -> None:
        """SIGKILL, as in the chaos runs: no shutdown of any kind."""
        assert self._running is not None
        self._running.close()  # service_process kills what is still running
        self._running = self._process = None

    def terminate(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self.kill()


class Gate:
    """A loopback TCP port that forwards each connection to a Unix socket while open. Closed, it cuts the
    connections it carries and refuses new ones: the service behind it is away for whoever dials the gate
    alone (the agent), and there for everyone else (the queue service minting run tokens)."""

    def __init__(self, unix_address: str) -> None:
        self._path = unix_address.removeprefix("unix:")
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._open = threading.Event()
        self._open.set()
        self._carried: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._open.is_set():
                client.close()
                continue
            upstream = socket.socket(socket.AF_UNIX)
            try:
                upstream.connect(self._path)
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                self._carried += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._open.clear()
        with self._lock:
            carried, self._carried = self._carried, []
        for connection in carried:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def open(self) -> None:
        self._open.set()

    def stop(self) -> None:
        self.close()
        self._listener.close()


@pytest.fixture(scope="module")
def registry(home: Path) -> Iterator[RestartableService]:
    service = RestartableService("registry", home)
    service.start()
    yield service
    service.terminate()


@pytest.fixture(scope="module")
def queue_service(
    home: Path, registry: RestartableService, lease_ttl_seconds: float
) -> Iterator[RestartableService]:
    service = RestartableService(
        "queue",
        home,
        {
            "TAKEOFF_REGISTRY_ADDRESS": registry.address,
            "TAKEOFF_LEASE_TTL_SECONDS": str(lease_ttl_seconds),
            "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS": "0.5",
            "TAKEOFF_SHUTDOWN_GRACE_SECONDS": "1",
        },
    )
    service.start()
    yield service
    service.terminate()


@pytest.fixture(scope="module")
def builder(home: Path, registry: RestartableService) -> Iterator[RestartableService]:
    service = RestartableService("builder", home, {"TAKEOFF_REGISTRY_ADDRESS": registry.address})
    service.start()
    yield service
    service.terminate()


class QueueView:
    """The test's calls to the queue service, through a channel that finds a restarted one again within a
    couple of seconds (takeoff_rpc's options); a call that finds it away answers None."""

    def __init__(self, address: str) -> None:
        self._channel = open_channel(address, api_key=ADMIN_KEY)
        self.queues = queue_pb2_grpc.QueueServiceStub(self._channel)

    def agent(self, name: str) -> queue_pb2.Agent | None:
        try:
            return self.queues.GetAgent(queue_pb2.GetAgentRequest(name=name), timeout=10).agent
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                return None
            raise

    def wait_capacity(self, name: str, capacity: int) -> None:
        """Until the queue service has ``name`` connected and offering ``capacity``."""

        def offered() -> bool:
            agent = self.agent(name)
            return agent is not None and agent.connected and agent.capacity == capacity

        wait_for(offered, timeout=60, what=f"{name} to offer capacity {capacity}")

    def ended(self, name: str) -> queue_pb2.Item | None:
        item = self.queues.GetItem(queue_pb2.GetItemRequest(name=name), timeout=10).item
        return item if item.HasField("end_time") else None

    def close(self) -> None:
        self._channel.close()


@pytest.fixture(scope="module")
def hello_job(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A job that creates its run and prints a line; its venv is built by whichever test comes first."""
    with Client(stack.registry, project=PROJECT) as client:
        return code_job(client, tmp_path_factory.mktemp("hello"), "hello", HELLO)


@pytest.fixture
def view(stack: Stack) -> Iterator[QueueView]:
    view = QueueView(stack.queue_address)
    yield view
    view.close()


def connected_agent(start_agent: StartAgent, view: QueueView, queue: str) -> tuple[AgentProcess, str]:
    """An agent for ``queue`` with room for MAX_JOBS items, and its name, once the queue service has it."""
    agent = start_agent([queue], max_jobs=MAX_JOBS)
    name = agent.status().agent
    view.wait_capacity(name, MAX_JOBS)
    return agent, name


def test_a_build_requested_while_the_builder_is_down_succeeds_first_time_and_no_work_is_taken_meanwhile(
    stack: Stack,
    builder: RestartableService,
    start_agent: StartAgent,
    view: QueueView,
    hello_job: str,
) -> None:
    queue = stack.new_queue()
    _, agent = connected_agent(start_agent, view, queue)

    builder.kill()
    first = stack.enqueue(queue, hello_job)
    stack.wait_state(first, BUILDING)
    view.wait_capacity(agent, 0)
    # The agent has room for MAX_JOBS, but offers none while the build it holds cannot reach its builder.
    second = stack.enqueue(queue, hello_job)
    assert stack.item(second).state == PENDING
    builder.start()

    for name in (first, second):
        item = stack.wait_ended(name)
        assert (item.state, item.attempt) == (SUCCEEDED, 1), item.transitions
    view.wait_capacity(agent, MAX_JOBS)


def test_a_run_created_while_the_registry_is_away_succeeds_on_its_first_attempt(
    stack: Stack,
    registry: RestartableService,
    start_agent: StartAgent,
    view: QueueView,
    hello_job: str,
) -> None:
    # The queue service mints each attempt's run token in the registry before it assigns: the registry is
    # away for the agent alone, which dials it through a gate (its job dials the registry itself).
    gate = Gate(registry.address)
    try:
        queue = stack.new_queue(paused=True)
        agent = start_agent(
            [queue],
            max_jobs=MAX_JOBS,
            registry_address=gate.address,
            job_registry_address=registry.address,
        )
        name = agent.status().agent
        view.wait_capacity(name, MAX_JOBS)
        item = stack.enqueue(queue, hello_job)

        gate.close()
        stack.queues.UpdateQueue(
            queue_pb2.UpdateQueueRequest(
                queue=queue_pb2.Queue(name=queue, paused=False),
                update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
            )
        )
        # Assigned, and the agent's CreateRun found the registry away: it offers no capacity meanwhile.
        stack.wait_until(item, lambda found: found.state in LIVE, "to be assigned")
        view.wait_capacity(name, 0)
        gate.open()

        ended = stack.wait_ended(item)
        assert (ended.state, ended.attempt) == (SUCCEEDED, 1), ended.transitions
        view.wait_capacity(name, MAX_JOBS)
    finally:
        gate.stop()


def test_the_lease_reconnects_to_a_restarted_queue_service_and_the_next_item_dispatches(
    stack: Stack,
    queue_service: RestartableService,
    start_agent: StartAgent,
    view: QueueView,
    hello_job: str,
) -> None:
    queue = stack.new_queue()
    agent, name = connected_agent(start_agent, view, queue)
    before = agent.status().session_id

    queue_service.kill()
    queue_service.start()
    view.wait_capacity(name, MAX_JOBS)
    wait_for(
        lambda: (status := agent.status()).connected and status.session_id != before,
        what="the agent to hold a new session",
    )

    # The module's Stack dials the queue service through a plain channel, which may take its time to notice
    # the restart: this test's own calls go through the view's.
    item = view.queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job=hello_job)).item.name
    ended = wait_for(lambda: view.ended(item), timeout=120, what=f"{item} to end")
    assert (ended.state, ended.attempt) == (SUCCEEDED, 1), ended.transitions


def test_lease_reconnects_wait_at_most_a_second_with_full_jitter() -> None:
    ceilings = [lease.RECONNECT.backoff_ceiling(retry) for retry in range(1, 64)]
    assert ceilings[0] == pytest.approx(0.1)
    assert ceilings == sorted(ceilings)
    assert max(ceilings) == lease.MAX_RECONNECT_DELAY_SECONDS == 1.0
    rng = random.Random(12)
    late = [lease.RECONNECT.delay(30, rng) for _ in range(1000)]
    assert all(0 <= delay <= 1.0 for delay in late)
    # Drawn from the whole range, so that agents spread out.
    assert min(late) < 0.1
    assert max(late) > 0.9
    # While the queue service is away the channel's back-off paces the attempts: with gRPC's 20 % jitter on
    # top it stays within the same second.
    assert dict(lease.CHANNEL_OPTIONS)["grpc.max_reconnect_backoff_ms"] * 1.2 <= 1000


# ----- Builder.build against a builder whose streams break, in process ------------------------------------

RUN = "projects/p/runs/item-1"
VERSION = "projects/p/jobs/j/versions/1"
BuildContext = grpc.aio.ServicerContext[build_pb2.BuildRequest, build_pb2.BuildResponse]
Script = Callable[[build_pb2.BuildRequest, BuildContext], AsyncIterator[build_pb2.BuildResponse]]


class ScriptedBuilder:
    """Serves only BuildService.Build: the n-th call follows ``scripts[n]`` (the last one, once they run out);
    records every request."""

    def __init__(self, scripts: list[Script]) -> None:
        self.scripts = scripts
        self.requests: list[build_pb2.BuildRequest] = []

    def handler(self) -> grpc.GenericRpcHandler:
        build = grpc.unary_stream_rpc_method_handler(
            self._build,
            request_deserializer=build_pb2.BuildRequest.FromString,
            response_serializer=build_pb2.BuildResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(BUILD_SERVICE, {"Build": build})

    async def _build(
        self, request: build_pb2.BuildRequest, context: BuildContext
    ) -> AsyncIterator[build_pb2.BuildResponse]:
        self.requests.append(request)
        async for event in self.scripts[min(len(self.requests), len(self.scripts)) - 1](request, context):
            yield event


def queued(joined: bool = False) -> build_pb2.BuildResponse:
    return build_pb2.BuildResponse(build="builds/b1", queued=build_pb2.BuildQueued(joined=joined))


def cache() -> build_pb2.BuildResponse:
    return build_pb2.BuildResponse(build="builds/b1", cache=build_pb2.BuildCacheStatus(hit=False))


def log(*lines: str) -> build_pb2.BuildResponse:
    return build_pb2.BuildResponse(build="builds/b1", log=build_pb2.BuildLog(lines=lines))


def result() -> build_pb2.BuildResponse:
    return build_pb2.BuildResponse(build="builds/b1", result=build_pb2.BuildResult(venv_path="/venv"))


def infra_failure() -> build_pb2.BuildResponse:
    failure = build_pb2.BuildFailure(
        reason=common_pb2.FAILURE_REASON_BUILD_INFRA, message="the builder stopped before the build finished"
    )
    return build_pb2.BuildResponse(build="builds/b1", failure=failure)


def events_then(
    events: list[build_pb2.BuildResponse], *, break_with: grpc.StatusCode | None = None
) -> Script:
    async def script(
        request: build_pb2.BuildRequest, context: BuildContext
    ) -> AsyncIterator[build_pb2.BuildResponse]:
        for event in events:
            yield event
        if break_with is not None:
            await context.abort(break_with, "going away")

    return script


ServeBuilder = Callable[[list[Script]], Awaitable[tuple[ScriptedBuilder, str]]]


@pytest.fixture
async def serve_builder() -> AsyncIterator[ServeBuilder]:
    """Start a builder that follows ``scripts``; returns it and its address."""
    servers: list[grpc.aio.Server] = []

    async def serve(scripts: list[Script]) -> tuple[ScriptedBuilder, str]:
        servicer = ScriptedBuilder(scripts)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((servicer.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield serve
    for server in servers:
        await server.stop(0)


async def collect(
    address: str, *, push: bool = False, retry_until: float | None = None
) -> tuple[list[build_pb2.BuildResponse], list[bool]]:
    """Every event Builder.build passes on, and what its Reachability said, in order."""
    changes: list[bool] = []
    reachability = Reachability(on_change=changes.append)
    client = Builder(address, reachability)
    try:
        events = [
            event
            async for event in client.build(
                VERSION, build_pb2.BUILD_KIND_VENV, RUN, push=push, retry_until=retry_until
            )
        ]
    finally:
        await reachability.close()
        await client.close()
    return events, changes


def kinds(events: list[build_pb2.BuildResponse]) -> list[str | None]:
    return [event.WhichOneof("event") for event in events]


async def test_a_broken_build_stream_is_reopened_with_the_same_request_id_and_nothing_is_passed_on_twice(
    serve_builder: ServeBuilder,
) -> None:
    builder, address = await serve_builder(
        [
            events_then([queued(), cache(), log("a", "b")], break_with=grpc.StatusCode.UNAVAILABLE),
            # A repeated request_id follows the same build from its first event (services/takeoff_builder).
            events_then([queued(joined=True), cache(), log("a"), log("b", "c"), result()]),
        ]
    )

    events, changes = await collect(address)

    assert [request.request_id for request in builder.requests] == [RUN, RUN]
    assert kinds(events) == ["queued", "cache", "log", "log", "result"]
    assert [list(event.log.lines) for event in events if event.HasField("log")] == [["a", "b"], ["c"]]
    assert changes == [False, True]  # unreachable when the stream broke, reachable once it answered again


async def test_a_build_that_ended_build_infra_is_started_again_under_a_new_request_id(
    serve_builder: ServeBuilder,
) -> None:
    # What a builder killed under a build answers its caller's retry: the recorded build, FAILED BUILD_INFRA.
    builder, address = await serve_builder(
        [
            events_then([queued(), cache(), log("a")], break_with=grpc.StatusCode.UNAVAILABLE),
            events_then([queued(joined=True), cache(), infra_failure()]),
            events_then([queued(), cache(), log("x"), result()]),
        ]
    )

    events, _ = await collect(address)

    assert [request.request_id for request in builder.requests] == [RUN, RUN, f"{RUN}~rebuild-1"]
    assert kinds(events) == ["queued", "cache", "log", "queued", "cache", "log", "result"]


async def test_a_build_infra_failure_ends_the_build_once_the_rebuilds_are_spent(
    serve_builder: ServeBuilder,
) -> None:
    builder, address = await serve_builder([events_then([queued(), infra_failure()])])

    events, _ = await collect(address)

    assert len(builder.requests) == 1 + MAX_REBUILDS
    assert events[-1].failure.reason == common_pb2.FAILURE_REASON_BUILD_INFRA


async def test_a_builder_that_stays_away_past_the_retry_deadline_fails_the_build_as_infrastructure(
    serve_builder: ServeBuilder,
) -> None:
    _, address = await serve_builder([events_then([], break_with=grpc.StatusCode.UNAVAILABLE)])

    # A deadline well inside the first health probe (1 s after the first failure): this fake answers the
    # probe, and a probe before the deadline would count it reachable again for a moment.
    events, changes = await collect(address, retry_until=time.time() + 0.3)

    assert kinds(events) == ["failure"]
    assert events[0].failure.reason == common_pb2.FAILURE_REASON_BUILD_INFRA
    assert address in events[0].failure.message
    assert changes == [False]


async def test_a_build_the_builder_refuses_ends_config_invalid_without_a_retry(
    serve_builder: ServeBuilder,
) -> None:
    # What a builder with no registry answers a push (services/takeoff_builder: PUSH_REGISTRY_NOT_CONFIGURED).
    builder, address = await serve_builder([events_then([], break_with=grpc.StatusCode.FAILED_PRECONDITION)])

    events, _ = await collect(address, push=True)

    assert len(builder.requests) == 1
    assert builder.requests[0].options.push
    assert kinds(events) == ["failure"]
    assert events[0].failure.reason == common_pb2.FAILURE_REASON_CONFIG_INVALID
    assert "going away" in events[0].failure.message


async def test_a_push_is_asked_of_every_reopened_stream(serve_builder: ServeBuilder) -> None:
    builder, address = await serve_builder(
        [
            events_then([queued()], break_with=grpc.StatusCode.UNAVAILABLE),
            events_then([queued(joined=True), cache(), result()]),
        ]
    )

    await collect(address, push=True)

    assert [request.options.push for request in builder.requests] == [True, True]


STUBBORN = """\
import os, pathlib, signal, time, takeoff
run = takeoff.init()
marks = pathlib.Path(run.config["marks"])
# The first attempt outlives its SIGTERM: the agent's fence is still stopping it when the queue returns.
signal.signal(signal.SIGTERM, lambda *_: (marks / "terminated").touch())
(marks / f"running-{os.environ['TAKEOFF_ATTEMPT']}").touch()
while not (marks / "go").exists():
    time.sleep(0.05)
if (marks / "terminated").exists() and os.environ["TAKEOFF_ATTEMPT"] == "1":
    os._exit(143)  # stopped, as SIGTERM's default would have: the run is not finished
"""


def test_work_the_agent_fenced_while_the_queue_was_away_is_reported_once_it_returns(
    stack: Stack,
    queue_service: RestartableService,
    start_agent: StartAgent,
    view: QueueView,
    tmp_path: Path,
) -> None:
    """The queue service keeps held leases through its restart; an agent that fenced its work meanwhile
    must say how that work ended (AGENT_LOST), or the item would stay live with nobody working on it."""
    with Client(stack.registry, project=PROJECT) as client:
        job = code_job(client, tmp_path, "stubborn", STUBBORN)
    marks = tmp_path / "marks"
    marks.mkdir()
    queue = stack.new_queue()
    agent = start_agent([queue], stop_grace_seconds=600)
    view.wait_capacity(agent.status().agent, 1)
    item = view.queues.Enqueue(
        queue_pb2.EnqueueRequest(queue=queue, job=job, run_config=dict_to_struct({"marks": str(marks)}))
    ).item.name
    wait_for((marks / "running-1").exists, timeout=120, what="the first attempt to run")

    queue_service.kill()
    wait_for((marks / "terminated").exists, timeout=60, what="the agent to fence its job")
    queue_service.start()
    wait_for(
        lambda: (status := agent.status()).connected and any(work.item == item for work in status.work),
        timeout=60,
        what="the agent to reconnect still holding the fenced lease",
    )
    (marks / "go").touch()  # the first attempt ends now; the second, if there is one, at once

    ended = wait_for(lambda: view.ended(item), timeout=90, what=f"{item} to end")
    assert (ended.state, ended.attempt) == (SUCCEEDED, 2), ended.transitions
    first_end = next(t for t in ended.transitions if t.attempt == 1 and t.to_state == PENDING)
    assert first_end.reason == common_pb2.FAILURE_REASON_AGENT_LOST


FINISHES_THEN_LINGERS = """\
import os, pathlib, time, takeoff
run = takeoff.init()
run.finish()
pathlib.Path(run.config["marks"], f"finished-{os.environ['TAKEOFF_ATTEMPT']}").write_text(str(os.getpid()))
time.sleep(600)  # still shutting down, say, when the fence stops it
"""


def test_a_job_that_finished_its_run_before_the_fence_stopped_it_succeeds_once(
    stack: Stack,
    queue_service: RestartableService,
    start_agent: StartAgent,
    view: QueueView,
    tmp_path: Path,
) -> None:
    with Client(stack.registry, project=PROJECT) as client:
        job = code_job(client, tmp_path, "lingers", FINISHES_THEN_LINGERS)
    marks = tmp_path / "marks"
    marks.mkdir()
    queue = stack.new_queue()
    agent = start_agent([queue])
    view.wait_capacity(agent.status().agent, 1)
    item = view.queues.Enqueue(
        queue_pb2.EnqueueRequest(queue=queue, job=job, run_config=dict_to_struct({"marks": str(marks)}))
    ).item.name
    finished = marks / "finished-1"
    wait_for(finished.exists, timeout=120, what="the first attempt to finish its run")
    job_pid = int(finished.read_text())

    queue_service.kill()
    wait_for(lambda: not pid_alive(job_pid), timeout=60, what="the agent's fence to stop the job")
    queue_service.start()

    ended = wait_for(lambda: view.ended(item), timeout=90, what=f"{item} to end")
    assert (ended.state, ended.attempt) == (SUCCEEDED, 1), ended.transitions
    assert not (marks / "finished-2").exists()
