"""The agent's domain from and to protos, at its edges: the Lease stream, the builder, the registry.

An Assignment is kept in its lease directory as the bytes the queue sent (``assignment.bin``) and
converted whenever it is read, so a restarted agent sees exactly what the first one was given.
"""

from __future__ import annotations

import os
from pathlib import Path

from google.protobuf.message import DecodeError

from takeoff.v1 import build_pb2, common_pb2, queue_pb2, runs_pb2
from takeoff_agent.domain import (
    ITEM,
    JOB_VERSION,
    RUN,
    Assignment,
    BuildKind,
    Built,
    FailureReason,
    ItemState,
    JobVersion,
    LogStream,
    Outcome,
    ResourceKind,
    RunState,
    SecretMount,
    SourceKind,
)
from takeoff_server.names import ResourcePattern
from takeoff_server.protovalues import struct_to_dict

AssignmentMessage = queue_pb2.LeaseResponse.Assignment
LeaseRequest = queue_pb2.LeaseRequest
ASSIGNMENT_FILE = "assignment.bin"


def assignment_from_proto(message: AssignmentMessage) -> Assignment:
    """The domain Assignment; ValueError naming the field when the queue sent one the agent cannot run."""
    version = message.job_version
    source = version.source.WhichOneof("source")
    if source is None:
        raise ValueError(f"job version {version.name!r} has no source")
    try:
        resource = ResourceKind(message.resource)
    except ValueError:
        raise ValueError(f"resource kind {message.resource} is not one this agent knows") from None
    return Assignment(
        lease_id=message.lease_id,
        epoch=message.epoch,
        item=_named(ITEM, message.item.name, "item.name"),
        queue=message.queue,
        run=_named(RUN, message.run, "run"),
        attempt=message.attempt,
        job_version=JobVersion(
            name=_named(JOB_VERSION, version.name, "job_version.name"),
            source=SourceKind(source),
            image=version.source.image.reference,
            build_context=version.environment.build_context,
        ),
        resource=resource,
        entrypoint=tuple(message.entrypoint),
        run_config=struct_to_dict(message.item.run_config),
        resource_config=struct_to_dict(message.resource_config),
        container_name=message.container_name,
        run_display_name=message.item.run_display_name,
        assign_time=message.assign_time.ToNanoseconds() / 1e9 if message.HasField("assign_time") else 0.0,
        start_deadline=(
            message.start_deadline.ToNanoseconds() / 1e9 if message.HasField("start_deadline") else None
        ),
        max_run_time=(
            message.max_run_time.ToTimedelta().total_seconds() if message.HasField("max_run_time") else None
        ),
        traceparent=message.traceparent,
        run_token=message.run_token,
        secrets=tuple(_secret_mount(mount, message.queue) for mount in message.secrets),
    )


SECRET = ResourcePattern("projects/{project}/secrets/{secret}")
QUEUE = ResourcePattern("projects/{project}/queues/{queue}")


def _secret_mount(mount: queue_pb2.SecretMount, queue: str) -> SecretMount:
    """The mount with its secret's full name (a short id names a secret of the queue's project)."""
    name = mount.secret
    if "/" not in name and (parts := QUEUE.match(queue)) is not None:
        name = f"projects/{parts['project']}/secrets/{name}"
    if SECRET.match(name) is None:
        raise ValueError(f"secret {mount.secret!r} is not of the form {SECRET.template}")
    if bool(mount.env) == bool(mount.file):
        raise ValueError(f"secret {name} must be mounted as exactly one of env and file")
    return SecretMount(secret=name, env=mount.env, file=mount.file)


def _named(pattern: ResourcePattern, name: str, field: str) -> str:
    if pattern.match(name) is None:
        raise ValueError(f"{field} {name!r} is not of the form {pattern.template}")
    return name


def record_assignment(message: AssignmentMessage, lease_dir: Path) -> None:
    """Keep the assignment on disk before any work starts, so a restarted agent can report it held and
    finish its run. It holds the attempt's run token: the lease directory is the agent's alone (0700) and
    the file is readable by the agent's user only (0600)."""
    lease_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = lease_dir / f"{ASSIGNMENT_FILE}.partial"
    partial.unlink(missing_ok=True)  # one left by a crash may have other permissions
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(message.SerializeToString())
    partial.replace(lease_dir / ASSIGNMENT_FILE)


def recorded_assignment(lease_dir: Path) -> Assignment | None:
    """The assignment recorded in ``lease_dir``; None when there is none the agent can read."""
    try:
        return assignment_from_proto(AssignmentMessage.FromString((lease_dir / ASSIGNMENT_FILE).read_bytes()))
    except (OSError, DecodeError, ValueError):
        return None


def built_from_proto(result: build_pb2.BuildResult, kind: BuildKind) -> Built:
    return Built(
        kind=kind,
        venv_path=result.venv_path,
        code_path=result.code_path,
        python_path=result.python_path,
        image=result.image,
        image_id=result.image_id,
        pushed=result.pushed,
        cache_hit=result.cache_hit,
    )


def failure_reason_from_proto(reason: int, default: FailureReason) -> FailureReason:
    """``reason``, or ``default`` when it is unset or newer than this agent."""
    try:
        return FailureReason(reason) if reason else default
    except ValueError:
        return default


def complete_request(lease_id: str, epoch: int, outcome: Outcome) -> LeaseRequest.Complete:
    return LeaseRequest.Complete(
        lease_id=lease_id,
        epoch=epoch,
        outcome=item_state_to_proto(outcome.state),
        reason=common_pb2.FailureReason.ValueType(outcome.reason),
        exit_code=outcome.exit_code,
        message=outcome.message,
    )


# The domain's enums carry the proto numbers: these only say so to the type checker.


def item_state_to_proto(state: ItemState) -> common_pb2.ItemState.ValueType:
    return common_pb2.ItemState.ValueType(state)


def run_state_to_proto(state: RunState) -> common_pb2.RunState.ValueType:
    return common_pb2.RunState.ValueType(state)


def log_stream_to_proto(stream: LogStream) -> runs_pb2.LogStream.ValueType:
    return runs_pb2.LogStream.ValueType(stream)


def build_kind_to_proto(kind: BuildKind) -> build_pb2.BuildKind.ValueType:
    return build_pb2.BuildKind.ValueType(kind)


def resource_kind_to_proto(kind: ResourceKind) -> common_pb2.ResourceKind.ValueType:
    return common_pb2.ResourceKind.ValueType(kind)
