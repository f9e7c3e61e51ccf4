"""Container images through the Docker engine: build, push, and check that an image exists.

The docker SDK blocks, so every engine call runs in a worker thread and build output reaches the build's
log as it is produced. The classic builder (the SDK has no BuildKit) puts build arguments into
``docker history``: nothing secret goes into a build. The CA bundle pip needs is public and travels in
the build context; index URLs go into the Dockerfile only when they carry no credentials.

Every image gets the SDK from a wheel of the running package (``takeoff._sdk_wheel``), installed in a
layer of its own right after the venv: that layer depends only on the base image, the wheel and the pip
settings, so the engine's layer cache shares it between all jobs on a base image.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import requests

from takeoff._sdk_wheel import DISTRIBUTION as SDK_DISTRIBUTION
from takeoff._sdk_wheel import SdkWheel
from takeoff_builder.model import BuildError, BuildFailed, BuildInfraError, JobSpec
from takeoff_builder.pip import PackageIndex, pip_failure
from takeoff_builder.venvs import REQUIREMENTS_FILE, check_python_version
from takeoff_server.docker_registry import RegistryLogin, registry_host

Log = Callable[[str], None]

CA_BUNDLE_FILE = "takeoff-ca-certificates.crt"
"""Where the CA bundle lies in every build context, for custom Dockerfiles to use too."""
_VENV = "/opt/venv"
_SUPPORT = "/opt/takeoff"
_WORKDIR = "/app"
_MISSING = ("manifest unknown", "not found", "no such image", "pull access denied", "name unknown")
_UNAUTHORIZED = ("no basic auth credentials", "unauthorized", "authentication required")
_ENGINE_CALL_SECONDS = 60
_PYTHON_UNAVAILABLE = re.compile(r"python \S+ is not available in the base image")
_SDK_REPLACED = "the requirements replaced the Takeoff SDK"
SDK_CHECK = (
    "import importlib.metadata as m, sys; "
    "names = {(d.metadata['Name'] or '').lower().replace('_', '-') for d in m.distributions()}; "
    f"sys.exit({_SDK_REPLACED!r} + ' with the unrelated package named takeoff: remove it' "
    "if 'takeoff' in names "
    f"else {_SDK_REPLACED!r} + ': {SDK_DISTRIBUTION} comes from the builder, not the package index' "
    f"if {SDK_DISTRIBUTION!r} not in names "
    f"or m.distribution({SDK_DISTRIBUTION!r}).read_text('direct_url.json') is None else 0)"
)
"""Python that fails when the job's requirements put a package named ``takeoff`` (not ours on the public
index) over the SDK, or installed ``takeoff-sdk`` from an index: pip records a ``direct_url.json`` only for
what it installed from a file, as the SDK's own wheel is."""
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # the engine colours what build steps print on stderr


BUILD_KEY_LABEL = "takeoff.build-key"
"""Every image the builder makes carries it: retention prunes only images with it."""


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """A tag of an image the builder made, as the engine has it."""

    tag: str
    create_time: datetime
    size_bytes: int
    """The image's size with its base layers, which images share: a sum over images over-counts."""


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


def generated_dockerfile(spec: JobSpec, base_image: str, index: PackageIndex, sdk_wheel: str) -> str:
    """base image -> venv -> SDK -> requirements -> code -> entrypoint. The SDK layer (``sdk_wheel``, a
    file of the context's ``takeoff/``) is the same for every job on this base image; the requirements come
    before the code, so a version that changes only code reuses the dependency layers."""
    environment = spec.environment
    lines = [f"FROM {base_image}"]
    if environment.python_version:
        check_python_version(environment.python_version)
        lines.append(_version_check(environment.python_version, base_image))
    ca_bundle = f"{_SUPPORT}/{CA_BUNDLE_FILE}" if index.ca_bundle else None
    pip_variables = index.environment(ca_bundle_path=ca_bundle)
    pip_variables["PIP_NO_CACHE_DIR"] = "1"
    pip = " ".join(f"{name}={shlex.quote(value)}" for name, value in sorted(pip_variables.items())) + " pip"
    lines += [
        f"RUN python3 -m venv {_VENV}",
        f"ENV VIRTUAL_ENV={_VENV} PATH={_VENV}/bin:$PATH PYTHONUNBUFFERED=1",
        f"COPY takeoff/ {_SUPPORT}/",
        f"RUN {pip} install {_SUPPORT}/{sdk_wheel}",
    ]
    if environment.requirements.strip():
        lines += [
            f"COPY {REQUIREMENTS_FILE} {_SUPPORT}/",
            f"RUN {pip} install -r {_SUPPORT}/{REQUIREMENTS_FILE}",
            "RUN " + json.dumps(["python", "-c", SDK_CHECK]),
        ]
    lines += [f"COPY code/ {_WORKDIR}/", f"WORKDIR {_WORKDIR}"]
    if spec.entrypoint:
        lines.append("ENTRYPOINT " + json.dumps(list(spec.entrypoint)))
    return "\n".join(lines) + "\n"


class Images:
    """Builds, pushes and finds images on the engine at ``docker_host`` (None: ``DOCKER_HOST`` or the
    local socket), with the login of each registry host in ``logins``."""

    def __init__(
        self,
        *,
        docker_host: str | None,
        image_prefix: str,
        default_base_image: str,
        index: PackageIndex,
        sdk_wheel: SdkWheel,
        scratch: Path,
        logins: Mapping[str, RegistryLogin],
    ) -> None:
        self._docker_host = docker_host
        self._image_prefix = image_prefix
        self.default_base_image = default_base_image
        self._index = index
        self.sdk_wheel = sdk_wheel
        self._scratch = scratch
        self._logins = dict(logins)

    def base_image(self, spec: JobSpec) -> str:
        return spec.environment.base_image or self.default_base_image

    def tag(self, spec: JobSpec, build_key: str) -> str:
        return f"{self._image_prefix}/{spec.job_id}:{build_key[:16]}"

    async def find(self, reference: str, *, ask_registry: bool) -> FoundImage:
        """The image's local id (empty when the engine lacks it) and, with ``ask_registry``, its digest in
        its registry (empty when the registry lacks it)."""
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

    async def built(self) -> list[BuiltImage]:
        """The tags under this builder's image prefix of images it made (labelled with a build key)."""
        return await asyncio.to_thread(self._built)

    async def remove(self, tag: str) -> bool:
        """Untag ``tag`` (the engine deletes the image with its last tag); False when the engine refuses
        because a container, running or stopped, uses the image."""
        return await asyncio.to_thread(self._remove, tag)

    def _built(self) -> list[BuiltImage]:
        with self._engine() as engine:
            images = engine.images(filters={"label": BUILD_KEY_LABEL})
        return [
            BuiltImage(tag, datetime.fromtimestamp(image["Created"], UTC), int(image.get("Size") or 0))
            for image in images
            for tag in image.get("RepoTags") or ()
            if tag.startswith(self._image_prefix + "/")
        ]

    def _remove(self, tag: str) -> bool:
        with self._engine() as engine:
            try:
                engine.remove_image(tag, noprune=False)
            except docker.errors.NotFound:
                return True
            except docker.errors.APIError as error:
                if error.status_code == 409:  # conflict: a container uses the image
                    return False
                raise
        return True

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
            if not ask_registry:
                return FoundImage(image_id)
            try:
                descriptor = engine.inspect_distribution(reference, auth_config=self._auth_config(reference))
            except docker.errors.APIError as error:
                explanation = str(error.explanation or error)
                if any(marker in explanation.lower() for marker in _MISSING):
                    return FoundImage(image_id)
                if any(marker in explanation.lower() for marker in _UNAUTHORIZED):
                    raise self._refused(reference) from None
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
        if environment.dockerfile:
            log(f"using the job's own Dockerfile; the context has the SDK as {self.sdk_wheel.filename}")
            shutil.copytree(source, context, symlinks=True)
            dockerfile.write_text(environment.dockerfile)
            self._add_support_files(context)
            return context, dockerfile
        index, left_out = self._index.public()
        for note in left_out:
            log(f"note: {note}")
        shutil.copytree(source, context / "code", symlinks=True)
        self._add_support_files(context / "takeoff")
        if environment.requirements.strip():
            (context / REQUIREMENTS_FILE).write_text(environment.requirements)
        text = generated_dockerfile(spec, self.base_image(spec), index, self.sdk_wheel.filename)
        dockerfile.write_text(text)
        log("generated Dockerfile:")
        for line in text.splitlines():
            log(f"  {line}")
        return context, dockerfile

    def _add_support_files(self, directory: Path) -> None:
        """The SDK wheel and the CA bundle, which both kinds of build context carry."""
        self.sdk_wheel.write(directory)
        if self._index.ca_bundle is not None:
            shutil.copyfile(self._index.ca_bundle, directory / CA_BUNDLE_FILE)

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
        said = next(
            (line for line in output if _PYTHON_UNAVAILABLE.match(line) or line.startswith(_SDK_REPLACED)),
            None,
        )
        if said is not None:
            return BuildFailed(said.strip())
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
                repository, tag=version, stream=True, decode=True, auth_config=self._auth_config(tag)
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

    def _auth_config(self, reference: str) -> dict[str, str] | None:
        login = self._logins.get(registry_host(reference))
        return login.auth_config() if login is not None else None

    def _refused(self, reference: str) -> BuildFailed:
        host = registry_host(reference)
        why = (
            "the login configured for it was refused"
            if host in self._logins
            else "no login for it is configured (builder setting registry_auth)"
        )
        return BuildFailed(f"the registry {host} refused access to {reference}: {why}")
