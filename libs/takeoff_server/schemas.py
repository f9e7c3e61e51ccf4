"""JSON Schemas clients hand the API (job inputs, template variables), checked whole when they are created.

A schema that is accepted must never fail later, when a config is validated against it: besides the
metaschema check, every ``$ref`` / ``$dynamicRef`` in it must resolve within the schema itself (or to one
of the metaschemas jsonschema ships). Nothing is ever fetched: a remote reference is refused, here and in
:func:`schema_validator`, which the services validate instances with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema
from jsonschema.protocols import Validator
from jsonschema_specifications import REGISTRY as METASCHEMAS  # type: ignore[import-untyped]
from referencing.exceptions import Unresolvable

from takeoff_server.errors import InvalidArgument
from takeoff_server.validation import MAX_CONFIG_DEPTH, field_error, nesting_depth

MAX_SCHEMA_BYTES = 64 * 1024
"""A schema's size as compact JSON."""
MAX_SCHEMA_DEPTH = MAX_CONFIG_DEPTH
"""Nesting of JSON objects and arrays: a job's input schema travels to agents inside a lease Assignment, as
deep in protobuf's recursion limit as a run config."""

_DEFAULT_DIALECT = referencing.jsonschema.DRAFT202012
_REFERENCE_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")


# The metaschemas jsonschema ships, and nothing else: a registry without a `retrieve` fetches nothing.
_OFFLINE_REGISTRY: referencing.Registry[Any] = METASCHEMAS


def _schema_error(field: str, problem: str) -> InvalidArgument:
    return field_error(field, problem, reason="SCHEMA_INVALID")


def _specification(schema: Mapping[str, Any], field: str) -> referencing.Specification[Any]:
    dialect = schema.get("$schema")
    if dialect is None:
        return _DEFAULT_DIALECT
    if not isinstance(dialect, str):
        raise _schema_error(f"{field}.$schema", "must be a string naming a JSON Schema dialect")
    try:
        return referencing.jsonschema.specification_with(dialect)
    except referencing.jsonschema.UnknownDialect:
        raise _schema_error(
            f"{field}.$schema",
            f"{dialect!r} is not a JSON Schema dialect this server knows "
            "(e.g. https://json-schema.org/draft/2020-12/schema)",
        ) from None


# referencing does not export its Resolver class: `registry.resolver()` makes them.
Resolver = Any
Scoped = tuple[referencing.Resource[Any], Resolver]


def _subschemas(resource: referencing.Resource[Any], resolver: Resolver) -> list[Scoped]:
    """Every (sub)schema in ``resource`` with the resolver of its base URI (``$id`` moves it)."""
    found = []
    pending = [(resource, resolver)]
    while pending:
        current, outer = pending.pop()
        scoped = outer.in_subresource(current)
        found.append((current, scoped))
        pending.extend((subresource, scoped) for subresource in current.subresources())
    return found


def _references(contents: Any) -> list[str]:
    if not isinstance(contents, Mapping):
        return []
    return [contents[keyword] for keyword in _REFERENCE_KEYWORDS if isinstance(contents.get(keyword), str)]


def _applied_in_place(contents: Any) -> list[Any]:
    """The subschemas that apply to the same instance as ``contents`` (not to a part of it)."""
    if not isinstance(contents, Mapping):
        return []
    applied = [contents[keyword] for keyword in ("not", "if", "then", "else") if keyword in contents]
    for keyword in ("allOf", "anyOf", "oneOf"):
        if isinstance(contents.get(keyword), list):
            applied.extend(contents[keyword])
    if isinstance(contents.get("dependentSchemas"), Mapping):
        applied.extend(contents["dependentSchemas"].values())
    return applied


def _loops_in_place(edges: Mapping[int, list[int]]) -> bool:
    """Whether following references and in-place applicators can come back to a schema already being
    applied to the same instance: validation would never end."""
    finished: set[int] = set()
    for start in edges:
        if start in finished:
            continue
        on_path = {start}
        stack = [(start, iter(edges[start]))]
        while stack:
            node, successors = stack[-1]
            successor = next(successors, None)
            if successor is None:
                stack.pop()
                on_path.discard(node)
                finished.add(node)
            elif successor in on_path:
                return True
            elif successor not in finished:
                on_path.add(successor)
                stack.append((successor, iter(edges[successor])))
    return False


def check_json_schema(schema: Mapping[str, Any], *, field: str) -> None:
    """Refuse (INVALID_ARGUMENT ``SCHEMA_INVALID`` on ``field``) a schema that is too large or deep, is
    not valid for its dialect (Draft 2020-12 unless ``$schema`` says otherwise), or has a reference that
    does not resolve inside it."""
    depth = nesting_depth(schema, give_up_beyond=MAX_SCHEMA_DEPTH)
    if depth > MAX_SCHEMA_DEPTH:
        raise _schema_error(field, f"nests deeper than {MAX_SCHEMA_DEPTH} levels of objects and arrays")
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False, default=str).encode())
    if size > MAX_SCHEMA_BYTES:
        raise _schema_error(field, f"is {size} bytes as JSON; at most {MAX_SCHEMA_BYTES} are allowed")
    specification = _specification(schema, field)
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator_class.check_schema(dict(schema))
    except jsonschema.SchemaError as error:
        where = "".join(f"[{part!r}]" for part in error.absolute_path)
        raise _schema_error(f"{field}{where}", f"not a valid JSON Schema: {error.message}") from None
    resource = specification.create_resource(schema)
    root_uri = resource.id() or ""
    registry = _OFFLINE_REGISTRY.with_resource(root_uri, resource)
    subschemas = _subschemas(resource, registry.resolver(base_uri=root_uri))
    edges: dict[int, list[int]] = {id(sub.contents): [] for sub, _ in subschemas}
    for subschema, resolver in subschemas:
        targets = _applied_in_place(subschema.contents)
        for reference in _references(subschema.contents):
            try:
                targets.append(resolver.lookup(reference).contents)
            except Unresolvable:
                raise _schema_error(
                    field, f"the reference {reference!r} does not resolve within the schema"
                ) from None
        edges[id(subschema.contents)] = [id(target) for target in targets if id(target) in edges]
    if _loops_in_place(edges):
        raise _schema_error(field, "its references loop back to themselves without validating any deeper")


def schema_validator(schema: Mapping[str, Any]) -> Validator:
    """A validator for a schema :func:`check_json_schema` accepted; it never fetches remote references."""
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return validator_class(dict(schema), registry=_OFFLINE_REGISTRY)
