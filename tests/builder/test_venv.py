"""Venv builds against a real registry: keys and cache, streamed events, concurrency, every bad input."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

import takeoff
import takeoff_builder
from takeoff.v1 import build_pb2, common_pb2
from takeoff_builder.model import Build, BuildKind, BuildOptions, BuildState
from takeoff_builder.store import BuildStore
from takeoff_server.database import Database
from tests.builder.conftest import (
    BUILD_DEADLINE_SECONDS,
    IMAGE,
    MISSING_PACKAGE,
    NOOP,
    SMALL_REQUIREMENT,
    TRAIN_PY,
    UNINSTALLABLE_REQUIREMENTS,
    VENV,
    Builder,
    create_job,
    rpc_failure,
    running_builder,
)
from tests.processes import ServiceProcess

BUILD_FAILED = common_pb2.FAILURE_REASON_BUILD_FAILED
BUILD_INFRA = common_pb2.FAILURE_REASON_BUILD_INFRA


def run_job(result: build_pb2.BuildResult, work_dir: Path, *argv: str) -> str:
    """Run the job as an agent would: in a fresh copy of the code, with the venv's python."""
    shutil.copytree(result.code_path, work_dir)
    completed = subprocess.run(
        [result.python_path, *argv], cwd=work_dir, capture_output=True, text=True, check=True, timeout=60
    )
    return completed.stdout


async def test_a_code_job_builds_into_a_venv_with_its_requirement_and_streams_its_events(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, requirements=SMALL_REQUIREMENT)

    outcome = await builder.build(version)

    assert outcome.kinds[:2] == ["queued", "cache"]
    assert outcome.kinds[-1] == "result"
    assert set(outcome.kinds[2:-1]) == {"log"}
    assert outcome.queued.build.state == build_pb2.BUILD_STATE_QUEUED
    assert not outcome.queued.joined
    assert all(response.build == outcome.name for response in outcome.responses)
    assert not outcome.cache.hit
    assert any("Successfully installed six-1.16.0" in line for line in outcome.log)
    result = outcome.result
    assert not result.cache_hit
    assert result.build_key == outcome.cache.build_key
    assert result.environment_key == outcome.cache.environment_key
    assert Path(result.python_path) == Path(result.venv_path) / "bin" / "python"
    assert Path(result.venv_path).is_relative_to(builder.settings.builds_path)
    assert run_job(result, tmp_path / "work", "train.py") == "six 1.16.0\n"

    stored = await builder.stub.GetBuild(build_pb2.GetBuildRequest(name=outcome.name, include_log=True))
    assert stored.build.state == build_pb2.BUILD_STATE_SUCCEEDED
    assert stored.build.job_version == version
    assert stored.build.result == result
    assert list(stored.build.log_lines) == outcome.log
    assert stored.build.log_line_count == len(outcome.log)
    assert stored.build.start_time.ToDatetime() <= stored.build.end_time.ToDatetime()


async def test_a_second_build_of_the_same_version_is_a_cache_hit_that_runs_nothing(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, requirements=SMALL_REQUIREMENT)
    first = await builder.build(version)
    shelves = {shelf: builder.published(shelf) for shelf in ("venvs", "code")}
    venv_files = _snapshot(Path(first.result.venv_path))

    second = await builder.build(version)

    assert second.kinds == ["queued", "cache", "result"]  # no log: nothing ran
    assert second.cache.hit
    assert second.cache.detail == "venv hit, code hit"
    assert second.result.cache_hit
    assert second.name != first.name
    assert (second.result.venv_path, second.result.code_path) == (
        first.result.venv_path,
        first.result.code_path,
    )
    assert {shelf: builder.published(shelf) for shelf in shelves} == shelves
    assert builder.unpublished("venvs") == builder.unpublished("code") == []
    assert _snapshot(Path(second.result.venv_path)) == venv_files  # pip touched nothing
    stored = await builder.stub.GetBuild(build_pb2.GetBuildRequest(name=second.name))
    assert stored.build.cache_hit
    assert stored.build.log_line_count == 0


def _snapshot(directory: Path) -> dict[str, int]:
    """Every file below ``directory`` with its modification time in ns: a rebuild would change them."""
    return {
        str(path.relative_to(directory)): path.stat().st_mtime_ns
        for path in directory.rglob("*")
        if path.is_file() and not path.is_symlink()
    }


async def test_a_code_only_change_reuses_the_venv(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    first = await builder.build(create_job(client, tmp_path, requirements=SMALL_REQUIREMENT))
    changed = create_job(
        client, tmp_path, requirements=SMALL_REQUIREMENT, files={"train.py": TRAIN_PY + "print('changed')\n"}
    )

    second = await builder.build(changed)

    assert not second.cache.hit
    assert second.cache.detail == "venv hit, code miss"
    assert second.cache.environment_key == first.cache.environment_key
    assert second.cache.build_key != first.cache.build_key
    assert second.result.venv_path == first.result.venv_path
    assert second.result.code_path != first.result.code_path
    assert not any("pip" in line for line in second.log)
    assert run_job(second.result, tmp_path / "work", "train.py") == "six 1.16.0\nchanged\n"


async def test_two_concurrent_identical_builds_run_once(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, requirements=SMALL_REQUIREMENT)

    one, other = await asyncio.gather(builder.build(version), builder.build(version))

    assert one.name == other.name
    assert sorted([one.queued.joined, other.queued.joined]) == [False, True]
    assert one.result == other.result
    assert one.log == other.log  # the joiner had the events from the start replayed
    assert sum("Successfully installed six" in line for line in one.log) == 1
    listed = await builder.stub.ListBuilds(build_pb2.ListBuildsRequest(job=version))
    assert [build.name for build in listed.builds] == [one.name]


async def test_a_build_outlives_a_caller_that_goes_away(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, requirements=SMALL_REQUIREMENT)
    call = builder.stub.Build(build_pb2.BuildRequest(job_version=version, kind=VENV))
    first = await call.read()
    assert isinstance(first, build_pb2.BuildResponse)
    call.cancel()

    async def finished() -> build_pb2.Build:
        while True:
            got = await builder.stub.GetBuild(build_pb2.GetBuildRequest(name=first.build))
            if got.build.state == build_pb2.BUILD_STATE_SUCCEEDED:
                return got.build
            assert got.build.state != build_pb2.BUILD_STATE_FAILED, got.build.failure
            await asyncio.sleep(0.1)

    build = await asyncio.wait_for(finished(), timeout=BUILD_DEADLINE_SECONDS)
    assert (await builder.build(version)).result.venv_path == build.result.venv_path


async def test_no_cache_builds_again_and_keeps_the_old_venv_for_whoever_uses_it(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, files={"train.py": "print('ok')\n"})
    first = await builder.build(version)

    again = await builder.build(version, no_cache=True)

    assert not again.cache.hit
    assert again.result.venv_path != first.result.venv_path
    assert run_job(first.result, tmp_path / "old", "train.py") == "ok\n"  # still there, still works
    assert (await builder.build(version)).result.venv_path == again.result.venv_path


async def test_a_job_without_requirements_gets_a_bare_venv(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, files={"train.py": "print('plain')\n"})

    outcome = await builder.build(version)

    assert "no requirements to install" in outcome.log
    assert run_job(outcome.result, tmp_path / "work", "train.py") == "plain\n"


async def test_the_build_context_is_below_the_code_path(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    files = {"jobs/train/train.py": "print('nested')\n", "README.md": "top\n"}
    version = create_job(client, tmp_path, files=files, build_context="jobs/train")

    result = (await builder.build(version)).result

    assert (Path(result.code_path) / "README.md").exists()
    assert (Path(result.code_path) / "jobs/train/train.py").exists()


# Bad input: each fails with the right reason and leaves nothing that counts as cached.


async def test_a_requirement_pip_rejects_fails_the_build_and_is_not_cached(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, requirements=UNINSTALLABLE_REQUIREMENTS)

    outcome = await builder.build(version)

    failure = outcome.failure
    assert failure.reason == BUILD_FAILED
    assert MISSING_PACKAGE in failure.message
    assert failure.log_tail
    assert failure.log_tail[-1] == outcome.log[-1]
    assert len(failure.log_tail) <= 50
    assert builder.published("venvs") == []
    assert builder.unpublished("venvs") == []

    again = await builder.build(version)
    assert not again.cache.hit
    assert again.failure.reason == BUILD_FAILED
    stored = await builder.stub.GetBuild(build_pb2.GetBuildRequest(name=again.name))
    assert stored.build.state == build_pb2.BUILD_STATE_FAILED
    assert stored.build.failure == again.failure


async def test_a_malformed_requirement_fails_the_build(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, requirements="six=>>1\n")

    failure = (await builder.build(version)).failure

    assert failure.reason == BUILD_FAILED
    assert "six=>>1" in failure.message


async def test_a_python_version_the_builder_lacks_fails_clearly_and_is_never_substituted(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, python_version="3.4")

    first = await builder.build(version)
    second = await builder.build(version)

    for outcome in (first, second):
        assert not outcome.cache.hit
        assert outcome.failure.reason == BUILD_FAILED
        assert "python 3.4 is not available on this builder" in outcome.failure.message
    assert builder.published("venvs") == []


async def test_the_builders_own_python_is_used_when_asked_for_by_version(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    own = f"{sys.version_info.major}.{sys.version_info.minor}"
    version = create_job(
        client, tmp_path, python_version=own, files={"train.py": "import sys; print(sys.version)"}
    )

    result = (await builder.build(version)).result

    assert run_job(result, tmp_path / "work", "train.py").startswith(f"{own}.")


async def test_a_build_context_missing_from_the_source_fails_the_build(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, build_context="no/such/dir")

    failure = (await builder.build(version)).failure

    assert failure.reason == BUILD_FAILED
    assert "'no/such/dir' is not a directory" in failure.message


async def test_a_version_that_does_not_exist_is_not_found_before_any_event(
    builder: Builder, client: takeoff.Client, tmp_path: Path, project: str
) -> None:
    version = create_job(client, tmp_path)
    missing_version = version.rsplit("/", 1)[0] + "/99"

    for reference, reason in [
        (f"projects/{project}/jobs/nope/versions/0", "JOB_NOT_FOUND"),
        (missing_version, "JOB_VERSION_NOT_FOUND"),
        (f"projects/{project}/jobs/train:no-such-alias", "JOB_VERSION_NOT_FOUND"),
    ]:
        problem = await rpc_failure(builder.build(reference))
        assert (problem.code, problem.reason) == (grpc.StatusCode.NOT_FOUND, reason), reference
    assert builder.calls == []


@pytest.mark.parametrize(
    ("request_fields", "reason", "field"),
    [
        ({"job_version": "train:v0", "kind": VENV}, "NAME_INVALID", "job_version"),
        ({"job_version": "", "kind": VENV}, "NAME_INVALID", "job_version"),
        ({"kind": build_pb2.BUILD_KIND_UNSPECIFIED}, "ARGUMENT_INVALID", "kind"),
        ({"kind": NOOP}, "BUILD_KIND_INCOMPATIBLE", "kind"),
        ({"kind": VENV, "options": build_pb2.BuildOptions(push=True)}, "ARGUMENT_INVALID", "options.push"),
        ({"kind": VENV, "run": "runs/1"}, "NAME_INVALID", "run"),
        ({"kind": VENV, "request_id": "x" * 129}, "ARGUMENT_INVALID", "request_id"),
    ],
)
async def test_invalid_requests_are_refused_before_any_event(
    builder: Builder,
    client: takeoff.Client,
    tmp_path: Path,
    *,
    request_fields: dict[str, object],
    reason: str,
    field: str,
) -> None:
    fields = {"job_version": create_job(client, tmp_path), **request_fields}
    request = build_pb2.BuildRequest(**fields)  # type: ignore[arg-type]

    problem = await rpc_failure(_first_event(builder, request))

    assert (problem.code, problem.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert field in problem.fields


async def _first_event(builder: Builder, request: build_pb2.BuildRequest) -> object:
    return await builder.stub.Build(request).read()


async def test_a_push_without_a_push_registry_is_a_failed_precondition(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path)

    problem = await rpc_failure(builder.build(version, IMAGE, push=True))

    assert (problem.code, problem.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "PUSH_REGISTRY_NOT_CONFIGURED",
    )


async def test_an_unreachable_registry_is_unavailable(tmp_path: Path) -> None:
    async with running_builder(tmp_path / "builder", "127.0.0.1:1") as builder:
        problem = await rpc_failure(builder.build("projects/p/jobs/j/versions/0"))

    assert (problem.code, problem.reason) == (grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")


# Records: idempotent retries, GetBuild, ListBuilds, recovery after a restart.


async def test_a_retried_request_id_replays_the_same_build(
    builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path)
    first = await builder.build(version, request_id="retry-1")

    retried = await builder.build(version, request_id="retry-1")

    assert retried.name == first.name
    assert retried.queued.joined
    assert retried.result == first.result
    assert retried.log == first.log
    conflict = await rpc_failure(builder.build(version, request_id="retry-1", no_cache=True))
    assert (conflict.code, conflict.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_CONFLICT")


async def test_get_build_names_and_missing_builds(builder: Builder) -> None:
    missing = await rpc_failure(builder.stub.GetBuild(build_pb2.GetBuildRequest(name="builds/nope")))
    malformed = await rpc_failure(builder.stub.GetBuild(build_pb2.GetBuildRequest(name="nope")))

    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "BUILD_NOT_FOUND")
    assert (malformed.code, malformed.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "NAME_INVALID")


async def test_list_builds_filters_by_job_state_and_kind_and_pages(
    builder: Builder, client: takeoff.Client, tmp_path: Path, project: str
) -> None:
    good = create_job(client, tmp_path, job="good")
    bad = create_job(client, tmp_path, job="bad", python_version="3.4")
    built = [await builder.build(good), await builder.build(good), await builder.build(bad)]

    async def names(**fields: object) -> list[str]:
        request = build_pb2.ListBuildsRequest(**fields)  # type: ignore[arg-type]
        return [build.name for build in (await builder.stub.ListBuilds(request)).builds]

    newest_first = [outcome.name for outcome in reversed(built)]
    assert await names() == newest_first
    assert await names(job=f"projects/{project}/jobs/good") == newest_first[1:]
    assert await names(job=good) == newest_first[1:]
    assert await names(states=[build_pb2.BUILD_STATE_FAILED]) == newest_first[:1]
    assert await names(states=[build_pb2.BUILD_STATE_UNSPECIFIED]) == []
    assert await names(kind=IMAGE) == []
    assert await names(kind=VENV) == newest_first

    first_page = await builder.stub.ListBuilds(build_pb2.ListBuildsRequest(page_size=2))
    second_page = await builder.stub.ListBuilds(
        build_pb2.ListBuildsRequest(page_size=2, page_token=first_page.next_page_token)
    )
    assert [b.name for b in first_page.builds] + [b.name for b in second_page.builds] == newest_first
    assert second_page.next_page_token == ""
    assert all(not build.log_lines for build in first_page.builds)

    for request, reason in [
        (build_pb2.ListBuildsRequest(job="jobs/good"), "NAME_INVALID"),
        (build_pb2.ListBuildsRequest(page_size=-1), "ARGUMENT_INVALID"),
        (build_pb2.ListBuildsRequest(page_token=first_page.next_page_token, kind=VENV), "PAGE_TOKEN_INVALID"),
    ]:
        problem = await rpc_failure(builder.stub.ListBuilds(request))
        assert (problem.code, problem.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


async def test_builds_a_stopped_builder_left_unfinished_fail_as_infrastructure_at_its_restart(
    registry: ServiceProcess, tmp_path: Path
) -> None:
    home = tmp_path / "builder"
    home.mkdir()
    database = Database("builder", f"sqlite:///{home / 'builder.db'}", migrations=_migrations())
    await database.migrate()
    left = Build(
        id="left0running",
        job_version="projects/p/jobs/j/versions/0",
        kind=BuildKind.VENV,
        options=BuildOptions(),
        create_time=datetime.now(UTC),
        state=BuildState.RUNNING,
    )
    await BuildStore(database).insert(left)
    await database.close()

    async with running_builder(home, registry.address) as builder:
        got = await builder.stub.GetBuild(build_pb2.GetBuildRequest(name="builds/left0running"))

    assert got.build.state == build_pb2.BUILD_STATE_FAILED
    assert got.build.failure.reason == BUILD_INFRA
    assert "stopped before the build finished" in got.build.failure.message


def _migrations() -> Path:
    return Path(takeoff_builder.__file__).with_name("migrations")
