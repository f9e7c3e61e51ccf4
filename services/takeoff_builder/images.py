"""Container images through the Docker engine: build, push, and check that an image exists.

The docker SDK blocks, so every engine call runs in a worker thread and build output reaches the build's
log as it is produced. The classic builder (the SDK has no BuildKit) puts build arguments into
``docker history``: nothing secret goes into a build. The CA bundle pip needs is public and travels in
the build context; index URLs go into the Dockerfile only when they carry no credentials.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import requests

from takeoff_builder.model import BuildError, BuildFailed, BuildInfraError, JobSpec
from takeoff_builder.pip import PackageIndex, pip_failure
from takeoff_builder.venvs import REQUIREMENTS_FILE, check_python_version

Log = Callable[[str], None]

CA_BUNDLE_FILE = "takeoff-ca-certificates.crt"
"""Where the CA bundle lies in every build context, for custom Dockerfiles to use too."""
_VENV = "/opt/venv"
_SUPPORT = "/opt/takeoff"
_WORKDIR = "/app"
_MISSING = ("manifest unknown", "not found", "no such image", "pull access denied", "name unknown")
_ENGINE_CALL_SECONDS = 60
_PYTHON_UNAVAILABLE = re.compile(r"python \S+ is not available in the base image")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # the engine colours what build steps print on stderr


@dataclass(frozen=True, slots=True)
class RegistryLogin:
    username: str
    password: str

    def auth_config(self) -> dict[str, str]:
        return {"username": self.username, "password": self.password}


@dataclass(frozen=True, slots=True)
class FoundImage:
    image_id: str = ""
    """Local image id, when the engine has the image."""
    digest: str = ""
    """Registry digest, when a registry was asked and has it."""


def split_reference(reference: str) -> tuple[str, str]:
    """``host:5000/team/job:tag`` -> (``host:5000/team/job``, ``tag``); a digest or no tag gives ``""``."""
    if "@" in reference:
        return reference, ""
    repository, colon, tag = reference.rpartition(":")
    if not colon or "/" in tag:
        return reference, ""
    return repository, tag


def _version_check(python_version: str, base_image: str) -> str:
    """A Dockerfile step that fails clearly when the base image has another Python than the job asks."""
    code = (
        "import sys; have = '%d.%d.%d' % sys.version_info[:3]; "
        f"want = {python_version!r}; "
        "sys.exit(0 if have == want or have.startswith(want + '.') else "
        f"'python ' + want + ' is not available in the base image {base_image} (it has python ' + have + ')')"
    )
    return "RUN " + json.dumps(["python3", "-c", code])


def generated_dockerfile(spec: JobSpec, base_image: str, index: PackageIndex) -> str:
    """base image -> venv -> requirements -> code -> entrypoint. The requirements come before the code,
    so a version that changes only code reuses the dependency layer."""
    environment = spec.environment
    lines = [f"FROM {base_image}"]
    if environment.python_version:
        check_python_version(environment.python_version)
        lines.append(_version_check(environment.python_version, base_image))
    lines += [
        f"RUN python3 -m venv {_VENV}",
        f"ENV VIRTUAL_ENV={_VENV} PATH={_VENV}/bin:$PATH PYTHONUNBUFFERED=1",
    ]
    if environment.requirements.strip():
        pip_variables = index.environment(
            ca_bundle_path=f"{_SUPPORT}/{CA_BUNDLE_FILE}" if index.ca_bundle else None
        )
        pip_variables["PIP_NO_CACHE_DIR"] = "1"
        assignments = " ".join(
            f"{name}={shlex.quote(value)}" for name, value in sorted(pip_variables.items())
        )
        lines += [
            f"COPY takeoff/ {_SUPPORT}/",
            f"RUN {assignments} pip install -r {_SUPPORT}/{REQUIREMENTS_FILE}",
        ]
    lines += [f"COPY code/ {_WORKDIR}/", f"WORKDIR {_WORKDIR}"]
    if spec.entrypoint:
        lines.append("ENTRYPOINT " + json.dumps(list(spec.entrypoint)))
    return "\n".join(lines) + "\n"


class Images:
    """Builds, pushes and finds images on the engine at ``docker_host`` (None: ``DOCKER_HOST`` or the
    local socket)."""

    def __init__(
        self,
        *,
        docker_host: str | None,
        image_prefix: str,
        default_base_image: str,
        index: PackageIndex,
        scratch: Path,
        login: RegistryLogin | None = None,
    ) -> None:
        self._docker_host = docker_host
        self._image_prefix = image_prefix
        self.default_base_image = default_base_image
        self._index = index
        self._scratch = scratch
        self._login = login

    def base_image(self, spec: JobSpec) -> str:
        return spec.environment.base_image or self.default_base_image

    def tag(self, spec: JobSpec, build_key: str) -> str:
        return f"{self._image_prefix}/{spec.job_id}:{build_key[:16]}"

    async def find(self, reference: str, *, ask_registry: bool) -> FoundImage:
        """The image's local id and, with ``ask_registry`` or when it is not local, its registry digest."""
        return await asyncio.to_thread(self._find, reference, ask_registry)

    async def build(
        self, spec: JobSpec, code: Path, tag: str, log: Log, *, labels: Mapping[str, str], no_cache: bool
    ) -> str:
        """Build ``spec`` with its code at ``code``, tagged ``tag``; returns the image id."""
        return await asyncio.to_thread(
            self._build, spec, code, tag, log, labels=dict(labels), no_cache=no_cache
        )

    async def push(self, tag: str, log: Log) -> str:
        """Push ``tag`` to its registry; returns the registry digest."""
        return await asyncio.to_thread(self._push, tag, log)

    @contextmanager
    def _engine(self) -> Iterator[docker.APIClient]:
        """A client of the engine; an engine that cannot be reached is a retryable failure."""
        options: dict[str, Any] = docker.utils.kwargs_from_env()
        if self._docker_host:
            options["base_url"] = self._docker_host
        where = options.get("base_url") or "the local Docker socket"
        try:
            client = docker.APIClient(version="auto", timeout=_ENGINE_CALL_SECONDS, **options)
        except docker.errors.DockerException as error:
            raise BuildInfraError(f"the Docker engine at {where} is not reachable: {error}") from None
        try:
            yield client
        except docker.errors.APIError as error:
            explanation = str(error.explanation or error)
            if error.is_client_error():  # the engine refused what it was given, e.g. a malformed Dockerfile
                raise BuildFailed(f"the Docker engine refused the build: {explanation}") from None
            raise BuildInfraError(f"the Docker engine at {where} failed: {explanation}") from None
        except requests.exceptions.RequestException as error:
            raise BuildInfraError(f"lost the connection to the Docker engine at {where}: {error}") from None
        finally:
            client.close()

    def _find(self, reference: str, ask_registry: bool) -> FoundImage:
        with self._engine() as engine:
            try:
                image_id = str(engine.inspect_image(reference)["Id"])
            except docker.errors.NotFound:
                image_id = ""
            if image_id and not ask_registry:
                return FoundImage(image_id)
            try:
                descriptor = engine.inspect_distribution(reference, auth_config=self._auth_config())
            except docker.errors.APIError as error:
                explanation = str(error.explanation or error)
                if any(marker in explanation.lower() for marker in _MISSING):
                    return FoundImage(image_id)
                raise BuildInfraError(
                    f"could not ask the registry of {reference} for it: {explanation}"
                ) from None
            return FoundImage(image_id, str(descriptor["Descriptor"]["digest"]))

    def _build(
        self, spec: JobSpec, code: Path, tag: str, log: Log, *, labels: dict[str, str], no_cache: bool
    ) -> str:
        self._scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self._scratch, prefix="context-") as scratch:
            context, dockerfile = self._prepare_context(spec, code, Path(scratch), log)
            with self._engine() as engine:
                return self._run_build(
                    engine, context, dockerfile, tag=tag, log=log, labels=labels, no_cache=no_cache
                )

    def _prepare_context(self, spec: JobSpec, code: Path, scratch: Path, log: Log) -> tuple[Path, Path]:
        environment = spec.environment
        source = code / environment.build_context
        context = scratch / "context"
        dockerfile = scratch / "Dockerfile"
        ca_bundle = self._index.ca_bundle
        if environment.dockerfile:
            log("using the job's own Dockerfile")
            shutil.copytree(source, context, symlinks=True)
            dockerfile.write_text(environment.dockerfile)
            if ca_bundle is not None:
                shutil.copyfile(ca_bundle, context / CA_BUNDLE_FILE)
            return context, dockerfile
        index, left_out = self._index.public()
        for note in left_out:
            log(f"note: {note}")
        shutil.copytree(source, context / "code", symlinks=True)
        support = context / "takeoff"
        support.mkdir()
        (support / REQUIREMENTS_FILE).write_text(environment.requirements)
        if ca_bundle is not None:
            shutil.copyfile(ca_bundle, support / CA_BUNDLE_FILE)
        text = generated_dockerfile(spec, self.base_image(spec), index)
        dockerfile.write_text(text)
        log("generated Dockerfile:")
        for line in text.splitlines():
            log(f"  {line}")
        return context, dockerfile

    def _run_build(
        self,
        engine: docker.APIClient,
        context: Path,
        dockerfile: Path,
        *,
        tag: str,
        log: Log,
        labels: dict[str, str],
        no_cache: bool,
    ) -> str:
        output: list[str] = []
        image_id = ""
        error = ""
        for chunk in engine.build(
            path=str(context),
            dockerfile=str(dockerfile),
            tag=tag,
            labels=labels,
            nocache=no_cache,
            rm=True,
            forcerm=True,
            decode=True,
        ):
            for line in _ANSI_ESCAPE.sub("", str(chunk.get("stream", ""))).splitlines():
                if line.strip():
                    output.append(line)
                    log(line)
            if "error" in chunk:
                error = str(chunk["error"]).strip()
                output.append(error)
                log(error)
            aux = chunk.get("aux")
            if isinstance(aux, dict) and "ID" in aux:
                image_id = str(aux["ID"])
        if error:
            raise self._build_failure(error, output)
        if not image_id:
            image_id = str(engine.inspect_image(tag)["Id"])
        return image_id

    @staticmethod
    def _build_failure(error: str, output: list[str]) -> BuildError:
        unavailable = next((line for line in output if _PYTHON_UNAVAILABLE.match(line)), None)
        if unavailable is not None:
            return BuildFailed(unavailable.strip())
        if any(marker in error.lower() for marker in _MISSING):
            return BuildFailed(f"the image build failed: {error}")
        failure = pip_failure(output, what="the image build failed")
        if isinstance(failure, BuildInfraError):
            return failure
        return BuildFailed(f"the image build failed: {error}")

    def _push(self, tag: str, log: Log) -> str:
        repository, version = split_reference(tag)
        digest = ""
        with self._engine() as engine:
            log(f"pushing {tag}")
            for chunk in engine.push(
                repository, tag=version, stream=True, decode=True, auth_config=self._auth_config()
            ):
                if "error" in chunk:
                    raise BuildInfraError(f"pushing {tag} failed: {chunk['error']}")
                status = chunk.get("status")
                if status and "progressDetail" not in chunk:
                    log(f"{chunk['id']}: {status}" if "id" in chunk else str(status))
                aux = chunk.get("aux")
                if isinstance(aux, dict) and "Digest" in aux:
                    digest = str(aux["Digest"])
        return digest

    def _auth_config(self) -> dict[str, str] | None:
        return self._login.auth_config() if self._login is not None else None
