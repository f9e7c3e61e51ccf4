"""What a run is found and described by (tags, notes, group, job type), its config changed after init
(UpdateRunConfig, the launch's keys read-only) and ListRuns' filters, on a real registry."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

import takeoff_registry.store
from takeoff.v1 import common_pb2, runs_pb2
from takeoff_registry.store import ProjectRow
from takeoff_server.database import Database
from takeoff_server.protovalues import dict_to_struct, struct_to_dict
from takeoff_server.sqltypes import JsonText, UtcDateTime
from tests.registry.conftest import Registry, failure, registry_settings, start_registry

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
LAUNCH = {"lr": 0.1, "epochs": 3}
MIGRATIONS = Path(takeoff_registry.store.__file__).with_name("migrations")
_PLAIN_RUN_COLUMNS = (
    *("project_id", "run_id", "display_name", "job", "job_version", "queue_item", "attempt", "state"),
    *("message", "history_length", "last_step", "log_line_count"),
)


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


# Tags, notes, group and job type


async def test_labels_given_at_creation_come_back_on_every_run(registry: Registry) -> None:
    labels = {"notes": "baseline, no warmup", "group": "sweep-7", "job_type": "train"}
    created = await create_run(registry, "labelled", tags=["b", "a", "b"], **labels)

    got = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=created.name))).run
    [listed] = (await registry.runs.ListRuns(runs_pb2.ListRunsRequest(parent="projects/demo"))).runs
    for run in (created, got, listed):
        assert list(run.tags) == ["b", "a"]  # repeats dropped, order kept
        assert (run.notes, run.group, run.job_type) == tuple(labels.values())


async def test_attach_sets_the_labels_it_gives_and_keeps_the_others(registry: Registry) -> None:
    run = await create_run(registry, tags=["baseline"], group="sweep-7")

    attach = runs_pb2.AttachRunRequest(name=run.name, notes="second try", job_type="eval")
    attached = (await registry.runs.AttachRun(attach)).run

    assert list(attached.tags) == ["baseline"]
    assert (attached.notes, attached.group, attached.job_type) == ("second try", "sweep-7", "eval")


async def test_labels_at_their_limits_are_kept(registry: Registry) -> None:
    tags = [f"{number:02d}".ljust(64, "t") for number in range(64)]
    run = await create_run(
        registry, tags=tags, notes="n" * 4096, group="g" * 128, job_type="j" * 64, display_name="x"
    )
    attach = runs_pb2.AttachRunRequest(name=run.name, tags=["100%", "a_b", "ü"])
    attached = (await registry.runs.AttachRun(attach)).run

    assert list(run.tags) == tags
    assert (len(run.notes), len(run.group), len(run.job_type)) == (4096, 128, 64)
    assert list(attached.tags) == ["100%", "a_b", "ü"]


async def test_tags_out_of_bounds_are_refused_naming_each_one(registry: Registry) -> None:
    bad_tags = ["ok", "", "a,b", "t" * 65, "nul\0"]
    refused = await failure(create_run(registry, "refused", tags=bad_tags))
    assert (refused.code, refused.reason) == (INVALID, "ARGUMENT_INVALID")
    assert refused.fields == ["run.tags[1]", "run.tags[2]", "run.tags[3]", "run.tags[4]"]

    too_many = await failure(create_run(registry, "refused", tags=[f"t{number}" for number in range(65)]))
    assert (too_many.code, too_many.fields) == (INVALID, ["run.tags"])

    run = await create_run(registry, "kept", tags=["before"])
    attach = runs_pb2.AttachRunRequest(name=run.name, tags=["fine", "no,comma"])
    on_attach = await failure(registry.runs.AttachRun(attach))
    assert (on_attach.code, on_attach.fields) == (INVALID, ["tags[1]"])

    assert await list_ids(registry) == ["kept"]
    stored = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))).run
    assert (stored.state, list(stored.tags)) == (common_pb2.RUN_STATE_STARTING, ["before"])


async def test_notes_group_and_job_type_out_of_bounds_are_refused(registry: Registry) -> None:
    too_long = {"notes": "n" * 4097, "group": "g" * 129, "job_type": "j" * 65}
    refused = await failure(create_run(registry, "refused", **too_long))
    assert (refused.code, refused.reason) == (INVALID, "ARGUMENT_INVALID")
    assert refused.fields == ["run.notes", "run.group", "run.job_type"]

    run = await create_run(registry)
    with_nul = runs_pb2.AttachRunRequest(name=run.name, notes="a\0", group="b\0", job_type="c\0")
    on_attach = await failure(registry.runs.AttachRun(with_nul))
    assert (on_attach.code, on_attach.fields) == (INVALID, ["notes", "group", "job_type"])


# ListRuns filters


async def test_runs_are_listed_by_id_prefix(registry: Registry) -> None:
    for run_id in ("abc-1", "abc_2", "abc2", "ab", "abd", "b"):
        await create_run(registry, run_id)

    assert await list_ids(registry, id_prefix="abc") == ["abc2", "abc_2", "abc-1"]
    assert await list_ids(registry, id_prefix="abc-") == ["abc-1"]
    assert await list_ids(registry, id_prefix="ab") == ["abd", "ab", "abc2", "abc_2", "abc-1"]
    assert await list_ids(registry, id_prefix="abc-1") == ["abc-1"]
    assert await list_ids(registry, id_prefix="c") == []

    for prefix in ("-a", "a%", "A", "a" * 64):
        refused = await failure(list_ids(registry, id_prefix=prefix))
        assert (refused.code, refused.reason, refused.fields) == (INVALID, "ARGUMENT_INVALID", ["id_prefix"])


async def test_runs_are_listed_by_group_and_by_every_tag_given(registry: Registry) -> None:
    await create_run(registry, "both", tags=["a", "b"], group="sweep")
    await create_run(registry, "only-a", tags=["a"], group="sweep")
    await create_run(registry, "only-b", tags=["b"])
    await create_run(registry, "wildcards", tags=["a%", "x_y"], group="other")
    await create_run(registry, "look-alikes", tags=["a%b", "xzy"], group="sweep")

    assert await list_ids(registry, tags=["a"]) == ["only-a", "both"]
    assert await list_ids(registry, tags=["a", "b"]) == ["both"]
    assert await list_ids(registry, tags=["b", "a", "b"]) == ["both"]
    assert await list_ids(registry, tags=["a%"]) == ["wildcards"]
    assert await list_ids(registry, tags=["x_y"]) == ["wildcards"]
    assert await list_ids(registry, group="sweep") == ["look-alikes", "only-a", "both"]
    assert await list_ids(registry, group="sweep", tags=["a"]) == ["only-a", "both"]
    assert await list_ids(registry, group="swe") == []

    comma = await failure(list_ids(registry, tags=["a,b"]))
    assert (comma.code, comma.fields) == (INVALID, ["tags[0]"])
    nul = await failure(list_ids(registry, group="a\0"))
    assert (nul.code, nul.fields) == (INVALID, ["group"])


async def test_filtered_pages_continue_with_the_same_filters_only(registry: Registry) -> None:
    for number in range(3):
        await create_run(registry, f"kept-{number}", group="sweep")
        await create_run(registry, f"other-{number}")
    request = runs_pb2.ListRunsRequest(parent="projects/demo", group="sweep", id_prefix="kept", page_size=2)
    first = await registry.runs.ListRuns(request)
    request.page_token = first.next_page_token
    second = await registry.runs.ListRuns(request)

    listed = [run.name.rpartition("/")[2] for run in [*first.runs, *second.runs]]
    assert listed == ["kept-2", "kept-1", "kept-0"]
    assert second.next_page_token == ""
    request.group = "other"
    changed = await failure(registry.runs.ListRuns(request))
    assert (changed.code, changed.reason) == (INVALID, "PAGE_TOKEN_INVALID")


async def test_a_run_stored_before_these_fields_reads_as_unlabelled_with_no_read_only_keys(
    database_url: str, tmp_path: Path
) -> None:
    before = tmp_path / "migrations-before-0004"
    before.mkdir()
    for revision in sorted(MIGRATIONS.glob("000[1-3]_*.py")):
        shutil.copy(revision, before)
    old = Database("registry", database_url, migrations=before)
    try:
        assert await old.migrate() == "0003"
        async with old.engine.begin() as connection:
            await _store_run_before_0004(connection, "old")
    finally:
        await old.close()

    async for registry in start_registry(registry_settings(tmp_path / "home", database_url)):
        run = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name="projects/demo/runs/old"))).run
        assert (list(run.tags), run.notes, run.group, run.job_type) == ([], "", "", "")
        assert list(run.launch_config_keys) == []
        updated = await update_config(registry, run.name, {"lr": 0.2})
        assert struct_to_dict(updated.config) == {"lr": 0.2}
        assert await list_ids(registry, id_prefix="ol") == ["old"]


_RUNS_BEFORE_0004 = sa.table(
    "registry_runs",
    *(sa.column(name) for name in _PLAIN_RUN_COLUMNS),
    *(sa.column(name, JsonText) for name in ("config", "summary", "metric_keys")),
    *(sa.column(name, UtcDateTime) for name in ("create_time", "update_time")),
)
"""The columns of ``registry_runs`` that revision 0003 leaves (every one without a default)."""


async def _store_run_before_0004(connection: AsyncConnection, run_id: str) -> None:
    now = datetime.now(UTC)
    await connection.execute(sa.insert(ProjectRow).values(project_id="demo", create_time=now))
    run = {
        **dict.fromkeys(("display_name", "job", "job_version", "queue_item", "message"), ""),
        **dict.fromkeys(("attempt", "history_length", "last_step", "log_line_count"), 0),
        "project_id": "demo",
        "run_id": run_id,
        "state": "RUNNING",
        "config": {"lr": 0.1},
        "summary": {},
        "metric_keys": [],
        "create_time": now,
        "update_time": now,
    }
    await connection.execute(sa.insert(_RUNS_BEFORE_0004).values(run))
