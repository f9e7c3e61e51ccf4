"""How logged values become metric rows, and how errors read: pure functions, no server."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from typing import Any

import pytest

from takeoff import FieldViolation, ReadOnlyConfigError, RunConfig, TakeoffError
from takeoff._delivery import MetricSummaries
from takeoff._run import _checked_row
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
    values = {"loss": 0.5, "epoch": 3, "ok": True, "tag": "warmup", "hist": [1, 2], "none": None}
    _fill_row(row, 7, 1_700_000_000_123_456_789, values)
    assert row.step == 7
    assert (row.time.seconds, row.time.nanos) == (1_700_000_000, 123_456_789)
    assert dict(row.values) == {"loss": 0.5, "epoch": 3.0}
    assert struct_to_dict(row.data) == {"ok": True, "tag": "warmup", "hist": [1, 2], "none": None}


def test_logged_values_become_plain_json_values() -> None:
    logged = {"lr": Scalar(0.01), "pair": ("a", Scalar(2)), "nested": {"acc": Scalar(0.9)}, "n": None}
    assert _checked_row(logged) == {"lr": 0.01, "pair": ["a", 2], "nested": {"acc": 0.9}, "n": None}


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"obj": object()}, "run.log value 'obj' has type object: log numbers, strings"),
        ({"deep": {"x": [1, {1, 2}]}}, "run.log value 'deep.x[1]' has type set"),
        ({"": 1.0}, "metric names are non-empty strings, not ''"),
        ({3: 1.0}, "metric names are non-empty strings, not 3"),
        ([("loss", 1.0)], "run.log takes a dict of metric names to values, not list"),
    ],
)
def test_values_that_are_not_json_are_refused_naming_the_key(values: object, error: str) -> None:
    with pytest.raises(TypeError, match=re.escape(error)):
        _checked_row(values)  # type: ignore[arg-type]


def test_a_metric_summary_is_its_last_value_unless_defined_otherwise() -> None:
    summaries = MetricSummaries()
    summaries.define("loss", "min,mean", None)
    summaries.define("val/*", "max", "epoch")
    summaries.define("noise", "none", None)
    rows: list[dict[str, Any]] = [
        {"loss": 3.0, "epoch": 0, "phase": "warmup", "noise": 1.0, "hist": [1, 2]},
        {"loss": 1.0, "epoch": 1, "phase": "train", "best": 0.1, "system/cpu_percent": 50.0},
        {"loss": 2.0, "val/acc": 0.5},
        {"val/acc": 0.25, "epoch": 2},
    ]
    for row in rows:
        summaries.observe(row)
    summaries.set_explicitly({"best": 0.0})  # the code's own value: metric summaries leave it alone
    assert rows[2] == {"loss": 2.0, "val/acc": 0.5, "epoch": 1}  # synced to its step metric's last value
    assert summaries.take_changes() == {
        "loss": {"min": 1.0, "mean": 2.0},
        "epoch": 2,
        "phase": "train",
        "val/acc": {"max": 0.5},
    }
    summaries.observe({"epoch": 3, "noise": 2.0})
    summaries.define("phase", "none", None)
    assert summaries.take_changes() == {"epoch": 3, "phase": None}  # what changed since; None removes
    with pytest.raises(OverflowError):
        summaries.observe({"epoch": 10**400})  # the sender drops such a row, with a warning
    assert summaries.take_changes() == {}


def test_a_struct_round_trip_keeps_whole_numbers_whole() -> None:
    config = {"epochs": 3, "lr": 0.5, "layers": [64, 32], "optimizer": {"name": "adam", "beta": 0.9}}
    assert struct_to_dict(dict_to_struct(config)) == config
    assert isinstance(struct_to_dict(dict_to_struct(config))["epochs"], int)


def test_launched_config_keys_are_read_only_and_others_are_not() -> None:
    recorded: list[object] = []
    config = RunConfig({"lr": 0.5, "batch": 32}, frozenset({"lr"}), recorded.append)
    config["batch"] = 64
    config.new = True  # attributes too, as in wandb
    with pytest.raises(ReadOnlyConfigError, match=r"'lr' was set by the launch .* its value is 0.5"):
        config["lr"] = 1.0
    with pytest.raises(ReadOnlyConfigError):
        config.update({"layers": 3, "lr": 1.0})  # refused whole
    with pytest.raises(ReadOnlyConfigError):
        del config["lr"]
    del config["batch"]
    config.update(argparse.Namespace(layers=3))  # as wandb users pass their parsed arguments
    assert dict(config) == {"lr": 0.5, "new": True, "layers": 3}
    assert (config.lr, recorded) == (0.5, [{"batch": 64}, {"new": True}, {"batch": None}, {"layers": 3}])


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
