"""Who may call each method of the registry's services (docs/design.md §13): one rule per method.

Each rule names the permission a caller needs and the resources of the request it needs it on; the
server's access interceptor checks it on every request message (each message of a request stream), before
the servicer runs. An empty name yields no resource: the servicer then refuses the request as invalid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from takeoff.v1 import artifacts_pb2, jobs_pb2, runs_pb2
from takeoff_server.access import AccessRules, Check, Permission, Rule, constant, fields, needs

KEYS = "keys"
"""The resource KeyService's key-management methods are checked on: keys belong to no project."""
RUN_TOKEN_SIGNERS = "runTokenSigners"
"""What CreateRunTokenSigner is checked on: a signer signs tokens for any run, so only a grant everywhere
covers it."""


def _job_version_resource(request: jobs_pb2.GetJobVersionRequest) -> Iterable[str]:
    """A full reference names its project; a short one (``job:alias``) is read in ``project``."""
    if request.name.startswith("projects/"):
        yield request.name
    elif request.project:
        yield f"{request.project}/jobs/{request.name}"


def _upload_project(request: jobs_pb2.UploadArtifactRequest) -> Iterable[str]:
    """The project an upload stream's header names; chunks name none."""
    if request.HasField("header"):
        yield request.header.parent


def _artifact_version_resource(
    request: artifacts_pb2.GetArtifactVersionRequest | artifacts_pb2.UseArtifactVersionRequest,
) -> Iterable[str]:
    """As for job versions: a full reference names its project, a short one is read in ``project``."""
    if request.name.startswith("projects/"):
        yield request.name
    elif request.project:
        yield f"{request.project}/artifactCollections/{request.name}"


def _logging_run_or_project(request: artifacts_pb2.CreateArtifactVersionRequest) -> Iterable[str]:
    """The run a new version is logged for, else its project (so a run token, whose grant is its own run,
    must name that run); chunks name none, as for UploadArtifact."""
    if request.HasField("header"):
        yield request.header.run or request.header.parent


def _created_run(request: runs_pb2.CreateRunRequest) -> Iterable[str]:
    """The run a CreateRun makes, when its id is given (a run token may create its own run), else the
    project."""
    yield f"{request.parent}/runs/{request.run_id}" if request.run_id and request.parent else request.parent


JOB_SERVICE: AccessRules = {
    "CreateJob": needs(Permission.JOBS_WRITE, fields("parent")),
    "GetJob": needs(Permission.JOBS_READ, fields("name")),
    "ListJobs": needs(Permission.JOBS_READ, fields("parent")),
    "UpdateJob": needs(Permission.JOBS_WRITE, lambda request: (request.job.name,)),
    "DeleteJob": needs(Permission.JOBS_WRITE, fields("name")),
    "CreateJobVersion": needs(Permission.JOBS_WRITE, fields("parent")),
    "GetJobVersion": needs(Permission.JOBS_READ, _job_version_resource),
    "ListJobVersions": needs(Permission.JOBS_READ, fields("parent")),
    "SetJobAlias": needs(Permission.JOBS_WRITE, fields("job")),
    "DeleteJobAlias": needs(Permission.JOBS_WRITE, fields("job")),
    "UploadArtifact": needs(Permission.JOBS_WRITE, _upload_project),
    "GetArtifact": needs(Permission.JOBS_READ, fields("name")),
    "DownloadArtifact": needs(Permission.JOBS_READ, fields("name")),
}

RUN_SERVICE: AccessRules = {
    "CreateRun": needs(Permission.RUNS_WRITE, _created_run),
    "AttachRun": needs(Permission.RUNS_WRITE, fields("name")),
    "GetRun": needs(Permission.RUNS_READ, fields("name")),
    "ListRuns": needs(Permission.RUNS_READ, fields("parent")),
    "LogMetrics": needs(Permission.RUNS_WRITE, fields("name")),
    "BatchLogMetrics": needs(Permission.RUNS_WRITE, fields("name")),
    "UpdateSummary": needs(Permission.RUNS_WRITE, fields("name")),
    "UpdateRunConfig": needs(Permission.RUNS_WRITE, fields("name")),
    "AppendLogs": needs(Permission.RUNS_WRITE, fields("name")),
    "FinishRun": needs(Permission.RUNS_WRITE, fields("name")),
    "ReadMetrics": needs(Permission.RUNS_READ, fields("name")),
    "ReadLogs": needs(Permission.RUNS_READ, fields("name")),
}

ARTIFACT_SERVICE: AccessRules = {
    "FindMissingBlobs": needs(Permission.ARTIFACTS_READ, fields("parent")),
    "CreateArtifactVersion": needs(Permission.ARTIFACTS_WRITE, _logging_run_or_project),
    "GetArtifactVersion": needs(Permission.ARTIFACTS_READ, _artifact_version_resource),
    "UseArtifactVersion": Rule(
        (
            Check(Permission.ARTIFACTS_READ, _artifact_version_resource),
            Check(Permission.RUNS_WRITE, fields("run")),
        )
    ),
    "GetArtifactCollection": needs(Permission.ARTIFACTS_READ, fields("name")),
    "ListArtifactCollections": needs(Permission.ARTIFACTS_READ, fields("parent")),
    "ListArtifactVersions": needs(Permission.ARTIFACTS_READ, fields("parent")),
    "ReadArtifactFile": needs(Permission.ARTIFACTS_READ, fields("name")),
}

KEY_SERVICE: AccessRules = {
    "CreateKey": needs(Permission.KEYS_WRITE, constant(KEYS)),
    "GetKey": needs(Permission.KEYS_READ, constant(KEYS)),
    "ListKeys": needs(Permission.KEYS_READ, constant(KEYS)),
    "RevokeKey": needs(Permission.KEYS_WRITE, constant(KEYS)),
    "VerifyKey": needs(Permission.KEYS_VERIFY, constant(KEYS)),
    "MintRunToken": needs(Permission.TOKENS_MINT, fields("run")),
    "RevokeRunTokens": needs(Permission.TOKENS_MINT, fields("run")),
    "BatchRevokeRunTokens": needs(Permission.TOKENS_MINT, fields("runs")),
    "CreateRunTokenSigner": needs(Permission.TOKENS_MINT, constant(RUN_TOKEN_SIGNERS)),
}

SECRET_SERVICE: AccessRules = {
    "SetSecret": needs(Permission.SECRETS_WRITE, fields("parent")),
    "DeleteSecret": needs(Permission.SECRETS_WRITE, fields("name")),
    "ListSecrets": needs(Permission.SECRETS_READ, fields("parent")),
    "AccessSecret": needs(Permission.SECRETS_ACCESS, fields("name")),
}

RULES: Mapping[str, AccessRules] = {
    "takeoff.v1.JobService": JOB_SERVICE,
    "takeoff.v1.RunService": RUN_SERVICE,
    "takeoff.v1.ArtifactService": ARTIFACT_SERVICE,
    "takeoff.v1.KeyService": KEY_SERVICE,
    "takeoff.v1.SecretService": SECRET_SERVICE,
}
"""Each service's rules by its full name."""
