"""Print the permission table of docs/design.md from the code: every method of every service, the
permission its access rule checks, on what, and which key kinds hold that permission.

The rules come from each service's ``access.py`` (what the servers enforce), the key kinds' permissions
from ``takeoff_server.access.grants_for``: the table cannot drift from either, and a test
(tests/integration/test_access_rules.py) checks that docs/design.md holds exactly this output between
``<!-- access-table:begin -->`` and ``<!-- access-table:end -->``.

Usage: ``python tools/access_table.py`` (from the repository root, in the project's environment).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from takeoff.v1 import (
    agent_pb2,
    artifacts_pb2,
    build_pb2,
    jobs_pb2,
    keys_pb2,
    queue_pb2,
    runs_pb2,
    secrets_pb2,
)
from takeoff_server.access import (
    AccessRules,
    Check,
    KeyKind,
    KeyScope,
    Permission,
    ProjectRole,
    Rule,
    ServiceRole,
    grants_for,
)

BEGIN_MARKER = "<!-- access-table:begin -->"
END_MARKER = "<!-- access-table:end -->"

SERVICES: tuple[tuple[ServiceDescriptor, str], ...] = (
    (jobs_pb2.DESCRIPTOR.services_by_name["JobService"], "registry"),
    (runs_pb2.DESCRIPTOR.services_by_name["RunService"], "registry"),
    (artifacts_pb2.DESCRIPTOR.services_by_name["ArtifactService"], "registry"),
    (keys_pb2.DESCRIPTOR.services_by_name["KeyService"], "registry"),
    (secrets_pb2.DESCRIPTOR.services_by_name["SecretService"], "registry"),
    (queue_pb2.DESCRIPTOR.services_by_name["QueueService"], "queue"),
    (build_pb2.DESCRIPTOR.services_by_name["BuildService"], "builder"),
    (agent_pb2.DESCRIPTOR.services_by_name["AgentService"], "agent"),
)
"""Every Takeoff service, and the process that serves it."""

KEY_KINDS: tuple[tuple[str, KeyScope], ...] = (
    ("admin", KeyScope(KeyKind.ADMIN)),
    ("project (read)", KeyScope(KeyKind.PROJECT, projects=("projects/p",), role=ProjectRole.READ)),
    ("project (write)", KeyScope(KeyKind.PROJECT, projects=("projects/p",), role=ProjectRole.WRITE)),
    ("agent", KeyScope(KeyKind.AGENT, queues=("projects/p/queues/q",))),
    ("service (queue)", KeyScope(KeyKind.SERVICE, service=ServiceRole.QUEUE)),
    ("service (builder)", KeyScope(KeyKind.SERVICE, service=ServiceRole.BUILDER)),
    ("service (console)", KeyScope(KeyKind.SERVICE, service=ServiceRole.CONSOLE)),
    (
        "run token",
        KeyScope(
            KeyKind.RUN,
            run="projects/p/runs/r",
            job_version="projects/p/jobs/j/versions/1",
            secrets=("projects/p/secrets/s",),
        ),
    ),
)
"""One key of each kind (and role), named as the table names them."""


def service_rules() -> dict[str, AccessRules]:
    """Each service's rules by its full name, from the services' ``access.py``."""
    from takeoff_agent.access import RULES as AGENT
    from takeoff_builder.access import RULES as BUILDER
    from takeoff_queue.access import RULES as QUEUE
    from takeoff_registry.access import RULES as REGISTRY

    return {
        **REGISTRY,
        "takeoff.v1.QueueService": QUEUE,
        "takeoff.v1.BuildService": BUILDER,
        "takeoff.v1.AgentService": AGENT,
    }


def kinds_holding(permission: Permission) -> list[str]:
    """The key kinds that hold ``permission`` on some resource."""
    held = [name for name, scope in KEY_KINDS if any(g.permission == permission for g in grants_for(scope))]
    if {"project (read)", "project (write)"} <= set(held):
        held = [name.replace("project (read)", "project") for name in held if name != "project (write)"]
    return held


# --- what a check is checked on ---------------------------------------------------------------------


def _closure(function: Any) -> dict[str, Any]:
    cells = function.__closure__ or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells), strict=True))


def _marked(descriptor: Descriptor, prefix: str = "", depth: int = 0) -> list[Message]:
    """Messages of ``descriptor`` whose string fields hold ``{path}`` markers: the first with every field
    outside a oneof, then one per oneof choice of a message field (a stream's Hello, an upload's header)."""
    message = GetMessageClass(descriptor)()
    choices: list[tuple[FieldDescriptor, Message]] = []
    for field in descriptor.fields:
        path = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                getattr(message, field.name).append(f"{{{path}}}")
            else:
                setattr(message, field.name, f"{{{path}}}")
            continue
        nested = field.message_type
        if nested is None or depth >= 2 or nested.GetOptions().map_entry:
            continue
        inner = _marked(nested, f"{path}.", depth + 1)[0]
        if field.containing_oneof is not None:
            choices.append((field, inner))
        elif field.is_repeated:
            getattr(message, field.name).add().CopyFrom(inner)
        else:
            getattr(message, field.name).CopyFrom(inner)
    variants = [message]
    for field, inner in choices:
        variant = GetMessageClass(descriptor)()
        variant.CopyFrom(message)
        getattr(variant, field.name).CopyFrom(inner)
        variants.append(variant)
    return variants


def _probe(resources: Any, request_type: Descriptor) -> list[str]:
    """What ``resources`` yields for requests whose fields hold their own paths as markers."""
    seen: list[str] = []
    for request in _marked(request_type):
        try:
            names = list(resources(request))
        except Exception:  # a function that needs a real name shape: described by its docstring instead
            return []
        seen.extend(name for name in names if name and name not in seen)
    return seen


def _code(text: str) -> str:
    """``{path}`` markers, RST literals and roles as markdown code."""
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", text)
    return re.sub(r"``(.+?)``", r"`\1`", re.sub(r"\{([\w.]+)\}", r"`\1`", text))


def scope_of(check: Check, request_type: Descriptor) -> str:
    """What ``check`` needs its permission on, in words."""
    resources = check.resources
    if resources is None:
        return "anywhere"
    qualified = getattr(resources, "__qualname__", "")
    if qualified.startswith("constant."):
        return ", ".join(f"`{name}`" for name in _closure(resources)["names"])
    if qualified.startswith("fields."):
        return ", ".join(f"`{name}`" for name in _closure(resources)["names"])
    doc = inspect.getdoc(resources)
    if doc and not qualified.endswith("<lambda>"):
        first = " ".join(doc.split("\n\n", 1)[0].split())
        return _code(first.rstrip("."))
    probed = _probe(resources, request_type)
    if probed:
        return " or ".join(_code(name) for name in probed)
    return f"`{getattr(resources, '__name__', 'resources')}`"


# --- the table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    service: str
    method: str
    permission: Permission
    scope: str
    kinds: tuple[str, ...]
    note: str = ""


def _rule_note(rule: Rule) -> str:
    if type(rule) is Rule:
        return ""
    doc = inspect.getdoc(type(rule)) or type(rule).__name__
    return _code(" ".join(doc.split("\n\n", 1)[0].split()).rstrip("."))


def rows(rules: Mapping[str, AccessRules] | None = None) -> list[Row]:
    """One row per check of each method's rule, in proto order; a method without a rule raises
    ``KeyError`` naming it."""
    rules = service_rules() if rules is None else rules
    table: list[Row] = []
    for service, _process in SERVICES:
        service_rules_ = rules.get(service.full_name, {})
        for method in service.methods:
            if method.name not in service_rules_:
                raise KeyError(f"{service.full_name}.{method.name} has no access rule")
            rule = service_rules_[method.name]
            note = _rule_note(rule)
            for check in rule.checks:
                table.append(
                    Row(
                        service.name,
                        method.name,
                        check.permission,
                        scope_of(check, method.input_type),
                        tuple(kinds_holding(check.permission)),
                        note,
                    )
                )
    return table


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(table: Iterable[Row] | None = None) -> str:
    """The table as markdown, ending in a newline."""
    lines = [
        "| Service | Method | Permission | On | Key kinds that hold it |",
        "|---|---|---|---|---|",
    ]
    for row in rows() if table is None else table:
        scope = row.scope + (f" ({row.note})" if row.note else "")
        lines.append(
            f"| {row.service} | {row.method} | `{row.permission}` | {_cell(scope)} | {', '.join(row.kinds)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    print(markdown(), end="")


if __name__ == "__main__":
    main()
