"""The permission table, checked against the code and against running services.

1. Every method of every service descriptor has an access rule (the services refuse to start otherwise,
   but this names the method without starting anything).
2. Every rule is checked both ways against a real registry, queue, builder and agent, with real keys of
   every kind made through KeyService: for each method one request is built generically (an empty request
   whose resource fields name things in project ``a``), sent with each key, and the outcome compared with
   what the rule says of that key's grants: admitted keys get past access (any status but UNAUTHENTICATED
   and PERMISSION_DENIED), refused keys get PERMISSION_DENIED naming the permission they lack. A key of
   a kind the table says lacks a permission is refused; a write key for project ``b`` is refused wherever
   the write key for ``a`` is admitted.
3. docs/design.md holds exactly the table tools/access_table.py prints.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from takeoff.v1 import common_pb2, keys_pb2, keys_pb2_grpc, queue_pb2, queue_pb2_grpc
from takeoff_rpc.channels import open_aio_channel
from takeoff_rpc.status import decode_rpc_error
from takeoff_server import errors
from takeoff_server.access import Principal, Rule
from takeoff_server.peers import principal
from tests.conftest import IN_CI
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, service_process
from tools.access_table import BEGIN_MARKER, END_MARKER, SERVICES, kinds_holding, markdown, service_rules

ROOT = Path(__file__).resolve().parents[2]
CALL_TIMEOUT = 10.0
STREAM_TIMEOUT = 3.0
"""A server stream still open after this has got past access."""

A = "projects/a"
NAMES = {
    "project": A,
    "job": f"{A}/jobs/j",
    "version": f"{A}/jobs/j/versions/0",
    "artifact": f"{A}/artifacts/{'0' * 64}",
    "artifact collection": f"{A}/artifactCollections/c",
    "artifact version": f"{A}/artifactCollections/c/versions/0",
    "run": f"{A}/runs/r",
    "queue": f"{A}/queues/q",
    "item": f"{A}/queues/q/items/i",
    "secret": f"{A}/secrets/s",
    "key": "keys/nobody",
    "build": "builds/nobody",
    "agent": "agents/nobody",
}
"""What generated requests name: things in project ``a`` (that need not exist)."""
AGENT_QUEUE = f"{A}/queues/agent-only"
"""The paused queue the agent process serves (its lease is not the one under test)."""

LAST = ("BatchRevokeRunTokens", "RevokeKey", "Drain", "RevokeRunTokens")
"""Methods whose admitted calls would disturb the others (end the agent, revoke the run token): last, in
this order. RevokeRunTokens comes last of all: its admitted call revokes the run token's run, so the run
token reads KEY_INVALID in every check after it once the registry's 2 s verification cache has run out (a
method's refused keys are checked before its admitted ones, so its own check is not)."""


# --- 1. every method has a rule ----------------------------------------------------------------------


def all_methods() -> list[MethodDescriptor]:
    methods = [method for service, _ in SERVICES for method in service.methods]
    return sorted(methods, key=lambda method: LAST.index(method.name) if method.name in LAST else -1)


def test_every_method_of_every_service_has_an_access_rule() -> None:
    rules = service_rules()
    missing = [
        method.full_name
        for method in all_methods()
        if method.name not in rules.get(method.containing_service.full_name, {})
    ]
    assert not missing, f"methods without an access rule: {missing}"
    assert {service.full_name for service, _ in SERVICES} == {
        "takeoff.v1.JobService",
        "takeoff.v1.RunService",
        "takeoff.v1.ArtifactService",
        "takeoff.v1.KeyService",
        "takeoff.v1.SecretService",
        "takeoff.v1.QueueService",
        "takeoff.v1.BuildService",
        "takeoff.v1.AgentService",
    }


def test_no_rule_names_a_method_the_service_does_not_have() -> None:
    rules = service_rules()
    for service, _ in SERVICES:
        assert set(rules[service.full_name]) <= {method.name for method in service.methods}, service.name


# --- 3. the table in the design doc ------------------------------------------------------------------


def test_the_design_doc_holds_the_table_the_code_gives() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    if BEGIN_MARKER not in design or END_MARKER not in design:
        message = (
            f"docs/design.md has no {BEGIN_MARKER} ... {END_MARKER} section: paste the output of "
            "`python tools/access_table.py` between those markers"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    documented = design.split(BEGIN_MARKER, 1)[1].split(END_MARKER, 1)[0].strip()
    assert documented == markdown().strip(), (
        "docs/design.md's permission table differs from the code: replace it with the output of "
        "`python tools/access_table.py`"
    )


# --- 2. each rule both ways, live ---------------------------------------------------------------------


def _noun(method: MethodDescriptor) -> str:
    """Which of :data:`NAMES` a method's ``name`` and collection ``parent`` are about."""
    service, name = method.containing_service.name, method.name
    if service == "JobService":
        return "version" if "JobVersion" in name else "artifact" if "Artifact" in name else "job"
    if service == "QueueService":
        return "item" if "Item" in name else "agent" if "Agent" in name else "queue"
    if service == "ArtifactService" and name != "FindMissingBlobs":  # that one names its project only
        return "artifact collection" if "Collection" in name else "artifact version"
    return {
        "RunService": "run",
        "KeyService": "key",
        "SecretService": "secret",
        "BuildService": "build",
    }.get(service, "")


PARENT_OF = {"version": "job", "item": "queue", "artifact version": "artifact collection"}
"""A collection's parent, where it is not the project."""
FIELD_NAMES = {
    "queue": "queue",
    "job": "job",
    "job_version": "version",
    "run": "run",
    "item": "item",
    "queue_item": "item",
    "project": "project",
    "secrets": "secret",
}
IDS = ("job_id", "run_id", "queue_id", "secret_id")


def request_for(method: MethodDescriptor) -> Message:
    """An empty request of ``method`` whose resource fields name things in project ``a``."""
    request = GetMessageClass(method.input_type)()
    noun = _noun(method)
    for field in method.input_type.fields:
        value: str | None = None
        if field.name == "name" and noun:
            value = NAMES[noun]
        elif field.name == "parent":
            value = NAMES[PARENT_OF.get(noun, "project")]
        elif field.name in FIELD_NAMES and field.type == field.TYPE_STRING:
            value = NAMES[FIELD_NAMES[field.name]]
        elif field.name in IDS:
            value = "new"
        if value is not None:
            if field.is_repeated:
                getattr(request, field.name).append(value)
            else:
                setattr(request, field.name, value)
    # Resources inside messages: the object an Update changes, an upload's header, a lease's Hello, mounts.
    if method.name in ("UpdateJob", "UpdateQueue"):
        getattr(request, noun).name = NAMES[noun]
    if method.name in ("UploadArtifact", "CreateArtifactVersion"):
        request.header.parent = A  # type: ignore[attr-defined]
    if method.name == "Lease":
        request.hello.queues.append(NAMES["queue"])  # type: ignore[attr-defined]
    if method.name == "Enqueue":
        request.secrets.add(secret=NAMES["secret"], env="S")  # type: ignore[attr-defined]
    return request


@dataclass(frozen=True)
class LiveKey:
    label: str
    """The key kind as the table names it."""
    secret: str
    principal: Principal


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    reason: str
    permission: str
    message: str

    @property
    def admitted(self) -> bool:
        return self.code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


PASSED = Outcome(grpc.StatusCode.OK, "", "", "")


def expected(rule: Rule, key: LiveKey, request: Message) -> str | None:
    """None when ``rule`` admits ``key`` for ``request``, else the permission it is refused for."""
    try:
        rule.enforce(key.principal, request)
    except errors.PermissionDenied as denied:
        return denied.metadata["permission"]
    return None


async def call(channel: grpc.aio.Channel, method: MethodDescriptor, request: Message, secret: str) -> Outcome:
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = (("authorization", f"Bearer {secret}"),)
    serialize, deserialize = type(request).SerializeToString, GetMessageClass(method.output_type).FromString
    try:
        if method.client_streaming and method.server_streaming:
            stream = channel.stream_stream(path, serialize, deserialize)(
                iter([request]), timeout=STREAM_TIMEOUT, metadata=metadata
            )
            await stream.read()
            stream.cancel()
        elif method.client_streaming:
            await channel.stream_unary(path, serialize, deserialize)(
                iter([request]), timeout=CALL_TIMEOUT, metadata=metadata
            )
        elif method.server_streaming:
            responses = channel.unary_stream(path, serialize, deserialize)(
                request, timeout=STREAM_TIMEOUT, metadata=metadata
            )
            await responses.read()
            responses.cancel()
        else:
            await channel.unary_unary(path, serialize, deserialize)(
                request, timeout=CALL_TIMEOUT, metadata=metadata
            )
    except grpc.aio.AioRpcError as error:
        status = decode_rpc_error(error)
        return Outcome(status.code, status.reason, status.metadata.get("permission", ""), status.message)
    return PASSED


@dataclass
class Stack:
    addresses: dict[str, str]
    keys: list[LiveKey]


KEY_SPECS: dict[str, keys_pb2.Key] = {
    "admin": keys_pb2.Key(kind=keys_pb2.KEY_KIND_ADMIN),
    "project (read)": keys_pb2.Key(
        kind=keys_pb2.KEY_KIND_PROJECT, projects=[A], role=keys_pb2.PROJECT_ROLE_READ
    ),
    "project (write)": keys_pb2.Key(
        kind=keys_pb2.KEY_KIND_PROJECT, projects=[A], role=keys_pb2.PROJECT_ROLE_WRITE
    ),
    "agent": keys_pb2.Key(kind=keys_pb2.KEY_KIND_AGENT, queues=[NAMES["queue"]]),
    "service (queue)": keys_pb2.Key(kind=keys_pb2.KEY_KIND_SERVICE, service=keys_pb2.SERVICE_ROLE_QUEUE),
    "service (builder)": keys_pb2.Key(kind=keys_pb2.KEY_KIND_SERVICE, service=keys_pb2.SERVICE_ROLE_BUILDER),
    "service (console)": keys_pb2.Key(kind=keys_pb2.KEY_KIND_SERVICE, service=keys_pb2.SERVICE_ROLE_CONSOLE),
}
OTHER_PROJECT = "project (write) in b"


async def make_keys(registry: str) -> list[LiveKey]:
    """One key of every kind (and a write key for project ``b``), made by the admin through KeyService."""
    made: list[LiveKey] = []
    async with open_aio_channel(registry, api_key=ADMIN_KEY) as channel:
        keys = keys_pb2_grpc.KeyServiceStub(channel)
        specs = {
            **KEY_SPECS,
            OTHER_PROJECT: keys_pb2.Key(
                kind=keys_pb2.KEY_KIND_PROJECT, projects=["projects/b"], role=keys_pb2.PROJECT_ROLE_WRITE
            ),
        }
        for label, spec in specs.items():
            created = await keys.CreateKey(
                keys_pb2.CreateKeyRequest(key=keys_pb2.Key(display_name=label, **_fields(spec))),
                timeout=CALL_TIMEOUT,
            )
            made.append(LiveKey(label, created.secret, principal(created.key)))
        token = await keys.MintRunToken(
            keys_pb2.MintRunTokenRequest(
                run=NAMES["run"], item=NAMES["item"], job_version=NAMES["version"], secrets=[NAMES["secret"]]
            ),
            timeout=CALL_TIMEOUT,
        )
        made.append(LiveKey("run token", token.secret, principal(token.key)))
    return made


def _fields(key: keys_pb2.Key) -> dict[str, Any]:
    return {field.name: value for field, value in key.ListFields()}


@contextlib.contextmanager
def running_stack(home: Path) -> Iterator[dict[str, ServiceProcess]]:
    with contextlib.ExitStack() as processes:
        registry = processes.enter_context(service_process("registry", home))
        uses_registry = {"TAKEOFF_REGISTRY_ADDRESS": registry.address}
        queue = processes.enter_context(service_process("queue", home, env=uses_registry))
        builder = processes.enter_context(service_process("builder", home, env=uses_registry))
        asyncio.run(_create_agent_queue(queue.address))
        agent = processes.enter_context(
            service_process(
                "agent",
                home,
                env={
                    **uses_registry,
                    "TAKEOFF_QUEUES": f'["{AGENT_QUEUE}"]',
                    "TAKEOFF_QUEUE_ADDRESS": queue.address,
                    "TAKEOFF_BUILDER_ADDRESS": builder.address,
                },
            )
        )
        yield {"registry": registry, "queue": queue, "builder": builder, "agent": agent}


async def _create_agent_queue(queue: str) -> None:
    async with open_aio_channel(queue, api_key=ADMIN_KEY) as channel:
        await queue_pb2_grpc.QueueServiceStub(channel).CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent=A,
                queue_id=AGENT_QUEUE.rsplit("/", 1)[1],
                queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS, paused=True),
            ),
            timeout=CALL_TIMEOUT,
        )


@pytest.fixture(scope="module")
def live_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("access")


@pytest.fixture(scope="module")
def stack(live_home: Path) -> Iterator[Stack]:
    with running_stack(live_home) as processes:
        keys = asyncio.run(make_keys(processes["registry"].address))
        yield Stack({name: process.address for name, process in processes.items()}, keys)


@dataclass(frozen=True)
class Verdict:
    method: str
    key: str
    expected: str | None
    outcome: Outcome


async def check_method(
    channels: dict[str, grpc.aio.Channel], method: MethodDescriptor, rule: Rule, keys: list[LiveKey]
) -> list[Verdict]:
    """Every key against one method: the refused ones first (they change nothing), then the admitted."""
    process = dict((service.full_name, name) for service, name in SERVICES)[
        method.containing_service.full_name
    ]
    request = request_for(method)
    plan = [(key, expected(rule, key, request)) for key in keys]
    verdicts: list[Verdict] = []
    for admitted in (False, True):
        batch = [(key, want) for key, want in plan if (want is None) == admitted]
        outcomes = await asyncio.gather(
            *(call(channels[process], method, request, key.secret) for key, _ in batch)
        )
        verdicts.extend(
            Verdict(method.full_name, key.label, want, outcome)
            for (key, want), outcome in zip(batch, outcomes, strict=True)
        )
    return verdicts


def method_named(full_name: str) -> MethodDescriptor:
    return next(method for method in all_methods() if method.full_name == full_name)


async def check_boundaries(channels: dict[str, grpc.aio.Channel], keys: dict[str, LiveKey]) -> None:
    """The boundaries the issue names, beyond one request per method: an agent key cannot lease a queue
    it was not given; a run token cannot write another run nor enqueue."""
    lease = method_named("takeoff.v1.QueueService.Lease")
    other_queue = request_for(lease)
    other_queue.hello.queues[:] = [f"{A}/queues/other"]  # type: ignore[attr-defined]
    append = method_named("takeoff.v1.RunService.AppendLogs")
    other_run = request_for(append)
    other_run.name = f"{A}/runs/other"  # type: ignore[attr-defined]
    enqueue = method_named("takeoff.v1.QueueService.Enqueue")
    cases = [
        (channels["queue"], lease, other_queue, keys["agent"], "queues.lease"),
        (channels["registry"], append, other_run, keys["run token"], "runs.write"),
        (channels["queue"], enqueue, request_for(enqueue), keys["run token"], "items.write"),
    ]
    for channel, method, request, key, permission in cases:
        outcome = await call(channel, method, request, key.secret)
        assert (outcome.code, outcome.permission) == (grpc.StatusCode.PERMISSION_DENIED, permission), (
            method.name,
            key.label,
            outcome,
        )


@contextlib.asynccontextmanager
async def plain_channels(addresses: dict[str, str]) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    # No channel key: each call presents the key under test.
    channels = {name: grpc.aio.insecure_channel(address) for name, address in addresses.items()}
    try:
        yield channels
    finally:
        for channel in channels.values():
            await channel.close()


def _holds(label: str, kinds: list[str]) -> bool:
    label = "project (write)" if label == OTHER_PROJECT else label
    return label in kinds or (label.startswith("project") and "project" in kinds)


@pytest.mark.timeout(180)
async def test_every_rule_admits_the_keys_it_grants_and_refuses_the_others_naming_the_permission(
    stack: Stack,
) -> None:
    rules = service_rules()
    verdicts: list[Verdict] = []
    async with plain_channels(stack.addresses) as channels:
        await check_boundaries(channels, {key.label: key for key in stack.keys})
        for method in all_methods():
            rule = rules[method.containing_service.full_name][method.name]
            verdicts.extend(await check_method(channels, method, rule, stack.keys))

    problems: list[str] = []
    for verdict in verdicts:
        got = f"{verdict.outcome.code.name} {verdict.outcome.reason} {verdict.outcome.message[:160]!r}"
        if verdict.expected is None and not verdict.outcome.admitted:
            problems.append(f"{verdict.method} with the {verdict.key} key: expected admitted, got {got}")
        if verdict.expected is not None and (
            verdict.outcome.code != grpc.StatusCode.PERMISSION_DENIED
            or (verdict.outcome.reason, verdict.outcome.permission) != ("PERMISSION_DENIED", verdict.expected)
        ):
            problems.append(
                f"{verdict.method} with the {verdict.key} key: expected PERMISSION_DENIED naming "
                f"{verdict.expected}, got {got}"
            )
    assert not problems, "\n".join(problems)

    by_method: dict[str, dict[str, Verdict]] = {}
    for verdict in verdicts:
        by_method.setdefault(verdict.method, {})[verdict.key] = verdict
    for method in all_methods():
        seen = by_method[method.full_name]
        # Both ways, for every rule: some key is admitted and some refused.
        assert any(v.outcome.admitted for v in seen.values()), f"{method.full_name}: no key admitted"
        assert any(not v.outcome.admitted for v in seen.values()), f"{method.full_name}: no key refused"
        # Keys of the kinds the table says lack a permission of the rule are refused. (A rule of its own
        # class, such as ListAgents' "queues.read on the queue filter, else agents.read", decides between
        # its checks itself: the comparison with what the rule says above covers it.)
        rule = rules[method.containing_service.full_name][method.name]
        for check in rule.checks if type(rule) is Rule else ():
            for label, verdict in seen.items():
                if not _holds(label, kinds_holding(check.permission)):
                    assert verdict.outcome.code == grpc.StatusCode.PERMISSION_DENIED, (
                        method.full_name,
                        label,
                    )
        # A secret's value goes to the attempt it was given to, through its run token, and to no other key.
        if method.name == "AccessSecret":
            assert {label for label, v in seen.items() if v.outcome.admitted} == {"run token"}
        # A write key for another project is refused wherever the write key for ``a`` is admitted.
        if seen["project (write)"].outcome.admitted:
            assert seen[OTHER_PROJECT].outcome.code == grpc.StatusCode.PERMISSION_DENIED, method.full_name
