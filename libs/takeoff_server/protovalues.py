"""Values in and out of the protobuf well-known types the API uses: Struct, Timestamp, Duration.

A Struct holds every number as a double; whole numbers come back as ``int`` so that a config's
``{"epochs": 3}`` reaches a job as 3, not 3.0. Times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """As ``Timestamp.FromDatetime`` has it (a naive value is UTC), by one subtraction: the queue builds
    a dozen of these per item's life cycle, and protobuf's own goes through a time tuple and ``timegm``."""
    since = moment - (_NAIVE_EPOCH if moment.tzinfo is None else _EPOCH)
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1_000
    )


def optional_timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    return timestamp(moment) if moment is not None else None


def to_datetime(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def optional_duration(span: timedelta | None) -> duration_pb2.Duration | None:
    if span is None:
        return None
    duration = duration_pb2.Duration()
    duration.FromTimedelta(span)
    return duration
