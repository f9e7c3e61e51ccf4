"""What the pages show, as plain Python built from the services' messages: no gRPC, no HTTP.

Every state, pending reason and failure reason is said in words here, once; the templates and the event
streams (whose JSON the page's script renders) both use these views, so a live update shows exactly what a
reload would.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from google.protobuf import timestamp_pb2

from takeoff.v1 import artifacts_pb2, common_pb2, queue_pb2, runs_pb2
from takeoff_server.protovalues import struct_to_dict

PENDING_WORDS = {
    queue_pb2.PENDING_REASON_QUEUE_PAUSED: "The queue is paused",
    queue_pb2.PENDING_REASON_RETRY_BACKOFF: "Waiting before the next attempt",
    queue_pb2.PENDING_REASON_CONCURRENCY_LIMIT: "The queue runs as many items as its limit allows",
    queue_pb2.PENDING_REASON_NO_AGENT: "No agent serves this queue",
    queue_pb2.PENDING_REASON_AGENTS_BUSY: "Every agent serving this queue is busy",
    queue_pb2.PENDING_REASON_WAITING_FOR_GPUS: "Waiting for free GPUs",
    queue_pb2.PENDING_REASON_QUEUED: "Waiting for the items ahead of it",
}

FAILURE_WORDS = {
    common_pb2.FAILURE_REASON_AGENT_LOST: "The agent running it stopped answering",
    common_pb2.FAILURE_REASON_BUILD_INFRA: "The build could not run (builder, Docker or package index away)",
    common_pb2.FAILURE_REASON_PREEMPTED: "It was stopped from outside (preempted, evicted or drained)",
    common_pb2.FAILURE_REASON_START_TIMEOUT: "It did not start within the queue's start timeout",
    common_pb2.FAILURE_REASON_RUNNER_INFRA: "The runner could not start or watch it (infrastructure)",
    common_pb2.FAILURE_REASON_RELEASED: "The agent handed it back before starting it",
    common_pb2.FAILURE_REASON_MAX_RUN_TIME_EXCEEDED: "It ran longer than its maximum run time",
    common_pb2.FAILURE_REASON_JOB_FAILED: "The job exited with an error",
    common_pb2.FAILURE_REASON_NO_RUN: "The job exited without calling takeoff.init()",
    common_pb2.FAILURE_REASON_BUILD_FAILED: "The build failed (requirements, Dockerfile, source or image)",
    common_pb2.FAILURE_REASON_CONFIG_INVALID: "Its configuration was refused when the work was prepared",
    common_pb2.FAILURE_REASON_CANCELLED: "It was cancelled",
}

RUN_STATE_WORDS = {
    common_pb2.RUN_STATE_STARTING: "Created, waiting for the job to call takeoff.init()",
    common_pb2.RUN_STATE_RUNNING: "Running",
    common_pb2.RUN_STATE_FINISHED: "Finished",
    common_pb2.RUN_STATE_FAILED: "The job failed",
    common_pb2.RUN_STATE_CRASHED: "The job's process died without finishing the run",
    common_pb2.RUN_STATE_KILLED: "The job was stopped on purpose",
}

ENDED_ITEM_STATES = frozenset(
    {common_pb2.ITEM_STATE_SUCCEEDED, common_pb2.ITEM_STATE_FAILED, common_pb2.ITEM_STATE_CANCELLED}
)
ENDED_RUN_STATES = frozenset(
    {
        common_pb2.RUN_STATE_FINISHED,
        common_pb2.RUN_STATE_FAILED,
        common_pb2.RUN_STATE_CRASHED,
        common_pb2.RUN_STATE_KILLED,
    }
)
PRIORITIES = {
    "critical": common_pb2.PRIORITY_CRITICAL,
    "high": common_pb2.PRIORITY_HIGH,
    "medium": common_pb2.PRIORITY_MEDIUM,
    "low": common_pb2.PRIORITY_LOW,
}


def item_state(state: common_pb2.ItemState.ValueType) -> str:
    return common_pb2.ItemState.Name(state).removeprefix("ITEM_STATE_")


def run_state(state: common_pb2.RunState.ValueType) -> str:
    return common_pb2.RunState.Name(state).removeprefix("RUN_STATE_")


def resource_kind(kind: common_pb2.ResourceKind.ValueType) -> str:
    return common_pb2.ResourceKind.Name(kind).removeprefix("RESOURCE_KIND_").lower().replace("_", "-")


def priority_name(priority: common_pb2.Priority.ValueType) -> str:
    return common_pb2.Priority.Name(priority or common_pb2.PRIORITY_MEDIUM).removeprefix("PRIORITY_").lower()


def when(stamp: timestamp_pb2.Timestamp) -> str:
    """A timestamp as ISO 8601 UTC to the second, or "" when unset (the page's script shows it locally)."""
    if not stamp.seconds and not stamp.nanos:
        return ""
    return datetime.fromtimestamp(stamp.seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def last_segment(name: str) -> str:
    return name.rpartition("/")[2]


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


@dataclass(frozen=True)
class ItemName:
    """``projects/{p}/queues/{q}/items/{i}`` in parts."""

    project: str
    queue: str
    item: str

    @classmethod
    def parse(cls, name: str) -> ItemName:
        parts = name.split("/")
        return cls(parts[1], parts[3], parts[5])

    @property
    def url(self) -> str:
        return f"/projects/{self.project}/queues/{self.queue}/items/{self.item}"


def run_url(run_name: str) -> str:
    """``projects/{p}/runs/{r}`` -> its page."""
    return "/" + run_name if run_name else ""


@dataclass(frozen=True)
class TransitionView:
    time: str
    from_state: str
    to_state: str
    attempt: int
    reason: str
    message: str
    agent: str
    actor: str
    run_url: str


@dataclass(frozen=True)
class ItemView:
    """An item as the queue, item and launch pages show it; ``as_json`` is what its event streams send."""

    id: str
    url: str
    queue: str
    state: str
    ended: bool
    job: str
    job_version: str
    priority: str
    attempt: int
    max_attempts: int
    position: int
    pending_reason: str
    pending_detail: str
    failure: str
    message: str
    exit_code: int | None
    cancel_requested: bool
    enqueue_time: str
    end_time: str
    run: str
    run_url: str
    agent: str
    creator: str
    run_config: str
    transitions: list[TransitionView] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def item_view(item: queue_pb2.Item) -> ItemView:
    name = ItemName.parse(item.name)
    pending = item.state == common_pb2.ITEM_STATE_PENDING
    return ItemView(
        id=name.item,
        url=name.url,
        queue=name.queue,
        state=item_state(item.state),
        ended=item.state in ENDED_ITEM_STATES,
        job=item.job,
        job_version=item.job_version,
        priority=priority_name(item.priority),
        attempt=item.attempt,
        max_attempts=item.max_attempts,
        position=item.position if pending else 0,
        pending_reason=PENDING_WORDS.get(item.pending_reason, "") if pending else "",
        pending_detail=item.pending_detail if pending else "",
        failure=FAILURE_WORDS.get(item.reason, ""),
        message=item.message,
        exit_code=item.exit_code if item.HasField("exit_code") else None,
        cancel_requested=item.cancel_requested,
        enqueue_time=when(item.enqueue_time),
        end_time=when(item.end_time),
        run=last_segment(item.run),
        run_url=run_url(item.run),
        agent=last_segment(item.agent),
        creator=item.creator,
        run_config=pretty_json(struct_to_dict(item.run_config)),
        transitions=[
            TransitionView(
                time=when(t.time),
                from_state=item_state(t.from_state) if t.from_state else "",
                to_state=item_state(t.to_state),
                attempt=t.attempt,
                reason=FAILURE_WORDS.get(t.reason, ""),
                message=t.message,
                agent=last_segment(t.agent),
                actor=t.actor,
                run_url=run_url(t.run),
            )
            for t in item.transitions
        ],
    )


@dataclass(frozen=True)
class AgentLeaseView:
    item: str
    item_url: str
    state: str
    attempt: int


@dataclass(frozen=True)
class AgentView:
    id: str
    display_name: str
    connected: bool
    draining: bool
    capacity: int
    last_heartbeat: str
    leases: list[AgentLeaseView]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def agent_view(agent: queue_pb2.Agent) -> AgentView:
    return AgentView(
        id=last_segment(agent.name),
        display_name=agent.display_name,
        connected=agent.connected,
        draining=agent.draining,
        capacity=agent.capacity,
        last_heartbeat=when(agent.last_heartbeat_time),
        leases=[
            AgentLeaseView(
                last_segment(lease.item),
                ItemName.parse(lease.item).url,
                item_state(lease.state),
                lease.attempt,
            )
            for lease in agent.leases
        ],
    )


@dataclass(frozen=True)
class QueueView:
    id: str
    url: str
    resource: str
    description: str
    paused: bool
    secure: bool
    prioritization: bool
    concurrency_limit: int
    agent_count: int
    counts: dict[str, int]
    resource_config: str
    template_variables: dict[str, dict[str, Any]]


def queue_view(queue: queue_pb2.Queue) -> QueueView:
    project, queue_id = queue.name.split("/")[1], last_segment(queue.name)
    counts = {f.name: getattr(queue.item_counts, f.name) for f in queue.item_counts.DESCRIPTOR.fields}
    return QueueView(
        id=queue_id,
        url=f"/projects/{project}/queues/{queue_id}",
        resource=resource_kind(queue.resource),
        description=queue.description,
        paused=queue.paused,
        secure=queue.secure,
        prioritization=queue.prioritization,
        concurrency_limit=queue.concurrency_limit,
        agent_count=queue.agent_count,
        counts=counts,
        resource_config=pretty_json(struct_to_dict(queue.resource_config)),
        template_variables={
            name: {"schema": struct_to_dict(variable.schema), "description": variable.description}
            for name, variable in sorted(queue.template_variables.items())
        },
    )


@dataclass(frozen=True)
class SourceView:
    kind: str
    summary: str
    code_sha256: str = ""


def source_view(version: common_pb2.JobVersion) -> SourceView:
    source = version.source
    which = source.WhichOneof("source")
    if which == "code":
        size = f"{source.code.size_bytes:,} bytes"
        return SourceView("code", f"code tarball sha256:{source.code.sha256} ({size})", source.code.sha256)
    if which == "git":
        ref = f" ({source.git.ref})" if source.git.ref else ""
        return SourceView("git", f"{source.git.url}{ref} at commit {source.git.commit}")
    if which == "image":
        return SourceView("image", source.image.reference)
    return SourceView("", "")


@dataclass(frozen=True)
class RunView:
    id: str
    url: str
    display_name: str
    state: str
    state_words: str
    ended: bool
    exit_code: int | None
    failure: str
    job_version: str
    queue_item_url: str
    attempt: int
    create_time: str
    end_time: str
    config: str
    summary: str
    metric_keys: list[str]
    history_length: int
    log_line_count: int
    tags: list[str]
    group: str
    resumed_from: str
    """The run of the item's previous attempt that this one continues (its id), or ""."""
    resumed_from_url: str


def run_view(run: runs_pb2.Run) -> RunView:
    failed = run.state in (
        common_pb2.RUN_STATE_FAILED,
        common_pb2.RUN_STATE_CRASHED,
        common_pb2.RUN_STATE_KILLED,
    )
    exit_code = run.exit_code if run.HasField("exit_code") else None
    failure = ""
    if failed:
        failure = RUN_STATE_WORDS[run.state]
        if exit_code is not None:
            failure += f", exit code {exit_code}"
        if run.message:
            failure += f": {run.message}"
    return RunView(
        id=last_segment(run.name),
        url=run_url(run.name),
        display_name=run.display_name or last_segment(run.name),
        state=run_state(run.state),
        state_words=RUN_STATE_WORDS.get(run.state, ""),
        ended=run.state in ENDED_RUN_STATES,
        exit_code=exit_code,
        failure=failure,
        job_version=run.job_version,
        queue_item_url=ItemName.parse(run.queue_item).url if run.queue_item else "",
        attempt=run.attempt,
        create_time=when(run.create_time),
        end_time=when(run.end_time),
        config=pretty_json(struct_to_dict(run.config)),
        summary=pretty_json(struct_to_dict(run.summary)),
        metric_keys=[key for key in run.metric_keys if not key.startswith("_")],
        history_length=run.history_length,
        log_line_count=run.log_line_count,
        tags=list(run.tags),
        group=run.group,
        resumed_from=last_segment(run.resumed_from),
        resumed_from_url=run_url(run.resumed_from),
    )


def attempt_segment(run: runs_pb2.Run) -> dict[str, Any]:
    """Which attempt a chart segment is: its run and the label the legend shows."""
    label = f"attempt {run.attempt}" if run.attempt else f"run {last_segment(run.name)}"
    return {"run": last_segment(run.name), "url": run_url(run.name), "attempt": run.attempt, "label": label}


def metric_rows(rows: list[runs_pb2.MetricRow]) -> list[dict[str, Any]]:
    """Rows for a chart: numeric values only, non-finite ones as null (JSON has no NaN)."""
    return [
        {
            "index": row.index,
            "step": row.step,
            "values": {key: value if math.isfinite(value) else None for key, value in row.values.items()},
        }
        for row in rows
    ]


def log_lines(lines: list[runs_pb2.LogLine]) -> list[dict[str, Any]]:
    return [
        {
            "index": line.index,
            "stream": runs_pb2.LogStream.Name(line.stream).removeprefix("LOG_STREAM_").lower(),
            "text": line.text,
            "rank": line.rank if line.HasField("rank") else None,
        }
        for line in lines
    ]


def size_words(size_bytes: int) -> str:
    """A size for people: ``512 B``, ``1.5 KiB``, ``2.0 GiB`` (the exact count goes in a title)."""
    if size_bytes < 1024:
        return f"{size_bytes} B"
    size = size_bytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def artifact_url(name: str) -> str:
    """``projects/{p}/artifactCollections/{a}[/versions/{n}]`` -> its page (ids need no quoting)."""
    return "/" + name


@dataclass(frozen=True)
class ArtifactFileView:
    path: str
    size: str
    size_bytes: int
    sha256: str
    download_url: str


@dataclass(frozen=True)
class ArtifactVersionView:
    artifact: str
    """The artifact's id (``ckpt``)."""
    artifact_url: str
    version: int
    label: str
    """``ckpt:v3``, as a reference names it."""
    url: str
    type: str
    digest: str
    digest_short: str
    size: str
    size_bytes: int
    files: list[ArtifactFileView]
    aliases: list[str]
    metadata: str
    run: str
    run_url: str
    used_by: list[tuple[str, str]]
    """(run id, its page), most recent use first, at most 100."""
    use_count: int
    create_time: str


def artifact_version_view(version: artifacts_pb2.ArtifactVersion) -> ArtifactVersionView:
    collection = version.name.rpartition("/versions/")[0]
    artifact = last_segment(collection)
    url = artifact_url(version.name)
    return ArtifactVersionView(
        artifact=artifact,
        artifact_url=artifact_url(collection),
        version=version.version,
        label=f"{artifact}:v{version.version}",
        url=url,
        type=version.type,
        digest=version.digest,
        digest_short=version.digest[:12],
        size=size_words(version.size_bytes),
        size_bytes=version.size_bytes,
        files=[
            ArtifactFileView(
                path=file.path,
                size=size_words(file.size_bytes),
                size_bytes=file.size_bytes,
                sha256=file.sha256,
                download_url=f"{url}/files/{quote(file.path)}",
            )
            for file in version.files
        ],
        aliases=list(version.aliases),
        metadata=pretty_json(struct_to_dict(version.metadata)),
        run=last_segment(version.run),
        run_url=run_url(version.run),
        used_by=[(last_segment(run), run_url(run)) for run in version.used_by],
        use_count=version.use_count,
        create_time=when(version.create_time),
    )


@dataclass(frozen=True)
class ArtifactCollectionView:
    id: str
    url: str
    type: str
    version_count: int
    latest: int | None
    latest_url: str
    aliases: list[tuple[str, int, str]]
    """(alias, version number, the version's page), by alias."""
    update_time: str


def artifact_collection_view(collection: artifacts_pb2.ArtifactCollection) -> ArtifactCollectionView:
    def version_url(number: int) -> str:
        return artifact_url(f"{collection.name}/versions/{number}")

    latest = collection.aliases.get("latest")
    return ArtifactCollectionView(
        id=last_segment(collection.name),
        url=artifact_url(collection.name),
        type=collection.type,
        version_count=collection.version_count,
        latest=latest,
        latest_url=version_url(latest) if latest is not None else "",
        aliases=[(alias, n, version_url(n)) for alias, n in sorted(collection.aliases.items())],
        update_time=when(collection.update_time),
    )


def attachment(path: str) -> str:
    """A Content-Disposition that saves a file under its own name: an ASCII fallback, and the exact name
    (RFC 6266 ``filename*``) for browsers, all of which read it."""
    name = path.rpartition("/")[2]
    fallback = "".join(c if c.isascii() and (c.isalnum() or c in "._-+") else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
