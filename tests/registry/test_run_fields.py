"""What a run is found and described by (tags, notes, group, job type), its config changed after init
(UpdateRunConfig, the launch's keys read-only) and ListRuns' filters, on a real registry."""

from __future__ import annotations

from typing import Any

import grpc

from takeoff.v1 import common_pb2, runs_pb2
from takeoff_server.protovalues import dict_to_struct, struct_to_dict
from tests.registry.conftest import Registry, failure

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
LAUNCH = {"lr": 0.1, "epochs": 3}


async def create_run(registry: Registry, run_id: str = "", **run: Any) -> runs_pb2.Run:
    request = runs_pb2.CreateRunRequest(parent="projects/demo", run_id=run_id, run=runs_pb2.Run(**run))
    return (await registry.runs.CreateRun(request)).run


async def launched_run(registry: Registry, run_id: str = "") -> runs_pb2.Run:
    """A run as the agent creates it for a launch, then attached by the job with its defaults."""
    run = await create_run(registry, run_id, config=dict_to_struct(LAUNCH))
    attach = runs_pb2.AttachRunRequest(name=run.name, config=dict_to_struct({**LAUNCH, "seed": 1}))
    return (await registry.runs.AttachRun(attach)).run


async def update_config(registry: Registry, name: str, config: dict[str, Any]) -> runs_pb2.Run:
    request = runs_pb2.UpdateRunConfigRequest(name=name, config=dict_to_struct(config))
    return (await registry.runs.UpdateRunConfig(request)).run


async def list_ids(registry: Registry, **filters: Any) -> list[str]:
    response = await registry.runs.ListRuns(runs_pb2.ListRunsRequest(parent="projects/demo", **filters))
    return [run.name.rpartition("/")[2] for run in response.runs]


# UpdateRunConfig


async def test_config_updates_merge_keys_the_launch_did_not_set(registry: Registry) -> None:
    run = await launched_run(registry)
    assert sorted(run.launch_config_keys) == ["epochs", "lr"]

    updated = await update_config(registry, run.name, {"batch": 32, "seed": None, "model": {"depth": 4}})

    expected = {**LAUNCH, "batch": 32, "model": {"depth": 4}}
    assert struct_to_dict(updated.config) == expected
    stored = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))).run
    assert struct_to_dict(stored.config) == expected
    assert sorted(stored.launch_config_keys) == ["epochs", "lr"]


async def test_a_config_update_touching_launch_keys_is_refused_whole(registry: Registry) -> None:
    run = await launched_run(registry)
    request = runs_pb2.UpdateRunConfigRequest(
        name=run.name, config=dict_to_struct({"batch": 32, "lr": 0.5, "epochs": None})
    )

    refused = await failure(registry.runs.UpdateRunConfig(request))

    assert (refused.code, refused.reason) == (FAILED_PRECONDITION, "CONFIG_KEY_READ_ONLY")
    assert sorted(refused.fields) == ["config.epochs", "config.lr"]
    stored = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))).run
    assert struct_to_dict(stored.config) == {**LAUNCH, "seed": 1}


async def test_a_run_made_outside_a_launch_has_no_read_only_keys(registry: Registry) -> None:
    run = await create_run(registry)
    await registry.runs.AttachRun(runs_pb2.AttachRunRequest(name=run.name, config=dict_to_struct(LAUNCH)))

    updated = await update_config(registry, run.name, {"lr": 0.5})

    assert list(updated.launch_config_keys) == []
    assert struct_to_dict(updated.config) == {"lr": 0.5, "epochs": 3}


async def test_config_updates_end_with_the_run_and_stay_within_the_config_limit(registry: Registry) -> None:
    run = await launched_run(registry)
    half = "x" * (140 * 1024)
    await update_config(registry, run.name, {"a": half})

    too_big = await failure(update_config(registry, run.name, {"b": half}))
    assert (too_big.code, too_big.reason, too_big.fields) == (INVALID, "ARGUMENT_INVALID", ["config"])
    replaced = await update_config(registry, run.name, {"a": None, "b": half})
    assert set(struct_to_dict(replaced.config)) == {"lr", "epochs", "seed", "b"}

    finish = runs_pb2.FinishRunRequest(name=run.name, state=common_pb2.RUN_STATE_FINISHED)
    await registry.runs.FinishRun(finish)
    ended = await failure(update_config(registry, run.name, {"c": 1}))
    assert (ended.code, ended.reason) == (FAILED_PRECONDITION, "RUN_ENDED")
    missing = await failure(update_config(registry, "projects/demo/runs/nope", {"c": 1}))
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND")
    unset = await failure(registry.runs.UpdateRunConfig(runs_pb2.UpdateRunConfigRequest(name=run.name)))
    assert (unset.code, unset.fields) == (INVALID, ["config"])
