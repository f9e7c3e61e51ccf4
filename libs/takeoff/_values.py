"""What a job sends about its run, without the client's records: the run's state, and config, summary
and metric values as plain JSON-like Python converted to and from protobuf ``Struct``.

Kept apart from :mod:`takeoff.models`, which re-exports these, because a job's ``takeoff.init`` needs
only them: the models' twenty-odd dataclasses and the stubs of every service cost a job's start-up
tens of milliseconds for records it never builds.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from takeoff.v1 import common_pb2


class RunState(enum.StrEnum):
    """State of a run; FINISHED, FAILED, CRASHED and KILLED are final."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CRASHED = "CRASHED"
    KILLED = "KILLED"

    @property
    def ended(self) -> bool:
        return self not in (RunState.STARTING, RunState.RUNNING)

    @classmethod
    def _from_proto(cls, value: common_pb2.RunState.ValueType) -> RunState:
        return cls(common_pb2.RunState.Name(value).removeprefix("RUN_STATE_"))

    def _to_proto(self) -> common_pb2.RunState.ValueType:
        return common_pb2.RunState.Value(f"RUN_STATE_{self.value}")


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python; whole numbers come back as ``int`` (a Struct holds only doubles)."""
    return {key: _from_value(value) for key, value in struct.fields.items()}


def dict_to_struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(jsonable(values))
    return struct


def jsonable(value: Any) -> Any:
    """``value`` made of what JSON holds; numpy and torch values become numbers and lists, others text."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return jsonable(value.tolist())
    return str(value)


def _from_value(value: struct_pb2.Value) -> Any:
    match value.WhichOneof("kind"):
        case "number_value":
            number = value.number_value
            return int(number) if number.is_integer() and abs(number) < 2**53 else number
        case "struct_value":
            return struct_to_dict(value.struct_value)
        case "list_value":
            return [_from_value(item) for item in value.list_value.values]
        case "string_value":
            return value.string_value
        case "bool_value":
            return value.bool_value
    return None
