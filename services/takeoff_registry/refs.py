"""The registry's resource names and job references, parsed into typed keys.

Job references (common.proto): ``JOB``, ``JOB:ALIAS``, ``JOB:vN``, ``projects/P/jobs/JOB[:ALIAS|:vN]``
and ``projects/P/jobs/JOB/versions/N``; a reference without alias or version means ``latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from takeoff_server.errors import FieldViolation, InvalidArgument, NotFound
from takeoff_server.names import NAME_INVALID, ResourcePattern, check_id
from takeoff_server.validation import field_error

LATEST = "latest"
ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
VERSION_ALIAS_PATTERN = re.compile(r"v(0|[1-9][0-9]{0,17})")
_VERSION_NUMBER = r"0|[1-9][0-9]{0,17}"

PROJECT = ResourcePattern("projects/{project}")
JOB = ResourcePattern("projects/{project}/jobs/{job}")
JOB_VERSION = ResourcePattern("projects/{project}/jobs/{job}/versions/{version}", version=_VERSION_NUMBER)
ARTIFACT = ResourcePattern("projects/{project}/artifacts/{sha256}", sha256=r"[0-9a-f]{64}")
RUN = ResourcePattern("projects/{project}/runs/{run}")
QUEUE_ITEM = ResourcePattern("projects/{project}/queues/{queue}/items/{item}")


def parse_project(name: str, *, field: str) -> str:
    return PROJECT.parse(name, field=field)["project"]


def project_not_found(project: str) -> NotFound:
    name = PROJECT.format(project=project)
    return NotFound(
        "PROJECT_NOT_FOUND", f"project {name} has never been written to", metadata={"resource": name}
    )


@dataclass(frozen=True, slots=True)
class JobKey:
    project: str
    job: str

    @property
    def name(self) -> str:
        return JOB.format(project=self.project, job=self.job)

    def version_name(self, version: int) -> str:
        return JOB_VERSION.format(project=self.project, job=self.job, version=version)

    @classmethod
    def parse(cls, name: str, *, field: str) -> JobKey:
        return cls(**JOB.parse(name, field=field))


@dataclass(frozen=True, slots=True)
class JobReference:
    """A job and which of its versions: a number, an alias, or (neither) ``latest``."""

    job: JobKey
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.job.name}:v{self.version}"
        return f"{self.job.name}:{self.alias or LATEST}"


@dataclass(frozen=True, slots=True)
class ArtifactKey:
    project: str
    sha256: str

    @property
    def name(self) -> str:
        return ARTIFACT.format(project=self.project, sha256=self.sha256)

    @classmethod
    def parse(cls, name: str, *, field: str) -> ArtifactKey:
        return cls(**ARTIFACT.parse(name, field=field))


@dataclass(frozen=True, slots=True)
class RunKey:
    project: str
    run: str

    @property
    def name(self) -> str:
        return RUN.format(project=self.project, run=self.run)

    @classmethod
    def parse(cls, name: str, *, field: str) -> RunKey:
        return cls(**RUN.parse(name, field=field))


def _invalid_reference(reference: str, field: str, why: str) -> InvalidArgument:
    problem = f"{reference!r} is not a job reference ({why})" if reference else "a job reference is required"
    return InvalidArgument(NAME_INVALID, problem, violations=[FieldViolation(field, problem)])


def parse_job_reference(
    reference: str, *, project: str | None, field: str, project_field: str = "project"
) -> JobReference:
    """Parse any job reference form; short forms resolve in ``project`` (a project id)."""
    if (full_version := JOB_VERSION.match(reference)) is not None:
        return JobReference(
            JobKey(full_version["project"], full_version["job"]), version=int(full_version["version"])
        )
    job_part, _, selector = reference.partition(":")
    if job_part.startswith("projects/"):
        matched = JOB.match(job_part)
        if matched is None:
            raise _invalid_reference(reference, field, "expected projects/P/jobs/JOB[:ALIAS|:vN]")
        key = JobKey(**matched)
    else:
        if project is None:
            problem = f"a project is needed to resolve the short job reference {reference!r}"
            raise InvalidArgument(NAME_INVALID, problem, violations=[FieldViolation(project_field, problem)])
        try:
            key = JobKey(project, check_id(job_part, field=field, kind="job id"))
        except InvalidArgument:
            raise _invalid_reference(reference, field, "expected JOB, JOB:ALIAS or JOB:vN") from None
    if not selector:
        return JobReference(key)
    if VERSION_ALIAS_PATTERN.fullmatch(selector):
        return JobReference(key, version=int(selector[1:]))
    if ALIAS_PATTERN.fullmatch(selector):
        return JobReference(key, alias=selector)
    raise _invalid_reference(reference, field, f"{selector!r} is neither vN nor an alias")


def check_alias(alias: str, *, field: str) -> str:
    """A user alias: the alias format, not ``latest`` (ALIAS_RESERVED), not ``vN`` (ALIAS_INVALID)."""
    if alias == LATEST:
        problem = "the alias 'latest' is managed by the server and always points at the newest version"
        raise field_error(field, problem, reason="ALIAS_RESERVED")
    if VERSION_ALIAS_PATTERN.fullmatch(alias):
        problem = f"{alias!r} has the form vN, which is reserved for version numbers"
        raise field_error(field, problem, reason="ALIAS_INVALID")
    if not ALIAS_PATTERN.fullmatch(alias):
        problem = (
            f"alias {alias!r} must be 1-63 characters of a-z, 0-9, '_', '.' and '-', starting with a letter"
            if alias
            else "an alias is required"
        )
        raise field_error(field, problem, reason="ALIAS_INVALID")
    return alias
