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
from collections.abc import Iterable, Mapping, Sequence, Sized
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from takeoff_server.errors import FieldViolation, InvalidArgument, NotFound
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
ITEM_ID_DIGITS = 20
"""An item id is this many lowercase hex digits, new for every item (Enqueue, RelaunchItem)."""
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


_ITEM_ID_PREFIX = re.compile(f"[0-9a-f]{{1,{ITEM_ID_DIGITS}}}")


def check_id_prefix(prefix: str) -> None:
    """ListItems' ``id_prefix``: empty, or the start of an item id (ARGUMENT_INVALID otherwise)."""
    if prefix and _ITEM_ID_PREFIX.fullmatch(prefix) is None:
        raise InvalidArgument(
            "ARGUMENT_INVALID",
            f"id_prefix {prefix[:100]!r} is not the start of an item id",
            violations=[
                FieldViolation(
                    "id_prefix", f"1-{ITEM_ID_DIGITS} characters of 0-9 and a-f (item ids are hex)"
                )
            ],
        )


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


# What a job may see (docs/design.md §13, §16).
RESERVED_ENV_RULE = "TAKEOFF_*, LD_PRELOAD and PYTHONPATH"
_RESERVED_ENV = frozenset({"LD_PRELOAD", "PYTHONPATH"})


def reserved_env_name(name: str) -> bool:
    """Whether no config or secret mount may set the variable ``name``: ``TAKEOFF_*`` are the agent's (a
    job that could set ``TAKEOFF_TOKEN`` or ``TAKEOFF_RUN_ID`` could pass for another run), and
    ``LD_PRELOAD`` and ``PYTHONPATH`` would load code into the programs that start the job."""
    return name.startswith("TAKEOFF_") or name in _RESERVED_ENV


def reserved_env_problem(name: str) -> str:
    return (
        f"{name[:128]!r} may not be set: {RESERVED_ENV_RULE} are reserved (the agent sets them, or they "
        "load code)"
    )


_CODE_LOADING_PREFIXES = ("LD_", "DYLD_", "PYTHON", "BASH_FUNC_", "GIT_", "PIP_")
_CODE_LOADING = frozenset(
    {
        "BASH_ENV",
        "ENV",
        "PS4",
        "SHELLOPTS",
        "BASHOPTS",
        "IFS",
        "PATH",
        "NODE_OPTIONS",
        "NODE_PATH",
        "PERL5OPT",
        "PERL5LIB",
        "PERLLIB",
        "RUBYOPT",
        "RUBYLIB",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "CLASSPATH",
        "GCONV_PATH",
    }
)


def code_loading_env_name(name: str) -> bool:
    """Whether the variable ``name`` can make a fixed entrypoint load other code or run another program
    (``LD_*``, ``PYTHON*``, ``BASH_ENV``, ``NODE_OPTIONS``, ``PATH``, ...): on a secure queue an item's
    secret mount may not be given such a name (the secret's value would choose the code)."""
    return name.startswith(_CODE_LOADING_PREFIXES) or name in _CODE_LOADING


# Secret mounts (queue.proto SecretMount).
MAX_SECRET_MOUNTS = 32
SECRET_ID_PATTERN = r"[A-Za-z][A-Za-z0-9_-]{0,62}"
SECRET = ResourcePattern("projects/{project}/secrets/{secret}", secret=SECRET_ID_PATTERN)
_SECRET_ID = re.compile(SECRET_ID_PATTERN)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")


class MountLike(Protocol):
    """A secret mount as the proto, or the queue's model, holds it."""

    @property
    def secret(self) -> str: ...
    @property
    def env(self) -> str: ...
    @property
    def file(self) -> str: ...


Mount = TypeVar("Mount", bound=MountLike)


def secret_name(secret: str, project: str) -> str:
    """``secret`` as a full name: a short id is resolved in ``project`` (``projects/{p}``); a full name is
    returned as it is. ValueError when ``secret`` is neither."""
    if SECRET.match(secret) is not None:
        return secret
    if _SECRET_ID.fullmatch(secret) is None:
        raise ValueError(f"{secret!r} is not a secret name or id")
    return f"{project}/secrets/{secret}"


def check_secret_mounts(
    mounts: Sequence[MountLike], *, project: str, field: str, problems: Problems
) -> list[str]:
    """A queue's (``field`` ``queue.secrets``) or an item's (``secrets``) mounts: at most 32; each names a
    secret of ``project`` (``projects/{p}``, the queue's: run tokens are per project), by full name or id;
    exactly one of ``env`` and ``file``, each a valid, unreserved name used by no other mount of the list.

    Returns each mount's full secret name, in order ("" where the name was refused)."""
    if not check_count(mounts, field=field, at_most=MAX_SECRET_MOUNTS, problems=problems):
        return ["" for _ in mounts]
    names: list[str] = []
    envs: dict[str, int] = {}
    files: dict[str, int] = {}
    for index, mount in enumerate(mounts):
        where = f"{field}[{index}]"
        names.append(
            _checked_secret(mount.secret, project=project, field=f"{where}.secret", problems=problems)
        )
        if bool(mount.env) == bool(mount.file):
            problems.add(
                "ARGUMENT_INVALID",
                where,
                "set exactly one of env (an environment variable) and file (a file in the secrets directory)",
            )
        if mount.env:
            if problem := _env_name_problem(mount.env):
                problems.add("ARGUMENT_INVALID", f"{where}.env", problem)
            elif mount.env in envs:
                problems.add(
                    "ARGUMENT_INVALID",
                    f"{where}.env",
                    f"{mount.env} is already given by {field}[{envs[mount.env]}]",
                )
            else:
                envs[mount.env] = index
        if mount.file:
            if problem := _file_name_problem(mount.file):
                problems.add("ARGUMENT_INVALID", f"{where}.file", problem)
            elif mount.file in files:
                problems.add(
                    "ARGUMENT_INVALID",
                    f"{where}.file",
                    f"{mount.file!r} is already given by {field}[{files[mount.file]}]",
                )
            else:
                files[mount.file] = index
    return names


def _checked_secret(secret: str, *, project: str, field: str, problems: Problems) -> str:
    if not secret:
        problems.add("NAME_INVALID", field, "required: projects/{project}/secrets/{secret} or a secret id")
        return ""
    try:
        name = secret_name(secret, project)
    except ValueError:
        problems.add(
            "NAME_INVALID",
            field,
            f"{secret[:300]!r} is neither projects/{{project}}/secrets/{{secret}} nor a secret id "
            "(1-63 of A-Z, a-z, 0-9, '_' and '-', starting with a letter)",
        )
        return ""
    if not name.startswith(f"{project}/"):
        problems.add(
            "ARGUMENT_INVALID",
            field,
            f"{name} is not a secret of {project}: a queue's jobs receive only their own project's secrets",
        )
        return ""
    return name


def _env_name_problem(name: str) -> str | None:
    if not _ENV_NAME.fullmatch(name):
        return (
            f"{name[:200]!r} is not a variable name: 1-128 of A-Z, a-z, 0-9 and '_', not starting with "
            "a digit"
        )
    if reserved_env_name(name):
        return reserved_env_problem(name)
    return None


def _file_name_problem(name: str) -> str | None:
    if not _FILE_NAME.fullmatch(name) or name == "." or ".." in name:
        return (
            f"{name[:300]!r} is not a file name: 1-255 of A-Z, a-z, 0-9, '.', '_' and '-', one path "
            "component, not '.' and without '..'"
        )
    return None


def check_item_secrets(
    mounts: Sequence[MountLike],
    *,
    project: str,
    queue_mounts: Sequence[MountLike],
    secure: bool,
    queue: str,
    problems: Problems,
) -> list[str]:
    """An Enqueue's ``secrets``: :func:`check_secret_mounts`, and on a ``secure`` queue (``queue``, its
    name) an item's mount may neither replace one of the queue's (same ``env`` or ``file``) nor give a
    variable that loads code (:func:`code_loading_env_name`): ``SECURE_QUEUE_OVERRIDE``."""
    names = check_secret_mounts(mounts, project=project, field="secrets", problems=problems)
    if not secure or len(mounts) > MAX_SECRET_MOUNTS:
        return names
    queue_envs = {mount.env for mount in queue_mounts if mount.env}
    queue_files = {mount.file for mount in queue_mounts if mount.file}
    for index, mount in enumerate(mounts):
        where = f"secrets[{index}]"
        if mount.env in queue_envs:
            problems.add(
                "SECURE_QUEUE_OVERRIDE",
                f"{where}.env",
                f"the queue gives {mount.env} itself; {_SECURE.format(queue=queue)}",
            )
        elif mount.env and code_loading_env_name(mount.env) and _env_name_problem(mount.env) is None:
            problems.add(
                "SECURE_QUEUE_OVERRIDE",
                f"{where}.env",
                f"{mount.env[:128]} can make the job load other code; {_SECURE.format(queue=queue)}",
            )
        if mount.file in queue_files:
            problems.add(
                "SECURE_QUEUE_OVERRIDE",
                f"{where}.file",
                f"the queue gives the file {mount.file!r} itself; {_SECURE.format(queue=queue)}",
            )
    return names


_SECURE = "{queue} is a secure queue, where only the queue's own settings may do that"


def check_secure_entrypoint(
    entrypoint: Sequence[str], *, secure: bool, queue: str, problems: Problems
) -> None:
    """On a ``secure`` queue an item runs its job version's entrypoint: an override is
    ``SECURE_QUEUE_OVERRIDE``."""
    if secure and entrypoint:
        problems.add(
            "SECURE_QUEUE_OVERRIDE",
            "entrypoint",
            f"an item may not replace its job's entrypoint; {_SECURE.format(queue=queue)}",
        )


def merge_secret_mounts(queue_mounts: Sequence[Mount], item_mounts: Sequence[Mount]) -> list[Mount]:
    """What an attempt receives (Assignment.secrets): the queue's mounts, less those an item mount
    replaces (the same ``env``, or the same ``file``), then the item's, in order."""
    envs = {mount.env for mount in item_mounts if mount.env}
    files = {mount.file for mount in item_mounts if mount.file}
    kept = [
        mount
        for mount in queue_mounts
        if not (mount.env and mount.env in envs) and not (mount.file and mount.file in files)
    ]
    return [*kept, *item_mounts]
