"""The shared input checks every server uses: JSON Schemas, Structs, enum numbers, durations."""

from __future__ import annotations

import enum
import http.server
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from google.protobuf import duration_pb2
from referencing.exceptions import Unresolvable

from takeoff.v1 import common_pb2, queue_pb2
from takeoff_server.errors import InvalidArgument
from takeoff_server.protovalues import dict_to_struct
from takeoff_server.schemas import MAX_SCHEMA_DEPTH, check_json_schema, schema_validator
from takeoff_server.validation import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    check_struct,
    duration_value,
    enum_member,
)


def nested(levels: int) -> dict[str, Any]:
    """``levels`` containers: objects around a list, the deepest protobuf encoding of that nesting."""
    value: dict[str, Any] = {"leaf": [1]}
    for _ in range(levels - 2):
        value = {"a": value}
    return value


def refused(check: Any, *args: Any, **kwargs: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        check(*args, **kwargs)
    return raised.value


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"lr": {"type": "number", "default": 0.1}}},
        {"$ref": "#/$defs/lr", "$defs": {"lr": {"type": "number"}}},
        {"properties": {"a": {"$ref": "#lr"}}, "$defs": {"lr": {"$anchor": "lr", "type": "number"}}},
        {"properties": {"child": {"$ref": "#"}}},  # recursion that descends into the value ends
        {"$id": "https://example.test/s", "properties": {"a": {"$ref": "t"}}, "$defs": {"t": {"$id": "t"}}},
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "definitions": {"a": {}},
            "$ref": "#/definitions/a",
        },
        {"$ref": "https://json-schema.org/draft/2020-12/schema"},  # a metaschema jsonschema ships
    ],
)
def test_complete_schemas_are_accepted(schema: dict[str, Any]) -> None:
    check_json_schema(schema, field="inputs.schema")


@pytest.mark.parametrize(
    ("schema", "field", "problem"),
    [
        ({"properties": {"a": {"$ref": "#/$defs/nowhere"}}}, "inputs.schema", "does not resolve"),
        ({"properties": {"a": {"$ref": "#missing-anchor"}}}, "inputs.schema", "does not resolve"),
        ({"$ref": "https://example.test/remote.json"}, "inputs.schema", "does not resolve"),
        ({"$ref": "#"}, "inputs.schema", "loop"),
        (
            {"allOf": [{"$ref": "#/$defs/b"}], "$defs": {"b": {"anyOf": [{"$ref": "#"}]}}},
            "inputs.schema",
            "loop",
        ),
        ({"type": "nonsense"}, "inputs.schema['type']", "not a valid JSON Schema"),
        ({"pattern": "("}, "inputs.schema['pattern']", "not a valid JSON Schema"),
        ({"$schema": "https://example.test/dialect"}, "inputs.schema.$schema", "not a JSON Schema dialect"),
        (nested(MAX_SCHEMA_DEPTH + 1), "inputs.schema", "deeper"),
        ({"description": "x" * 70_000}, "inputs.schema", "bytes"),
    ],
)
def test_incomplete_or_hostile_schemas_are_schema_invalid(
    schema: dict[str, Any], field: str, problem: str
) -> None:
    error = refused(check_json_schema, schema, field="inputs.schema")

    assert error.reason == "SCHEMA_INVALID"
    assert [v.field for v in error.violations] == [field]
    assert problem in error.message


@pytest.fixture
def schema_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on loopback that serves a schema and records every request it gets."""
    requested: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            body = json.dumps({"type": "string"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/schema.json", requested
    finally:
        server.shutdown()
        thread.join()


def test_nothing_is_fetched_to_check_or_use_a_schema(schema_server: tuple[str, list[str]]) -> None:
    url, requested = schema_server
    schema = {"properties": {"a": {"$ref": url}}}

    error = refused(check_json_schema, schema, field="inputs.schema")
    with pytest.raises(Unresolvable):
        schema_validator(schema).is_valid({"a": 1})

    assert error.reason == "SCHEMA_INVALID"
    assert requested == []


def test_structs_within_the_limits_pass() -> None:
    check_struct(
        nested(MAX_CONFIG_DEPTH), field="run_config", max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH
    )
    check_struct({"a": [1, 2.5, "x", None, True, float("nan")]}, field="c", max_bytes=100, max_depth=2)


@pytest.mark.parametrize(
    ("value", "field", "problem"),
    [
        (nested(MAX_CONFIG_DEPTH + 1), "run_config", "deeper"),
        ({"a": [[[[]]]]}, "run_config", "deeper"),
        ({"blob": "x" * MAX_CONFIG_BYTES}, "run_config", "bytes"),
    ],
)
def test_structs_beyond_the_limits_are_refused(value: dict[str, Any], field: str, problem: str) -> None:
    error = refused(check_struct, value, field="run_config", max_bytes=MAX_CONFIG_BYTES, max_depth=4)

    assert error.reason == "ARGUMENT_INVALID"
    assert [v.field for v in error.violations] == [field]
    assert problem in error.message


def test_configs_and_schemas_at_the_depth_limit_reach_an_agent() -> None:
    """What an agent receives: a LeaseResponse whose Assignment holds the item (its run config) and the
    job version (its input schema)."""
    response = queue_pb2.LeaseResponse()
    response.assignment.item.run_config.CopyFrom(dict_to_struct(nested(MAX_CONFIG_DEPTH)))
    response.assignment.job_version.inputs.schema.CopyFrom(dict_to_struct(nested(MAX_SCHEMA_DEPTH)))

    decoded = queue_pb2.LeaseResponse.FromString(response.SerializeToString())

    assert decoded == response


class ItemState(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"


def test_enum_numbers_map_to_domain_members_by_name() -> None:
    assert enum_member(
        ItemState, common_pb2.ITEM_STATE_RUNNING, field="state", proto=common_pb2.ItemState
    ) is (ItemState.RUNNING)
    assert enum_member(ItemState, 0, field="state", proto=common_pb2.ItemState) is None


@pytest.mark.parametrize("number", [999, -1, common_pb2.ITEM_STATE_LEASED])  # the last has no domain member
def test_unknown_enum_numbers_are_invalid_argument(number: int) -> None:
    error = refused(enum_member, ItemState, number, field="states[0]", proto=common_pb2.ItemState)

    assert error.reason == "ARGUMENT_INVALID"
    assert [v.field for v in error.violations] == ["states[0]"]
    assert "ITEM_STATE_PENDING (1)" in error.message


def test_durations_convert_within_their_range() -> None:
    assert duration_value(duration_pb2.Duration(seconds=90, nanos=5), field="timeout") == timedelta(
        seconds=90, microseconds=0
    )


@pytest.mark.parametrize(
    ("seconds", "nanos", "problem"),
    [
        (10**15, 0, "not a valid"),
        (-(10**15), 0, "not a valid"),
        (1, -5, "not a valid"),
        (0, 2 * 10**9, "not a valid"),
        (-1, 0, "negative"),
    ],
)
def test_durations_out_of_range_are_refused(seconds: int, nanos: int, problem: str) -> None:
    duration = duration_pb2.Duration(seconds=seconds, nanos=nanos)

    error = refused(duration_value, duration, field="queue.start_timeout")

    assert [v.field for v in error.violations] == ["queue.start_timeout"]
    assert problem in error.message
