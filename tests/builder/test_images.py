"""Image and noop builds through a real Docker engine, with a local base image, a loopback registry and
one that wants a login (.ci/docker-setup.sh provides them). The engine-down case needs no engine and
always runs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import docker
import pytest

import takeoff
from takeoff.models import ImageSource
from takeoff.v1 import common_pb2
from takeoff_server.docker_registry import registry_host
from tests.builder.conftest import (
    IMAGE,
    MISSING_PACKAGE,
    NOOP,
    SMALL_REQUIREMENT,
    TRAIN_PY,
    UNINSTALLABLE_REQUIREMENTS,
    Builder,
    create_job,
    running_builder,
)
from tests.conftest import DockerSetup
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess

BUILD_FAILED = common_pb2.FAILURE_REASON_BUILD_FAILED
BUILD_INFRA = common_pb2.FAILURE_REASON_BUILD_INFRA
SDK_TRAIN_PY = """\
import importlib.metadata, os, six, takeoff
sdk = importlib.metadata.distribution("takeoff-sdk")
print("six", six.__version__, "takeoff", takeoff.__version__, "in", os.getcwd())
print("takeoff-sdk from", "its wheel" if sdk.read_text("direct_url.json") else "an index")
run = takeoff.init(config={"lr": 0.1})
run.log({"loss": 0.5})
"""


@asynccontextmanager
async def own_image_builder(
    registry: ServiceProcess, docker_setup: DockerSetup, tmp_path: Path, **overrides: Any
) -> AsyncIterator[Builder]:
    """A builder with its own image repository, so no test reuses another's images; removed after."""
    repository = f"takeoff-test/{uuid.uuid4().hex[:10]}"
    async with running_builder(
        tmp_path / "builder",
        registry.address,
        default_base_image=docker_setup.base_image,
        image_repository=repository,
        **overrides,
    ) as builder:
        yield builder
    prefix = f"{builder.settings.image_prefix}/"
    for image in docker_setup.engine.images.list():
        for tag in image.tags:
            if tag.startswith(prefix):
                docker_setup.engine.images.remove(tag, force=True)


@pytest.fixture
async def image_builder(
    registry: ServiceProcess, docker_setup: DockerSetup, tmp_path: Path
) -> AsyncIterator[Builder]:
    """Without a push registry, as a local-container agent's builder: images stay in the engine, and a
    cache miss asks no registry (there is none to ask)."""
    async with own_image_builder(registry, docker_setup, tmp_path) as builder:
        yield builder


@pytest.fixture
async def pushing_image_builder(
    registry: ServiceProcess, docker_setup: DockerSetup, tmp_path: Path
) -> AsyncIterator[Builder]:
    async with own_image_builder(
        registry, docker_setup, tmp_path, push_registry=docker_setup.registry
    ) as builder:
        yield builder


def run_image(engine: docker.DockerClient, image: str, *command: str) -> str:
    output = engine.containers.run(image, list(command) or None, remove=True, network_disabled=True)
    return bytes(output).decode()


def layers(engine: docker.DockerClient, image: str) -> list[str]:
    return list(engine.images.get(image).attrs["RootFS"]["Layers"])


def push_as(engine: docker.DockerClient, image: str, reference: str, login: dict[str, str]) -> None:
    """Push ``image`` as ``reference`` and leave no such tag in the engine."""
    repository, _, tag = reference.rpartition(":")
    engine.images.get(image).tag(repository, tag)
    try:
        for chunk in engine.images.push(repository, tag, auth_config=login, stream=True, decode=True):
            assert "error" not in chunk, chunk
    finally:
        engine.images.remove(reference)


def cached_steps(log: list[str]) -> dict[str, bool]:
    """Whether the engine took the SDK install, the requirements install and the code from its cache."""
    steps = {
        "sdk": "install /opt/takeoff/takeoff_sdk-",
        "requirements": "install -r",
        "code": "COPY code/",
    }
    found = {}
    for index, line in enumerate(log):
        for name, marker in steps.items():
            if line.startswith("Step ") and marker in line:
                found[name] = "Using cache" in log[index + 1]
    return found


async def test_a_code_job_image_has_its_requirements_and_the_sdk_which_reports_its_run(
    image_builder: Builder,
    docker_setup: DockerSetup,
    registry: ServiceProcess,
    client: takeoff.Client,
    tmp_path: Path,
) -> None:
    version = create_job(
        client,
        tmp_path,
        files={"src/train.py": SDK_TRAIN_PY, "README": "outside the build context\n"},
        requirements=SMALL_REQUIREMENT,
        build_context="src",
    )

    first = await image_builder.build(version, IMAGE)

    result = first.result
    prefix = f"{image_builder.settings.image_prefix}/train"
    assert result.image == f"{prefix}:{result.build_key[:16]}"
    assert result.image_id.startswith("sha256:")
    assert not result.pushed
    assert not first.cache.hit
    assert any("Successfully installed six-1.16.0" in line for line in first.log)
    labels = docker_setup.engine.images.get(result.image).labels
    assert labels["takeoff.job-version"] == version
    # The job reaches the test's registry on loopback, as an agent's container reaches the registry.
    output = docker_setup.engine.containers.run(
        result.image,
        remove=True,
        network_mode="host",
        environment={
            "TAKEOFF_REGISTRY": registry.address,
            "TAKEOFF_PROJECT": client.project,
            "TAKEOFF_API_KEY": ADMIN_KEY,
        },
    )
    assert bytes(output).decode().splitlines() == [
        f"six 1.16.0 takeoff {takeoff.__version__} in /app",
        "takeoff-sdk from its wheel",
    ]
    [run] = client.list_runs()
    assert run.state is takeoff.RunState.FINISHED
    assert run.config == {"lr": 0.1}
    assert [row.values for row in client.read_metrics(run.name)] == [{"loss": 0.5}]
    listed = docker_setup.engine.containers.run(result.image, entrypoint=["ls"], remove=True)
    assert bytes(listed).decode() == "train.py\n"  # only the build context is in the image

    second = await image_builder.build(version, IMAGE)

    assert second.kinds == ["queued", "cache", "result"]
    assert second.cache.hit
    assert (second.result.image, second.result.image_id) == (result.image, result.image_id)


async def test_a_code_change_reuses_the_dependency_layers_and_a_requirements_change_the_sdk_layer(
    image_builder: Builder, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    first = await image_builder.build(create_job(client, tmp_path, requirements=SMALL_REQUIREMENT), IMAGE)
    changed = {"train.py": TRAIN_PY + "print('changed')\n"}

    code_changed = await image_builder.build(
        create_job(client, tmp_path, requirements=SMALL_REQUIREMENT, files=changed), IMAGE
    )
    requirements_changed = await image_builder.build(
        create_job(client, tmp_path, requirements=f"{SMALL_REQUIREMENT}\n# changed\n"), IMAGE
    )

    assert code_changed.cache.environment_key == first.cache.environment_key
    assert requirements_changed.cache.environment_key != first.cache.environment_key
    assert code_changed.result.image != first.result.image
    assert not any("Successfully installed" in line for line in code_changed.log)
    assert cached_steps(code_changed.log) == {"sdk": True, "requirements": True, "code": False}
    assert cached_steps(requirements_changed.log) == {"sdk": True, "requirements": False, "code": False}
    # The base image's layers, the venv, the SDK wheel and its install: shared by all three images.
    shared = len(layers(docker_setup.engine, docker_setup.base_image)) + 3
    before, after, other = (
        layers(docker_setup.engine, outcome.result.image)
        for outcome in (first, code_changed, requirements_changed)
    )
    assert before[:-1] == after[:-1]  # everything up to the dependencies is shared
    assert before[-1] != after[-1]  # only the code layer differs
    assert before[:shared] == other[:shared]
    assert before[shared] != other[shared]  # the requirements
    assert run_image(docker_setup.engine, code_changed.result.image) == "six 1.16.0\nchanged\n"


async def test_push_to_and_pull_from_the_registry(
    pushing_image_builder: Builder, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, files={"train.py": "print('pushed')\n"})

    pushed = await pushing_image_builder.build(version, IMAGE, push=True)
    again = await pushing_image_builder.build(version, IMAGE, push=True)

    assert pushed.result.pushed
    assert pushed.result.image.startswith(f"{docker_setup.registry}/")
    assert pushed.result.image_digest.startswith("sha256:")
    assert again.kinds == ["queued", "cache", "result"]
    assert again.cache.detail.endswith("in the registry")
    assert again.result.image_digest == pushed.result.image_digest

    docker_setup.engine.images.remove(pushed.result.image, force=True)
    # As a replica on another engine sees it: in the registry, so there is nothing to build or push.
    elsewhere = await pushing_image_builder.build(version, IMAGE, push=True)
    assert elsewhere.kinds == ["queued", "cache", "result"]
    assert elsewhere.cache.hit
    assert elsewhere.cache.detail.endswith(" hit in the registry")
    assert (elsewhere.result.image_id, elsewhere.result.image_digest) == ("", pushed.result.image_digest)
    assert elsewhere.result.image == pushed.result.image
    found = await pushing_image_builder.build(
        create_job(client, tmp_path, job="prebuilt", source=ImageSource(pushed.result.image)), NOOP
    )
    assert (found.result.image_id, found.result.image_digest) == ("", pushed.result.image_digest)

    docker_setup.engine.images.pull(pushed.result.image)
    assert run_image(docker_setup.engine, pushed.result.image) == "pushed\n"


async def test_a_noop_build_finds_a_local_image(
    image_builder: Builder, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, source=ImageSource(docker_setup.base_image), entrypoint=())

    outcome = await image_builder.build(version, NOOP)

    assert outcome.result.image == docker_setup.base_image
    assert outcome.result.image_id == docker_setup.engine.images.get(docker_setup.base_image).id
    assert outcome.result.build_key == ""


async def test_a_noop_build_finds_a_private_image_with_its_login_and_is_refused_without_it(
    registry: ServiceProcess, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    # A tag of its own, pushed here and not left in the engine, so only the registry can answer.
    private = f"{docker_setup.auth_registry}/takeoff-test/private:{uuid.uuid4().hex[:8]}"
    login = {"username": docker_setup.auth_user, "password": docker_setup.auth_password}
    push_as(docker_setup.engine, docker_setup.base_image, private, login)
    version = create_job(client, tmp_path, job="private", source=ImageSource(private), entrypoint=())
    logins = {"with": login, "wrong": {**login, "password": "not-the-password"}, "without": None}

    outcomes = {}
    for name, auth in logins.items():
        overrides: dict[str, Any] = {"registry_auth": {docker_setup.auth_registry: auth}} if auth else {}
        async with running_builder(tmp_path / name, registry.address, **overrides) as builder:
            outcomes[name] = await builder.build(version, NOOP)

    found = outcomes["with"].result
    assert (found.image, found.image_id) == (private, "")
    assert found.image_digest.startswith("sha256:")
    for name, why in [
        ("wrong", "the login configured for it was refused"),
        ("without", "no login for it is configured (builder setting registry_auth)"),
    ]:
        failure = outcomes[name].failure
        assert failure.reason == BUILD_FAILED
        refused = f"the registry {docker_setup.auth_registry} refused access to {private}"
        assert failure.message == f"{refused}: {why}"
        assert docker_setup.auth_password not in str(outcomes[name].responses)


async def test_the_jobs_own_dockerfile_replaces_the_template_and_gets_the_sdk_and_the_ca_bundle(
    image_builder: Builder, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    dockerfile = (
        f"FROM {docker_setup.base_image}\n"
        "COPY . /srv/\n"
        "RUN test -s /srv/takeoff-ca-certificates.crt\n"
        "RUN python3 -m pip install -q --no-index --no-deps --target /opt/sdk /srv/takeoff_sdk-*.whl\n"
        "ENV PYTHONPATH=/opt/sdk\n"
        'ENTRYPOINT ["python3", "/srv/hello.py"]\n'
    )
    hello = "import takeoff\nprint('custom', takeoff.__version__)\n"
    version = create_job(client, tmp_path, files={"hello.py": hello}, dockerfile=dockerfile)

    outcome = await image_builder.build(version, IMAGE)

    assert run_image(docker_setup.engine, outcome.result.image) == f"custom {takeoff.__version__}\n"


# Bad input: each fails with the right reason, the log tail, and nothing cached.


async def test_a_failing_dockerfile_fails_the_build_and_is_not_cached(
    image_builder: Builder, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    dockerfile = f"FROM {docker_setup.base_image}\nRUN echo about to fail && exit 3\n"
    version = create_job(client, tmp_path, dockerfile=dockerfile)

    for _ in range(2):
        outcome = await image_builder.build(version, IMAGE)
        assert not outcome.cache.hit
        failure = outcome.failure
        assert failure.reason == BUILD_FAILED
        assert "returned a non-zero code: 3" in failure.message
        assert "about to fail" in failure.log_tail
        tag = f"{image_builder.settings.image_prefix}/train:{outcome.cache.build_key[:16]}"
        assert not docker_setup.engine.images.list(name=tag)


async def test_a_malformed_dockerfile_fails_the_build(
    image_builder: Builder, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    dockerfile = f"FROM {docker_setup.base_image}\nNOT-AN-INSTRUCTION here\n"
    version = create_job(client, tmp_path, dockerfile=dockerfile)

    failure = (await image_builder.build(version, IMAGE)).failure

    assert failure.reason == BUILD_FAILED
    assert "unknown instruction" in failure.message


async def test_a_requirement_pip_rejects_fails_the_image_build(
    image_builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, requirements=UNINSTALLABLE_REQUIREMENTS)

    failure = (await image_builder.build(version, IMAGE)).failure

    assert failure.reason == BUILD_FAILED
    assert MISSING_PACKAGE in "\n".join(failure.log_tail)


async def test_a_python_version_the_base_image_lacks_fails_clearly(
    image_builder: Builder, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, python_version="3.4")

    failure = (await image_builder.build(version, IMAGE)).failure

    assert failure.reason == BUILD_FAILED
    assert failure.message.startswith("python 3.4 is not available in the base image")


async def test_an_image_that_does_not_exist_fails_the_noop_build(
    image_builder: Builder, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    missing = f"{docker_setup.registry}/takeoff-test/missing:{uuid.uuid4().hex[:8]}"
    version = create_job(client, tmp_path, source=ImageSource(missing), entrypoint=())

    failure = (await image_builder.build(version, NOOP)).failure

    assert failure.reason == BUILD_FAILED
    assert failure.message == f"the image {missing} does not exist locally or in its registry"


async def test_a_docker_engine_that_is_not_running_is_a_retryable_failure(
    registry: ServiceProcess, client: takeoff.Client, tmp_path: Path
) -> None:
    code_job = create_job(client, tmp_path)
    image_job = create_job(
        client, tmp_path, job="prebuilt", source=ImageSource("example/train:1"), entrypoint=()
    )
    socket = tmp_path / "no-engine.sock"

    async with running_builder(
        tmp_path / "builder", registry.address, docker_host=f"unix://{socket}"
    ) as builder:
        outcomes = [await builder.build(code_job, IMAGE), await builder.build(image_job, NOOP)]
        again = await builder.build(code_job, IMAGE)

    for outcome in [*outcomes, again]:
        assert "cache" not in outcome.kinds  # not even the cache could be looked at
        assert outcome.failure.reason == BUILD_INFRA
        assert f"the Docker engine at unix://{socket} is not reachable" in outcome.failure.message
    assert again.name != outcomes[0].name


@pytest.mark.parametrize(
    ("reference", "host"),
    [
        ("python:3.12-slim", "docker.io"),
        ("library/python", "docker.io"),
        ("ghcr.io/team/job:1", "ghcr.io"),
        ("127.0.0.1:5001/team/job:1", "127.0.0.1:5001"),
        ("localhost/job@sha256:abc", "localhost"),
    ],
)
def test_the_registry_of_an_image_reference_is_its_first_component_when_that_is_a_host(
    reference: str, host: str
) -> None:
    assert registry_host(reference) == host
