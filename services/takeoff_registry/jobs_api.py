"""gRPC servicer of JobService: requests become domain calls, results become protos."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from takeoff.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from takeoff_registry.artifacts import Artifact, Artifacts
from takeoff_registry.jobs import Job, Jobs
from takeoff_registry.refs import ArtifactKey, JobKey, parse_job_reference, parse_project
from takeoff_registry.upload_streams import header_and_chunks
from takeoff_registry.versions import (
    CodeSource,
    Environment,
    GitSource,
    ImageSource,
    JobVersion,
    Source,
    VersionSpec,
)
from takeoff_server.errors import FieldViolation, InvalidArgument
from takeoff_server.idempotency import check_request_id
from takeoff_server.names import ID_RULE, check_id, is_valid_id
from takeoff_server.pagination import page_request, page_response
from takeoff_server.protovalues import dict_to_struct, struct_to_dict, timestamp
from takeoff_server.validation import field_error

UPDATABLE_JOB_FIELDS = frozenset({"description"})


def _job_to_proto(job: Job) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        name=job.key.name,
        description=job.description,
        version_count=job.version_count,
        latest_version=job.latest_version,
        aliases=job.aliases,
        create_time=timestamp(job.create_time),
        update_time=timestamp(job.update_time),
    )


def _source_to_proto(source: Source | None) -> common_pb2.JobSource:
    if isinstance(source, CodeSource):
        return common_pb2.JobSource(
            code=common_pb2.CodeSource(sha256=source.sha256, size_bytes=source.size_bytes)
        )
    if isinstance(source, GitSource):
        return common_pb2.JobSource(
            git=common_pb2.GitSource(url=source.url, ref=source.ref, commit=source.commit)
        )
    if isinstance(source, ImageSource):
        return common_pb2.JobSource(image=common_pb2.ImageSource(reference=source.reference))
    return common_pb2.JobSource()


def _version_to_proto(version: JobVersion) -> common_pb2.JobVersion:
    spec = version.spec
    inputs = common_pb2.JobInputs(
        schema=dict_to_struct(spec.input_schema) if spec.input_schema is not None else None,
        defaults=dict_to_struct(spec.input_defaults) if spec.input_defaults is not None else None,
    )
    environment = spec.environment
    return common_pb2.JobVersion(
        name=version.name,
        version=version.version,
        source=_source_to_proto(spec.source),
        entrypoint=spec.entrypoint,
        inputs=inputs,
        outputs=common_pb2.JobOutputs(metrics=spec.output_metrics),
        environment=common_pb2.Environment(
            python_version=environment.python_version,
            requirements=environment.requirements,
            base_image=environment.base_image,
            dockerfile=environment.dockerfile,
            build_context=environment.build_context,
        ),
        description=spec.description,
        aliases=version.aliases,
        digest=version.digest,
        create_time=timestamp(version.create_time),
    )


def _source_from_proto(source: common_pb2.JobSource) -> Source | None:
    kind = source.WhichOneof("source")
    if kind == "code":
        return CodeSource(sha256=source.code.sha256)
    if kind == "git":
        return GitSource(url=source.git.url, ref=source.git.ref)
    if kind == "image":
        return ImageSource(reference=source.image.reference)
    return None


def _spec_from_proto(version: common_pb2.JobVersion) -> VersionSpec:
    inputs = version.inputs
    environment = version.environment
    return VersionSpec(
        source=_source_from_proto(version.source),
        entrypoint=tuple(version.entrypoint),
        input_schema=struct_to_dict(inputs.schema) if inputs.HasField("schema") else None,
        input_defaults=struct_to_dict(inputs.defaults) if inputs.HasField("defaults") else None,
        output_metrics=tuple(version.outputs.metrics),
        environment=Environment(
            python_version=environment.python_version,
            requirements=environment.requirements,
            base_image=environment.base_image,
            dockerfile=environment.dockerfile,
            build_context=environment.build_context,
        ),
        description=version.description,
    )


def _artifact_to_proto(artifact: Artifact) -> jobs_pb2.Artifact:
    return jobs_pb2.Artifact(
        name=artifact.key.name,
        sha256=artifact.key.sha256,
        size_bytes=artifact.size_bytes,
        create_time=timestamp(artifact.create_time),
    )


def _update_mask_paths(paths: list[str]) -> set[str]:
    if not paths:
        raise field_error(
            "update_mask", "name the fields to update: description (or *)", reason="UPDATE_MASK_INVALID"
        )
    if "*" in paths:
        return set(UPDATABLE_JOB_FIELDS)
    violations = [
        FieldViolation(f"update_mask.paths[{index}]", f"{path!r} is not a field that can be updated")
        for index, path in enumerate(paths)
        if path not in UPDATABLE_JOB_FIELDS
    ]
    if violations:
        raise InvalidArgument(
            "UPDATE_MASK_INVALID", "update_mask: only description can be updated", violations=violations
        )
    return set(paths)


class JobApi(jobs_pb2_grpc.JobServiceServicer):
    """Jobs, versions, aliases and artifacts."""

    def __init__(self, jobs: Jobs, artifacts: Artifacts) -> None:
        self._jobs = jobs
        self._artifacts = artifacts

    async def CreateJob(
        self,
        request: jobs_pb2.CreateJobRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.CreateJobRequest, jobs_pb2.CreateJobResponse],
    ) -> jobs_pb2.CreateJobResponse:
        key = JobKey(
            parse_project(request.parent, field="parent"),
            check_id(request.job_id, field="job_id", kind="job id"),
        )
        job = await self._jobs.create_job(
            key, description=request.job.description, request_id=check_request_id(request.request_id)
        )
        return jobs_pb2.CreateJobResponse(job=_job_to_proto(job))

    async def GetJob(
        self,
        request: jobs_pb2.GetJobRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.GetJobRequest, jobs_pb2.GetJobResponse],
    ) -> jobs_pb2.GetJobResponse:
        job = await self._jobs.get_job(JobKey.parse(request.name, field="name"))
        return jobs_pb2.GetJobResponse(job=_job_to_proto(job))

    async def ListJobs(
        self,
        request: jobs_pb2.ListJobsRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.ListJobsRequest, jobs_pb2.ListJobsResponse],
    ) -> jobs_pb2.ListJobsResponse:
        project = parse_project(request.parent, field="parent")
        prefix = request.job_id_prefix
        if prefix and not is_valid_id(prefix):
            raise field_error("job_id_prefix", f"{prefix!r} cannot start a job id ({ID_RULE})")
        query = {"parent": request.parent, "job_id_prefix": prefix}
        page = page_request(
            page_size_requested=request.page_size,
            page_token=request.page_token,
            query=query,
            cursor_types=[str],
        )
        jobs, last_id = await self._jobs.list_jobs(project, prefix=prefix, page=page)
        shown, token = page_response(
            [(_job_to_proto(job), (job.key.job,)) for job in jobs], more=last_id is not None, query=query
        )
        return jobs_pb2.ListJobsResponse(jobs=shown, next_page_token=token)

    async def UpdateJob(
        self,
        request: jobs_pb2.UpdateJobRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.UpdateJobRequest, jobs_pb2.UpdateJobResponse],
    ) -> jobs_pb2.UpdateJobResponse:
        key = JobKey.parse(request.job.name, field="job.name")
        paths = _update_mask_paths(list(request.update_mask.paths))
        description = request.job.description if "description" in paths else None
        job = await self._jobs.update_job(key, description=description)
        return jobs_pb2.UpdateJobResponse(job=_job_to_proto(job))

    async def DeleteJob(
        self,
        request: jobs_pb2.DeleteJobRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.DeleteJobRequest, jobs_pb2.DeleteJobResponse],
    ) -> jobs_pb2.DeleteJobResponse:
        await self._jobs.delete_job(JobKey.parse(request.name, field="name"))
        return jobs_pb2.DeleteJobResponse()

    async def CreateJobVersion(
        self,
        request: jobs_pb2.CreateJobVersionRequest,
        context: grpc.aio.ServicerContext[
            jobs_pb2.CreateJobVersionRequest, jobs_pb2.CreateJobVersionResponse
        ],
    ) -> jobs_pb2.CreateJobVersionResponse:
        created = await self._jobs.create_version(
            JobKey.parse(request.parent, field="parent"),
            _spec_from_proto(request.version),
            aliases=list(request.aliases),
            allow_missing=request.allow_missing,
            request_id=check_request_id(request.request_id),
        )
        return jobs_pb2.CreateJobVersionResponse(
            version=_version_to_proto(created.version),
            reused_existing=created.reused_existing,
            job=_job_to_proto(created.job),
        )

    async def GetJobVersion(
        self,
        request: jobs_pb2.GetJobVersionRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.GetJobVersionRequest, jobs_pb2.GetJobVersionResponse],
    ) -> jobs_pb2.GetJobVersionResponse:
        project = None
        if request.project and not request.name.startswith("projects/"):
            project = parse_project(request.project, field="project")
        reference = parse_job_reference(request.name, project=project, field="name")
        return jobs_pb2.GetJobVersionResponse(version=_version_to_proto(await self._jobs.resolve(reference)))

    async def ListJobVersions(
        self,
        request: jobs_pb2.ListJobVersionsRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.ListJobVersionsRequest, jobs_pb2.ListJobVersionsResponse],
    ) -> jobs_pb2.ListJobVersionsResponse:
        key = JobKey.parse(request.parent, field="parent")
        query = {"parent": request.parent}
        page = page_request(
            page_size_requested=request.page_size,
            page_token=request.page_token,
            query=query,
            cursor_types=[int],
        )
        versions, last_number = await self._jobs.list_versions(key, page=page)
        shown, token = page_response(
            [(_version_to_proto(version), (version.version,)) for version in versions],
            more=last_number is not None,
            query=query,
        )
        return jobs_pb2.ListJobVersionsResponse(versions=shown, next_page_token=token)

    async def SetJobAlias(
        self,
        request: jobs_pb2.SetJobAliasRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.SetJobAliasRequest, jobs_pb2.SetJobAliasResponse],
    ) -> jobs_pb2.SetJobAliasResponse:
        job = await self._jobs.set_alias(
            JobKey.parse(request.job, field="job"), request.alias, request.version
        )
        return jobs_pb2.SetJobAliasResponse(job=_job_to_proto(job))

    async def DeleteJobAlias(
        self,
        request: jobs_pb2.DeleteJobAliasRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.DeleteJobAliasRequest, jobs_pb2.DeleteJobAliasResponse],
    ) -> jobs_pb2.DeleteJobAliasResponse:
        job = await self._jobs.delete_alias(JobKey.parse(request.job, field="job"), request.alias)
        return jobs_pb2.DeleteJobAliasResponse(job=_job_to_proto(job))

    async def UploadArtifact(
        self,
        request_iterator: AsyncIterator[jobs_pb2.UploadArtifactRequest],
        context: grpc.aio.ServicerContext[jobs_pb2.UploadArtifactRequest, jobs_pb2.UploadArtifactResponse],
    ) -> jobs_pb2.UploadArtifactResponse:
        header, chunks = await header_and_chunks(request_iterator)
        key = ArtifactKey(parse_project(header.parent, field="header.parent"), header.sha256)
        artifact, already_existed = await self._artifacts.upload(key, header.size_bytes, chunks)
        return jobs_pb2.UploadArtifactResponse(
            artifact=_artifact_to_proto(artifact), already_existed=already_existed
        )

    async def GetArtifact(
        self,
        request: jobs_pb2.GetArtifactRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.GetArtifactRequest, jobs_pb2.GetArtifactResponse],
    ) -> jobs_pb2.GetArtifactResponse:
        artifact = await self._artifacts.get(ArtifactKey.parse(request.name, field="name"))
        return jobs_pb2.GetArtifactResponse(artifact=_artifact_to_proto(artifact))

    async def DownloadArtifact(
        self,
        request: jobs_pb2.DownloadArtifactRequest,
        context: grpc.aio.ServicerContext[
            jobs_pb2.DownloadArtifactRequest, jobs_pb2.DownloadArtifactResponse
        ],
    ) -> AsyncIterator[jobs_pb2.DownloadArtifactResponse]:
        artifact, chunks = await self._artifacts.download(
            ArtifactKey.parse(request.name, field="name"), offset=request.offset
        )
        yield jobs_pb2.DownloadArtifactResponse(artifact=_artifact_to_proto(artifact))
        async for chunk in chunks:
            yield jobs_pb2.DownloadArtifactResponse(chunk=chunk)
