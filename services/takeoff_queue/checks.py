"""Bounds on what clients and agents send the queue service (queue.proto documents each), and where
projects exist.

What is accepted must stay usable: every duration fits date arithmetic whatever the clock says, and every
queue and item fits the messages that carry it (Queue, Item, an agent's Assignment) far under gRPC's
default 4 MiB receive size and protobuf's recursion limit, so a client can list it and an agent can decode
its work, and every Agent fits ListAgents. Text holds no NUL character, which PostgreSQL cannot store: a
request with one is refused, an agent's report of what happened has it replaced (see agent_report).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sized
from datetime import timedelta
from typing import Any, Protocol

from takeoff_server.errors import InvalidArgument, NotFound
from takeoff_server.names import ResourcePattern
from takeoff_server.schemas import MAX_SCHEMA_DEPTH, check_json_schema
from takeoff_server.validation import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    Problems,
    check_struct,
    clip_utf8,
    text_problem,
)

MAX_DESCRIPTION_CHARS = 4096
MAX_VARIABLE_DESCRIPTION_CHARS = 1024
MAX_TEMPLATE_VARIABLES = 64
MAX_CONTAINER_NAME_CHARS = 63
_CONTAINER_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
MAX_RUN_DISPLAY_NAME_CHARS = 256
MAX_CANCEL_MESSAGE_CHARS = 1024
MAX_ENTRYPOINT_ARGS = 256
MAX_ENTRYPOINT_BYTES = 64 * 1024
MAX_RUN_CONFIG_JSON_BYTES = 96 * 1024
"""A run config reaches the job as JSON in TAKEOFF_CONFIG; Linux allows 128 KiB per environment string."""
MAX_RESOURCE_CONFIG_JSON_BYTES = 1024 * 1024
"""How large a filled resource config may grow before it is built (its Struct limit is checked after)."""

JOB = ResourcePattern("projects/{project}/jobs/{job}")
JOB_VERSION = ResourcePattern(
    "projects/{project}/jobs/{job}/versions/{version}", version=r"0|[1-9][0-9]{0,17}"
)

MAX_RETRY_DELAY = timedelta(days=7)
MAX_START_TIMEOUT = timedelta(days=7)
MAX_RUN_TIME = timedelta(days=365)


def check_text(value: str, *, field: str, max_chars: int, problems: Problems) -> None:
    if problem := text_problem(value, max_chars=max_chars):
        problems.add("ARGUMENT_INVALID", field, problem)


def check_duration(
    value: timedelta | None,
    *,
    field: str,
    at_most: timedelta,
    problems: Problems,
    zero_allowed: bool = False,
) -> None:
    """``value`` (None: unset) must lie in (0, at_most], or [0, at_most] when ``zero_allowed``."""
    if value is None:
        return
    lowest = "0" if zero_allowed else "more than 0"
    if value < timedelta(0) or (value == timedelta(0) and not zero_allowed) or value > at_most:
        problems.add(
            "ARGUMENT_INVALID",
            field,
            f"must be {lowest} and at most {_spoken(at_most)} (got {value.total_seconds():g} s)",
        )


def _spoken(span: timedelta) -> str:
    return f"{span.days} days" if span.days and not span.seconds else f"{span.total_seconds():g} s"


def check_config(
    value: Mapping[str, Any],
    *,
    field: str,
    problems: Problems,
    reason: str = "ARGUMENT_INVALID",
    max_depth: int = MAX_CONFIG_DEPTH,
) -> bool:
    """A Struct's value (a config, template values): size, depth, finite numbers. False: refused."""
    try:
        check_struct(value, field=field, max_bytes=MAX_CONFIG_BYTES, max_depth=max_depth)
    except InvalidArgument as error:
        for violation in error.violations:
            problems.add(reason, violation.field, violation.description)
        return False
    return True


def check_run_config(value: Mapping[str, Any], *, field: str, problems: Problems) -> bool:
    if not check_config(value, field=field, problems=problems):
        return False
    size = len(json.dumps(value))  # as the agent writes TAKEOFF_CONFIG
    if size > MAX_RUN_CONFIG_JSON_BYTES:
        problems.add(
            "ARGUMENT_INVALID",
            field,
            f"is {size} bytes as JSON; at most {MAX_RUN_CONFIG_JSON_BYTES} are allowed (the job gets it in "
            "an environment variable)",
        )
        return False
    return True


def check_template_variables(variables: Mapping[str, Mapping[str, Any]], problems: Problems) -> bool:
    """A queue's declarations as a whole: how many, their descriptions, their size together. False: the
    schemas are not worth looking at one by one."""
    for name, variable in variables.items():
        check_text(
            variable.get("description", ""),
            field=f"queue.template_variables[{name}].description",
            max_chars=MAX_VARIABLE_DESCRIPTION_CHARS,
            problems=problems,
        )
    if len(variables) > MAX_TEMPLATE_VARIABLES:
        problems.add(
            "ARGUMENT_INVALID",
            "queue.template_variables",
            f"at most {MAX_TEMPLATE_VARIABLES} variables (got {len(variables)})",
        )
        return False
    # Each schema's depth is check_json_schema's to limit; its place in the map adds two levels.
    return check_config(
        variables, field="queue.template_variables", problems=problems, max_depth=MAX_SCHEMA_DEPTH + 2
    )


def check_container_name(name: str, problems: Problems) -> None:
    if name and not _CONTAINER_NAME.fullmatch(name):
        problems.add(
            "ARGUMENT_INVALID",
            "queue.container_name",
            f"must be a Kubernetes container name: 1-{MAX_CONTAINER_NAME_CHARS} characters of a-z, 0-9 and "
            "'-', starting and ending with a letter or digit",
        )


def check_entrypoint(argv: Iterable[str], problems: Problems) -> None:
    argv = list(argv)
    if len(argv) > MAX_ENTRYPOINT_ARGS:
        problems.add("ARGUMENT_INVALID", "entrypoint", f"at most {MAX_ENTRYPOINT_ARGS} arguments")
    if sum(len(argument.encode()) for argument in argv) > MAX_ENTRYPOINT_BYTES:
        problems.add("ARGUMENT_INVALID", "entrypoint", f"at most {MAX_ENTRYPOINT_BYTES} bytes in all")
    for index, argument in enumerate(argv):
        if "\x00" in argument:
            problems.add("ARGUMENT_INVALID", f"entrypoint[{index}]", "must not contain NUL characters")


def check_stored_schema(schema: Mapping[str, Any], *, field: str, whose: str, problems: Problems) -> bool:
    """A schema stored before schemas were checked whole (a job version's, a queue's variable's) may
    still fail at validation: refuse the request that would use it, naming ``field`` (the request field
    that chose it) and ``whose`` schema it is. False: refused."""
    problem = _stored_schema_problem(json.dumps(schema, sort_keys=True))
    if problem is None:
        return True
    problems.add("SCHEMA_INVALID", field, f"{whose} cannot be used ({problem}); it needs to be replaced")
    return False


@functools.lru_cache(maxsize=256)
def _stored_schema_problem(schema_json: str) -> str | None:
    """Cached: Enqueue checks the same few schemas over and over."""
    try:
        check_json_schema(json.loads(schema_json), field="schema")
    except InvalidArgument as error:
        return error.message
    return None


def check_job_filter(job: str) -> None:
    """ListItems' ``job``: empty, a job name or a job version name (NAME_INVALID otherwise)."""
    if job and JOB.match(job) is None:
        JOB_VERSION.parse(job, field="job")


class ProjectLookup(Protocol):
    """Where else a project may have been written to: the registry, the system of record for jobs and runs."""

    async def project_written(self, project: str, *, field: str) -> bool:
        """Whether ``project`` (``projects/{p}``) was written to there. Raises DEPENDENCY_UNAVAILABLE when
        that cannot be told; ``field`` is the caller's request field that named the project."""
        ...


class Projects:
    """The projects written to (common.proto: a read in a project never written to is PROJECT_NOT_FOUND).

    Through the queue service, CreateQueue is the first write into a project: the store records the project
    in the queue's transaction and keeps it when its queues are deleted, and the service is seeded from that
    record at start. A project may also have been written to through the registry only (a job, a run), so
    the registry is asked about any other project before it is called not found; a yes is kept (a project
    never stops existing), a no is not (the project may be written to there at any moment)."""

    def __init__(self, elsewhere: ProjectLookup) -> None:
        self._known: set[str] = set()
        self._elsewhere = elsewhere

    def written(self, *projects: str) -> None:
        self._known.update(projects)

    async def check(self, project: str, *, field: str) -> None:
        """NOT_FOUND ``PROJECT_NOT_FOUND`` unless ``project`` (``projects/{p}``) was written to."""
        if project in self._known:
            return
        if not await self._elsewhere.project_written(project, field=field):
            raise NotFound(
                "PROJECT_NOT_FOUND",
                f"project {project} was never written to: it holds no queue, job or run",
                metadata={"resource": project},
            )
        self._known.add(project)


# What an agent sends on the Lease stream (queue.proto documents each bound).
MAX_SESSION_ID_CHARS = 128
MAX_AGENT_DISPLAY_NAME_CHARS = 256
MAX_AGENT_VERSION_CHARS = 128
MAX_AGENT_LABELS = 64
MAX_LABEL_KEY_CHARS = 128
MAX_LABEL_VALUE_CHARS = 256
MAX_AGENT_QUEUES = 256
MAX_AGENT_RESOURCES = 16
MAX_AGENT_CAPACITY = 4096
"""Also the most held leases a Hello may name: an agent never held more than its capacity. An Agent
message lists one AgentLease (at most about 350 bytes) per lease: with every Hello field at its bound too,
an Agent is at most about 1.5 MiB."""
MAX_LEASE_ID_CHARS = 128
MAX_HELD_ITEM_CHARS = 1024

MAX_PROGRESS_DETAIL_BYTES = 1024
MAX_OUTCOME_MESSAGE_BYTES = 4096
"""Complete.message and Release.message. Each attempt adds at most three Progress details and one
outcome to an item's history, so the 501 transitions of an item of MAX_ATTEMPTS_LIMIT (100) attempts
take at most about 0.85 MiB: with every other input at its limit, an Item or Assignment stays far under
4 MiB."""


def agent_report(text: str, *, max_bytes: int) -> str:
    """An agent's account of what happened (a Progress detail, the message of a Complete or Release) as
    the item's history keeps it: at most ``max_bytes`` of UTF-8, the end kept (a failure message is a log
    tail and its last lines matter most), NUL characters replaced by U+FFFD. Unlike a client's request,
    the report is not refused: refusing a Complete or Release would strand the item on a lease whose
    work has ended, for a detail that only a person reads."""
    return clip_utf8(text.replace("\x00", "\ufffd"), max_bytes, marker="…", keep_end=True)


def check_count(values: Sized, *, field: str, at_most: int, problems: Problems) -> bool:
    """False: over the limit (the entries are not worth looking at one by one)."""
    if len(values) > at_most:
        problems.add("ARGUMENT_INVALID", field, f"at most {at_most} entries (got {len(values)})")
        return False
    return True


def check_labels(labels: Mapping[str, str], *, field: str, problems: Problems) -> None:
    if not check_count(labels, field=field, at_most=MAX_AGENT_LABELS, problems=problems):
        return
    for key, value in labels.items():
        if not key:
            problems.add("ARGUMENT_INVALID", field, "a label key must not be empty")
        check_text(key, field=f"{field} key", max_chars=MAX_LABEL_KEY_CHARS, problems=problems)
        check_text(value, field=f"{field}[{key[:64]!r}]", max_chars=MAX_LABEL_VALUE_CHARS, problems=problems)


def check_capacity(capacity: int, *, field: str, problems: Problems) -> None:
    if not 0 <= capacity <= MAX_AGENT_CAPACITY:
        problems.add("ARGUMENT_INVALID", field, f"must be 0..{MAX_AGENT_CAPACITY} (got {capacity})")
