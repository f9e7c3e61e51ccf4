"""How logged values become metric rows, and how errors read: pure functions, no server."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from takeoff import FieldViolation, ReadOnlyConfigError, RunConfig, TakeoffError
from takeoff._sender import _fill_row
from takeoff.models import dict_to_struct, struct_to_dict
from takeoff.v1 import runs_pb2


class Scalar:
    """Stands in for a numpy or torch scalar: not a float, but ``tolist()`` gives one."""

    def __init__(self, value: float) -> None:
        self.value = value

    def tolist(self) -> float:
        return self.value


def test_numbers_become_values_and_everything_else_data() -> None:
    row = runs_pb2.MetricRow()
    _fill_row(
        row,
        7,
        1_700_000_000_123_456_789,
        {
            "loss": 0.5,
            "epoch": 3,
            "lr": Scalar(0.01),
            "ok": True,
            "tag": "warmup",
            "hist": [1, 2],
            "none": None,
        },
    )
    assert row.step == 7
    assert (row.time.seconds, row.time.nanos) == (1_700_000_000, 123_456_789)
    assert dict(row.values) == {"loss": 0.5, "epoch": 3.0, "lr": 0.01}
    assert struct_to_dict(row.data) == {"ok": True, "tag": "warmup", "hist": [1, 2], "none": None}


def test_a_struct_round_trip_keeps_whole_numbers_whole() -> None:
    config = {"epochs": 3, "lr": 0.5, "layers": [64, 32], "optimizer": {"name": "adam", "beta": 0.9}}
    assert struct_to_dict(dict_to_struct(config)) == config
    assert isinstance(struct_to_dict(dict_to_struct(config))["epochs"], int)


def test_launched_config_keys_are_read_only_and_others_are_not() -> None:
    config = RunConfig({"lr": 0.5, "batch": 32}, launched_keys=frozenset({"lr"}))
    config["batch"] = 64
    config["new"] = True
    with pytest.raises(ReadOnlyConfigError, match="'lr' was set by the launch"):
        config["lr"] = 1.0
    with pytest.raises(ReadOnlyConfigError):
        del config["lr"]
    assert dict(config) == {"lr": 0.5, "batch": 64, "new": True}


def test_an_error_reads_as_reason_message_and_the_violations_that_add_something() -> None:
    error = TakeoffError(
        "INVALID_ARGUMENT",
        "NAME_INVALID",
        "job id 'Bad Name' is invalid",
        violations=[FieldViolation("job_id", "must be lowercase"), FieldViolation("parent", "is empty")],
    )
    assert (
        str(error)
        == "NAME_INVALID: job id 'Bad Name' is invalid (job_id: must be lowercase; parent: is empty)"
    )
    assert not error.retryable
    echo = TakeoffError(
        "INVALID_ARGUMENT", "NAME_INVALID", "job_id: must be lowercase",
        violations=[FieldViolation("job_id", "must be lowercase")],
    )  # fmt: skip
    assert str(echo) == "NAME_INVALID: job_id: must be lowercase"


def test_the_sdk_imports_no_server_code() -> None:
    # A job's environment has the SDK, not the services: `import takeoff` must not reach for them. It may
    # use the client plumbing it shares with the services (takeoff_rpc), which imports no server code.
    probe = (
        "import sys, takeoff, takeoff.cli; print(sorted(m for m in sys.modules if m.startswith('takeoff_')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    imported = ast.literal_eval(result.stdout.strip())
    assert [module for module in imported if module.split(".")[0] != "takeoff_rpc"] == []
