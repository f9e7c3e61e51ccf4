"""The run relay (takeoff_agent.relay): a job's RunService calls made through its agent, against a real
registry. The client is written here, frame by frame (a 4-byte big-endian length, then one message), as
any SDK would have to: nothing of the SDK is used.

The relay grants nothing: the registry decides on the job's own ``authorization`` as if the job had called
it. The agents the stack starts present the admin key (tests/keys.py), so a call the relay passed on
with the agent's key would succeed where these tests expect UNAUTHENTICATED.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import stat
import struct
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from takeoff.client import Client
from takeoff.v1 import common_pb2, jobs_pb2, keys_pb2, relay_pb2, runs_pb2
from takeoff_agent.domain import Assignment, BuildKind, Built, JobVersion, ResourceKind, SourceKind
from takeoff_agent.relay import RunRelay, socket_name, start_relay
from takeoff_agent.runners import slurm
from takeoff_agent.runners.base import Launch, RunnerContext, RunnerUnavailable
from takeoff_agent.runners.local_process import RELAY_VARIABLE, LocalProcessRunner
from takeoff_registry.settings import RegistrySettings
from takeoff_rpc.relay_wire import MAX_FRAME_BYTES
from tests.agent.conftest import PROJECT, Stack, StartAgent, code_job, running_agent
from tests.keys import ADMIN_KEY
from tests.registry.conftest import Registry, registry_settings, start_registry

RUN = "projects/demo/runs/relayed-1"
ITEM = "projects/demo/queues/q/items/relayed"
GET_RUN = "/takeoff.v1.RunService/GetRun"
CREATE_RUN = "/takeoff.v1.RunService/CreateRun"
OK, INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED, UNIMPLEMENTED = (
    grpc.StatusCode[name].value[0]
    for name in (
        "OK",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "UNIMPLEMENTED",
    )
)
WAITED = (grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
_LENGTH = struct.Struct(">I")


class RawClient:
    """One connection to a relay, spoken by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, address: str) -> RawClient:
        """A connection to ``address`` as jobs are given it: ``@name`` is the abstract socket ``\\0name``."""
        return cls(*await asyncio.open_unix_connection("\0" + address[1:] if address[:1] == "@" else address))

    async def send(self, body: bytes, *, length: int | None = None) -> None:
        self.writer.write(_LENGTH.pack(len(body) if length is None else length) + body)
        await self.writer.drain()

    async def reply(self) -> relay_pb2.RelayReply:
        (length,) = _LENGTH.unpack(await self.reader.readexactly(_LENGTH.size))
        return relay_pb2.RelayReply.FromString(await self.reader.readexactly(length))

    async def call(
        self, method: str, request: Message, token: str | None = None, *, seconds: float = 10.0
    ) -> relay_pb2.RelayReply:
        """The reply to ``method`` with ``token`` as its authorization, within ``seconds``."""
        call = relay_pb2.RelayCall(
            method=method,
            request=request.SerializeToString(),
            metadata={"authorization": f"Bearer {token}"} if token else {},
        )
        call.timeout.FromNanoseconds(int(seconds * 1e9))
        await self.send(call.SerializeToString())
        return await self.reply()

    async def closed_by_relay(self) -> bool:
        """Whether the relay has closed the connection (end of stream, nothing more in it)."""
        return await self.reader.read(1) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def status_of(reply: relay_pb2.RelayReply) -> tuple[str, list[str]]:
    """The ErrorInfo reason and the BadRequest fields of a reply's status details."""
    status = status_pb2.Status.FromString(reply.status_details)
    assert (status.code, status.message) == (reply.code, reply.message)
    info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            detail.Unpack(bad_request)
    return info.reason, [violation.field for violation in bad_request.field_violations]


# -- a relay in this process, to a registry in this process -------------------------------------------------


@asynccontextmanager
async def serving(settings: RegistrySettings) -> AsyncIterator[Registry]:
    """A registry serving in this process until the block ends."""
    async for running in start_registry(settings):
        yield running


def settings_in(tmp_path: Path) -> RegistrySettings:
    return registry_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'registry.db'}")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Registry]:
    """A registry of this test's own (the module's ``registry`` is the agent stack's process)."""
    async with serving(settings_in(tmp_path)) as running:
        yield running


async def listening(registry_address: str) -> RunRelay:
    """A relay to ``registry_address``, as an agent of a new id starts it."""
    relay = await start_relay(f"test-{uuid.uuid4().hex}", registry_address, None)
    assert relay is not None
    return relay


def address_of(relay: RunRelay) -> str:
    assert relay.address is not None
    return relay.address


@pytest.fixture
async def relay(served: Registry) -> AsyncIterator[RunRelay]:
    started = await listening(served.address)
    yield started
    await started.close()


@pytest.fixture
async def client(relay: RunRelay) -> AsyncIterator[RawClient]:
    connection = await RawClient.connect(address_of(relay))
    yield connection
    await connection.close()


@pytest.fixture
async def token(served: Registry) -> str:
    """A run token for RUN, as the queue mints one for an attempt."""
    version = await served.jobs.CreateJobVersion(
        jobs_pb2.CreateJobVersionRequest(
            parent="projects/demo/jobs/train",
            allow_missing=True,
            version=common_pb2.JobVersion(
                source=common_pb2.JobSource(image=common_pb2.ImageSource(reference="python:3.12"))
            ),
        )
    )
    minted = await served.keys.MintRunToken(
        keys_pb2.MintRunTokenRequest(run=RUN, item=ITEM, job_version=version.version.name)
    )
    await served.runs.CreateRun(
        runs_pb2.CreateRunRequest(
            parent="projects/demo",
            run_id="relayed-1",
            run=runs_pb2.Run(job_version=version.version.name),
        )
    )
    return minted.secret


async def test_a_run_call_made_through_the_relay_is_answered_by_the_registry(
    client: RawClient, token: str
) -> None:
    finished = await client.call(
        "/takeoff.v1.RunService/FinishRun",
        runs_pb2.FinishRunRequest(name=RUN, state=common_pb2.RUN_STATE_FINISHED, message="relayed"),
        token,
    )
    assert (finished.code, finished.message, finished.status_details) == (OK, "", b"")

    reply = await client.call(GET_RUN, runs_pb2.GetRunRequest(name=RUN), token)  # the same connection

    assert reply.code == OK
    run = runs_pb2.GetRunResponse.FromString(reply.response).run
    assert (run.name, run.state, run.message) == (RUN, common_pb2.RUN_STATE_FINISHED, "relayed")


async def test_a_refusal_comes_back_with_its_code_message_and_status_details(
    client: RawClient, token: str
) -> None:
    missing = await client.call(GET_RUN, runs_pb2.GetRunRequest(name="projects/demo/runs/nope"), ADMIN_KEY)
    assert missing.code == NOT_FOUND
    assert "nope" in missing.message
    assert status_of(missing) == ("RUN_NOT_FOUND", [])
    assert missing.response == b""

    malformed = await client.call(GET_RUN, runs_pb2.GetRunRequest(name="not a run name"), ADMIN_KEY)
    assert malformed.code == INVALID_ARGUMENT
    reason, fields = status_of(malformed)
    assert fields == ["name"]
    assert reason

    # A run token reads its own run only: the registry's refusal, passed on as it is.
    other = await client.call(GET_RUN, runs_pb2.GetRunRequest(name="projects/demo/runs/other"), token)
    assert other.code == PERMISSION_DENIED
    assert status_of(other)[0] == "PERMISSION_DENIED"


async def test_a_method_outside_run_service_is_unimplemented_and_never_called(
    client: RawClient, served: Registry
) -> None:
    key_id = f"relayed-{uuid.uuid4().hex[:8]}"
    create_key = keys_pb2.CreateKeyRequest(key=keys_pb2.Key(kind=keys_pb2.KEY_KIND_ADMIN), key_id=key_id)
    for method in (
        "/takeoff.v1.KeyService/CreateKey",
        "/takeoff.v1.RunServiceButNot/CreateKey",  # the service's name is matched whole
        "takeoff.v1.RunService/GetRun",  # not a full method name
    ):
        reply = await client.call(method, create_key, ADMIN_KEY)
        assert (reply.code, reply.message) == (UNIMPLEMENTED, "the run relay carries RunService calls only")
        assert (reply.status_details, reply.response) == (b"", b"")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.keys.GetKey(keys_pb2.GetKeyRequest(name=f"keys/{key_id}"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND  # the admin key passed to the relay made no key


async def test_the_relay_adds_no_credentials_and_passes_on_only_what_it_should(
    client: RawClient, token: str
) -> None:
    anonymous = await client.call(GET_RUN, runs_pb2.GetRunRequest(name=RUN))
    assert anonymous.code == UNAUTHENTICATED
    assert status_of(anonymous)[0]

    # Metadata other than authorization and trace context is dropped: a key under another name is no key.
    call = relay_pb2.RelayCall(
        method=GET_RUN,
        request=runs_pb2.GetRunRequest(name=RUN).SerializeToString(),
        metadata={"x-api-key": ADMIN_KEY, "Authorization": f"Bearer {token}", "traceparent": "junk"},
    )
    await client.send(call.SerializeToString())
    reply = await client.reply()
    assert reply.code == OK  # upper-case Authorization was passed on as authorization

    call.metadata.clear()
    call.metadata["x-api-key"] = ADMIN_KEY
    await client.send(call.SerializeToString())
    assert (await client.reply()).code == UNAUTHENTICATED

    # A value no header can carry is refused without a call, and without repeating it.
    call.metadata["authorization"] = f"Bearer {token}\nx-evil: 1"
    await client.send(call.SerializeToString())
    unsendable = await client.reply()
    assert unsendable.code == INVALID_ARGUMENT
    assert "authorization" in unsendable.message
    assert token not in unsendable.message
    assert (await client.call(GET_RUN, runs_pb2.GetRunRequest(name=RUN), token)).code == OK  # still open


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (_LENGTH.pack(MAX_FRAME_BYTES + 1), f"over the relay's limit of {MAX_FRAME_BYTES}"),
        (_LENGTH.pack(0xFFFFFFFF), "over the relay's limit"),
        (_LENGTH.pack(3) + b"\xff\xff\xff", "not a RelayCall"),
    ],
    ids=["one-byte-over", "4-GiB", "garbage"],
)
async def test_a_frame_over_the_limit_or_not_a_call_is_refused_and_the_connection_closed(
    client: RawClient, relay: RunRelay, token: str, frame: bytes, why: str
) -> None:
    client.writer.write(frame)
    await client.writer.drain()

    refused = await client.reply()
    assert refused.code == INVALID_ARGUMENT
    assert why in refused.message
    assert await client.closed_by_relay()

    again = await RawClient.connect(address_of(relay))  # the relay itself serves on
    try:
        assert (await again.call(GET_RUN, runs_pb2.GetRunRequest(name=RUN), token)).code == OK
    finally:
        await again.close()


async def test_a_frame_exactly_at_the_limit_is_read_whole(client: RawClient) -> None:
    call = relay_pb2.RelayCall(method="/takeoff.v1.KeyService/X")
    padding = MAX_FRAME_BYTES - call.ByteSize() - 5  # field 2's tag and its 4-byte varint length
    call.request = b"\0" * padding
    assert call.ByteSize() == MAX_FRAME_BYTES

    await client.send(call.SerializeToString())

    assert (await client.reply()).code == UNIMPLEMENTED


async def test_a_job_that_hangs_up_mid_frame_costs_the_relay_nothing(
    relay: RunRelay, client: RawClient, token: str
) -> None:
    await client.send(b"\x0a\x05", length=100)  # 2 of the 100 bytes it announced
    await client.close()
    again = await RawClient.connect(address_of(relay))
    try:
        assert (await again.call(GET_RUN, runs_pb2.GetRunRequest(name=RUN), token)).code == OK
    finally:
        await again.close()


async def test_a_registry_that_is_down_times_the_call_out_and_the_relay_serves_once_it_is_back(
    tmp_path: Path,
) -> None:
    request = runs_pb2.GetRunRequest(name="projects/demo/runs/nope")
    async with AsyncExitStack() as resources:
        async with serving(settings_in(tmp_path)) as registry:
            relay = await listening(registry.address)
            resources.push_async_callback(relay.close)
            client = await RawClient.connect(address_of(relay))
            resources.push_async_callback(client.close)
            assert (await client.call(GET_RUN, request, ADMIN_KEY)).code == NOT_FOUND  # connected

        down = await client.call(GET_RUN, request, ADMIN_KEY, seconds=0.3)
        assert down.code in WAITED, down

        async with serving(settings_in(tmp_path).model_copy(update={"listen": [registry.address]})):
            # The call waits for the registry to be ready: the channel reconnects within its back-off.
            back = await client.call(GET_RUN, request, ADMIN_KEY, seconds=30)
        assert back.code == NOT_FOUND, back


async def test_a_socket_name_taken_leaves_the_agent_without_a_relay_and_says_so(
    served: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    agent_id = f"test-{uuid.uuid4().hex}"
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(socket_name(agent_id))
    try:
        assert await start_relay(agent_id, served.address, None) is None
    finally:
        holder.close()
    assert f"the run relay cannot listen on @takeoff-relay-{agent_id}" in caplog.text
    assert f"({os.strerror(errno.EADDRINUSE)})" in caplog.text


async def test_closing_the_relay_ends_its_connections_and_frees_its_name(served: Registry) -> None:
    agent_id = f"test-{uuid.uuid4().hex}"
    relay = await start_relay(agent_id, served.address, None)
    assert relay is not None
    client = await RawClient.connect(socket_name(agent_id))
    # The connection is served (a call answered) before the relay closes under it.
    assert (await client.call(GET_RUN, runs_pb2.GetRunRequest(name=RUN))).code == UNAUTHENTICATED

    await relay.close()

    assert await client.closed_by_relay()
    await client.close()
    with pytest.raises(ConnectionRefusedError):
        await RawClient.connect(socket_name(agent_id))
    again = await start_relay(agent_id, served.address, None)  # a restarted agent takes the name back
    assert again is not None
    await again.close()


# -- which jobs are given the relay ----------------------------------------------------------------------


def assignment(kind: ResourceKind) -> Assignment:
    return Assignment(
        lease_id=uuid.uuid4().hex,
        epoch=1,
        item="projects/p/queues/q/items/i",
        queue="projects/p/queues/q",
        run="projects/p/runs/i-1",
        attempt=1,
        job_version=JobVersion("projects/p/jobs/j/versions/1", SourceKind.CODE),
        resource=kind,
        entrypoint=("python", "main.py"),
        resource_config={},
    )


def launch(work: Assignment, tmp_path: Path) -> Launch:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    built = Built(BuildKind.VENV, venv_path=sys.prefix, code_path=str(code), python_path=sys.executable)
    return Launch(
        assignment=work,
        built=built,
        env={},
        secrets={"TAKEOFF_TOKEN": "t"},
        registry_address="127.0.0.1:1",
        stop_grace_seconds=1,
    )


@pytest.mark.parametrize("relay_address", ["@takeoff-relay-a1", None])
def test_a_local_job_is_given_the_relay_only_when_it_runs(tmp_path: Path, relay_address: str | None) -> None:
    runner = LocalProcessRunner(RunnerContext("a1", tmp_path / "state", relay=relay_address))
    work = assignment(ResourceKind.LOCAL_PROCESS)

    environment = runner.job(work, tmp_path / "lease").environment(launch(work, tmp_path))

    assert environment.get(RELAY_VARIABLE) == relay_address
    assert environment["TAKEOFF_REGISTRY"] == "127.0.0.1:1"  # the way back when the relay cannot be reached
    assert environment["TAKEOFF_TOKEN"] == "t"


async def test_a_slurm_job_is_never_given_the_relay(tmp_path: Path) -> None:
    """A Slurm job may run on another node, which cannot reach the agent host's abstract sockets."""
    refusing = tmp_path / "sbatch"
    refusing.write_text("#!/bin/sh\necho 'sbatch: error: no cluster here' >&2\nexit 1\n")
    refusing.chmod(stat.S_IRWXU)
    repository = Path(__file__).parents[2]
    roots = [str(tmp_path), str(repository), sys.prefix, str(Path(sys.executable).parent)]
    commands = {name: str(refusing) for name in ("sbatch", "squeue", "scancel", "srun")}
    runner = slurm.create(
        {"shared_roots": roots, **commands},
        RunnerContext("a1", tmp_path / "state", relay="@takeoff-relay-a1"),
    )
    work = assignment(ResourceKind.SLURM)
    lease_dir = tmp_path / "state" / "leases" / work.lease_id
    lease_dir.mkdir(parents=True)

    with pytest.raises(RunnerUnavailable):  # written its spec, the job could not be submitted here
        await runner.job(work, lease_dir).start(launch(work, tmp_path))

    environment = json.loads((lease_dir / "spec.json").read_text())["env"]
    assert environment["TAKEOFF_TOKEN"] == "t"
    assert RELAY_VARIABLE not in environment


# -- a real agent -----------------------------------------------------------------------------------------

THROUGH_THE_RELAY = """\
import os, socket, struct
from takeoff.v1 import relay_pb2, runs_pb2

address = os.environ.get("TAKEOFF_RELAY")
print("relay", address, flush=True)
run = f"projects/{os.environ['TAKEOFF_PROJECT']}/runs/{os.environ['TAKEOFF_RUN_ID']}"
connection = socket.socket(socket.AF_UNIX)
connection.connect("\\0" + address[1:])
replies = connection.makefile("rb")

def call(metadata):
    body = relay_pb2.RelayCall(
        method="/takeoff.v1.RunService/GetRun",
        request=runs_pb2.GetRunRequest(name=run).SerializeToString(),
        metadata=metadata,
    ).SerializeToString()
    connection.sendall(struct.pack(">I", len(body)) + body)
    (length,) = struct.unpack(">I", replies.read(4))
    return relay_pb2.RelayReply.FromString(replies.read(length))

own = call({"authorization": "Bearer " + os.environ["TAKEOFF_TOKEN"]})
named = runs_pb2.GetRunResponse.FromString(own.response).run.name
print("with its token", own.code, named == run, flush=True)
print("without", call({}).code, flush=True)
"""
"""Makes GetRun of its own run through the relay it is given, with its run token and without any."""


def test_an_agent_relays_its_local_jobs_calls_with_their_tokens_and_no_key_of_its_own(
    stack: Stack, start_agent: StartAgent, tmp_path: Path
) -> None:
    with Client(stack.registry, project=PROJECT) as client:
        job = code_job(client, tmp_path, "relayed", THROUGH_THE_RELAY)
    queue = stack.new_queue(max_attempts=1)
    with running_agent(start_agent, [queue]) as agent:
        item = stack.wait_ended(stack.enqueue(queue, job))
        agent_id = (agent.state_dir / "agent_id").read_text()
        assert agent.terminate() == 0

    lines = stack.logs(item.run)
    assert f"relay @takeoff-relay-{agent_id}" in lines, lines
    assert f"with its token {OK} True" in lines, lines
    assert f"without {UNAUTHENTICATED}" in lines, lines  # the agent's own key is the admin key
    with pytest.raises(ConnectionRefusedError):  # gone with its agent
        socket.socket(socket.AF_UNIX).connect(socket_name(agent_id))


@pytest.mark.parametrize("how", ["turned off", "name taken"])
def test_an_agent_without_its_relay_runs_on(
    stack: Stack, start_agent: StartAgent, tmp_path: Path, how: str
) -> None:
    agent_id = f"test-{uuid.uuid4().hex}"
    state = tmp_path / "agent-state"
    state.mkdir()
    (state / "agent_id").write_text(agent_id)  # the id the agent will have
    holder = socket.socket(socket.AF_UNIX)
    env = {}
    if how == "name taken":
        holder.bind(socket_name(agent_id))
        holder.listen()
    else:
        env["TAKEOFF_RUN_RELAY"] = "false"
    try:
        with running_agent(start_agent, [stack.new_queue()], state_dir=state, env=env) as agent:
            assert agent.status().agent == f"agents/{agent_id}"  # it serves
            log = agent.log_file.read_text()
            if how == "name taken":
                assert f"the run relay cannot listen on @takeoff-relay-{agent_id}" in log, log
            else:
                assert "run relay" not in log, log
                with pytest.raises(ConnectionRefusedError):
                    socket.socket(socket.AF_UNIX).connect(socket_name(agent_id))
    finally:
        holder.close()
