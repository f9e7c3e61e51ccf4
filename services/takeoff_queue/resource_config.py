"""A queue's resource config: template variables, deep merge with an item's override, and the checks per
resource kind (docs/design.md §7).

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

from takeoff_server.errors import FieldViolation, InvalidArgument
from takeoff_server.resource_configs import CONTAINER_OPTIONS, PROCESS_OPTIONS, deep_merge
from takeoff_server.schemas import check_json_schema, schema_validator
from takeoff_server.validation import Problems

JsonObject = dict[str, Any]

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z][A-Za-z0-9_]{0,62})\s*\}\}")
_VARIABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


class ResourceKind(enum.Enum):
    LOCAL_PROCESS = "local-process"
    LOCAL_CONTAINER = "local-container"
    KUBERNETES = "kubernetes"


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
path, which no queue may mount: a job would reach the agent's host."""

# What each runner can take, as JSON Schemas of the shapes it reads. The option allow-lists are checked
# apart, to name each refused option as its own field.
SHAPES: dict[ResourceKind, JsonObject] = {
    ResourceKind.LOCAL_PROCESS: {"type": "object", "properties": {"env": _ENVIRONMENT}},
    ResourceKind.LOCAL_CONTAINER: {
        "type": "object",
        "properties": {
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


def check_for_resource(
    kind: ResourceKind, config: Any, where: str, *, unfilled: bool = False
) -> list[FieldViolation]:
    """Whether the runner for ``kind`` can take ``config``: known options only, each of the shape the
    runner reads. With ``unfilled`` (a queue's default, before Enqueue fills it), a whole ``{{var}}``
    stands for a value of any shape: its variable's schema is checked at each Enqueue, the filled
    config again."""
    problems = []
    if kind is not ResourceKind.KUBERNETES and isinstance(config, dict):
        allowed = CONTAINER_OPTIONS if kind is ResourceKind.LOCAL_CONTAINER else PROCESS_OPTIONS
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
    if kind is ResourceKind.LOCAL_CONTAINER and isinstance(config, dict):
        problems += _host_path_volumes(config.get("volumes"), f"{where}.volumes", unfilled=unfilled)
    return problems


def _host_path_volumes(volumes: Any, where: str, *, unfilled: bool) -> list[FieldViolation]:
    """Each volume whose source is not a named volume. With ``unfilled``, a source holding a ``{{var}}``
    waits for Enqueue, which checks it filled."""
    if isinstance(volumes, dict):
        sources = [(source, _field(where, [source])) for source in volumes]
    elif isinstance(volumes, list):
        sources = [
            (entry.split(":", 1)[0], _field(where, [index]))
            for index, entry in enumerate(volumes)
            if isinstance(entry, str)
        ]
    else:
        return []
    return [
        FieldViolation(
            field,
            f"{source[:200]!r} is not a named volume ([A-Za-z0-9][A-Za-z0-9_.-]+): host paths are refused",
        )
        for source, field in sources
        if not _VOLUME_NAME.match(source) and not (unfilled and placeholders(source))
    ]


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
) -> tuple[JsonObject, JsonObject, list[FieldViolation]]:
    """The config the runner gets for one item, the variable values used, and every problem found.

    The queue's schemas must be complete (``check_json_schema``); the filled config may be at most
    ``max_json_bytes`` as JSON.
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
    return merged, values, check_for_resource(kind, merged, "resource_config")
