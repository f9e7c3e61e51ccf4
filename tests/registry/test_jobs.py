"""JobService on a real registry: jobs, versions, aliases, references, paging, idempotency, bad input."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from takeoff.v1 import common_pb2, jobs_pb2
from takeoff_server.pagination import MAX_PAGE_BYTES
from takeoff_server.protovalues import dict_to_struct
from takeoff_server.validation import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH
from tests.registry.conftest import Registry, failure, upload

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def code_version(
    sha256: str, *, entrypoint: tuple[str, ...] = ("python", "train.py"), **fields: Any
) -> common_pb2.JobVersion:
    return common_pb2.JobVersion(
        source=common_pb2.JobSource(code=common_pb2.CodeSource(sha256=sha256)),
        entrypoint=entrypoint,
        **fields,
    )


def image_version(reference: str, **fields: Any) -> common_pb2.JobVersion:
    return common_pb2.JobVersion(
        source=common_pb2.JobSource(image=common_pb2.ImageSource(reference=reference)), **fields
    )


async def create_version(
    registry: Registry, job: str, version: common_pb2.JobVersion, **fields: Any
) -> jobs_pb2.CreateJobVersionResponse:
    fields.setdefault("allow_missing", True)
    return await registry.jobs.CreateJobVersion(
        jobs_pb2.CreateJobVersionRequest(parent=job, version=version, **fields)
    )


async def get_version(registry: Registry, name: str, project: str = "") -> common_pb2.JobVersion:
    response = await registry.jobs.GetJobVersion(jobs_pb2.GetJobVersionRequest(name=name, project=project))
    return response.version


async def test_job_life_cycle(registry: Registry) -> None:
    created = await registry.jobs.CreateJob(
        jobs_pb2.CreateJobRequest(
            parent="projects/demo", job_id="train", job=jobs_pb2.Job(description="MNIST")
        )
    )
    assert created.job.name == "projects/demo/jobs/train"
    assert (created.job.description, created.job.version_count, created.job.latest_version) == (
        "MNIST",
        0,
        "",
    )
    assert dict(created.job.aliases) == {}

    got = await registry.jobs.GetJob(jobs_pb2.GetJobRequest(name="projects/demo/jobs/train"))
    assert got.job == created.job

    updated = await registry.jobs.UpdateJob(
        jobs_pb2.UpdateJobRequest(
            job=jobs_pb2.Job(name="projects/demo/jobs/train", description="MNIST, faster"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
    )
    assert updated.job.description == "MNIST, faster"
    assert updated.job.update_time.ToDatetime() >= created.job.update_time.ToDatetime()

    listed = await registry.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent="projects/demo"))
    assert [job.name for job in listed.jobs] == ["projects/demo/jobs/train"]
    assert listed.next_page_token == ""

    await registry.jobs.DeleteJob(jobs_pb2.DeleteJobRequest(name="projects/demo/jobs/train"))
    gone = await failure(registry.jobs.GetJob(jobs_pb2.GetJobRequest(name="projects/demo/jobs/train")))
    assert (gone.code, gone.reason) == (NOT_FOUND, "JOB_NOT_FOUND")
    assert gone.metadata["resource"] == "projects/demo/jobs/train"


async def test_duplicate_job_is_refused_and_stores_nothing_more(registry: Registry) -> None:
    request = jobs_pb2.CreateJobRequest(parent="projects/demo", job_id="train")
    await registry.jobs.CreateJob(request)

    duplicate = await failure(registry.jobs.CreateJob(request))

    assert (duplicate.code, duplicate.reason) == (grpc.StatusCode.ALREADY_EXISTS, "JOB_ALREADY_EXISTS")
    assert await registry.count_rows("registry_jobs") == 1


async def test_reads_in_a_project_never_written_are_project_not_found(registry: Registry) -> None:
    calls: list[Awaitable[Any]] = [
        registry.jobs.GetJob(jobs_pb2.GetJobRequest(name="projects/ghost/jobs/train")),
        registry.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent="projects/ghost")),
        registry.jobs.GetJobVersion(jobs_pb2.GetJobVersionRequest(name="projects/ghost/jobs/train:v0")),
        registry.jobs.ListJobVersions(jobs_pb2.ListJobVersionsRequest(parent="projects/ghost/jobs/train")),
        registry.jobs.GetArtifact(jobs_pb2.GetArtifactRequest(name=f"projects/ghost/artifacts/{'a' * 64}")),
    ]
    for call in calls:
        problem = await failure(call)
        assert (problem.code, problem.reason) == (NOT_FOUND, "PROJECT_NOT_FOUND")
        assert problem.metadata["resource"] == "projects/ghost"
    assert await registry.count_rows("registry_projects") == 0


async def test_unknown_job_and_version_are_told_apart(registry: Registry) -> None:
    await registry.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/demo", job_id="empty"))
    sha256 = await upload(registry, "demo")
    await create_version(registry, "projects/demo/jobs/train", code_version(sha256))

    cases = {
        "nope": "JOB_NOT_FOUND",
        "empty": "JOB_VERSION_NOT_FOUND",  # a job without versions has no `latest`
        "train:v7": "JOB_VERSION_NOT_FOUND",
        "train:prod": "JOB_VERSION_NOT_FOUND",
        "projects/demo/jobs/train/versions/3": "JOB_VERSION_NOT_FOUND",
    }
    for reference, reason in cases.items():
        problem = await failure(get_version(registry, reference, project="projects/demo"))
        assert (problem.code, problem.reason) == (NOT_FOUND, reason), reference


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (jobs_pb2.CreateJobRequest(parent="project/demo", job_id="train"), "parent"),
        (jobs_pb2.CreateJobRequest(parent="projects/demo", job_id="Train"), "job_id"),
        (jobs_pb2.CreateJobRequest(parent="projects/demo", job_id="-train"), "job_id"),
        (jobs_pb2.CreateJobRequest(parent="projects/demo", job_id="t" * 64), "job_id"),
        (jobs_pb2.CreateJobRequest(parent="projects/de mo", job_id="train"), "parent"),
        (jobs_pb2.CreateJobRequest(parent="projects/demo", job_id=""), "job_id"),
    ],
)
async def test_invalid_names_are_name_invalid(
    registry: Registry, request_: jobs_pb2.CreateJobRequest, field: str
) -> None:
    problem = await failure(registry.jobs.CreateJob(request_))

    assert (problem.code, problem.reason, problem.fields) == (INVALID, "NAME_INVALID", [field])
    assert await registry.count_rows("registry_projects") == 0


@pytest.mark.parametrize(
    ("name", "project", "field"),
    [
        ("train", "", "project"),
        ("train:V1", "projects/demo", "name"),
        ("train:v1:v2", "projects/demo", "name"),
        ("projects/demo/jobs/Train", "", "name"),
        ("projects/demo/jobs/train/versions/x", "", "name"),
        ("", "projects/demo", "name"),
    ],
)
async def test_malformed_job_references_are_name_invalid(
    registry: Registry, name: str, project: str, field: str
) -> None:
    problem = await failure(get_version(registry, name, project))

    assert (problem.code, problem.reason, problem.fields) == (INVALID, "NAME_INVALID", [field])


async def test_versions_count_up_and_every_reference_form_resolves(registry: Registry) -> None:
    sha256 = await upload(registry, "demo")
    first = await create_version(registry, "projects/demo/jobs/train", code_version(sha256))
    second = await create_version(
        registry,
        "projects/demo/jobs/train",
        code_version(sha256, entrypoint=("python", "train.py", "--fast")),
        aliases=["prod"],
    )

    assert (first.version.name, first.version.version) == ("projects/demo/jobs/train/versions/0", 0)
    assert (second.version.version, second.reused_existing) == (1, False)
    assert list(second.version.aliases) == ["latest", "prod"]
    assert second.version.source.code.size_bytes > 0
    assert (second.job.version_count, second.job.latest_version) == (2, second.version.name)
    assert dict(second.job.aliases) == {"latest": 1, "prod": 1}

    v0, v1 = "projects/demo/jobs/train/versions/0", "projects/demo/jobs/train/versions/1"
    resolved = {
        "train": v1,
        "train:latest": v1,
        "train:prod": v1,
        "train:v0": v0,
        "projects/demo/jobs/train": v1,
        "projects/demo/jobs/train:v0": v0,
        "projects/demo/jobs/train:prod": v1,
        v0: v0,
    }
    for reference, expected in resolved.items():
        assert (await get_version(registry, reference, project="projects/demo")).name == expected, reference
    assert list((await get_version(registry, v0)).entrypoint) == ["python", "train.py"]


async def test_same_content_returns_the_newest_version_instead_of_a_new_one(registry: Registry) -> None:
    sha256 = await upload(registry, "demo")
    first = await create_version(registry, "projects/demo/jobs/train", code_version(sha256))
    again = await create_version(
        registry, "projects/demo/jobs/train", code_version(sha256, description="only the note differs")
    )

    assert again.reused_existing
    assert again.version.name == first.version.name
    assert again.version.digest == first.version.digest
    assert again.job.version_count == 1
    assert await registry.count_rows("registry_job_versions") == 1


async def test_digest_covers_the_content(registry: Registry) -> None:
    sha256 = await upload(registry, "demo")
    job = "projects/demo/jobs/train"
    digests = {
        (await create_version(registry, job, version)).version.digest
        for version in [
            code_version(sha256),
            code_version(sha256, environment=common_pb2.Environment(requirements="torch\n")),
            code_version(sha256, outputs=common_pb2.JobOutputs(metrics=["loss"])),
            code_version(sha256, inputs=common_pb2.JobInputs(defaults=dict_to_struct({"lr": 0.1}))),
        ]
    }
    assert len(digests) == 4


async def test_user_aliases_move_and_latest_is_reserved(registry: Registry) -> None:
    sha256 = await upload(registry, "demo")
    job = "projects/demo/jobs/train"
    await create_version(registry, job, code_version(sha256))
    await create_version(registry, job, code_version(sha256, entrypoint=("python", "other.py")))

    moved = await registry.jobs.SetJobAlias(jobs_pb2.SetJobAliasRequest(job=job, alias="prod", version=0))
    assert dict(moved.job.aliases) == {"latest": 1, "prod": 0}
    moved = await registry.jobs.SetJobAlias(jobs_pb2.SetJobAliasRequest(job=job, alias="prod", version=1))
    assert dict(moved.job.aliases) == {"latest": 1, "prod": 1}
    assert (await get_version(registry, f"{job}:prod")).version == 1

    for alias, reason in (("latest", "ALIAS_RESERVED"), ("v2", "ALIAS_INVALID"), ("Prod", "ALIAS_INVALID")):
        problem = await failure(
            registry.jobs.SetJobAlias(jobs_pb2.SetJobAliasRequest(job=job, alias=alias, version=0))
        )
        assert (problem.code, problem.reason, problem.fields) == (INVALID, reason, ["alias"]), alias
    missing = await failure(
        registry.jobs.SetJobAlias(jobs_pb2.SetJobAliasRequest(job=job, alias="x", version=9))
    )
    assert (missing.code, missing.reason) == (NOT_FOUND, "JOB_VERSION_NOT_FOUND")

    remaining = await registry.jobs.DeleteJobAlias(jobs_pb2.DeleteJobAliasRequest(job=job, alias="prod"))
    assert dict(remaining.job.aliases) == {"latest": 1}
    again = await failure(registry.jobs.DeleteJobAlias(jobs_pb2.DeleteJobAliasRequest(job=job, alias="prod")))
    assert (again.code, again.reason) == (NOT_FOUND, "ALIAS_NOT_FOUND")
    reserved = await failure(
        registry.jobs.DeleteJobAlias(jobs_pb2.DeleteJobAliasRequest(job=job, alias="latest"))
    )
    assert reserved.reason == "ALIAS_RESERVED"


async def test_invalid_json_schema_is_schema_invalid_and_creates_nothing(registry: Registry) -> None:
    sha256 = await upload(registry, "demo")
    version = code_version(sha256, inputs=common_pb2.JobInputs(schema=dict_to_struct({"type": "nonsense"})))

    problem = await failure(create_version(registry, "projects/demo/jobs/train", version))

    assert (problem.code, problem.reason) == (INVALID, "SCHEMA_INVALID")
    assert problem.fields == ["version.inputs.schema['type']"]
    assert await registry.count_rows("registry_jobs") == 0
    assert await registry.count_rows("registry_job_versions") == 0


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "object", "properties": {"lr": {"$ref": "#/$defs/nowhere"}}}, "does not resolve"),
        ({"$ref": "https://example.test/schema.json"}, "does not resolve"),
        ({"allOf": [{"$ref": "#"}]}, "loop"),
    ],
)
async def test_a_schema_that_would_fail_at_enqueue_is_refused_at_creation(
    registry: Registry, schema: dict[str, Any], problem: str
) -> None:
    version = image_version("python:3.12-slim", inputs=common_pb2.JobInputs(schema=dict_to_struct(schema)))

    refused = await failure(create_version(registry, "projects/demo/jobs/train", version))

    assert (refused.code, refused.reason, refused.fields) == (
        INVALID,
        "SCHEMA_INVALID",
        ["version.inputs.schema"],
    )
    assert problem in refused.message
    assert await registry.count_rows("registry_job_versions") == 0


async def test_defaults_too_large_or_deep_are_refused(registry: Registry) -> None:
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(MAX_CONFIG_DEPTH):
        deep = {"a": deep}
    for defaults in (deep, {"blob": "x" * MAX_CONFIG_BYTES}):
        version = image_version(
            "python:3.12-slim", inputs=common_pb2.JobInputs(defaults=dict_to_struct(defaults))
        )

        refused = await failure(create_version(registry, "projects/demo/jobs/train", version))

        assert (refused.code, refused.reason, refused.fields) == (
            INVALID,
            "ARGUMENT_INVALID",
            ["version.inputs.defaults"],
        )


async def test_defaults_must_validate_against_the_schema(registry: Registry) -> None:
    sha256 = await upload(registry, "demo")
    schema = {"type": "object", "properties": {"lr": {"type": "number"}, "epochs": {"type": "integer"}}}
    version = code_version(
        sha256,
        inputs=common_pb2.JobInputs(schema=dict_to_struct(schema), defaults=dict_to_struct({"lr": "fast"})),
    )

    problem = await failure(create_version(registry, "projects/demo/jobs/train", version))

    assert (problem.code, problem.reason, problem.fields) == (
        INVALID,
        "CONFIG_INVALID",
        ["version.inputs.defaults.lr"],
    )
    good = code_version(
        sha256,
        inputs=common_pb2.JobInputs(
            schema=dict_to_struct(schema), defaults=dict_to_struct({"lr": 0.1, "epochs": 3})
        ),
    )
    created = await create_version(registry, "projects/demo/jobs/train", good)
    assert created.version.inputs.defaults.fields["epochs"].number_value == 3


async def test_every_problem_of_a_version_is_listed_and_the_first_names_the_reason(
    registry: Registry,
) -> None:
    version = common_pb2.JobVersion(
        source=common_pb2.JobSource(code=common_pb2.CodeSource(sha256="not-a-digest")),
        environment=common_pb2.Environment(python_version="three", build_context="../up"),
    )

    problem = await failure(create_version(registry, "projects/demo/jobs/train", version, aliases=["latest"]))

    assert (problem.code, problem.reason) == (INVALID, "SOURCE_INVALID")
    assert problem.fields == [
        "version.source.code.sha256",
        "version.entrypoint",
        "version.environment.python_version",
        "version.environment.build_context",
        "aliases[0]",
    ]


@pytest.mark.parametrize(
    "reference",
    [
        "python:3.12-slim",
        "localhost:5000/team/train:1.2",
        "ghcr.io/acme/trainer",
        f"registry.example.com:443/a/b-c__d@sha256:{'ab' * 32}",
        "busybox",
    ],
)
async def test_valid_image_references_are_accepted(registry: Registry, reference: str) -> None:
    created = await create_version(registry, "projects/demo/jobs/img", image_version(reference))

    assert created.version.source.image.reference == reference
    assert list(created.version.entrypoint) == []  # an image job may use the image's own entrypoint


@pytest.mark.parametrize(
    "reference", ["", "Python:3.12", "python:", ":latest", "a b", "team//train", "python@sha256:abc", "-rm"]
)
async def test_invalid_image_references_are_source_invalid(registry: Registry, reference: str) -> None:
    problem = await failure(create_version(registry, "projects/demo/jobs/img", image_version(reference)))

    assert (problem.code, problem.reason, problem.fields) == (
        INVALID,
        "SOURCE_INVALID",
        ["version.source.image.reference"],
    )


async def test_code_versions_need_an_artifact_of_their_own_project(registry: Registry) -> None:
    sha256 = await upload(registry, "other")

    problem = await failure(create_version(registry, "projects/demo/jobs/train", code_version(sha256)))

    assert (problem.code, problem.reason) == (NOT_FOUND, "ARTIFACT_NOT_FOUND")
    assert problem.metadata["resource"] == f"projects/demo/artifacts/{sha256}"
    assert await registry.count_rows("registry_jobs") == 0


async def test_without_allow_missing_the_job_must_exist(registry: Registry) -> None:
    problem = await failure(
        create_version(
            registry, "projects/demo/jobs/train", image_version("python:3.12"), allow_missing=False
        )
    )

    assert (problem.code, problem.reason) == (NOT_FOUND, "JOB_NOT_FOUND")


async def test_request_ids_replay_creates_and_refuse_reuse_for_other_requests(registry: Registry) -> None:
    request = jobs_pb2.CreateJobRequest(parent="projects/demo", job_id="train", request_id="req-1")
    first = await registry.jobs.CreateJob(request)
    assert (await registry.jobs.CreateJob(request)).job == first.job

    conflict = await failure(
        registry.jobs.CreateJob(
            jobs_pb2.CreateJobRequest(parent="projects/demo", job_id="eval", request_id="req-1")
        )
    )
    assert (conflict.code, conflict.reason, conflict.fields) == (
        INVALID,
        "REQUEST_ID_CONFLICT",
        ["request_id"],
    )

    job = "projects/demo/jobs/train"
    created = await create_version(registry, job, image_version("python:3.12"), request_id="req-2")
    await create_version(registry, job, image_version("python:3.13"))
    replayed = await create_version(registry, job, image_version("python:3.12"), request_id="req-2")
    assert (replayed.version.name, replayed.reused_existing) == (created.version.name, False)
    assert await registry.count_rows("registry_job_versions") == 2

    too_long = await failure(
        registry.jobs.CreateJob(
            jobs_pb2.CreateJobRequest(parent="projects/demo", job_id="x", request_id="r" * 129)
        )
    )
    assert (too_long.reason, too_long.fields) == ("ARGUMENT_INVALID", ["request_id"])


async def test_list_jobs_pages_with_tokens_bound_to_the_query(registry: Registry) -> None:
    for job_id in ("b-2", "a-1", "b-1", "c-1", "b-3"):
        await registry.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/demo", job_id=job_id))

    seen: list[str] = []
    token = ""
    while True:
        page = await registry.jobs.ListJobs(
            jobs_pb2.ListJobsRequest(
                parent="projects/demo", job_id_prefix="b-", page_size=2, page_token=token
            )
        )
        seen += [job.name.rsplit("/", 1)[1] for job in page.jobs]
        token = page.next_page_token
        if not token:
            break
        assert len(page.jobs) == 2
    assert seen == ["b-1", "b-2", "b-3"]

    first = await registry.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent="projects/demo", page_size=1))
    for changed in (
        jobs_pb2.ListJobsRequest(parent="projects/demo", job_id_prefix="b", page_token=first.next_page_token),
        jobs_pb2.ListJobsRequest(parent="projects/demo", page_token="not-a-token"),
        jobs_pb2.ListJobsRequest(parent="projects/demo", page_token=first.next_page_token[:-3]),
    ):
        problem = await failure(registry.jobs.ListJobs(changed))
        assert (problem.code, problem.reason, problem.fields) == (
            INVALID,
            "PAGE_TOKEN_INVALID",
            ["page_token"],
        )
    negative = await failure(
        registry.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent="projects/demo", page_size=-1))
    )
    assert (negative.reason, negative.fields) == ("ARGUMENT_INVALID", ["page_size"])


async def test_list_versions_newest_first_in_pages(registry: Registry) -> None:
    job = "projects/demo/jobs/img"
    for minor in range(5):
        await create_version(registry, job, image_version(f"python:3.{minor}"))

    numbers: list[int] = []
    token = ""
    while True:
        page = await registry.jobs.ListJobVersions(
            jobs_pb2.ListJobVersionsRequest(parent=job, page_size=2, page_token=token)
        )
        numbers += [version.version for version in page.versions]
        if not (token := page.next_page_token):
            break
    assert numbers == [4, 3, 2, 1, 0]


async def test_a_page_token_is_refused_when_edited_or_used_in_another_method(registry: Registry) -> None:
    for job_id in ("a", "b"):
        await registry.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/demo", job_id=job_id))
        await create_version(registry, f"projects/demo/jobs/{job_id}", image_version("python:3.12-slim"))
        await create_version(registry, f"projects/demo/jobs/{job_id}", image_version("python:3.11-slim"))
    jobs_token = (
        await registry.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent="projects/demo", page_size=1))
    ).next_page_token
    versions_token = (
        await registry.jobs.ListJobVersions(
            jobs_pb2.ListJobVersionsRequest(parent="projects/demo/jobs/a", page_size=1)
        )
    ).next_page_token
    cursor, _, signature = jobs_token.partition(".")
    edited = base64.urlsafe_b64encode(json.dumps([0]).encode()).decode().rstrip("=") + "." + signature

    for listing in (
        registry.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent="projects/demo", page_token=edited)),
        registry.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent="projects/demo", page_token=f"{cursor}.")),
        registry.jobs.ListJobs(jobs_pb2.ListJobsRequest(parent="projects/demo", page_token=versions_token)),
        registry.jobs.ListJobVersions(
            jobs_pb2.ListJobVersionsRequest(parent="projects/demo/jobs/a", page_token=jobs_token)
        ),
    ):
        refused = await failure(listing)
        assert (refused.code, refused.reason, refused.fields) == (
            INVALID,
            "PAGE_TOKEN_INVALID",
            ["page_token"],
        )


async def test_a_page_of_versions_ends_before_it_would_outgrow_a_client_receive_limit(
    registry: Registry,
) -> None:
    job = "projects/demo/jobs/big"
    megabyte_of_requirements = "\n".join(f"package-{n}==1.0" for n in range(60_000))[: 1024 * 1024 - 16]
    for n in range(4):  # 4 MiB in all; each version differs in its last requirement
        environment = common_pb2.Environment(requirements=f"{megabyte_of_requirements}\nlast=={n}")
        await create_version(registry, job, image_version("python:3.12-slim", environment=environment))

    numbers: list[int] = []
    pages = 0
    token = ""
    while True:
        page = await registry.jobs.ListJobVersions(
            jobs_pb2.ListJobVersionsRequest(parent=job, page_size=50, page_token=token)
        )
        assert page.ByteSize() <= MAX_PAGE_BYTES + 1024
        numbers += [version.version for version in page.versions]
        pages += 1
        if not (token := page.next_page_token):
            break
    assert numbers == [3, 2, 1, 0]
    assert pages == 2


async def test_update_mask_names_only_description(registry: Registry) -> None:
    await registry.jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/demo", job_id="train"))
    job = jobs_pb2.Job(name="projects/demo/jobs/train", description="new")

    for paths, fields in ((["name", "description"], ["update_mask.paths[0]"]), ([], ["update_mask"])):
        problem = await failure(
            registry.jobs.UpdateJob(
                jobs_pb2.UpdateJobRequest(job=job, update_mask=field_mask_pb2.FieldMask(paths=paths))
            )
        )
        assert (problem.code, problem.reason, problem.fields) == (INVALID, "UPDATE_MASK_INVALID", fields)

    every = await registry.jobs.UpdateJob(
        jobs_pb2.UpdateJobRequest(job=job, update_mask=field_mask_pb2.FieldMask(paths=["*"]))
    )
    assert every.job.description == "new"


async def test_deleting_a_job_removes_versions_and_aliases_but_keeps_artifacts(registry: Registry) -> None:
    sha256 = await upload(registry, "demo")
    job = "projects/demo/jobs/train"
    await create_version(registry, job, code_version(sha256), aliases=["prod"])

    await registry.jobs.DeleteJob(jobs_pb2.DeleteJobRequest(name=job))

    assert await registry.count_rows("registry_job_versions") == 0
    assert await registry.count_rows("registry_job_aliases") == 0
    assert await registry.count_rows("registry_artifacts") == 1
    recreated = await create_version(registry, job, code_version(sha256))
    assert recreated.version.version == 0
