"""The registry's resource names and references to versions, parsed into typed keys.

Job references (common.proto): ``JOB``, ``JOB:ALIAS``, ``JOB:vN``, ``projects/P/jobs/JOB[:ALIAS|:vN]``
and ``projects/P/jobs/JOB/versions/N``; a reference without alias or version means ``latest``. Named
artifacts (artifacts.proto) are referenced the same way, ``projects/P/artifactCollections/A`` in place of
``projects/P/jobs/JOB``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from takeoff_server.errors import FieldViolation, InvalidArgument, NotFound
from takeoff_server.names import NAME_INVALID, ResourcePattern, check_id
from takeoff_server.validation import field_error

LATEST = "latest"
ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
VERSION_ALIAS_PATTERN = re.compile(r"v(0|[1-9][0-9]{0,17})")
_VERSION_NUMBER = r"0|[1-9][0-9]{0,17}"
_VERSION_SELECTOR = re.compile(r"v(0|[1-9][0-9]*)")
MAX_VERSION_NUMBER = 2**31 - 1
"""Version numbers are 32-bit integer columns; a larger one names no version and is refused as a name."""

PROJECT = ResourcePattern("projects/{project}")
JOB = ResourcePattern("projects/{project}/jobs/{job}")
JOB_VERSION = ResourcePattern("projects/{project}/jobs/{job}/versions/{version}", version=_VERSION_NUMBER)
ARTIFACT = ResourcePattern("projects/{project}/artifacts/{sha256}", sha256=r"[0-9a-f]{64}")
RUN = ResourcePattern("projects/{project}/runs/{run}")
ARTIFACT_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
ARTIFACT_ID_RULE = "1-128 characters of letters, digits, '-', '_' and '.', starting with a letter or digit"
ARTIFACT_COLLECTION = ResourcePattern(
    "projects/{project}/artifactCollections/{artifact}", artifact=ARTIFACT_ID_PATTERN
)
ARTIFACT_VERSION = ResourcePattern(
    "projects/{project}/artifactCollections/{artifact}/versions/{version}",
    artifact=ARTIFACT_ID_PATTERN,
    version=_VERSION_NUMBER,
)
EVERY_ARTIFACT = ResourcePattern("projects/{project}/artifactCollections/-")
"""ListArtifactVersions' parent for the versions of every artifact of a project."""
_ARTIFACT_ID = re.compile(ARTIFACT_ID_PATTERN)
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


@dataclass(frozen=True, slots=True)
class ArtifactCollectionKey:
    project: str
    artifact: str

    @property
    def name(self) -> str:
        return ARTIFACT_COLLECTION.format(project=self.project, artifact=self.artifact)

    def version_name(self, version: int) -> str:
        return ARTIFACT_VERSION.format(project=self.project, artifact=self.artifact, version=version)

    @classmethod
    def parse(cls, name: str, *, field: str) -> ArtifactCollectionKey:
        return cls(**ARTIFACT_COLLECTION.parse(name, field=field))


@dataclass(frozen=True, slots=True)
class ArtifactReference:
    """A named artifact and which of its versions: a number, an alias, or (neither) ``latest``."""

    collection: ArtifactCollectionKey
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.collection.name}:v{self.version}"
        return f"{self.collection.name}:{self.alias or LATEST}"


def check_artifact_id(value: str, *, field: str) -> str:
    if _ARTIFACT_ID.fullmatch(value):
        return value
    problem = f"artifact id {value!r} must be {ARTIFACT_ID_RULE}" if value else "an artifact id is required"
    raise InvalidArgument(NAME_INVALID, problem, violations=[FieldViolation(field, problem)])


@dataclass(frozen=True, slots=True)
class _ReferenceForm:
    """How references to the versions of one kind of thing are spelled."""

    kind: str
    spelled: str
    """The parent's name as error messages spell it, ``projects/P/jobs/JOB``."""
    parent: ResourcePattern
    full_version: ResourcePattern
    check_id: Callable[[str, str], str]
    alias: re.Pattern[str]


_JOB_REFERENCES = _ReferenceForm(
    "job",
    "projects/P/jobs/JOB",
    JOB,
    JOB_VERSION,
    lambda value, field: check_id(value, field=field, kind="job id"),
    ALIAS_PATTERN,
)
_ARTIFACT_REFERENCES = _ReferenceForm(
    "artifact",
    "projects/P/artifactCollections/ARTIFACT",
    ARTIFACT_COLLECTION,
    ARTIFACT_VERSION,
    lambda value, field: check_artifact_id(value, field=field),
    _ARTIFACT_ID,
)


def _invalid_reference(form: _ReferenceForm, reference: str, field: str, why: str) -> InvalidArgument:
    article = "an" if form.kind[0] in "aeiou" else "a"
    problem = (
        f"{reference!r} is not {article} {form.kind} reference ({why})"
        if reference
        else f"{article} {form.kind} reference is required"
    )
    return InvalidArgument(NAME_INVALID, problem, violations=[FieldViolation(field, problem)])


def _parse_reference(
    form: _ReferenceForm, reference: str, *, project: str | None, field: str, project_field: str
) -> tuple[dict[str, str], int | None, str | None]:
    """The parent's variables (project and id), and the version number or the alias (neither: latest)."""
    if (full_version := form.full_version.match(reference)) is not None:
        version = int(full_version.pop("version"))
        if version > MAX_VERSION_NUMBER:
            raise _invalid_reference(form, reference, field, f"version numbers go up to {MAX_VERSION_NUMBER}")
        return full_version, version, None
    id_part, colon, selector = reference.partition(":")
    upper = form.kind.upper()
    if id_part.startswith("projects/"):
        variables = form.parent.match(id_part)
        if variables is None:
            raise _invalid_reference(form, reference, field, f"expected {form.spelled}[:ALIAS|:vN]")
    else:
        if project is None:
            problem = f"a project is needed to resolve the short {form.kind} reference {reference!r}"
            raise InvalidArgument(NAME_INVALID, problem, violations=[FieldViolation(project_field, problem)])
        try:
            identifier = form.check_id(id_part, field)
        except InvalidArgument:
            raise _invalid_reference(
                form, reference, field, f"expected {upper}, {upper}:ALIAS or {upper}:vN"
            ) from None
        variables = {"project": project, form.parent.variables[1]: identifier}
    if not colon:
        return variables, None, None
    if not selector:
        raise _invalid_reference(
            form, reference, field, f"nothing after ':'; expected {upper}:ALIAS or {upper}:vN"
        )
    if _VERSION_SELECTOR.fullmatch(selector):
        if int(selector[1:]) > MAX_VERSION_NUMBER:
            raise _invalid_reference(
                form, reference, field, f"{selector!r} is no version number (v0 to v{MAX_VERSION_NUMBER})"
            )
        return variables, int(selector[1:]), None
    if form.alias.fullmatch(selector):
        return variables, None, selector
    raise _invalid_reference(form, reference, field, f"{selector!r} is neither vN nor an alias")


def parse_job_reference(
    reference: str, *, project: str | None, field: str, project_field: str = "project"
) -> JobReference:
    """Parse any job reference form; short forms resolve in ``project`` (a project id)."""
    variables, version, alias = _parse_reference(
        _JOB_REFERENCES, reference, project=project, field=field, project_field=project_field
    )
    return JobReference(JobKey(**variables), version=version, alias=alias)


def parse_artifact_version(name: str, *, field: str) -> ArtifactReference:
    """A full version name, ``projects/P/artifactCollections/A/versions/N``, as a reference."""
    variables = ARTIFACT_VERSION.parse(name, field=field)
    version = int(variables.pop("version"))
    if version > MAX_VERSION_NUMBER:
        raise _invalid_reference(
            _ARTIFACT_REFERENCES, name, field, f"version numbers go up to {MAX_VERSION_NUMBER}"
        )
    return ArtifactReference(ArtifactCollectionKey(**variables), version=version)


def parse_artifact_reference(
    reference: str, *, project: str | None, field: str, project_field: str = "project"
) -> ArtifactReference:
    """Parse any artifact reference form; short forms resolve in ``project`` (a project id)."""
    variables, version, alias = _parse_reference(
        _ARTIFACT_REFERENCES, reference, project=project, field=field, project_field=project_field
    )
    return ArtifactReference(ArtifactCollectionKey(**variables), version=version, alias=alias)


def check_alias(alias: str, *, field: str) -> str:
    """A user alias of a job: the alias format, not ``latest`` (ALIAS_RESERVED), not ``vN``
    (ALIAS_INVALID)."""
    rule = "1-63 characters of a-z, 0-9, '_', '.' and '-', starting with a letter"
    return _check_alias(alias, field=field, pattern=ALIAS_PATTERN, rule=rule)


def check_artifact_alias(alias: str, *, field: str) -> str:
    """A user alias of a named artifact: like an artifact id, not ``latest``, not ``vN``."""
    return _check_alias(alias, field=field, pattern=_ARTIFACT_ID, rule=ARTIFACT_ID_RULE)


def _check_alias(alias: str, *, field: str, pattern: re.Pattern[str], rule: str) -> str:
    if alias == LATEST:
        problem = "the alias 'latest' is managed by the server and always points at the newest version"
        raise field_error(field, problem, reason="ALIAS_RESERVED")
    if VERSION_ALIAS_PATTERN.fullmatch(alias):
        problem = f"{alias!r} has the form vN, which is reserved for version numbers"
        raise field_error(field, problem, reason="ALIAS_INVALID")
    if not pattern.fullmatch(alias):
        problem = f"alias {alias!r} must be {rule}" if alias else "an alias is required"
        raise field_error(field, problem, reason="ALIAS_INVALID")
    return alias
