"""gRPC servicer of RunService: requests become domain calls, results become protos."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from takeoff.v1 import common_pb2, runs_pb2, runs_pb2_grpc
from takeoff_registry.refs import JOB_VERSION, QUEUE_ITEM, JobKey, RunKey, parse_job_reference, parse_project
from takeoff_registry.runs import (
    History,
    NewRun,
    ResumeMode,
    Run,
    RunFilter,
    RunLabels,
    Runs,
    RunState,
)
from takeoff_registry.wire import (
    MAX_ENTRIES_PER_MESSAGE,
    chosen_metric_rows,
    log_batch,
    log_lines,
    metric_batch,
    metric_columns,
    metric_rows,
)
from takeoff_server.idempotency import check_request_id
from takeoff_server.names import ID_RULE, check_id, is_valid_id
from takeoff_server.pagination import MAX_PAGE_BYTES, page_request, page_response
from takeoff_server.protovalues import dict_to_struct, optional_timestamp, struct_to_dict, timestamp
from takeoff_server.validation import enum_member, field_error

EntryT = TypeVar("EntryT", bound=Message)

_STATE_FROM_PROTO = {common_pb2.RunState.Value(f"RUN_STATE_{state}"): state for state in RunState}


def _state_to_proto(state: RunState) -> common_pb2.RunState.ValueType:
    return common_pb2.RunState.Value(f"RUN_STATE_{state}")


def _run_to_proto(run: Run) -> runs_pb2.Run:
    return runs_pb2.Run(
        name=run.key.name,
        display_name=run.display_name,
        job_version=run.job_version,
        queue_item=run.queue_item,
        attempt=run.attempt,
        state=_state_to_proto(run.state),
        config=dict_to_struct(run.config),
        summary=dict_to_struct(run.summary),
        create_time=timestamp(run.create_time),
        start_time=optional_timestamp(run.start_time),
        end_time=optional_timestamp(run.end_time),
        update_time=timestamp(run.update_time),
        exit_code=run.exit_code,
        message=run.message,
        history_length=run.history_length,
        last_step=run.last_step,
        metric_keys=run.metric_keys,
        log_line_count=run.log_line_count,
        tags=run.labels.tags,
        notes=run.labels.notes,
        group=run.labels.group,
        job_type=run.labels.job_type,
        launch_config_keys=run.launch_config_keys,
        resumed_from=run.resumed_from,
    )


def _labels(given: runs_pb2.Run | runs_pb2.AttachRunRequest) -> RunLabels:
    return RunLabels(tuple(given.tags), given.notes, given.group, given.job_type)


def _run_filter(request: runs_pb2.ListRunsRequest) -> RunFilter:
    job = job_version = ""
    if JOB_VERSION.match(request.job) is not None:
        job_version = request.job
    elif request.job:
        job = JobKey.parse(request.job, field="job").name
    if request.queue_item:
        QUEUE_ITEM.parse(request.queue_item, field="queue_item")
    states = (
        tuple(
            state
            for index, number in enumerate(request.states)
            if (state := enum_member(RunState, number, field=f"states[{index}]", proto=common_pb2.RunState))
        )
        if request.states
        else None
    )
    if request.id_prefix and not is_valid_id(request.id_prefix):
        raise field_error("id_prefix", f"must be the start of a run id ({ID_RULE})")
    return RunFilter(
        job=job,
        job_version=job_version,
        queue_item=request.queue_item,
        states=states,
        id_prefix=request.id_prefix,
        group=request.group,
        tags=tuple(request.tags),
    )


def _batches(entries: Iterable[EntryT]) -> Iterable[list[EntryT]]:
    """Entries grouped into stream messages of at most MAX_ENTRIES_PER_MESSAGE entries and, so that a
    client's default 4 MiB receive size holds any message, at most MAX_PAGE_BYTES."""
    batch: list[EntryT] = []
    size = 0
    for entry in entries:
        entry_size = entry.ByteSize()
        if batch and size + entry_size > MAX_PAGE_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry_size
        if len(batch) == MAX_ENTRIES_PER_MESSAGE:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class RunApi(runs_pb2_grpc.RunServiceServicer):
    """Runs: config, metrics, summary, logs and state."""

    def __init__(self, runs: Runs) -> None:
        self._runs = runs

    async def CreateRun(
        self,
        request: runs_pb2.CreateRunRequest,
        context: grpc.aio.ServicerContext[runs_pb2.CreateRunRequest, runs_pb2.CreateRunResponse],
    ) -> runs_pb2.CreateRunResponse:
        project = parse_project(request.parent, field="parent")
        run_id = check_id(request.run_id, field="run_id", kind="run id") if request.run_id else ""
        run = request.run
        if run.queue_item:
            QUEUE_ITEM.parse(run.queue_item, field="run.queue_item")
        new = NewRun(
            display_name=run.display_name,
            job_version=(
                parse_job_reference(run.job_version, project=project, field="run.job_version")
                if run.job_version
                else None
            ),
            queue_item=run.queue_item,
            attempt=run.attempt,
            config=struct_to_dict(run.config) if run.HasField("config") else None,
            labels=_labels(run),
        )
        created = await self._runs.create_run(
            project, run_id, new, request_id=check_request_id(request.request_id)
        )
        return runs_pb2.CreateRunResponse(run=_run_to_proto(created))

    async def AttachRun(
        self,
        request: runs_pb2.AttachRunRequest,
        context: grpc.aio.ServicerContext[runs_pb2.AttachRunRequest, runs_pb2.AttachRunResponse],
    ) -> runs_pb2.AttachRunResponse:
        resume = enum_member(ResumeMode, request.resume, field="resume", proto=runs_pb2.ResumeMode)
        attached = await self._runs.attach_run(
            RunKey.parse(request.name, field="name"),
            config=struct_to_dict(request.config) if request.HasField("config") else None,
            display_name=request.display_name,
            labels=_labels(request),
            resume=resume or ResumeMode.NEVER,
        )
        resumed = attached.resumed_from_run
        return runs_pb2.AttachRunResponse(
            run=_run_to_proto(attached.run),
            resumed_from_run=_run_to_proto(resumed) if resumed is not None else None,
        )

    async def GetRun(
        self,
        request: runs_pb2.GetRunRequest,
        context: grpc.aio.ServicerContext[runs_pb2.GetRunRequest, runs_pb2.GetRunResponse],
    ) -> runs_pb2.GetRunResponse:
        run = await self._runs.get_run(RunKey.parse(request.name, field="name"))
        return runs_pb2.GetRunResponse(run=_run_to_proto(run))

    async def ListRuns(
        self,
        request: runs_pb2.ListRunsRequest,
        context: grpc.aio.ServicerContext[runs_pb2.ListRunsRequest, runs_pb2.ListRunsResponse],
    ) -> runs_pb2.ListRunsResponse:
        project = parse_project(request.parent, field="parent")
        where = _run_filter(request)
        query = {
            "parent": request.parent,
            "job": request.job,
            "queue_item": request.queue_item,
            "states": list(request.states),
            "id_prefix": request.id_prefix,
            "group": request.group,
            "tags": list(request.tags),
        }
        page = page_request(
            page_size_requested=request.page_size,
            page_token=request.page_token,
            query=query,
            cursor_types=[int],
        )
        runs, more = await self._runs.list_runs(project, where, page=page)
        shown, token = page_response(
            [(_run_to_proto(run), (position,)) for run, position in runs], more=more, query=query
        )
        return runs_pb2.ListRunsResponse(runs=shown, next_page_token=token)

    async def LogMetrics(
        self,
        request_iterator: AsyncIterator[runs_pb2.LogMetricsRequest],
        context: grpc.aio.ServicerContext[runs_pb2.LogMetricsRequest, runs_pb2.LogMetricsResponse],
    ) -> runs_pb2.LogMetricsResponse:
        key: RunKey | None = None
        accepted = skipped = length = 0
        async for message in request_iterator:
            if key is None:
                key = RunKey.parse(message.name, field="name")
            elif message.name and message.name != key.name:
                raise field_error("name", f"every message of the stream must name the run {key.name}")
            # Each batch is written whole though the caller cancels the stream meanwhile: a cancellation
            # part-way through a transaction could keep the database's write lock (FinishedCalls, which
            # does this for unary calls, leaves streams cancellable).
            appended = await asyncio.shield(
                self._runs.log_metrics(
                    key,
                    metric_batch(message.rows),
                    first_index=message.first_row_index if message.HasField("first_row_index") else None,
                )
            )
            accepted += appended.accepted
            skipped += appended.skipped
            length = appended.length
        if key is None:
            raise field_error("name", "the stream carried no messages")
        return runs_pb2.LogMetricsResponse(
            accepted_rows=accepted, skipped_rows=skipped, history_length=length
        )

    async def BatchLogMetrics(
        self,
        request: runs_pb2.BatchLogMetricsRequest,
        context: grpc.aio.ServicerContext[runs_pb2.BatchLogMetricsRequest, runs_pb2.BatchLogMetricsResponse],
    ) -> runs_pb2.BatchLogMetricsResponse:
        appended = await self._runs.log_metrics(
            RunKey.parse(request.name, field="name"),
            metric_batch(request.rows),
            first_index=request.first_row_index if request.HasField("first_row_index") else None,
        )
        return runs_pb2.BatchLogMetricsResponse(
            accepted_rows=appended.accepted, skipped_rows=appended.skipped, history_length=appended.length
        )

    async def UpdateSummary(
        self,
        request: runs_pb2.UpdateSummaryRequest,
        context: grpc.aio.ServicerContext[runs_pb2.UpdateSummaryRequest, runs_pb2.UpdateSummaryResponse],
    ) -> runs_pb2.UpdateSummaryResponse:
        key = RunKey.parse(request.name, field="name")
        if not request.HasField("summary"):
            raise field_error("summary", "the keys to merge are required")
        summary = await self._runs.update_summary(key, struct_to_dict(request.summary))
        return runs_pb2.UpdateSummaryResponse(summary=dict_to_struct(summary))

    async def UpdateRunConfig(
        self,
        request: runs_pb2.UpdateRunConfigRequest,
        context: grpc.aio.ServicerContext[runs_pb2.UpdateRunConfigRequest, runs_pb2.UpdateRunConfigResponse],
    ) -> runs_pb2.UpdateRunConfigResponse:
        key = RunKey.parse(request.name, field="name")
        if not request.HasField("config"):
            raise field_error("config", "the keys to merge are required")
        run = await self._runs.update_config(key, struct_to_dict(request.config))
        return runs_pb2.UpdateRunConfigResponse(run=_run_to_proto(run))

    async def AppendLogs(
        self,
        request: runs_pb2.AppendLogsRequest,
        context: grpc.aio.ServicerContext[runs_pb2.AppendLogsRequest, runs_pb2.AppendLogsResponse],
    ) -> runs_pb2.AppendLogsResponse:
        appended = await self._runs.append_logs(
            RunKey.parse(request.name, field="name"),
            log_batch(request.lines),
            first_index=request.first_line_index if request.HasField("first_line_index") else None,
        )
        return runs_pb2.AppendLogsResponse(
            accepted_lines=appended.accepted, skipped_lines=appended.skipped, log_line_count=appended.length
        )

    async def FinishRun(
        self,
        request: runs_pb2.FinishRunRequest,
        context: grpc.aio.ServicerContext[runs_pb2.FinishRunRequest, runs_pb2.FinishRunResponse],
    ) -> runs_pb2.FinishRunResponse:
        key = RunKey.parse(request.name, field="name")
        state = _STATE_FROM_PROTO.get(request.state)
        if state is None:
            raise field_error("state", "must be a final state: FINISHED, FAILED, CRASHED or KILLED")
        run, already_ended = await self._runs.finish_run(
            key,
            state,
            exit_code=request.exit_code if request.HasField("exit_code") else None,
            message=request.message,
        )
        return runs_pb2.FinishRunResponse(run=_run_to_proto(run), already_ended=already_ended)

    async def ReadMetrics(
        self,
        request: runs_pb2.ReadMetricsRequest,
        context: grpc.aio.ServicerContext[runs_pb2.ReadMetricsRequest, runs_pb2.ReadMetricsResponse],
    ) -> AsyncIterator[runs_pb2.ReadMetricsResponse]:
        key = RunKey.parse(request.name, field="name")
        keys = frozenset(request.keys)
        start = request.start_index
        if request.max_points:
            sampled = await self._runs.sample_metrics(
                key, start=start, max_points=request.max_points, keys=keys, columns_of=metric_columns
            )
            if sampled is not None:
                chunks = self._runs.read(key, History.METRICS, start=start, end=sampled.end, follow=False)
                async for chunk in chunks:
                    for rows in _batches(chosen_metric_rows(chunk, sampled.indices, keys=keys)):
                        yield runs_pb2.ReadMetricsResponse(rows=rows)
                if not request.follow:
                    return
                # Rows stored since are sent as they are: a live chart adds each point.
                start = sampled.end
        chunks = self._runs.read(key, History.METRICS, start=start, follow=request.follow)
        async for chunk in chunks:
            for rows in _batches(metric_rows(chunk, start=start, keys=keys)):
                yield runs_pb2.ReadMetricsResponse(rows=rows)

    async def ReadLogs(
        self,
        request: runs_pb2.ReadLogsRequest,
        context: grpc.aio.ServicerContext[runs_pb2.ReadLogsRequest, runs_pb2.ReadLogsResponse],
    ) -> AsyncIterator[runs_pb2.ReadLogsResponse]:
        key = RunKey.parse(request.name, field="name")
        if request.tail < 0:
            raise field_error("tail", "must not be negative")
        start = request.start_index
        if request.tail:
            # The last `tail` lines of the whole log; a streams filter then applies to them.
            start = max(0, (await self._runs.get_run(key)).log_line_count - request.tail)
        for index, number in enumerate(request.streams):
            if number not in runs_pb2.LogStream.values():
                raise field_error(f"streams[{index}]", f"{number} is not a log stream")
        streams = frozenset(request.streams)
        async for chunk in self._runs.read(key, History.LOGS, start=start, follow=request.follow):
            for lines in _batches(log_lines(chunk, start=start, streams=streams)):
                yield runs_pb2.ReadLogsResponse(lines=lines)
