"""A queue's resource config: template variables, deep merge with an item's override, and the checks per
resource kind (docs/design.md §7): the shapes each runner reads, host paths (a queue's
``allow_host_paths``), reserved environment variables, and what a secure queue's items may not override
(docs/design.md §13).

Merge rules: dicts merge key by key; lists are replaced, except the Kubernetes lists ``containers``,
``env``, ``volumes`` and ``volumeMounts``, whose entries merge by ``name``. A ``{{var}}`` that is a whole
string takes the variable's typed value (``"{{cpu}}"`` -> ``4``); inside a longer string it is formatted
as text.
"""

from __future__ import annotations

import copy
import enum
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from takeoff_queue.checks import check_config, reserved_env_name, reserved_env_problem
from takeoff_server.errors import FieldViolation, InvalidArgument
from takeoff_server.resource_configs import (
    CONTAINER_OPTIONS,
    PROCESS_OPTIONS,
    RAY_OPTIONS,
    SBATCH_EXTRA_OPTIONS,
    SLURM_OPTIONS,
    deep_merge,
)
from takeoff_server.schemas import check_json_schema, schema_validator
from takeoff_server.validation import Problems

JsonObject = dict[str, Any]

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z][A-Za-z0-9_]{0,62})\s*\}\}")
_VARIABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


class ResourceKind(enum.Enum):
    LOCAL_PROCESS = "local-process"
    LOCAL_CONTAINER = "local-container"
    KUBERNETES = "kubernetes"
    SLURM = "slurm"
    RAY = "ray"


def placeholders(config: Any) -> set[str]:
    """Every ``{{name}}`` used anywhere in ``config``."""
    return {match.group(1) for text in _strings(config) for match in _PLACEHOLDER.finditer(text)}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def fill(config: Any, values: Mapping[str, Any]) -> Any:
    """Replace placeholders: a whole-string ``{{v}}`` by the typed value, an embedded one by its text.

    A placeholder without a value stays as it is (the checks report undeclared ones).
    """
    if isinstance(config, str):
        whole = _PLACEHOLDER.fullmatch(config.strip())
        if whole and whole.group(1) in values:
            return copy.deepcopy(values[whole.group(1)])
        return _PLACEHOLDER.sub(
            lambda m: _as_text(values[m.group(1)]) if m.group(1) in values else m.group(0), config
        )
    if isinstance(config, dict):
        return {fill(key, values): fill(item, values) for key, item in config.items()}
    if isinstance(config, list):
        return [fill(item, values) for item in config]
    return config


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def is_placeholder(value: Any) -> bool:
    """Whether ``value`` is a whole ``{{var}}`` string, which Enqueue replaces by the typed value."""
    return isinstance(value, str) and _PLACEHOLDER.fullmatch(value.strip()) is not None


def check_variable_declarations(variables: Mapping[str, JsonObject], config: Any, problems: Problems) -> None:
    """A queue's declarations: valid names, complete schemas (with a ``type``) whose defaults validate, and
    no undeclared placeholder."""
    for name, schema in variables.items():
        where = f"queue.template_variables[{name}]"
        if not _VARIABLE_NAME.match(name):
            problems.add(
                "TEMPLATE_VARIABLE_INVALID", where, "names are 1-63 of [A-Za-z0-9_], starting with a letter"
            )
            continue
        if "type" not in schema:
            problems.add("SCHEMA_INVALID", f"{where}.schema", "the schema must say the value's `type`")
            continue
        try:
            check_json_schema(schema, field=f"{where}.schema")
        except InvalidArgument as error:
            for violation in error.violations:
                problems.add(error.reason, violation.field, violation.description)
            continue
        if "default" in schema:
            for problem in _violations(schema, schema["default"], f"{where}.schema.default"):
                problems.add("TEMPLATE_VARIABLE_INVALID", problem.field, problem.description)
    for name in sorted(placeholders(config) - set(variables)):
        problems.add(
            "TEMPLATE_VARIABLE_INVALID",
            "queue.resource_config",
            f"uses {{{{{name}}}}}, which is not a declared template variable",
        )


def resolve_variables(
    declared: Mapping[str, JsonObject], given: Mapping[str, Any]
) -> tuple[JsonObject, list[FieldViolation]]:
    """Every declared variable's value (given, else its default), and the problems with what was given."""
    values: JsonObject = {}
    problems = [
        FieldViolation(f"template_variables.{name}", "not a template variable of this queue")
        for name in sorted(set(given) - set(declared))
    ]
    for name, schema in sorted(declared.items()):
        where = f"template_variables.{name}"
        if name in given:
            value = given[name]
        elif "default" in schema:
            value = schema["default"]
        else:
            problems.append(FieldViolation(where, "required: this variable has no default"))
            continue
        found = _violations(schema, value, where)
        problems.extend(found)
        if not found:
            values[name] = value
    return values, problems


def _field(where: str, path: Iterable[str | int]) -> str:
    """``where`` followed by a JSON path: ``.key`` for object members, ``[i]`` for list entries."""
    return where + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)


def _violations(schema: JsonObject, value: Any, where: str) -> list[FieldViolation]:
    validator = schema_validator(schema)
    return [
        FieldViolation(_field(where, error.absolute_path), error.message)
        for error in sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
    ]


_PLAIN_VALUE = {"type": ["string", "number", "boolean"], "pattern": "^[^\\x00]*$", "maxLength": 65536}
_ENVIRONMENT = {
    "type": "object",
    "propertyNames": {"pattern": "^[^=\\x00]+$"},
    "additionalProperties": _PLAIN_VALUE,
}
_NAMED_ENTRIES = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1}},
    },
}
_OBJECT_META = {
    "type": "object",
    "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_CONTAINER = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": _NAMED_ENTRIES,
        "volumeMounts": _NAMED_ENTRIES,
        "resources": {"type": "object"},
    },
}
_SIZE = {"type": ["string", "integer"], "minimum": 0}
_VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]+$")
"""Docker's rule for a volume's name. A source that is not one (``/srv``, ``./data``, ``~/x``) is a host
path: a job would reach the agent's host, so only a queue with ``allow_host_paths`` may mount one, and
only as an absolute path."""

MAX_NODES = 256
_NODES = {"type": "integer", "minimum": 1, "maximum": MAX_NODES}
_SLURM_TEXT = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[^\\s]+$"}
"""A word sbatch takes as an option's value: no white space (the runner passes it as one argument)."""
_COUNT = {"type": "integer", "minimum": 1, "maximum": 1_000_000}
_SLURM_TIME = "^([0-9]+-)?[0-9]+(:[0-9]{1,2}){0,2}$"
_AMOUNT = {"type": "number", "minimum": 0}

# What each runner can take, as JSON Schemas of the shapes it reads. The option allow-lists are checked
# apart, to name each refused option as its own field.
SHAPES: dict[ResourceKind, JsonObject] = {
    ResourceKind.LOCAL_PROCESS: {"type": "object", "properties": {"env": _ENVIRONMENT, "nodes": _NODES}},
    ResourceKind.SLURM: {
        "type": "object",
        "properties": {
            "partition": _SLURM_TEXT,
            "nodes": _NODES,
            "ntasks_per_node": {"type": "integer", "minimum": 1, "maximum": 1024},
            "gpus_per_node": {"anyOf": [{"type": "integer", "minimum": 0}, _SLURM_TEXT]},
            "cpus_per_task": {"type": "integer", "minimum": 1, "maximum": 100_000},
            # sbatch's own spellings: megabytes as a number, or "16G"; minutes, or "[D-]HH:MM:SS"
            "mem": {"anyOf": [_COUNT, {"type": "string", "pattern": "^[0-9]+[KMGT]?$"}]},
            "time": {"anyOf": [_COUNT, {"type": "string", "pattern": _SLURM_TIME}]},
            "account": _SLURM_TEXT,
            "qos": _SLURM_TEXT,
            "constraint": {"type": "string", "minLength": 1, "maxLength": 1024},
            "sbatch": {
                "type": "object",
                "propertyNames": {"enum": sorted(SBATCH_EXTRA_OPTIONS)},
                "additionalProperties": {"anyOf": [{"type": ["integer", "boolean"]}, _SLURM_TEXT]},
            },
            "env": _ENVIRONMENT,
        },
    },
    ResourceKind.RAY: {
        "type": "object",
        "properties": {
            "entrypoint_num_cpus": {"type": "number", "minimum": 0},
            "entrypoint_num_gpus": {"type": "number", "minimum": 0},
            "entrypoint_memory": {"type": "integer", "minimum": 0},
            "entrypoint_resources": {"type": "object", "additionalProperties": _AMOUNT},
            "env": _ENVIRONMENT,
        },
    },
    ResourceKind.LOCAL_CONTAINER: {
        "type": "object",
        "properties": {
            "nodes": _NODES,
            "gpus": {"type": ["integer", "string", "array"], "items": {"type": "string"}},
            "cpus": {"type": ["number", "string"]},
            "mem_limit": _SIZE,
            "memswap_limit": {"type": ["string", "integer"]},
            "shm_size": _SIZE,
            "env": _ENVIRONMENT,
            # As the docker SDK takes them: {source: {"bind": target, "mode": m}} or ["source:target[:mode]"]
            "volumes": {
                "type": ["object", "array"],
                "items": {"type": "string", "pattern": "^[^:]+:[^:]+(:[^:]+)?$"},
                "additionalProperties": {
                    "type": "object",
                    "required": ["bind"],
                    "properties": {"bind": {"type": "string"}, "mode": {"type": "string"}},
                },
            },
            "user": {"type": ["string", "integer"]},
            "ipc_mode": {"type": "string"},
            "ulimits": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "soft": {"type": "integer"},
                        "hard": {"type": "integer"},
                    },
                },
            },
        },
    },
    ResourceKind.KUBERNETES: {
        "type": "object",
        "properties": {
            "nodes": _NODES,
            "apiVersion": {"const": "batch/v1"},
            "kind": {"const": "Job"},
            "metadata": _OBJECT_META,
            "spec": {
                "type": "object",
                "properties": {
                    "template": {
                        "type": "object",
                        "properties": {
                            "metadata": _OBJECT_META,
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "containers": {"type": "array", "items": _CONTAINER},
                                    "initContainers": {"type": "array", "items": _CONTAINER},
                                    "volumes": _NAMED_ENTRIES,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
_SHAPE_VALIDATORS = {kind: schema_validator(shape) for kind, shape in SHAPES.items()}
_OPTIONS = {
    ResourceKind.LOCAL_PROCESS: PROCESS_OPTIONS,
    ResourceKind.LOCAL_CONTAINER: CONTAINER_OPTIONS,
    ResourceKind.SLURM: SLURM_OPTIONS,
    ResourceKind.RAY: RAY_OPTIONS,
}


def check_for_resource(
    kind: ResourceKind, config: Any, where: str, *, unfilled: bool = False, allow_host_paths: bool = False
) -> list[FieldViolation]:
    """Whether the runner for ``kind`` can take ``config``: known options only, each of the shape the
    runner reads; no environment variable of ``RESERVED_ENV_RULE`` (``env`` of every kind, the ``env`` of
    Kubernetes containers and init containers); host paths (local-container ``volumes`` sources, Kubernetes
    ``hostPath`` volumes) only with ``allow_host_paths``. With ``unfilled`` (a queue's default, before
    Enqueue fills it), a whole ``{{var}}`` stands for a value of any shape: its variable's schema is checked
    at each Enqueue, the filled config again."""
    problems = []
    if kind is not ResourceKind.KUBERNETES and isinstance(config, dict):
        allowed = _OPTIONS[kind]
        problems += [
            FieldViolation(
                f"{where}.{key}",
                f"not an option of {kind.value} queues (allowed: {', '.join(sorted(allowed))})",
            )
            for key in sorted(set(config) - allowed, key=str)
        ]
    for error in sorted(
        _SHAPE_VALIDATORS[kind].iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]
    ):
        if unfilled and is_placeholder(error.instance):
            continue
        problems.append(FieldViolation(_field(where, error.absolute_path), error.message))
    if not isinstance(config, dict):
        return problems
    if kind is ResourceKind.KUBERNETES:
        pod = _pod_spec(config)
        for list_name in ("containers", "initContainers"):
            for index, container in _entries(pod.get(list_name)):
                problems += _reserved_named_env(
                    container.get("env"), f"{where}{_POD}.{list_name}[{index}].env"
                )
        if not allow_host_paths:
            problems += _host_path_pod_volumes(pod.get("volumes"), f"{where}{_POD}.volumes")
    else:
        problems += _reserved_env(config.get("env"), f"{where}.env")
    if kind is ResourceKind.LOCAL_CONTAINER:
        problems += _host_path_volumes(
            config.get("volumes"), f"{where}.volumes", unfilled=unfilled, allowed=allow_host_paths
        )
    return problems


_POD = ".spec.template.spec"


def _pod_spec(job: JsonObject) -> JsonObject:
    """A Job manifest's pod spec, or {} where the manifest has none of the right shape."""
    spec = job.get("spec")
    template = spec.get("template") if isinstance(spec, dict) else None
    pod = template.get("spec") if isinstance(template, dict) else None
    return pod if isinstance(pod, dict) else {}


def _entries(value: Any) -> Iterator[tuple[int, JsonObject]]:
    """The objects of a list (a shape problem elsewhere is reported by the shape check)."""
    if isinstance(value, list):
        yield from ((index, entry) for index, entry in enumerate(value) if isinstance(entry, dict))


def _reserved_env(env: Any, where: str) -> list[FieldViolation]:
    if not isinstance(env, dict):
        return []
    return [
        FieldViolation(_field(where, [name]), reserved_env_problem(name))
        for name in env
        if isinstance(name, str) and reserved_env_name(name)
    ]


def _reserved_named_env(env: Any, where: str) -> list[FieldViolation]:
    return [
        FieldViolation(f"{where}[{index}].name", reserved_env_problem(entry["name"]))
        for index, entry in _entries(env)
        if isinstance(entry.get("name"), str) and reserved_env_name(entry["name"])
    ]


def _host_path_pod_volumes(volumes: Any, where: str) -> list[FieldViolation]:
    return [
        FieldViolation(
            f"{where}[{index}].hostPath",
            f"volume {str(volume.get('name'))[:200]!r} mounts a host path: host paths are refused on this "
            "queue (allow_host_paths is off)",
        )
        for index, volume in _entries(volumes)
        if "hostPath" in volume
    ]


def _host_path_volumes(volumes: Any, where: str, *, unfilled: bool, allowed: bool) -> list[FieldViolation]:
    """Each volume whose source is not a named volume (with ``allowed``: nor an absolute host path).
    With ``unfilled``, a source holding a ``{{var}}`` waits for Enqueue, which checks it filled."""
    problems = []
    for source, field in _volume_sources(volumes, where):
        if _VOLUME_NAME.match(source) or (unfilled and placeholders(source)):
            continue
        if not allowed:
            problems.append(
                FieldViolation(
                    field,
                    f"{source[:200]!r} is not a named volume ([A-Za-z0-9][A-Za-z0-9_.-]+): host paths are "
                    "refused on this queue (allow_host_paths is off)",
                )
            )
        elif not source.startswith("/"):
            problems.append(
                FieldViolation(
                    field, f"{source[:200]!r} is neither a named volume nor an absolute path on the host"
                )
            )
    return problems


def _volume_sources(volumes: Any, where: str) -> list[tuple[str, str]]:
    """(source, field) of each local-container volume, in either form the docker SDK takes."""
    if isinstance(volumes, dict):
        return [(source, _field(where, [source])) for source in volumes if isinstance(source, str)]
    if isinstance(volumes, list):
        return [
            (entry.split(":", 1)[0], _field(where, [index]))
            for index, entry in enumerate(volumes)
            if isinstance(entry, str)
        ]
    return []


def filled_size(config: Any, values: Mapping[str, Any]) -> int:
    """An upper bound on the size of ``fill(config, values)`` as JSON, found without filling it: a config
    that uses a large value many times must be refused before it is built."""
    size = len(json.dumps(config))
    for text in _strings(config):
        for match in _PLACEHOLDER.finditer(text):
            if match.group(1) in values:
                size += len(json.dumps(values[match.group(1)]))
    return size


def effective_config(
    kind: ResourceKind,
    queue_default: JsonObject,
    override: JsonObject,
    declared: Mapping[str, JsonObject],
    given_values: Mapping[str, Any],
    *,
    max_json_bytes: int,
    allow_host_paths: bool = False,
) -> tuple[JsonObject, JsonObject, list[FieldViolation]]:
    """The config the runner gets for one item, the variable values used, and every problem found.

    The queue's schemas must be complete (``check_json_schema``); the filled config may be at most
    ``max_json_bytes`` as JSON; host paths only with ``allow_host_paths`` (the queue's).
    """
    values, problems = resolve_variables(declared, given_values)
    for name in sorted(placeholders(override) - set(declared)):
        problems.append(
            FieldViolation("resource_config", f"uses {{{{{name}}}}}, which the queue does not declare")
        )
    if problems:
        return {}, values, problems
    merged = deep_merge(queue_default, override, by_name=kind is ResourceKind.KUBERNETES)
    if filled_size(merged, values) > max_json_bytes:
        problem = f"filled with its template variables, it would exceed {max_json_bytes} bytes as JSON"
        return {}, values, [FieldViolation("resource_config", problem)]
    merged = fill(merged, values)
    return (
        merged,
        values,
        check_for_resource(kind, merged, "resource_config", allow_host_paths=allow_host_paths),
    )


def item_resource_config(
    kind: ResourceKind,
    *,
    queue_config: JsonObject,
    variable_schemas: Mapping[str, JsonObject],
    override: JsonObject,
    template_variables: Mapping[str, Any],
    secure: bool,
    allow_host_paths: bool,
    queue: str,
    max_json_bytes: int,
    problems: Problems,
) -> tuple[JsonObject, JsonObject]:
    """An Enqueue's resource config: :func:`effective_config` (``TEMPLATE_VARIABLE_INVALID``,
    ``RESOURCE_CONFIG_INVALID``), on a ``secure`` queue :func:`secure_override_violations` of the item's
    ``override`` filled with its values (``SECURE_QUEUE_OVERRIDE``, named first; a field it names is not
    named again), and the filled config's size as a Struct. Returns the filled config and the variable
    values ({} and {} when refused)."""
    merged, values, issues = effective_config(
        kind,
        queue_config,
        override,
        variable_schemas,
        template_variables,
        max_json_bytes=max_json_bytes,
        allow_host_paths=allow_host_paths,
    )
    named: set[str] = set()
    if secure:
        # The item's own values fill its override; a value blown up past the limit is refused anyway
        # (the merged config holds every use of it), so the override is then looked at unfilled.
        filled = fill(override, values) if filled_size(override, values) <= max_json_bytes else override
        for violation in secure_override_violations(
            kind, filled, queue=queue, allow_host_paths=allow_host_paths
        ):
            problems.add("SECURE_QUEUE_OVERRIDE", violation.field, violation.description)
            named.add(violation.field)
    for issue in issues:
        if issue.field in named:
            continue
        by_variable = issue.field.startswith("template_variables")
        reason = "TEMPLATE_VARIABLE_INVALID" if by_variable else "RESOURCE_CONFIG_INVALID"
        problems.add(reason, issue.field, issue.description)
    if issues or named:
        return {}, {}
    if not check_config(merged, field="resource_config", problems=problems, reason="RESOURCE_CONFIG_INVALID"):
        return {}, {}
    return merged, values


# What a secure queue's items may set (docs/design.md §13): every other option of an item's override is
# refused by name, so an option a runner learns later is refused until it is judged.
_SECURE = "{queue} is a secure queue: only the queue's own resource config may set this"

SECURE_CONTAINER_OPTIONS = frozenset(
    {"gpus", "cpus", "mem_limit", "memswap_limit", "shm_size", "ulimits", "ipc_mode", "nodes"}
)
"""The local-container options a secure queue's items may set (``ipc_mode`` only ``private``,
``shareable`` or ``none``)."""
_SECURE_IPC_MODES = frozenset({"private", "shareable", "none"})
_DOCKER_WHY = {
    "privileged": "runs the container with every capability and device of the host",
    "network_mode": "chooses the container's network (host: the host's own)",
    "network": "chooses the container's network",
    "pid_mode": "shares a process namespace (host: every process of the host)",
    "ipc_mode": "shares an IPC namespace (host: the host's)",
    "uts_mode": "shares the host's UTS namespace",
    "userns_mode": "leaves the engine's user namespace (host: root is the host's root)",
    "cgroupns": "shares the host's cgroup namespace",
    "cgroup_parent": "moves the container to another cgroup",
    "cap_add": "adds capabilities",
    "devices": "gives the container host devices",
    "device_requests": "gives the container host devices",
    "device_cgroup_rules": "allows host devices",
    "security_opt": "changes seccomp, AppArmor or SELinux confinement",
    "sysctls": "changes kernel parameters",
    "volumes_from": "mounts another container's volumes",
    "mounts": "mounts volumes or host paths",
    "runtime": "chooses the container runtime",
    "user": "chooses whom the job runs as (a name may be root in the image)",
    "group_add": "adds groups",
    "volumes": "mounts a volume (a named volume is shared with every container of the engine)",
    "env": "sets environment variables",
}
SECURE_POD_FIELDS = frozenset(
    {"containers", "volumes", "nodeSelector", "affinity", "topologySpreadConstraints"}
)
"""The pod spec fields a secure queue's items may set (containers and volumes entry by entry)."""
SECURE_CONTAINER_FIELDS = frozenset({"name", "resources", "imagePullPolicy"})
"""The fields of a Kubernetes container a secure queue's items may set."""
SECURE_VOLUME_SOURCES = frozenset(
    {"emptyDir", "ephemeral", "persistentVolumeClaim", "configMap", "downwardAPI"}
)
"""The Kubernetes volume sources a secure queue's items may add."""
_POD_WHY = {
    "hostNetwork": "puts the pod on the node's network",
    "hostPID": "shares the node's process namespace",
    "hostIPC": "shares the node's IPC namespace",
    "hostUsers": "runs in the node's user namespace",
    "shareProcessNamespace": "shares a process namespace between containers",
    "serviceAccountName": "runs the pod as another service account (its API credentials)",
    "serviceAccount": "runs the pod as another service account (its API credentials)",
    "automountServiceAccountToken": "mounts the service account's API token",
    "nodeName": "places the pod on a node, past the scheduler",
    "tolerations": "lets the pod onto tainted nodes (the control plane's among them)",
    "priorityClassName": "lets the pod preempt others",
    "runtimeClassName": "chooses the container runtime",
    "initContainers": "adds an init container (its own image and command)",
    "ephemeralContainers": "adds a container",
    "imagePullSecrets": "uses the namespace's registry credentials",
    "dnsConfig": "changes the pod's name resolution",
    "dnsPolicy": "changes the pod's name resolution",
    "hostAliases": "changes the pod's name resolution",
    "resourceClaims": "claims devices",
}
_CONTAINER_WHY = {
    "image": "replaces the container's image",
    "command": "replaces the entrypoint",
    "args": "changes the entrypoint's arguments",
    "workingDir": "changes where the entrypoint runs",
    "env": "sets an environment variable",
    "envFrom": "sets environment variables from a ConfigMap or Secret",
    "lifecycle": "runs commands in the container",
    "livenessProbe": "runs commands in the container",
    "readinessProbe": "runs commands in the container",
    "startupProbe": "runs commands in the container",
    "volumeMounts": "mounts a volume into the container",
    "volumeDevices": "gives the container a block device",
    "ports": "opens ports (hostPort: on the node)",
}


_SLURM_QUEUE_OWNED = {
    "account": "charges another account's allocation",
    "qos": "changes the job's quality of service (limits and priority)",
    "partition": "moves the job to other nodes",
    "sbatch": "passes options to sbatch",
}
"""What a secure slurm queue keeps to itself: whose allocation its jobs spend and where they go."""


def secure_override_violations(
    kind: ResourceKind, override: Any, *, queue: str, allow_host_paths: bool, where: str = "resource_config"
) -> list[FieldViolation]:
    """What a secure queue (named ``queue``) refuses in an item's ``override`` (filled with the item's
    template values), each option by its path in the override.

    local-process and ray: any ``env``. slurm: any ``env``, ``account``, ``qos``, ``partition`` or ``sbatch``.
    local-container: any option but :data:`SECURE_CONTAINER_OPTIONS`
    (``env``, ``volumes``, ``user``, ``privileged``, ``network_mode``, ``cap_add``, ...), and an
    ``ipc_mode`` other than private, shareable or none. kubernetes: at the top only ``apiVersion``,
    ``kind``, ``metadata.labels``/``annotations`` and ``spec.ttlSecondsAfterFinished`` besides the pod
    spec; no pod template metadata; pod spec fields :data:`SECURE_POD_FIELDS`; container fields
    :data:`SECURE_CONTAINER_FIELDS` (``securityContext`` named leaf by leaf, ``env`` entry by entry);
    volume sources :data:`SECURE_VOLUME_SOURCES`. A host path the queue would refuse anyway
    (``allow_host_paths`` off) is left to :func:`check_for_resource` (``RESOURCE_CONFIG_INVALID``), as
    is a value of the wrong shape."""
    if not isinstance(override, dict):
        return []
    refused: list[tuple[str, str]] = []
    if kind is ResourceKind.KUBERNETES:
        _secure_job(override, where, refused, allow_host_paths=allow_host_paths)
    else:
        for key, value in override.items():
            field = _field(where, [key])
            if key == "env" and isinstance(value, dict):
                refused += [(_field(field, [name]), f"sets {str(name)[:128]}") for name in value]
            elif kind is ResourceKind.SLURM:
                if key in _SLURM_QUEUE_OWNED:
                    refused.append((field, f"{key} {_SLURM_QUEUE_OWNED[key]}"))
            elif kind is not ResourceKind.LOCAL_CONTAINER:
                continue  # local-process and ray take no other dangerous option; the shape check names others
            elif key == "volumes":
                sources = _volume_sources(value, field)
                refused += [
                    (at, f"mounts {source[:200]!r}: {_DOCKER_WHY['volumes']}")
                    for source, at in sources
                    if allow_host_paths or _VOLUME_NAME.match(source)
                ]
            elif key == "ipc_mode":
                if value not in _SECURE_IPC_MODES:
                    refused.append((field, f"ipc_mode {str(value)[:64]!r} {_DOCKER_WHY['ipc_mode']}"))
            elif key not in SECURE_CONTAINER_OPTIONS and (key in _DOCKER_WHY or key in CONTAINER_OPTIONS):
                refused.append((field, f"{key} {_DOCKER_WHY.get(key, '')}".strip()))
    message = _SECURE.format(queue=queue)
    return [FieldViolation(field, f"{why}; {message}") for field, why in refused]


def _secure_job(
    job: JsonObject, where: str, refused: list[tuple[str, str]], *, allow_host_paths: bool
) -> None:
    for key, value in job.items():
        field = _field(where, [key])
        if key in ("apiVersion", "kind", "nodes"):
            continue
        if key == "metadata" and isinstance(value, dict):
            refused += [
                (_field(field, [name]), "a Job field the queue owns")
                for name in value
                if name not in ("labels", "annotations")
            ]
        elif key == "spec" and isinstance(value, dict):
            for name, spec_value in value.items():
                at = _field(field, [name])
                if name == "ttlSecondsAfterFinished":
                    continue
                if name != "template":
                    refused.append((at, "a Job field the queue owns"))
                elif isinstance(spec_value, dict):
                    _secure_template(spec_value, at, refused, allow_host_paths=allow_host_paths)
        elif key not in ("metadata", "spec"):
            refused.append((field, "not a field an item may set"))


def _secure_template(
    template: JsonObject, where: str, refused: list[tuple[str, str]], *, allow_host_paths: bool
) -> None:
    for key, value in template.items():
        field = _field(where, [key])
        if key == "spec" and isinstance(value, dict):
            _secure_pod(value, field, refused, allow_host_paths=allow_host_paths)
        elif key == "metadata":
            refused += [
                (
                    at,
                    "the pod's labels and annotations choose its network policies, services and security "
                    "profiles",
                )
                for at in _leaves(value, field)
            ]
        elif key != "spec":
            refused.append((field, "not a field an item may set"))


def _secure_pod(
    pod: JsonObject, where: str, refused: list[tuple[str, str]], *, allow_host_paths: bool
) -> None:
    for key, value in pod.items():
        field = _field(where, [key])
        if key == "containers":
            for index, container in _entries(value):
                _secure_container(container, _field(field, [index]), refused)
        elif key == "volumes":
            for index, volume in _entries(value):
                for source in volume:
                    if source in SECURE_VOLUME_SOURCES or source == "name":
                        continue
                    if source == "hostPath" and not allow_host_paths:
                        continue  # refused on this queue anyway: check_for_resource names it
                    refused.append(
                        (
                            _field(field, [index, source]),
                            f"volume {str(volume.get('name'))[:200]!r} is a {source} volume (an item may add "
                            f"{', '.join(sorted(SECURE_VOLUME_SOURCES))})",
                        )
                    )
        elif key in ("initContainers", "ephemeralContainers") and isinstance(value, list):
            refused += [(_field(field, [index]), _POD_WHY[key]) for index in range(len(value))]
        elif key == "securityContext":
            refused += [(at, "the pod's security context") for at in _leaves(value, field)]
        elif key not in SECURE_POD_FIELDS:
            refused.append((field, _POD_WHY.get(key, "a pod field the queue owns")))


def _secure_container(container: JsonObject, where: str, refused: list[tuple[str, str]]) -> None:
    for key, value in container.items():
        field = _field(where, [key])
        if key in SECURE_CONTAINER_FIELDS:
            continue
        if key == "securityContext":
            refused += [(at, "the container's security context") for at in _leaves(value, field)]
        elif key == "env" and isinstance(value, list):
            refused += [
                (
                    _field(field, [index]),
                    f"sets {str(entry.get('name') if isinstance(entry, dict) else entry)[:128]}",
                )
                for index, entry in enumerate(value)
            ]
        else:
            refused.append((field, _CONTAINER_WHY.get(key, "a container field the queue owns")))


def _leaves(value: Any, where: str) -> list[str]:
    """The path of every non-object value inside ``value`` (``where`` itself for a non-object or an
    empty one): each setting of a security context is named."""
    if not isinstance(value, dict) or not value:
        return [where]
    return [leaf for key, item in value.items() for leaf in _leaves(item, _field(where, [key]))]
