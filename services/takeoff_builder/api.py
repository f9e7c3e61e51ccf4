"""gRPC servicer of the builder: builds with streamed events, and their records.

Thin by design: requests become domain calls, events and records become protos.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from takeoff.v1 import build_pb2, build_pb2_grpc, common_pb2
from takeoff_builder.builds import Builder
from takeoff_builder.model import (
    BUILD,
    JOB,
    JOB_VERSION,
    Build,
    BuildEvent,
    BuildFailure,
    BuildKind,
    BuildOptions,
    BuildQuery,
    BuildRequest,
    BuildResult,
    BuildState,
    CacheChecked,
    Failed,
    LogLine,
    Succeeded,
)
from takeoff_server.idempotency import check_request_id
from takeoff_server.names import NAME_INVALID, ResourcePattern
from takeoff_server.pagination import MAX_PAGE_BYTES, page_request, page_response
from takeoff_server.protovalues import optional_timestamp
from takeoff_server.validation import Problems, enum_member, field_error

Context = grpc.aio.ServicerContext[Any, Any]

RUN = ResourcePattern("projects/{project}/runs/{run}")

_KIND_PROTOS: dict[BuildKind, build_pb2.BuildKind.ValueType] = {
    kind: build_pb2.BuildKind.Value(f"BUILD_KIND_{kind.name}") for kind in BuildKind
}
_STATE_PROTOS: dict[BuildState, build_pb2.BuildState.ValueType] = {
    state: build_pb2.BuildState.Value(f"BUILD_STATE_{state.name}") for state in BuildState
}


def _result_to_proto(result: BuildResult) -> build_pb2.BuildResult:
    return build_pb2.BuildResult(
        venv_path=result.venv_path,
        code_path=result.code_path,
        python_path=result.python_path,
        image=result.image,
        image_id=result.image_id,
        image_digest=result.image_digest,
        pushed=result.pushed,
        environment_key=result.environment_key,
        build_key=result.build_key,
        cache_hit=result.cache_hit,
    )


def _failure_to_proto(failure: BuildFailure) -> build_pb2.BuildFailure:
    return build_pb2.BuildFailure(
        reason=common_pb2.FailureReason.Value(f"FAILURE_REASON_{failure.reason.value}"),
        message=failure.message,
        log_tail=failure.log_tail,
    )


def _build_to_proto(build: Build, log_lines: Sequence[str] = ()) -> build_pb2.Build:
    return build_pb2.Build(
        name=build.name,
        job_version=build.job_version,
        kind=_KIND_PROTOS[build.kind],
        options=build_pb2.BuildOptions(push=build.options.push, no_cache=build.options.no_cache),
        state=_STATE_PROTOS[build.state],
        environment_key=build.environment_key,
        build_key=build.build_key,
        cache_hit=build.cache_hit,
        result=_result_to_proto(build.result) if build.result is not None else None,
        failure=_failure_to_proto(build.failure) if build.failure is not None else None,
        create_time=optional_timestamp(build.create_time),
        start_time=optional_timestamp(build.start_time),
        end_time=optional_timestamp(build.end_time),
        run=build.run,
        log_line_count=build.log_line_count,
        log_lines=log_lines,
    )


def _tail_that_fits(lines: Sequence[str]) -> Sequence[str]:
    """The last lines of a log that fit in MAX_PAGE_BYTES, so that GetBuild's answer stays under a
    client's default 4 MiB receive size (Build.log_line_count still counts every line)."""
    size = 0
    for start in range(len(lines) - 1, -1, -1):
        size += len(lines[start].encode()) + 4  # the field's tag and length
        if size > MAX_PAGE_BYTES:
            return lines[start + 1 :]
    return lines


def _responses(build_name: str, events: Sequence[BuildEvent]) -> list[build_pb2.BuildResponse]:
    """Events as stream messages; consecutive log lines travel together."""
    responses: list[build_pb2.BuildResponse] = []
    lines: list[str] = []
    for index, event in enumerate(events):
        time = optional_timestamp(event.time)
        match event.body:
            case LogLine(text=text):
                lines.append(text)
                next_is_log = index + 1 < len(events) and isinstance(events[index + 1].body, LogLine)
                if not next_is_log:
                    log = build_pb2.BuildLog(lines=lines)
                    responses.append(build_pb2.BuildResponse(build=build_name, time=time, log=log))
                    lines = []
            case CacheChecked(hit=hit, environment_key=environment_key, build_key=build_key, detail=detail):
                cache = build_pb2.BuildCacheStatus(
                    hit=hit, environment_key=environment_key, build_key=build_key, detail=detail
                )
                responses.append(build_pb2.BuildResponse(build=build_name, time=time, cache=cache))
            case Succeeded(result=result):
                responses.append(
                    build_pb2.BuildResponse(build=build_name, time=time, result=_result_to_proto(result))
                )
            case Failed(failure=failure):
                responses.append(
                    build_pb2.BuildResponse(build=build_name, time=time, failure=_failure_to_proto(failure))
                )
    return responses


def _build_request(request: build_pb2.BuildRequest) -> BuildRequest:
    problems = Problems()
    if not request.job_version.startswith("projects/"):
        problems.add(
            NAME_INVALID,
            "job_version",
            "a fully qualified job reference is required: projects/{p}/jobs/{j}/versions/{n} or "
            "projects/{p}/jobs/{j}[:alias|:vN]",
        )
    kind = None
    with problems.collect():
        kind = enum_member(BuildKind, request.kind, field="kind", proto=build_pb2.BuildKind)
        if kind is None:
            raise field_error("kind", "required: venv, image or noop")
    if request.run:
        with problems.collect():
            RUN.parse(request.run, field="run")
    with problems.collect():
        check_request_id(request.request_id)
    problems.raise_if_any()
    assert kind is not None
    return BuildRequest(
        job_version=request.job_version,
        kind=kind,
        options=BuildOptions(push=request.options.push, no_cache=request.options.no_cache),
        run=request.run,
        request_id=request.request_id,
    )


def _query(request: build_pb2.ListBuildsRequest) -> BuildQuery:
    problems = Problems()
    if request.job and not (JOB.match(request.job) or JOB_VERSION.match(request.job)):
        problems.add(
            NAME_INVALID,
            "job",
            f"{request.job!r} is neither a job (projects/{{p}}/jobs/{{j}}) nor a version "
            "(projects/{p}/jobs/{j}/versions/{n})",
        )
    states = []
    for index, number in enumerate(request.states):
        with problems.collect():
            state = enum_member(BuildState, number, field=f"states[{index}]", proto=build_pb2.BuildState)
            if state is not None:
                states.append(state)
    kind = None
    with problems.collect():
        kind = enum_member(BuildKind, request.kind, field="kind", proto=build_pb2.BuildKind)
    problems.raise_if_any()
    return BuildQuery(job=request.job, states=tuple(states), kind=kind)


class BuildApi(build_pb2_grpc.BuildServiceServicer):
    """Venv, image and noop builds."""

    def __init__(self, builder: Builder) -> None:
        self._builder = builder

    async def Build(
        self, request: build_pb2.BuildRequest, context: Context
    ) -> AsyncIterator[build_pb2.BuildResponse]:
        started = await self._builder.start(_build_request(request))
        run = started.run
        name = run.build.name
        queued = build_pb2.BuildQueued(build=_build_to_proto(run.snapshot()), joined=started.joined)
        yield build_pb2.BuildResponse(
            build=name, time=optional_timestamp(run.build.create_time), queued=queued
        )
        async for events in run.follow():
            for response in _responses(name, events):
                yield response

    async def GetBuild(
        self, request: build_pb2.GetBuildRequest, context: Context
    ) -> build_pb2.GetBuildResponse:
        build_id = BUILD.parse(request.name, field="name")["build"]
        build, log_lines = await self._builder.get(build_id, include_log=request.include_log)
        return build_pb2.GetBuildResponse(build=_build_to_proto(build, _tail_that_fits(log_lines)))

    async def ListBuilds(
        self, request: build_pb2.ListBuildsRequest, context: Context
    ) -> build_pb2.ListBuildsResponse:
        query = _query(request)
        if request.states and not query.states:
            return build_pb2.ListBuildsResponse()  # only BUILD_STATE_UNSPECIFIED, which matches nothing
        fields = {"job": request.job, "states": sorted(request.states), "kind": request.kind}
        page = page_request(
            page_size_requested=request.page_size,
            page_token=request.page_token,
            query=fields,
            cursor_types=[int],
        )
        builds, more = await self._builder.list(query, page)
        shown, token = page_response(
            [(_build_to_proto(build), (cursor,)) for build, cursor in builds], more=more, query=fields
        )
        return build_pb2.ListBuildsResponse(builds=shown, next_page_token=token)
