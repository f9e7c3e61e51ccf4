"""What a job version is made of, the rules it must follow, and its content digest."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from takeoff_registry.git_source import check_ref, check_url
from takeoff_registry.refs import JobKey
from takeoff_server.schemas import check_json_schema, schema_validator
from takeoff_server.validation import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, Problems, check_struct, check_text

MAX_DESCRIPTION = 4096
MAX_TEXT_FILE = 1024 * 1024
MAX_METRIC_NAME = 256
MAX_METRICS = 1000
MAX_ENTRYPOINT_BYTES = 64 * 1024
"""The whole argv, as UTF-8."""
SHA256 = re.compile(r"[0-9a-f]{64}")
PYTHON_VERSION = re.compile(r"[0-9]+\.[0-9]+(\.[0-9]+)?")

# Docker's reference grammar (distribution/reference), with sha256 as the only digest.
_ALNUM = r"[a-z0-9]+"
_PATH_COMPONENT = rf"{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
IMAGE_REFERENCE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)
_MAX_IMAGE_NAME = 255


@dataclass(frozen=True, slots=True)
class CodeSource:
    sha256: str
    size_bytes: int = 0
    """Filled from the stored artifact."""


@dataclass(frozen=True, slots=True)
class GitSource:
    url: str
    ref: str = ""
    commit: str = ""
    """The commit ``ref`` resolved to when the version was created."""


@dataclass(frozen=True, slots=True)
class ImageSource:
    reference: str


Source = CodeSource | GitSource | ImageSource


@dataclass(frozen=True, slots=True)
class Environment:
    python_version: str = ""
    requirements: str = ""
    base_image: str = ""
    dockerfile: str = ""
    build_context: str = ""


@dataclass(frozen=True, slots=True)
class VersionSpec:
    """Everything a client says about a new version."""

    source: Source | None
    entrypoint: tuple[str, ...] = ()
    input_schema: dict[str, Any] | None = None
    input_defaults: dict[str, Any] | None = None
    output_metrics: tuple[str, ...] = ()
    environment: Environment = field(default_factory=Environment)
    description: str = ""


@dataclass(frozen=True, slots=True)
class JobVersion:
    job: JobKey
    version: int
    spec: VersionSpec
    digest: str
    aliases: tuple[str, ...]
    """Aliases pointing here, ``latest`` included when this is the newest version."""
    create_time: datetime

    @property
    def name(self) -> str:
        return self.job.version_name(self.version)


def is_image_reference(reference: str) -> bool:
    matched = IMAGE_REFERENCE.fullmatch(reference)
    return matched is not None and len(matched["name"]) <= _MAX_IMAGE_NAME


def check_spec(spec: VersionSpec, problems: Problems, *, prefix: str = "version") -> None:
    """Add every rule ``spec`` breaks to ``problems`` (nothing here talks to the network)."""
    _check_source(spec.source, problems, f"{prefix}.source")
    needs_entrypoint = isinstance(spec.source, CodeSource | GitSource)
    if needs_entrypoint and not spec.entrypoint:
        problems.add(
            "ARGUMENT_INVALID",
            f"{prefix}.entrypoint",
            'code and git jobs need an entrypoint argv list, e.g. ["python", "train.py"]',
        )
    if spec.entrypoint and not spec.entrypoint[0]:
        problems.add("ARGUMENT_INVALID", f"{prefix}.entrypoint[0]", "the program to run must not be empty")
    for index, argument in enumerate(spec.entrypoint):
        with problems.collect():
            check_text(argument, field=f"{prefix}.entrypoint[{index}]")
    if sum(len(argument.encode()) for argument in spec.entrypoint) > MAX_ENTRYPOINT_BYTES:
        problems.add(
            "ARGUMENT_INVALID", f"{prefix}.entrypoint", f"must be at most {MAX_ENTRYPOINT_BYTES} bytes"
        )
    _check_inputs(spec, problems, f"{prefix}.inputs")
    if len(spec.output_metrics) > MAX_METRICS:
        problems.add("ARGUMENT_INVALID", f"{prefix}.outputs.metrics", f"at most {MAX_METRICS} metric names")
    for index, metric in enumerate(spec.output_metrics):
        if not metric:
            problems.add("ARGUMENT_INVALID", f"{prefix}.outputs.metrics[{index}]", "must not be empty")
        with problems.collect():
            check_text(metric, field=f"{prefix}.outputs.metrics[{index}]", max_chars=MAX_METRIC_NAME)
    _check_environment(spec.environment, problems, f"{prefix}.environment")
    with problems.collect():
        check_text(spec.description, field=f"{prefix}.description", max_chars=MAX_DESCRIPTION)


def _check_source(source: Source | None, problems: Problems, prefix: str) -> None:
    if source is None:
        problems.add("SOURCE_INVALID", prefix, "a source is required: code, git or image")
    elif isinstance(source, CodeSource):
        if not SHA256.fullmatch(source.sha256):
            problems.add(
                "SOURCE_INVALID", f"{prefix}.code.sha256", "must be a lowercase hex sha256 (64 characters)"
            )
    elif isinstance(source, GitSource):
        with problems.collect():
            check_url(source.url, field=f"{prefix}.git.url")
        with problems.collect():
            check_ref(source.ref, field=f"{prefix}.git.ref")
    elif not is_image_reference(source.reference):
        problems.add(
            "SOURCE_INVALID",
            f"{prefix}.image.reference",
            f"{source.reference!r} is not an image reference like python:3.12-slim or "
            "localhost:5000/team/train:1.2",
        )


def _check_inputs(spec: VersionSpec, problems: Problems, prefix: str) -> None:
    defaults = spec.input_defaults
    if defaults is not None:
        with problems.collect():
            check_struct(
                defaults, field=f"{prefix}.defaults", max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH
            )
    schema = spec.input_schema
    if schema is None:
        return
    with problems.collect():
        check_json_schema(schema, field=f"{prefix}.schema")
        # Only a schema that passed can judge the defaults.
        for violation in schema_validator(schema).iter_errors(defaults) if defaults is not None else ():
            where = "".join(
                f".{part}" if isinstance(part, str) else f"[{part}]" for part in violation.absolute_path
            )
            problems.add("CONFIG_INVALID", f"{prefix}.defaults{where}", violation.message)


def _check_environment(environment: Environment, problems: Problems, prefix: str) -> None:
    if environment.python_version and not PYTHON_VERSION.fullmatch(environment.python_version):
        problems.add("ARGUMENT_INVALID", f"{prefix}.python_version", "must look like 3.12 or 3.12.4")
    if environment.base_image and not is_image_reference(environment.base_image):
        problems.add("ARGUMENT_INVALID", f"{prefix}.base_image", "is not an image reference")
    for name, text in (("requirements", environment.requirements), ("dockerfile", environment.dockerfile)):
        with problems.collect():
            check_text(text, field=f"{prefix}.{name}", max_bytes=MAX_TEXT_FILE)
    context = environment.build_context
    if context and (
        context.startswith("/") or "\\" in context or ".." in context.split("/") or "\x00" in context
    ):
        problems.add(
            "ARGUMENT_INVALID",
            f"{prefix}.build_context",
            "must be a relative, '/'-separated path inside the source, without '..'",
        )


def _source_document(source: Source | None) -> dict[str, Any]:
    if isinstance(source, CodeSource):
        return {"code": {"sha256": source.sha256, "size_bytes": source.size_bytes}}
    if isinstance(source, GitSource):
        return {"git": {"url": source.url, "ref": source.ref, "commit": source.commit}}
    if isinstance(source, ImageSource):
        return {"image": {"reference": source.reference}}
    raise ValueError("a stored version always has a source")


def to_document(spec: VersionSpec) -> dict[str, Any]:
    """The version's content as stored: plain JSON, read back by :func:`from_document`."""
    return {
        "source": _source_document(spec.source),
        "entrypoint": list(spec.entrypoint),
        "inputs": {"schema": spec.input_schema, "defaults": spec.input_defaults},
        "outputs": {"metrics": list(spec.output_metrics)},
        "environment": {
            "python_version": spec.environment.python_version,
            "requirements": spec.environment.requirements,
            "base_image": spec.environment.base_image,
            "dockerfile": spec.environment.dockerfile,
            "build_context": spec.environment.build_context,
        },
    }


def from_document(document: dict[str, Any], description: str) -> VersionSpec:
    source_kind, source_fields = next(iter(document["source"].items()))
    source: Source = {"code": CodeSource, "git": GitSource, "image": ImageSource}[source_kind](
        **source_fields
    )
    return VersionSpec(
        source=source,
        entrypoint=tuple(document["entrypoint"]),
        input_schema=document["inputs"]["schema"],
        input_defaults=document["inputs"]["defaults"],
        output_metrics=tuple(document["outputs"]["metrics"]),
        environment=Environment(**document["environment"]),
        description=description,
    )


def content_digest(spec: VersionSpec) -> str:
    """sha256 over the canonical JSON of what the version runs.

    The description, the git ref's spelling and the artifact's size are left out: two versions that run
    the same commit or tarball the same way are the same content.
    """
    document = to_document(spec)
    source = document["source"]
    if "git" in source:
        source["git"] = {"url": source["git"]["url"], "commit": source["git"]["commit"]}
    if "code" in source:
        source["code"] = {"sha256": source["code"]["sha256"]}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
