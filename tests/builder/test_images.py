"""Image and noop builds through a real Docker engine, with a local base image and a loopback registry
(.ci/docker-setup.sh provides both). The engine-down case needs no engine and always runs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest

import takeoff
from takeoff.models import ImageSource
from takeoff.v1 import common_pb2
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
from tests.processes import ServiceProcess

BUILD_FAILED = common_pb2.FAILURE_REASON_BUILD_FAILED
BUILD_INFRA = common_pb2.FAILURE_REASON_BUILD_INFRA


@pytest.fixture
async def image_builder(
    registry: ServiceProcess, docker_setup: DockerSetup, tmp_path: Path
) -> AsyncIterator[Builder]:
    """A builder with its own image repository, so no test reuses another's images; removed after."""
    repository = f"takeoff-test/{uuid.uuid4().hex[:10]}"
    async with running_builder(
        tmp_path / "builder",
        registry.address,
        default_base_image=docker_setup.base_image,
        image_repository=repository,
        push_registry=docker_setup.registry,
    ) as builder:
        yield builder
    prefix = f"{docker_setup.registry}/{repository}/"
    for image in docker_setup.engine.images.list():
        for tag in image.tags:
            if tag.startswith(prefix):
                docker_setup.engine.images.remove(tag, force=True)


def run_image(engine: docker.DockerClient, image: str, *command: str) -> str:
    output = engine.containers.run(image, list(command) or None, remove=True, network_disabled=True)
    return bytes(output).decode()


def layers(engine: docker.DockerClient, image: str) -> list[str]:
    return list(engine.images.get(image).attrs["RootFS"]["Layers"])


async def test_a_code_job_builds_into_an_image_that_runs_and_imports_its_requirement(
    image_builder: Builder, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, requirements=SMALL_REQUIREMENT)

    first = await image_builder.build(version, IMAGE)

    result = first.result
    prefix = f"{image_builder.settings.image_prefix}/train"
    assert result.image == f"{prefix}:{result.build_key[:16]}"
    assert result.image_id.startswith("sha256:")
    assert not result.pushed
    assert not first.cache.hit
    assert any("Successfully installed six-1.16.0" in line for line in first.log)
    assert run_image(docker_setup.engine, result.image) == "six 1.16.0\n"
    labels = docker_setup.engine.images.get(result.image).labels
    assert labels["takeoff.job-version"] == version

    second = await image_builder.build(version, IMAGE)

    assert second.kinds == ["queued", "cache", "result"]
    assert second.cache.hit
    assert (second.result.image, second.result.image_id) == (result.image, result.image_id)


async def test_a_code_only_change_reuses_the_dependency_layer(
    image_builder: Builder, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    first = await image_builder.build(create_job(client, tmp_path, requirements=SMALL_REQUIREMENT), IMAGE)
    changed = {"train.py": TRAIN_PY + "print('changed')\n"}

    second = await image_builder.build(
        create_job(client, tmp_path, requirements=SMALL_REQUIREMENT, files=changed), IMAGE
    )

    assert second.cache.environment_key == first.cache.environment_key
    assert second.result.image != first.result.image
    assert not any("Successfully installed" in line for line in second.log)
    pip_step = next(
        index for index, line in enumerate(second.log) if "pip install" in line and "Step" in line
    )
    assert "Using cache" in second.log[pip_step + 1]
    assert "Using cache" not in second.log[-3:]  # the code step, last, ran
    before, after = (
        layers(docker_setup.engine, first.result.image),
        layers(docker_setup.engine, second.result.image),
    )
    assert before[:-1] == after[:-1]  # everything up to the dependencies is shared
    assert before[-1] != after[-1]  # only the code layer differs
    assert run_image(docker_setup.engine, second.result.image) == "six 1.16.0\nchanged\n"


async def test_push_to_and_pull_from_the_registry(
    image_builder: Builder, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    version = create_job(client, tmp_path, files={"train.py": "print('pushed')\n"})

    pushed = await image_builder.build(version, IMAGE, push=True)
    again = await image_builder.build(version, IMAGE, push=True)

    assert pushed.result.pushed
    assert pushed.result.image.startswith(f"{docker_setup.registry}/")
    assert pushed.result.image_digest.startswith("sha256:")
    assert again.kinds == ["queued", "cache", "result"]
    assert again.cache.detail.endswith("in the registry")
    assert again.result.image_digest == pushed.result.image_digest

    docker_setup.engine.images.remove(pushed.result.image, force=True)
    found = await image_builder.build(
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


async def test_the_jobs_own_dockerfile_replaces_the_template_and_gets_the_ca_bundle(
    image_builder: Builder, docker_setup: DockerSetup, client: takeoff.Client, tmp_path: Path
) -> None:
    dockerfile = (
        f"FROM {docker_setup.base_image}\n"
        "COPY . /srv/\n"
        "RUN test -s /srv/takeoff-ca-certificates.crt\n"
        'ENTRYPOINT ["python3", "/srv/hello.py"]\n'
    )
    version = create_job(client, tmp_path, files={"hello.py": "print('custom')\n"}, dockerfile=dockerfile)

    outcome = await image_builder.build(version, IMAGE)

    assert run_image(docker_setup.engine, outcome.result.image) == "custom\n"


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
