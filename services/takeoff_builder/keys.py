"""The cache keys of docs/design.md §6.

The environment key covers what the dependencies are made from; the build key adds the code. Each kind
hashes only the inputs it uses (a venv has no base image or Dockerfile), so that changing, say, the
default base image rebuilds images but not venvs. An image also bakes in the build context and the
entrypoint, so its build key covers them: two versions differing only there must not share a tag.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from takeoff_builder.model import BuildKind, JobSpec

BUILDER_VERSION = "1"
"""Bump when the way venvs or images are made changes, so that nothing made the old way is reused."""


@dataclass(frozen=True, slots=True)
class BuildKeys:
    environment: str
    build: str


def _digest(fields: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_keys(spec: JobSpec, kind: BuildKind, *, base_image: str, sdk_wheel: str) -> BuildKeys:
    """The keys of a venv or image build; ``base_image`` is the one an image build would use and
    ``sdk_wheel`` the sha256 of the SDK wheel it installs (or puts in the context of the job's own
    Dockerfile)."""
    environment = spec.environment
    inputs: dict[str, object] = {
        "builder": BUILDER_VERSION,
        "kind": kind.value,
        "python_version": environment.python_version,
        "requirements": environment.requirements,
    }
    if kind is BuildKind.IMAGE:
        inputs |= {"base_image": base_image, "dockerfile": environment.dockerfile, "sdk": sdk_wheel}
    environment_key = _digest(inputs)
    code: dict[str, object] = {"environment": environment_key, "source": spec.source_digest}
    if kind is BuildKind.IMAGE:
        code |= {"build_context": environment.build_context, "entrypoint": list(spec.entrypoint)}
    return BuildKeys(environment_key, _digest(code))
