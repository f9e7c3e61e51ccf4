"""A queue's resource config: template variables, deep merge with an item's override, and the checks per
resource kind (DESIGN.md §7).

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
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema

from takeoff_server.errors import FieldViolation

JsonObject = dict[str, Any]

MERGED_BY_NAME = frozenset({"containers", "env", "volumes", "volumeMounts"})
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z][A-Za-z0-9_]{0,62})\s*\}\}")
_VARIABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


class ResourceKind(enum.Enum):
    LOCAL_PROCESS = "local-process"
    LOCAL_CONTAINER = "local-container"
    KUBERNETES = "kubernetes"


# The docker options a local-container queue may set; the runner maps each onto the docker SDK.
CONTAINER_OPTIONS = frozenset(
    {
        "gpus",
        "cpus",
        "mem_limit",
        "memswap_limit",
        "shm_size",
        "env",
        "volumes",
        "user",
        "ipc_mode",
        "ulimits",
    }
)
PROCESS_OPTIONS = frozenset({"env"})


def deep_merge(base: Any, override: Any, *, by_name: bool = False) -> Any:
    """``override`` over ``base`` by the rules above; neither argument is changed."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            if key not in merged:
                merged[key] = copy.deepcopy(value)
            elif (
                by_name
                and key in MERGED_BY_NAME
                and isinstance(merged[key], list)
                and isinstance(value, list)
            ):
                merged[key] = _merge_named(merged[key], value, by_name=by_name)
            else:
                merged[key] = deep_merge(merged[key], value, by_name=by_name)
        return merged
    return copy.deepcopy(override)


def _merge_named(base: list[Any], override: list[Any], *, by_name: bool) -> list[Any]:
    merged = copy.deepcopy(base)
    position = {entry.get("name"): i for i, entry in enumerate(merged) if isinstance(entry, dict)}
    for entry in override:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name is not None and name in position:
            merged[position[name]] = deep_merge(merged[position[name]], entry, by_name=by_name)
        else:
            merged.append(copy.deepcopy(entry))
    return merged


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


def check_variable_declarations(variables: Mapping[str, JsonObject], config: Any) -> list[FieldViolation]:
    """A queue's declarations: valid names and schemas (with a ``type``), and no undeclared placeholder."""
    problems = []
    for name, schema in variables.items():
        where = f"queue.template_variables[{name}]"
        if not _VARIABLE_NAME.match(name):
            problems.append(FieldViolation(where, "names are 1-63 of [A-Za-z0-9_], starting with a letter"))
            continue
        if "type" not in schema:
            problems.append(FieldViolation(f"{where}.schema", "the schema must say the value's `type`"))
            continue
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as error:
            problems.append(FieldViolation(f"{where}.schema", f"not a valid JSON Schema: {error.message}"))
            continue
        if "default" in schema:
            problems.extend(_violations(schema, schema["default"], f"{where}.schema.default"))
    for name in sorted(placeholders(config) - set(variables)):
        problems.append(
            FieldViolation(
                "queue.resource_config", f"uses {{{{{name}}}}}, which is not a declared template variable"
            )
        )
    return problems


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


def _violations(schema: JsonObject, value: Any, where: str) -> list[FieldViolation]:
    validator = jsonschema.Draft202012Validator(schema)
    return [
        FieldViolation(where + "".join(f".{p}" for p in error.absolute_path), error.message)
        for error in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    ]


def check_for_resource(kind: ResourceKind, config: JsonObject, where: str) -> list[FieldViolation]:
    """Whether the runner for ``kind`` can take ``config``."""
    if kind is ResourceKind.KUBERNETES:
        problems = []
        for key, expected in (("apiVersion", "batch/v1"), ("kind", "Job")):
            if key in config and config[key] != expected:
                problems.append(
                    FieldViolation(f"{where}.{key}", f"must be {expected!r} for a kubernetes queue")
                )
        containers = config.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        if not isinstance(containers, list) or any(
            not isinstance(c, dict) or "name" not in c for c in containers
        ):
            problems.append(
                FieldViolation(
                    f"{where}.spec.template.spec.containers", "must be a list of containers with names"
                )
            )
        return problems
    allowed = CONTAINER_OPTIONS if kind is ResourceKind.LOCAL_CONTAINER else PROCESS_OPTIONS
    problems = [
        FieldViolation(
            f"{where}.{key}", f"not an option of {kind.value} queues (allowed: {', '.join(sorted(allowed))})"
        )
        for key in sorted(set(config) - allowed)
    ]
    env = config.get("env", {})
    if not isinstance(env, dict) or any(not isinstance(v, str | int | float | bool) for v in env.values()):
        problems.append(FieldViolation(f"{where}.env", "must map variable names to plain values"))
    return problems


def effective_config(
    kind: ResourceKind,
    queue_default: JsonObject,
    override: JsonObject,
    declared: Mapping[str, JsonObject],
    given_values: Mapping[str, Any],
) -> tuple[JsonObject, JsonObject, list[FieldViolation]]:
    """The config the runner gets for one item, the variable values used, and every problem found."""
    values, problems = resolve_variables(declared, given_values)
    for name in sorted(placeholders(override) - set(declared)):
        problems.append(
            FieldViolation("resource_config", f"uses {{{{{name}}}}}, which the queue does not declare")
        )
    if problems:
        return {}, values, problems
    merged = fill(deep_merge(queue_default, override, by_name=kind is ResourceKind.KUBERNETES), values)
    return merged, values, check_for_resource(kind, merged, "resource_config")
