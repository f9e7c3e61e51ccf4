"""Generated requests against every method of every service: each gets a documented status, never a crash.

For every method of JobService, RunService, KeyService, SecretService, QueueService, BuildService and
AgentService (enumerated from the proto descriptors, so a new method is covered without touching this
file) hypothesis generates requests with random values in every field: names that point at real objects
or nearly so, huge and odd strings (NUL characters among them), integer extremes, unknown enum numbers,
nested messages, Structs with odd values, durations and timestamps out of range, bytes. Each request goes
to a real stack (every service its own process), once on SQLite under a temporary home and once on
PostgreSQL, each service in a schema of its own: PostgreSQL refuses text SQLite takes (NUL), which must
not surface as INTERNAL. The test asserts:

- the status is OK or one the method's proto comment documents (``Errors:``), plus what every method may
  answer (an undecodable request, a generic bad argument) — never INTERNAL or UNKNOWN;
- every error carries an ErrorInfo in the ``takeoff.dev`` domain whose reason is in the catalogue;
- a create that failed left nothing behind in the matching List;
- the server still answers health afterwards.

Calls present the admin key, so that every request reaches its servicer (AccessSecret, which no admin key
may call, a run token that may read one secret). A second run sends generated
requests for a subset of methods with a key of each kind (project, agent, service, run token, admin):
there the status may also be PERMISSION_DENIED naming a permission, never UNAUTHENTICATED (the keys are
valid) nor INTERNAL.

Client-streaming calls send one or two generated messages; the bidirectional Lease stream has its own
tests (tests/queue). Runs are derandomised: the same examples every time.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import descriptor, duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from takeoff.v1 import (
    agent_pb2,
    build_pb2,
    common_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    queue_pb2,
    queue_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
    secrets_pb2,
)
from takeoff_rpc.channels import open_channel
from takeoff_server.access import Permission
from takeoff_server.protovalues import dict_to_struct
from tests.keys import ADMIN_KEY
from tests.postgres import assert_service_wrote_tables, postgres_schema_url
from tests.processes import ServiceProcess, service_process

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos" / "takeoff" / "v1"
PROJECT = "fuzz"
AGENT_QUEUE = "agent-only"
EXAMPLES_PER_METHOD = {"sqlite": 25, "postgresql": 15}
"""Generated examples per method on each database (the hostile examples come on top, on both): the
PostgreSQL leg repeats what SQLite covers with fewer, to keep both under 90 s on a small machine."""
CALL_TIMEOUT = 10.0
STREAM_TIMEOUT = 2.0
"""A server stream that is still open then (a watch) has answered well enough."""

SERVICES = {
    "takeoff.v1.JobService": "registry",
    "takeoff.v1.RunService": "registry",
    "takeoff.v1.KeyService": "registry",
    "takeoff.v1.SecretService": "registry",
    "takeoff.v1.QueueService": "queue",
    "takeoff.v1.BuildService": "builder",
    "takeoff.v1.AgentService": "agent",
}
SKIPPED = {"takeoff.v1.QueueService.Lease": "bidirectional; the lease tests in tests/queue cover it"}
DESCRIPTORS = [
    module.DESCRIPTOR.services_by_name[name.rsplit(".", 1)[1]]
    for module, name in (
        (jobs_pb2, "takeoff.v1.JobService"),
        (runs_pb2, "takeoff.v1.RunService"),
        (keys_pb2, "takeoff.v1.KeyService"),
        (secrets_pb2, "takeoff.v1.SecretService"),
        (queue_pb2, "takeoff.v1.QueueService"),
        (build_pb2, "takeoff.v1.BuildService"),
        (agent_pb2, "takeoff.v1.AgentService"),
    )
]
# Methods that remove things (the objects generated names point at, or the agent itself) come last.
METHODS = sorted(
    (method for service in DESCRIPTORS for method in service.methods if method.full_name not in SKIPPED),
    key=lambda method: method.name.startswith(("Delete", "Drain", "Revoke")),
)

CATALOGUE = frozenset(
    value.name.removeprefix("ERROR_REASON_")
    for value in common_pb2.ErrorReason.DESCRIPTOR.values
    if value.number != 0
)
_CODES = "|".join(code.name for code in grpc.StatusCode)
ANY_METHOD = {
    ("INVALID_ARGUMENT", "REQUEST_INVALID"),  # bytes that are not the request message
    ("INVALID_ARGUMENT", "ARGUMENT_INVALID"),  # a field out of its documented range (common.proto)
    ("INVALID_ARGUMENT", "NAME_INVALID"),
}


def documented_errors() -> dict[str, tuple[set[str], set[str]]]:
    """Method full name -> (status codes, reasons) its proto comment lists after ``Errors:``."""
    documented: dict[str, tuple[set[str], set[str]]] = {}
    for proto in PROTOS.glob("*.proto"):
        text = proto.read_text()
        for service in re.finditer(r"^service (\w+) \{(.*?)^\}", text, re.MULTILINE | re.DOTALL):
            comment: list[str] = []
            for line in service[2].splitlines():
                stripped = line.strip()
                if stripped.startswith("//"):
                    comment.append(stripped.removeprefix("//"))
                    continue
                if rpc := re.match(r"rpc (\w+)\(", stripped):
                    errors = re.split(r"\bErrors\b[^:]*:", " ".join(comment), maxsplit=1)[-1]
                    documented[f"takeoff.v1.{service[1]}.{rpc[1]}"] = (
                        set(re.findall(rf"\b({_CODES})\b", errors)),
                        set(re.findall(r"`([A-Z][A-Z0-9_]+)`", errors)),
                    )
                comment = []
    return documented


DOCUMENTED = documented_errors()


# --- the stack --------------------------------------------------------------------------------------


@dataclass
class Stack:
    processes: dict[str, ServiceProcess]
    channels: dict[tuple[str, str], grpc.Channel] = field(default_factory=dict)
    start_agent: Callable[[], ServiceProcess] | None = None
    secret_reader: str = ""
    """A run token that may read ``projects/fuzz/secrets/nope``: AccessSecret is the one method no admin
    key may call (a secret's value goes only to the attempt given it)."""

    def channel(self, server: str, key: str = ADMIN_KEY) -> grpc.Channel:
        """A channel to ``server`` presenting ``key``."""
        if (server, key) not in self.channels:
            self.channels[server, key] = open_channel(self.processes[server].address, api_key=key)
        return self.channels[server, key]

    def replace_drained_agent(self) -> None:
        """A Drain that succeeds ends the agent, as agent.proto says: wait for that, then start another."""
        assert self.start_agent is not None
        self.processes["agent"].process.wait(timeout=CALL_TIMEOUT)
        for server, key in [opened for opened in self.channels if opened[0] == "agent"]:
            self.channels.pop((server, key)).close()
        self.processes["agent"] = self.start_agent()


def _seed(registry: grpc.Channel, queue: grpc.Channel) -> None:
    """Objects for generated names to hit: a job with a version, a queue with an item, a run."""
    jobs = jobs_pb2_grpc.JobServiceStub(registry)
    jobs.CreateJob(
        jobs_pb2.CreateJobRequest(parent=f"projects/{PROJECT}", job_id="img"), timeout=CALL_TIMEOUT
    )
    jobs.CreateJobVersion(
        jobs_pb2.CreateJobVersionRequest(
            parent=f"projects/{PROJECT}/jobs/img",
            version=common_pb2.JobVersion(
                source=common_pb2.JobSource(image=common_pb2.ImageSource(reference="python:3.12-slim")),
                inputs=common_pb2.JobInputs(
                    schema=dict_to_struct({"type": "object", "properties": {"lr": {"type": "number"}}})
                ),
            ),
            aliases=["prod"],
        ),
        timeout=CALL_TIMEOUT,
    )
    runs_pb2_grpc.RunServiceStub(registry).CreateRun(
        runs_pb2.CreateRunRequest(parent=f"projects/{PROJECT}", run_id="r1"), timeout=CALL_TIMEOUT
    )
    queues = queue_pb2_grpc.QueueServiceStub(queue)
    queues.CreateQueue(
        queue_pb2.CreateQueueRequest(
            parent=f"projects/{PROJECT}",
            queue_id="q",
            queue=queue_pb2.Queue(
                resource=common_pb2.RESOURCE_KIND_LOCAL_CONTAINER,
                template_variables={
                    "gpus": queue_pb2.TemplateVariable(
                        schema=dict_to_struct({"type": "integer", "default": 0})
                    )
                },
            ),
        ),
        timeout=CALL_TIMEOUT,
    )
    queues.Enqueue(
        queue_pb2.EnqueueRequest(queue=f"projects/{PROJECT}/queues/q", job="img"), timeout=CALL_TIMEOUT
    )
    # The agent serves a queue of its own, paused and out of the generated names' reach: it runs nothing.
    queues.CreateQueue(
        queue_pb2.CreateQueueRequest(
            parent=f"projects/{PROJECT}",
            queue_id=AGENT_QUEUE,
            queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS, paused=True),
        ),
        timeout=CALL_TIMEOUT,
    )


def _secret_reader(stack: Stack) -> str:
    # Its run is out of the generated names' reach: a generated RevokeRunTokens cannot revoke it.
    minted = keys_pb2_grpc.KeyServiceStub(stack.channel("registry")).MintRunToken(
        keys_pb2.MintRunTokenRequest(
            run=f"projects/{PROJECT}/runs/secret-reader",
            item=f"projects/{PROJECT}/queues/q/items/secret-reader",
            job_version=f"projects/{PROJECT}/jobs/img/versions/0",
            secrets=[f"projects/{PROJECT}/secrets/nope"],
        ),
        timeout=CALL_TIMEOUT,
    )
    return str(minted.secret)


ADMIN_REFUSED = {"takeoff.v1.SecretService.AccessSecret": "secrets.access"}
"""The methods an admin key may not call, and the permission it lacks."""


def access_refusal(outcome: Outcome, method: descriptor.MethodDescriptor, admin: bool) -> bool:
    """Whether ``outcome`` is the access layer refusing a key its grants do not cover (which a non-admin
    key may meet on any method, and an admin key only where :data:`ADMIN_REFUSED` says)."""
    if (outcome.code, outcome.reason) != (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"):
        return False
    permission = outcome.metadata.get("permission")
    assert permission in PERMISSIONS, f"{method.full_name}: {outcome}"
    return not admin or ADMIN_REFUSED.get(method.full_name) == permission


STORED_SERVICES = ("registry", "queue", "builder")
"""The services that keep a database: on PostgreSQL each gets a schema of its own, as in production."""


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _database_envs(database: str, processes: contextlib.ExitStack) -> dict[str, dict[str, str]]:
    """Each stored service's ``TAKEOFF_DATABASE_URL`` (none: SQLite under the home)."""
    if database == "sqlite":
        return {service: {} for service in STORED_SERVICES}
    return {
        service: {"TAKEOFF_DATABASE_URL": processes.enter_context(postgres_schema_url(f"fuzz_{service}"))}
        for service in STORED_SERVICES
    }


@pytest.fixture(scope="module")
def stack(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp(f"fuzz-{database}")
    with contextlib.ExitStack() as processes:
        envs = _database_envs(database, processes)
        registry = processes.enter_context(service_process("registry", home, env=envs["registry"]))
        uses_registry = {"TAKEOFF_REGISTRY_ADDRESS": registry.address}
        queue = processes.enter_context(
            service_process("queue", home, env={**uses_registry, **envs["queue"]})
        )
        builder = processes.enter_context(
            service_process("builder", home, env={**uses_registry, **envs["builder"]})
        )
        for service, env in envs.items():
            if url := env.get("TAKEOFF_DATABASE_URL"):
                assert_service_wrote_tables(url, f"{service}_")  # this leg really runs on PostgreSQL
        running = Stack({"registry": registry, "queue": queue, "builder": builder})
        _seed(running.channel("registry"), running.channel("queue"))
        agent_env = {
            **uses_registry,
            "TAKEOFF_QUEUES": f'["projects/{PROJECT}/queues/{AGENT_QUEUE}"]',
            "TAKEOFF_QUEUE_ADDRESS": queue.address,
            "TAKEOFF_BUILDER_ADDRESS": builder.address,
        }
        running.start_agent = lambda: processes.enter_context(service_process("agent", home, env=agent_env))
        running.processes["agent"] = running.start_agent()
        running.secret_reader = _secret_reader(running)
        yield running
        for channel in running.channels.values():
            channel.close()


# --- generated requests ----------------------------------------------------------------------------

NAMES = [
    f"projects/{PROJECT}",
    f"projects/{PROJECT}/jobs/img",
    f"projects/{PROJECT}/jobs/img/versions/0",
    f"projects/{PROJECT}/jobs/nope",
    f"projects/{PROJECT}/queues/q",
    f"projects/{PROJECT}/queues/nope",
    f"projects/{PROJECT}/runs/r1",
    "projects/never-written",
    "img",
    "img:prod",
    "img:v0",
    "img:v99999999999999999999",
    "builds/nope",
    "agents/nope",
    "keys/nope",
    f"projects/{PROJECT}/secrets/nope",
    f"projects/{PROJECT}/queues/q/items/nope",
    "q",
    "r1",
    "new-id",
]
HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "é" * 64,
    "x" * 129,
    "x" * 5000,
    "projects/",
    "projects/fuzz/jobs/",
    "../../etc/passwd",
    "*",
    "a" * 63,
    "-1",
    "\U0001f680",
    "nul\x00inside",  # PostgreSQL text cannot hold NUL; SQLite can
    "line\nbreak\ttab\x7f",
]
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# Duration and Timestamp allow about ±10,000 years; values past that (and nanos past a second) are
# what a hostile client sends.
SECONDS = st.one_of(
    st.integers(-10, 10**6),
    st.sampled_from([-1, 0, 315_576_000_000, 315_576_000_001, 10**15, -(10**15), 2**63 - 1, -(2**63)]),
)
NANOS = st.one_of(st.just(0), st.integers(-(10**9) - 1, 10**9 + 1))

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**60), 2**60).map(float),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
STRUCTS = st.one_of(
    st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4),
    st.sampled_from(
        [
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}},
            {"$ref": "#"},
            {"apiVersion": "batch/v1", "kind": "Job", "spec": "a string"},
            {"type": "integer"},
            {"lr": 0.1},
            {"nul\x00key": "nul\x00value", "nested": {"\x00": ["\x00"]}},
        ]
    ),
)


def _struct(value: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    for key, item in value.items():
        struct.fields[key].CopyFrom(_value(item))
    return struct


def _value(item: Any) -> struct_pb2.Value:
    # By hand, not Struct.update: that refuses NaN nowhere but a hostile client is not bound by it either.
    if item is None:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(item, bool):
        return struct_pb2.Value(bool_value=item)
    if isinstance(item, float):
        return struct_pb2.Value(number_value=item)
    if isinstance(item, str):
        return struct_pb2.Value(string_value=item)
    if isinstance(item, list):
        return struct_pb2.Value(list_value=struct_pb2.ListValue(values=[_value(child) for child in item]))
    return struct_pb2.Value(struct_value=_struct(item))


def deep_struct(levels: int) -> struct_pb2.Struct:
    """A Struct of ``levels`` nested objects (at most 32: protobuf cannot hold a deeper one in a request)."""
    value: dict[str, Any] = {"leaf": 1.0}
    for _ in range(levels - 1):
        value = {"a": value}
    return _struct(value)


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def with_deep_struct(request: Message, field_name: str, levels: int) -> bytes:
    """``request`` encoded, with a Struct of ``levels`` nested objects in ``field_name``: deeper than
    protobuf lets a client build, so written by hand, as a hostile client would."""
    encoded = b""
    for _ in range(levels):
        value = b"\x2a" + _varint(len(encoded)) + encoded  # Value.struct_value
        entry = b"\x0a\x01a\x12" + _varint(len(value)) + value  # Struct.fields entry "a"
        encoded = b"\x0a" + _varint(len(entry)) + entry
    number = request.DESCRIPTOR.fields_by_name[field_name].number
    return request.SerializeToString() + _varint(number << 3 | 2) + _varint(len(encoded)) + encoded


def _strings() -> st.SearchStrategy[str]:
    # st.text draws any code point but the surrogates (a proto string cannot hold a lone one either), NUL
    # included, yet rarely: NUL inside otherwise plain text gets an alternative of its own.
    with_nul = st.builds("\x00".join, st.lists(st.text(max_size=6), min_size=2, max_size=3))
    return st.one_of(st.sampled_from(NAMES), st.sampled_from(HOSTILE_STRINGS), st.text(max_size=20), with_nul)


def _scalar(field_descriptor: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field_descriptor.type
    types = descriptor.FieldDescriptor
    if kind == types.TYPE_STRING:
        return _strings()
    if kind == types.TYPE_BYTES:
        return st.binary(max_size=32)
    if kind == types.TYPE_BOOL:
        return st.booleans()
    if kind in (types.TYPE_DOUBLE, types.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if kind == types.TYPE_DOUBLE else 32)
    if kind == types.TYPE_ENUM:
        assert field_descriptor.enum_type is not None
        known = [value.number for value in field_descriptor.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, max(known) + 1, 999, INT32[1]]))
    if kind in (types.TYPE_INT64, types.TYPE_SINT64, types.TYPE_SFIXED64):
        low, high = INT64
    elif kind in (types.TYPE_UINT32, types.TYPE_FIXED32):
        low, high = 0, 2**32 - 1
    elif kind in (types.TYPE_UINT64, types.TYPE_FIXED64):
        low, high = 0, 2**64 - 1
    else:
        low, high = INT32
    return st.one_of(
        st.integers(-3, 100),
        st.sampled_from([low, high, low + 1, -1, 0, 2**31, 10**9]).filter(
            lambda number: low <= number <= high
        ),
    )


def _well_known(message_descriptor: descriptor.Descriptor) -> st.SearchStrategy[Message] | None:
    match message_descriptor.full_name:
        case "google.protobuf.Struct":
            return STRUCTS.map(_struct)
        case "google.protobuf.Value":
            return JSON_VALUES.map(_value)
        case "google.protobuf.Duration":
            return st.builds(duration_pb2.Duration, seconds=SECONDS, nanos=NANOS)
        case "google.protobuf.Timestamp":
            return st.builds(timestamp_pb2.Timestamp, seconds=SECONDS, nanos=NANOS)
        case "google.protobuf.FieldMask":
            paths = st.one_of(
                st.sampled_from(["*", "description", "paused", "display_name", "nope"]), _strings()
            )
            return st.lists(paths, max_size=3).map(lambda chosen: field_mask_pb2.FieldMask(paths=chosen))
    return None


def messages(message_descriptor: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of this type with any subset of their fields set to generated values."""
    well_known = _well_known(message_descriptor)
    if well_known is not None:
        return well_known

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = message_factory(message_descriptor)()
        chosen_oneofs = {
            oneof.name: draw(st.sampled_from([None, *oneof.fields])) for oneof in message_descriptor.oneofs
        }
        for field_descriptor in message_descriptor.fields:
            oneof = field_descriptor.containing_oneof
            if oneof is not None and chosen_oneofs[oneof.name] is not field_descriptor:
                continue
            if oneof is None and not draw(st.booleans()):
                continue
            _fill(draw, message, field_descriptor, depth)
        return message

    return build()


def _fill(
    draw: st.DrawFn, message: Message, field_descriptor: descriptor.FieldDescriptor, depth: int
) -> None:
    name = field_descriptor.name
    entry = field_descriptor.message_type
    if entry is not None and entry.GetOptions().map_entry:
        keys = draw(st.lists(_scalar(entry.fields_by_name["key"]), max_size=3))
        value_field = entry.fields_by_name["value"]
        for key in keys:
            if value_field.message_type is not None:
                getattr(message, name)[key].CopyFrom(draw(messages(value_field.message_type, depth + 1)))
            else:
                getattr(message, name)[key] = draw(_scalar(value_field))
        return
    if entry is not None:
        if depth >= 3:
            return
        values = messages(entry, depth + 1)
        if field_descriptor.is_repeated:
            getattr(message, name).extend(draw(st.lists(values, max_size=2)))
        else:
            getattr(message, name).CopyFrom(draw(values))
        return
    if field_descriptor.is_repeated:
        getattr(message, name).extend(draw(st.lists(_scalar(field_descriptor), max_size=3)))
    else:
        setattr(message, name, draw(_scalar(field_descriptor)))


def message_factory(message_descriptor: descriptor.Descriptor) -> type[Message]:
    return GetMessageClass(message_descriptor)


# --- the hostile corpus ----------------------------------------------------------------------------

EDITED_TOKEN = "WyJ6eiJd.AAAAAAAAAAAAAAAAAAAAAA"  # ["zz"] with a made-up signature
HUGE = duration_pb2.Duration(seconds=10**15)
UNKNOWN_PRIORITY = cast(common_pb2.Priority.ValueType, 999)
UNKNOWN_STATE = cast(common_pb2.ItemState.ValueType, 999)
UNKNOWN_KIND = cast(build_pb2.BuildKind.ValueType, 999)
NUL = "nul\x00inside"
"""Text PostgreSQL cannot store (SQLite can): every text field that reaches a store must refuse it."""
HOSTILE: dict[str, list[Message | bytes]] = {
    "takeoff.v1.JobService.CreateJobVersion": [
        jobs_pb2.CreateJobVersionRequest(
            parent=f"projects/{PROJECT}/jobs/img",
            version=common_pb2.JobVersion(
                source=common_pb2.JobSource(image=common_pb2.ImageSource(reference="python:3.12-slim")),
                inputs=common_pb2.JobInputs(
                    schema=_struct({"properties": {"a": {"$ref": "#/$defs/nowhere"}}})
                ),
            ),
        ),
        jobs_pb2.CreateJobVersionRequest(
            parent=f"projects/{PROJECT}/jobs/img",
            version=common_pb2.JobVersion(
                source=common_pb2.JobSource(image=common_pb2.ImageSource(reference="python:3.12-slim")),
                inputs=common_pb2.JobInputs(defaults=deep_struct(32)),
            ),
        ),
    ],
    "takeoff.v1.JobService.CreateJob": [
        jobs_pb2.CreateJobRequest(
            parent=f"projects/{PROJECT}", job_id="big", job=jobs_pb2.Job(description="d" * (3 * 1024 * 1024))
        ),
        jobs_pb2.CreateJobRequest(
            parent=f"projects/{PROJECT}", job_id="nul", job=jobs_pb2.Job(description=NUL)
        ),
        jobs_pb2.CreateJobRequest(parent=f"projects/{PROJECT}", job_id="nul", request_id=NUL),
    ],
    "takeoff.v1.JobService.UpdateJob": [
        jobs_pb2.UpdateJobRequest(
            job=jobs_pb2.Job(name=f"projects/{PROJECT}/jobs/img", description=NUL),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
    ],
    "takeoff.v1.JobService.ListJobs": [
        jobs_pb2.ListJobsRequest(parent=f"projects/{PROJECT}", page_token=EDITED_TOKEN)
    ],
    "takeoff.v1.RunService.CreateRun": [
        runs_pb2.CreateRunRequest(
            parent=f"projects/{PROJECT}",
            run_id="big",
            run=runs_pb2.Run(display_name="n" * (3 * 1024 * 1024)),
        ),
        runs_pb2.CreateRunRequest(
            parent=f"projects/{PROJECT}", run_id="deep", run=runs_pb2.Run(config=deep_struct(32))
        ),
        runs_pb2.CreateRunRequest(
            parent=f"projects/{PROJECT}", run_id="deep", run=runs_pb2.Run(config=deep_struct(32))
        ),
        runs_pb2.CreateRunRequest(
            parent=f"projects/{PROJECT}", run_id="nul", run=runs_pb2.Run(display_name=NUL)
        ),
        runs_pb2.CreateRunRequest(
            parent=f"projects/{PROJECT}", run_id="nul", run=runs_pb2.Run(config=_struct({NUL: NUL}))
        ),
    ],
    "takeoff.v1.RunService.FinishRun": [
        runs_pb2.FinishRunRequest(
            name=f"projects/{PROJECT}/runs/r1", state=common_pb2.RUN_STATE_FAILED, message=NUL
        ),
    ],
    "takeoff.v1.RunService.BatchLogMetrics": [
        runs_pb2.BatchLogMetricsRequest(
            name=f"projects/{PROJECT}/runs/r1", rows=[runs_pb2.MetricRow(step=0, values={NUL: 1.0})]
        ),
    ],
    "takeoff.v1.RunService.AppendLogs": [
        runs_pb2.AppendLogsRequest(name=f"projects/{PROJECT}/runs/r1", lines=[runs_pb2.LogLine(text=NUL)]),
    ],
    "takeoff.v1.RunService.ListRuns": [
        runs_pb2.ListRunsRequest(parent=f"projects/{PROJECT}", page_token=EDITED_TOKEN),
        runs_pb2.ListRunsRequest(
            parent=f"projects/{PROJECT}", id_prefix="%_'\\", group=NUL, tags=["a,b", NUL]
        ),
    ],
    "takeoff.v1.RunService.UpdateRunConfig": [
        runs_pb2.UpdateRunConfigRequest(name=f"projects/{PROJECT}/runs/r1", config=deep_struct(32)),
        with_deep_struct(runs_pb2.UpdateRunConfigRequest(name=f"projects/{PROJECT}/runs/r1"), "config", 200),
        runs_pb2.UpdateRunConfigRequest(name=f"projects/{PROJECT}/runs/r1"),
    ],
    "takeoff.v1.RunService.UpdateSummary": [
        runs_pb2.UpdateSummaryRequest(name=f"projects/{PROJECT}/runs/r1", summary=deep_struct(32)),
        with_deep_struct(runs_pb2.UpdateSummaryRequest(name=f"projects/{PROJECT}/runs/r1"), "summary", 40),
    ],
    "takeoff.v1.RunService.AttachRun": [
        with_deep_struct(runs_pb2.AttachRunRequest(name=f"projects/{PROJECT}/runs/r1"), "config", 200),
        runs_pb2.AttachRunRequest(
            name=f"projects/{PROJECT}/runs/r1", tags=["", "x" * 65, NUL], notes=NUL * 5000
        ),
    ],
    "takeoff.v1.QueueService.CreateQueue": [
        queue_pb2.CreateQueueRequest(
            parent=f"projects/{PROJECT}",
            queue_id="k8s",
            queue=queue_pb2.Queue(
                resource=common_pb2.RESOURCE_KIND_KUBERNETES,
                resource_config=_struct({"apiVersion": "batch/v1", "kind": "Job", "spec": "a string"}),
            ),
        ),
        queue_pb2.CreateQueueRequest(
            parent=f"projects/{PROJECT}",
            queue_id="refs",
            queue=queue_pb2.Queue(
                resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS,
                template_variables={
                    "v": queue_pb2.TemplateVariable(schema=_struct({"type": "object", "$ref": "#/nowhere"}))
                },
            ),
        ),
        queue_pb2.CreateQueueRequest(
            parent=f"projects/{PROJECT}",
            queue_id="slow",
            queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS, start_timeout=HUGE),
        ),
        queue_pb2.CreateQueueRequest(
            parent=f"projects/{PROJECT}",
            queue_id="named",
            queue=queue_pb2.Queue(
                resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS, description="d" * (3 * 1024 * 1024)
            ),
        ),
        queue_pb2.CreateQueueRequest(
            parent=f"projects/{PROJECT}",
            queue_id="nul",
            queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS, description=NUL),
            request_id=NUL,
        ),
    ],
    "takeoff.v1.QueueService.Enqueue": [
        queue_pb2.EnqueueRequest(queue=f"projects/{PROJECT}/queues/q", job="img", max_run_time=HUGE),
        queue_pb2.EnqueueRequest(
            queue=f"projects/{PROJECT}/queues/q", job="img", run_display_name="n" * (3 * 1024 * 1024)
        ),
        queue_pb2.EnqueueRequest(queue=f"projects/{PROJECT}/queues/q", job="img", run_config=deep_struct(32)),
        with_deep_struct(
            queue_pb2.EnqueueRequest(queue=f"projects/{PROJECT}/queues/q", job="img"), "run_config", 40
        ),
        queue_pb2.EnqueueRequest(queue=f"projects/{PROJECT}/queues/q", job="img", priority=UNKNOWN_PRIORITY),
        queue_pb2.EnqueueRequest(queue=f"projects/{PROJECT}/queues/q", job="img", run_display_name=NUL),
        queue_pb2.EnqueueRequest(queue=f"projects/{PROJECT}/queues/q", job="img", request_id=NUL),
        queue_pb2.EnqueueRequest(
            queue=f"projects/{PROJECT}/queues/q", job="img", run_config=_struct({NUL: NUL})
        ),
    ],
    "takeoff.v1.QueueService.ListItems": [
        queue_pb2.ListItemsRequest(parent=f"projects/{PROJECT}/queues/q", page_token=EDITED_TOKEN),
        queue_pb2.ListItemsRequest(parent=f"projects/{PROJECT}/queues/q", states=[UNKNOWN_STATE]),
    ],
    "takeoff.v1.QueueService.ListQueues": [queue_pb2.ListQueuesRequest(parent="projects/never-written")],
    "takeoff.v1.BuildService.Build": [
        build_pb2.BuildRequest(job_version=f"projects/{PROJECT}/jobs/img/versions/0", kind=UNKNOWN_KIND),
        build_pb2.BuildRequest(
            job_version=f"projects/{PROJECT}/jobs/img/versions/0",
            kind=build_pb2.BUILD_KIND_NOOP,
            request_id=NUL,
        ),
    ],
    "takeoff.v1.AgentService.Drain": [
        agent_pb2.DrainRequest(timeout=duration_pb2.Duration(seconds=-(10**15)))
    ],
}


# --- calling and judging ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    reason: str = ""
    domain: str = ""
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def _outcome_of(error: grpc.RpcError) -> Outcome:
    call: Any = error
    trailing = dict(call.trailing_metadata() or ())
    details = trailing.get("grpc-status-details-bin")
    info = error_details_pb2.ErrorInfo()
    if details is not None:
        for detail in status_pb2.Status.FromString(details).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(info)
    return Outcome(call.code(), info.reason, info.domain, call.details() or "", dict(info.metadata))


def call(
    stack: Stack, method: descriptor.MethodDescriptor, request: Message | bytes, key: str = ADMIN_KEY
) -> Outcome:
    channel = stack.channel(SERVICES[method.containing_service.full_name], key)
    path = f"/{method.containing_service.full_name}/{method.name}"

    def serialize(message: Message | bytes) -> bytes:
        return message if isinstance(message, bytes) else message.SerializeToString()

    deserialize = message_factory(method.output_type).FromString
    try:
        if method.client_streaming:
            channel.stream_unary(path, serialize, deserialize)(iter([request, request]), timeout=CALL_TIMEOUT)
        elif method.server_streaming:
            for _ in channel.unary_stream(path, serialize, deserialize)(request, timeout=STREAM_TIMEOUT):
                pass
        else:
            channel.unary_unary(path, serialize, deserialize)(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        outcome = _outcome_of(error)
        if method.server_streaming and outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Outcome(grpc.StatusCode.OK)  # a watch still open: it answered
        return outcome
    return Outcome(grpc.StatusCode.OK)


def check_documented(method: descriptor.MethodDescriptor, request: Message | bytes, outcome: Outcome) -> None:
    if outcome.code == grpc.StatusCode.OK:
        return
    got = f"{outcome.code.name} {outcome.reason}: {outcome.message[:200]}"
    shown = f"{method.full_name}({_summary(request)}) -> {got}"
    assert outcome.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), shown
    assert (outcome.domain, outcome.reason in CATALOGUE) == ("takeoff.dev", True), shown
    codes, reasons = DOCUMENTED.get(method.full_name, (set(), set()))
    documented = outcome.code.name in codes and (outcome.reason in reasons or not reasons)
    assert documented or (outcome.code.name, outcome.reason) in ANY_METHOD, f"undocumented: {shown}"


def _summary(request: Message | bytes) -> str:
    text = repr(request[:100]) if isinstance(request, bytes) else str(request).replace("\n", " ")
    return text if len(text) <= 300 else f"{text[:300]}... ({len(text)} characters)"


def _names(listing: Callable[[], Any], attribute: str) -> set[str]:
    return {entry.name for entry in getattr(listing(), attribute)}


def listing_for(stack: Stack, method: str) -> Callable[[], set[str]] | None:
    """What a failed call of ``method`` must leave unchanged, if it creates things."""
    jobs = jobs_pb2_grpc.JobServiceStub(stack.channel("registry"))
    runs = runs_pb2_grpc.RunServiceStub(stack.channel("registry"))
    queues = queue_pb2_grpc.QueueServiceStub(stack.channel("queue"))
    parent = f"projects/{PROJECT}"
    listings: dict[str, Callable[[], set[str]]] = {
        "takeoff.v1.JobService.CreateJob": lambda: _names(
            lambda: jobs.ListJobs(jobs_pb2.ListJobsRequest(parent=parent, page_size=1000)), "jobs"
        ),
        "takeoff.v1.JobService.CreateJobVersion": lambda: _names(
            lambda: jobs.ListJobVersions(
                jobs_pb2.ListJobVersionsRequest(parent=f"{parent}/jobs/img", page_size=1000)
            ),
            "versions",
        ),
        "takeoff.v1.RunService.CreateRun": lambda: _names(
            lambda: runs.ListRuns(runs_pb2.ListRunsRequest(parent=parent, page_size=1000)), "runs"
        ),
        "takeoff.v1.QueueService.CreateQueue": lambda: _names(
            lambda: queues.ListQueues(queue_pb2.ListQueuesRequest(parent=parent, page_size=1000)), "queues"
        ),
        "takeoff.v1.QueueService.Enqueue": lambda: _names(
            lambda: queues.ListItems(queue_pb2.ListItemsRequest(parent=f"{parent}/queues/q", page_size=1000)),
            "items",
        ),
    }
    return listings.get(method)


def serving(stack: Stack, method: descriptor.MethodDescriptor) -> bool:
    service = method.containing_service.full_name
    health = health_pb2_grpc.HealthStub(stack.channel(SERVICES[service]))
    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize(
    "method", METHODS, ids=[method.full_name.removeprefix("takeoff.v1.") for method in METHODS]
)
def test_generated_requests_get_documented_statuses(
    database: str, stack: Stack, method: descriptor.MethodDescriptor
) -> None:
    listing = listing_for(stack, method.full_name)

    @settings(
        max_examples=EXAMPLES_PER_METHOD[database],
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(request=messages(method.input_type))
    def check(request: Message | bytes) -> None:
        before = listing() if listing is not None else None
        admin = method.full_name not in ADMIN_REFUSED
        outcome = call(stack, method, request, ADMIN_KEY if admin else stack.secret_reader)
        if not access_refusal(outcome, method, admin):
            check_documented(method, request, outcome)
        if method.full_name == "takeoff.v1.AgentService.Drain" and outcome.code == grpc.StatusCode.OK:
            stack.replace_drained_agent()
        if listing is not None and outcome.code != grpc.StatusCode.OK:
            assert listing() == before, f"a failed {method.name} left something behind: {_summary(request)}"

    for hostile in HOSTILE.get(method.full_name, []):
        check = example(request=hostile)(check)
    check()
    assert serving(stack, method)


def test_every_hostile_example_names_a_method_the_fuzz_covers() -> None:
    covered = {method.full_name for method in METHODS}
    assert set(HOSTILE) <= covered
    for name, requests in HOSTILE.items():
        method = next(method for method in METHODS if method.full_name == name)
        assert all(
            isinstance(request, bytes) or request.DESCRIPTOR is method.input_type for request in requests
        ), name


# --- with a key of each kind -------------------------------------------------------------------------

KEYED_METHODS = [
    "takeoff.v1.JobService.GetJob",
    "takeoff.v1.JobService.CreateJob",
    "takeoff.v1.JobService.GetJobVersion",
    "takeoff.v1.RunService.CreateRun",
    "takeoff.v1.RunService.AppendLogs",
    "takeoff.v1.RunService.FinishRun",
    "takeoff.v1.KeyService.VerifyKey",
    "takeoff.v1.KeyService.ListKeys",
    "takeoff.v1.SecretService.ListSecrets",
    "takeoff.v1.SecretService.AccessSecret",
    "takeoff.v1.QueueService.Enqueue",
    "takeoff.v1.QueueService.ListItems",
    "takeoff.v1.QueueService.CancelItem",
    "takeoff.v1.BuildService.GetBuild",
    "takeoff.v1.AgentService.GetStatus",
]
"""A subset touching every service and every kind's boundary: reads, writes, run writes, keys, secrets."""
KEYED_EXAMPLES = {"sqlite": 6, "postgresql": 3}
"""Per method and key kind: the keyed run is about access, which PostgreSQL does not change, so its leg is
short (it is not skipped: CI fails every skip)."""
PERMISSIONS = frozenset(str(permission) for permission in Permission)
KINDS = ["admin", "project", "agent", "service", "run token"]


def make_key(stack: Stack, kind: str) -> str:
    """A fresh key of ``kind`` scoped to the fuzz project, made by the admin (each test makes its own: the
    admin leg's generated RevokeRunTokens may name the run a token was minted for)."""
    keys = keys_pb2_grpc.KeyServiceStub(stack.channel("registry"))
    if kind == "run token":
        return str(
            keys.MintRunToken(
                keys_pb2.MintRunTokenRequest(
                    run=f"projects/{PROJECT}/runs/r1",
                    item=f"projects/{PROJECT}/queues/q/items/nope",
                    job_version=f"projects/{PROJECT}/jobs/img/versions/0",
                ),
                timeout=CALL_TIMEOUT,
            ).secret
        )
    spec = {
        "admin": keys_pb2.Key(kind=keys_pb2.KEY_KIND_ADMIN),
        "project": keys_pb2.Key(
            kind=keys_pb2.KEY_KIND_PROJECT, projects=[f"projects/{PROJECT}"], role=keys_pb2.PROJECT_ROLE_WRITE
        ),
        "agent": keys_pb2.Key(kind=keys_pb2.KEY_KIND_AGENT, queues=[f"projects/{PROJECT}/queues/q"]),
        "service": keys_pb2.Key(kind=keys_pb2.KEY_KIND_SERVICE, service=keys_pb2.SERVICE_ROLE_QUEUE),
    }[kind]
    return str(keys.CreateKey(keys_pb2.CreateKeyRequest(key=spec), timeout=CALL_TIMEOUT).secret)


@pytest.mark.parametrize("kind", KINDS)
def test_generated_requests_with_a_key_of_each_kind_get_documented_statuses(
    database: str, stack: Stack, kind: str
) -> None:
    key = make_key(stack, kind)
    methods = [method for method in METHODS if method.full_name in KEYED_METHODS]
    assert len(methods) == len(KEYED_METHODS)
    for method in methods:
        keyed_check(stack, method, kind, key, KEYED_EXAMPLES[database])()
        assert serving(stack, method)


def keyed_check(
    stack: Stack, method: descriptor.MethodDescriptor, kind: str, key: str, examples: int
) -> Callable[[], None]:
    """The property for ``method`` called with ``key`` (of ``kind``), as a hypothesis test to run."""

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=messages(method.input_type))
    def check(request: Message) -> None:
        outcome = call(stack, method, request, key)
        shown = f"{method.full_name} with a {kind} key ({_summary(request)}) -> {outcome}"
        assert outcome.code != grpc.StatusCode.UNAUTHENTICATED, shown
        if not access_refusal(outcome, method, admin=kind == "admin"):
            check_documented(method, request, outcome)

    return check
