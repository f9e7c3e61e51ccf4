"""JSON values in and out of ``google.protobuf.Struct``, the API's carrier for free-form JSON.

A Struct holds every number as a double; whole numbers come back as ``int`` so that a config's
``{"epochs": 3}`` reaches a job as 3, not 3.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

_EXACT_INTEGERS = 2**53


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: _plain(value) for key, value in struct.fields.items()}


def dict_to_struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _plain(value: struct_pb2.Value) -> Any:
    match value.WhichOneof("kind"):
        case "number_value":
            number = value.number_value
            return int(number) if number.is_integer() and abs(number) < _EXACT_INTEGERS else number
        case "string_value":
            return value.string_value
        case "bool_value":
            return value.bool_value
        case "struct_value":
            return struct_to_dict(value.struct_value)
        case "list_value":
            return [_plain(item) for item in value.list_value.values]
    return None
