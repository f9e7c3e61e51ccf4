"""NUL characters in every kind of text a client sends the registry, on SQLite and PostgreSQL.

PostgreSQL's text types cannot hold NUL (U+0000) and SQLite's can: text the registry keeps as text
(names, descriptions, display names, messages, metric names, request ids) refuses NUL with INVALID_ARGUMENT
``ARGUMENT_INVALID`` naming the field on both, so a client sees one behaviour whichever store runs. Values
kept as data rather than text (Struct configs and summaries, log lines) keep NUL as given.
"""

from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2

from takeoff.v1 import common_pb2, jobs_pb2, runs_pb2
from takeoff_server.protovalues import dict_to_struct, struct_to_dict
from tests.registry.conftest import Registry, failure

PARENT = "projects/text"
NUL_TEXT = "before\x00after"
IMAGE = common_pb2.JobSource(image=common_pb2.ImageSource(reference="python:3.12-slim"))


async def job_names(registry: Registry) -> list[str]:
    response = await registry.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent=PARENT))
    return [job.name for job in response.jobs]


async def run_names(registry: Registry) -> list[str]:
    response = await registry.runs.ListRuns(runs_pb2.ListRunsRequest(parent=PARENT))
    return [run.name for run in response.runs]


async def create_run(registry: Registry, run_id: str) -> runs_pb2.Run:
    response = await registry.runs.CreateRun(runs_pb2.CreateRunRequest(parent=PARENT, run_id=run_id))
    return response.run


async def assert_refused(call: object, field: str) -> None:
    refused = await failure(call)  # type: ignore[arg-type]
    assert (refused.code, refused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ARGUMENT_INVALID")
    assert refused.fields == [field]
    assert "NUL" in refused.message


async def test_a_job_id_with_nul_is_an_invalid_name(registry: Registry) -> None:
    refused = await failure(
        registry.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent=PARENT, job_id="train\x00"))
    )
    assert (refused.code, refused.reason, refused.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "NAME_INVALID",
        ["job_id"],
    )
    refused = await failure(registry.jobs.GetJob(jobs_pb2.GetJobRequest(name=f"{PARENT}/jobs/train\x00")))
    assert (refused.code, refused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "NAME_INVALID")


async def test_a_job_description_with_nul_is_refused_and_no_job_is_listed(registry: Registry) -> None:
    await registry.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent=PARENT, job_id="kept"))

    await assert_refused(
        registry.jobs.CreateJob(
            jobs_pb2.CreateJobRequest(parent=PARENT, job_id="nul", job=jobs_pb2.Job(description=NUL_TEXT))
        ),
        "job.description",
    )
    await assert_refused(
        registry.jobs.UpdateJob(
            jobs_pb2.UpdateJobRequest(
                job=jobs_pb2.Job(name=f"{PARENT}/jobs/kept", description=NUL_TEXT),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            )
        ),
        "job.description",
    )

    assert await job_names(registry) == [f"{PARENT}/jobs/kept"]
    kept = await registry.jobs.GetJob(jobs_pb2.GetJobRequest(name=f"{PARENT}/jobs/kept"))
    assert kept.job.description == ""


async def test_version_texts_with_nul_are_refused_and_no_version_is_created(registry: Registry) -> None:
    await registry.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent=PARENT, job_id="train"))
    cases = {
        "version.description": common_pb2.JobVersion(source=IMAGE, description=NUL_TEXT),
        "version.outputs.metrics[0]": common_pb2.JobVersion(
            source=IMAGE, outputs=common_pb2.JobOutputs(metrics=[NUL_TEXT])
        ),
        "version.environment.requirements": common_pb2.JobVersion(
            source=IMAGE, environment=common_pb2.Environment(requirements=f"numpy\n{NUL_TEXT}\n")
        ),
    }
    for field, version in cases.items():
        await assert_refused(
            registry.jobs.CreateJobVersion(
                jobs_pb2.CreateJobVersionRequest(
                    parent=f"{PARENT}/jobs/train", version=version, allow_missing=True
                )
            ),
            field,
        )

    versions = await registry.jobs.ListJobVersions(
        jobs_pb2.ListJobVersionsRequest(parent=f"{PARENT}/jobs/train")
    )
    assert list(versions.versions) == []


async def test_a_request_id_with_nul_is_refused_and_nothing_is_created(registry: Registry) -> None:
    await registry.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent=PARENT, job_id="kept"))
    kept_run = await create_run(registry, "kept")
    await assert_refused(
        registry.jobs.CreateJob(
            jobs_pb2.CreateJobRequest(parent=PARENT, job_id="train", request_id=NUL_TEXT)
        ),
        "request_id",
    )
    await assert_refused(
        registry.runs.CreateRun(runs_pb2.CreateRunRequest(parent=PARENT, run_id="r1", request_id=NUL_TEXT)),
        "request_id",
    )

    assert await job_names(registry) == [f"{PARENT}/jobs/kept"]
    assert await run_names(registry) == [kept_run.name]


async def test_a_run_display_name_with_nul_is_refused_and_no_run_is_listed(registry: Registry) -> None:
    run = await create_run(registry, "r1")
    await assert_refused(
        registry.runs.CreateRun(
            runs_pb2.CreateRunRequest(parent=PARENT, run_id="nul", run=runs_pb2.Run(display_name=NUL_TEXT))
        ),
        "run.display_name",
    )
    assert await run_names(registry) == [run.name]
    await assert_refused(
        registry.runs.AttachRun(runs_pb2.AttachRunRequest(name=run.name, display_name=NUL_TEXT)),
        "display_name",
    )
    unchanged = await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))
    assert (unchanged.run.state, unchanged.run.display_name) == (common_pb2.RUN_STATE_STARTING, "")


async def test_a_finish_message_with_nul_is_refused_and_the_run_goes_on(registry: Registry) -> None:
    run = await create_run(registry, "r1")

    await assert_refused(
        registry.runs.FinishRun(
            runs_pb2.FinishRunRequest(name=run.name, state=common_pb2.RUN_STATE_FAILED, message=NUL_TEXT)
        ),
        "message",
    )

    unchanged = await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))
    assert (unchanged.run.state, unchanged.run.message) == (common_pb2.RUN_STATE_STARTING, "")


async def test_a_metric_key_with_nul_is_refused_and_no_row_is_stored(registry: Registry) -> None:
    run = await create_run(registry, "r1")
    batches = {
        "values": runs_pb2.MetricRow(step=0, values={"loss": 1.0, NUL_TEXT: 2.0}),
        "data": runs_pb2.MetricRow(step=0, values={"loss": 1.0}, data=dict_to_struct({NUL_TEXT: "x"})),
    }
    for row in batches.values():
        await assert_refused(
            registry.runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=run.name, rows=[row])),
            "rows",
        )

    unchanged = await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))
    assert (unchanged.run.history_length, list(unchanged.run.metric_keys)) == (0, [])


async def test_structs_keep_nul_in_keys_and_values(registry: Registry) -> None:
    """Configs and summaries are JSON data, kept as JSON text with NUL escaped: they round-trip."""
    config = {NUL_TEXT: NUL_TEXT, "nested": {"\x00": ["\x00", 1.0]}}
    run = (
        await registry.runs.CreateRun(
            runs_pb2.CreateRunRequest(
                parent=PARENT, run_id="r1", run=runs_pb2.Run(config=dict_to_struct(config))
            )
        )
    ).run
    await registry.runs.UpdateSummary(
        runs_pb2.UpdateSummaryRequest(name=run.name, summary=dict_to_struct({NUL_TEXT: NUL_TEXT}))
    )

    stored = (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))).run
    assert struct_to_dict(stored.config) == config
    assert struct_to_dict(stored.summary) == {NUL_TEXT: NUL_TEXT}


async def test_log_lines_keep_nul_as_the_job_printed_it(registry: Registry) -> None:
    """Log lines are job output, stored as bytes: a NUL a job printed is kept, not refused or replaced."""
    run = await create_run(registry, "r1")

    appended = await registry.runs.AppendLogs(
        runs_pb2.AppendLogsRequest(name=run.name, lines=[runs_pb2.LogLine(text=NUL_TEXT)])
    )

    assert appended.accepted_lines == 1
    read = [
        line.text
        async for response in registry.runs.ReadLogs(runs_pb2.ReadLogsRequest(name=run.name))
        for line in response.lines
    ]
    assert read == [NUL_TEXT]
