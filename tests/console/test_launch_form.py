"""The launch form built from an input schema and template variables, read back, and the server's field
violations placed next to their fields (plain Python: no server)."""

from __future__ import annotations

from typing import Any

from takeoff_console.launch_form import LaunchForm
from takeoff_rpc.status import FieldViolation

SCHEMA = {
    "type": "object",
    "required": ["mode"],
    "properties": {
        "lr": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.1},
        "epochs": {"type": "integer", "default": 3},
        "mode": {"enum": ["fast", "full"]},
        "shuffle": {"type": "boolean"},
        "name": {"type": ["string", "null"]},
        "layers": {"type": "array", "items": {"type": "integer"}},
    },
}
VARIABLES: dict[str, dict[str, Any]] = {
    "cpus": {"type": "integer", "minimum": 1, "default": 2},
    "image": {"type": "string"},
}


def form() -> LaunchForm:
    return LaunchForm.build(SCHEMA, {"epochs": 5}, VARIABLES, request_id="r1")


def test_each_property_becomes_an_input_of_its_kind_holding_its_default() -> None:
    built = form()
    fields = {f.name: f for f in built.fields}
    assert [f.name for f in built.config_fields] == [
        "run_config.lr", "run_config.epochs", "run_config.mode", "run_config.shuffle", "run_config.name",
        "run_config.layers",
    ]  # fmt: skip
    assert (
        fields["run_config.lr"].kind,
        fields["run_config.lr"].minimum,
        fields["run_config.lr"].maximum,
    ) == (
        "number",
        0,
        1,
    )
    assert fields["run_config.epochs"].value == "5"  # the version's defaults win over the schema's
    assert fields["run_config.mode"].choices == [('"fast"', "fast"), ('"full"', "full")]
    assert fields["run_config.mode"].required
    assert [fields[n].kind for n in ("run_config.shuffle", "run_config.name", "run_config.layers")] == [
        "boolean",
        "string",
        "json",
    ]
    assert fields["template_variables.cpus"].value == "2"
    assert fields["template_variables.image"].required
    assert fields["template_variables.cpus"].testid == "launch-var-cpus"


def test_the_submitted_values_are_typed_and_empty_ones_left_to_the_defaults() -> None:
    built = form()
    submission = built.read(
        {
            "run_config.lr": "0.5",
            "run_config.epochs": "",
            "run_config.mode": '"full"',
            "run_config.shuffle": "true",
            "run_config.layers": "[64, 32]",
            "template_variables.cpus": "4",
            "priority": "high",
            "resource_config": '{"env": {"A": "1"}}',
        }
    )
    assert submission is not None
    assert submission.run_config == {"lr": 0.5, "mode": "full", "shuffle": True, "layers": [64, 32]}
    assert submission.template_variables == {"cpus": 4}
    assert submission.resource_config == {"env": {"A": "1"}}
    assert (submission.priority, submission.request_id) == ("high", "r1")


def test_a_value_that_cannot_be_sent_is_refused_on_its_field() -> None:
    built = form()
    refused = built.read({"run_config.epochs": "many", "run_config.layers": "[1,", "resource_config": "[1]"})
    assert refused is None
    errors = {f.name: f.error for f in built.fields if f.error}
    assert errors["run_config.epochs"] == "must be a whole number"
    assert errors["run_config.layers"].startswith("is not valid JSON")
    assert built.resource_config_error.startswith("must be a JSON object")


def test_the_server_s_violations_go_to_their_fields_or_above_the_form() -> None:
    built = form()
    built.refused(
        [
            FieldViolation("run_config.lr", "5 is greater than the maximum of 1"),
            FieldViolation("run_config.layers[1]", "'x' is not of type 'integer'"),
            FieldViolation("template_variables.cpus", "0 is less than the minimum of 1"),
            FieldViolation("resource_config.env", "must be an object"),
            FieldViolation("job", "an image job; local-process queues run code and git jobs"),
        ],
        "invalid run config",
    )
    errors = {f.name: f.error for f in built.fields if f.error}
    assert errors == {
        "run_config.lr": "5 is greater than the maximum of 1",
        "run_config.layers": "'x' is not of type 'integer'",
        "template_variables.cpus": "0 is less than the minimum of 1",
    }
    assert built.resource_config_error == "must be an object"
    assert built.errors == ["job: an image job; local-process queues run code and git jobs"]


def test_a_refusal_without_violations_shows_the_server_s_message() -> None:
    built = form()
    built.refused([], "the queue is being deleted")
    assert built.errors == ["the queue is being deleted"]
