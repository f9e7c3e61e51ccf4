"""Every reason a server can put in an ErrorInfo is in common.proto's ErrorReason catalogue.

Clients branch on reasons, and the catalogue is where they are documented, so a reason the servers use
but the catalogue lacks is an undocumented API. The servers' source is scanned (not run): every string
literal given as a reason to a ``TakeoffError`` class, ``Problems.add``, ``field_error(reason=...)``,
``rich_status`` or assigned to a variable named ``reason``.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff.v1 import common_pb2
from takeoff_server import errors

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [ROOT / "services", ROOT / "libs" / "takeoff_server"]

ERROR_CLASSES = frozenset(
    name
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, errors.TakeoffError)
)
CATALOGUE = frozenset(
    value.name.removeprefix("ERROR_REASON_")
    for value in common_pb2.ErrorReason.DESCRIPTOR.values
    if value.number != 0
)


def _literals(node: ast.expr) -> Iterator[str]:
    """The non-empty string constants ``node`` can evaluate to (a constant, or either branch of
    ``a if c else b``); an empty one stands for a reason passed through from another service."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value:
        yield node.value
    elif isinstance(node, ast.IfExp):
        yield from _literals(node.body)
        yield from _literals(node.orelse)


def _called_name(call: ast.Call) -> str:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return ""


def _reason_expressions(tree: ast.AST) -> Iterator[ast.expr]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _called_name(node)
            is_error = name in ERROR_CLASSES and bool(node.args)
            is_problem = name == "add" and len(node.args) == 3  # Problems.add(reason, field, description)
            if is_error or is_problem:
                yield node.args[0]
            elif name == "rich_status" and len(node.args) >= 3:
                yield node.args[2]
            yield from (keyword.value for keyword in node.keywords if keyword.arg == "reason")
        elif isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "reason" for target in node.targets
        ):
            yield node.value


@functools.cache
def reasons_used() -> dict[str, list[str]]:
    """reason -> where it is used (path:line)."""
    used: dict[str, list[str]] = {}
    for directory in SCANNED:
        for path in sorted(directory.rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for expression in _reason_expressions(tree):
                for reason in _literals(expression):
                    place = f"{path.relative_to(ROOT)}:{expression.lineno}"
                    used.setdefault(reason, []).append(place)
    return used


def test_the_scan_finds_the_reasons_it_is_meant_to() -> None:
    used = reasons_used()
    # One of each way a reason is given: an error class, Problems.add, field_error(reason=), rich_status.
    for reason in ("JOB_NOT_FOUND", "SOURCE_INVALID", "PAGE_TOKEN_INVALID", "INTERNAL", "REQUEST_INVALID"):
        assert reason in used


@pytest.mark.parametrize("reason", sorted(reasons_used()))
def test_every_reason_a_server_uses_is_in_the_catalogue(reason: str) -> None:
    places = ", ".join(reasons_used()[reason])
    assert reason in CATALOGUE, f"{reason} (used at {places}) is not in common.proto's ErrorReason enum"
