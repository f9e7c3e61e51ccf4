"""Containers from the command line, on a real Docker engine with the CI base image.

``takeoff demo --resource local-container`` in a fresh TAKEOFF_HOME (its stack offers its agent the
local-container runner because Docker answers); and, on one stack for the module with an agent started by
``takeoff agent`` (offered the same, and the stack's registry socket for its jobs), image jobs made with
``takeoff job create --image`` and launched with ``takeoff launch --wait`` on local-container queues made
with ``takeoff queue create --resource local-container``.

The image job that must succeed runs on an image a user would make: the base image with the wheel of
``takeoff sdk wheel`` installed, so its ``takeoff.init()`` attaches a run and logs a metric (an image
without the SDK could only prove NO_RUN). The failures are the ones a user must be able to read off the
command line: an image nobody can pull, and a job over its memory limit (``OOMKilled``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from takeoff.stack import LocalStack
from tests.conftest import DockerSetup
from tests.e2e.test_up import TAKEOFF, stack_record, takeoff, user_environment
from tests.processes import wait_for

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SDK_IMAGE = "takeoff-test/sdk-job:latest"
AGENT = "e2e-containers"
JOB_CODE = "import takeoff; run = takeoff.init(); run.log({'answer': 42}); run.finish()"
OVER_MEMORY_CODE = "data = b'x' * (512 << 20); print(len(data))"


@pytest.fixture(scope="module")
def sdk_image(docker_setup: DockerSetup, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The base image with the SDK wheel of `takeoff sdk wheel` installed in a venv (the Docker build cache
    makes it cheap while the wheel is unchanged)."""
    context = tmp_path_factory.mktemp("sdk-image")
    wheel = takeoff(context, "sdk", "wheel", str(context))
    assert wheel.returncode == 0, wheel.stderr
    certificates = ""
    if HOST_CA_BUNDLE.is_file():  # pip reaches the package index through whatever TLS the host trusts
        shutil.copyfile(HOST_CA_BUNDLE, context / "ca.crt")
        certificates = "COPY ca.crt /tmp/sdk/\nENV PIP_CERT=/tmp/sdk/ca.crt\n"
    (context / "Dockerfile").write_text(
        f"FROM {docker_setup.base_image}\n"
        "COPY *.whl /tmp/sdk/\n"
        f"{certificates}"
        "RUN python3 -m venv /opt/job && /opt/job/bin/pip install --no-cache-dir /tmp/sdk/*.whl\n"
        "ENV PATH=/opt/job/bin:$PATH PYTHONUNBUFFERED=1\n"
    )
    docker_setup.engine.images.build(path=str(context), tag=SDK_IMAGE, rm=True)
    return SDK_IMAGE


@pytest.fixture(scope="module")
def home(docker_setup: DockerSetup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running stack with two local-container queues, made through the CLI, and an agent serving both,
    started with `takeoff agent` (the stack's own agent is the demo's). The CLI and that agent find the
    stack's admin key in its TAKEOFF_HOME, as a user's would."""
    home = tmp_path_factory.mktemp("home")
    stack = LocalStack(home, base_port=0, base_image=docker_setup.base_image)
    stack.start()
    agent: subprocess.Popen[bytes] | None = None
    try:
        created = takeoff(home, "queue", "create", "containers", "--resource", "local-container")
        assert created.returncode == 0, created.stderr
        # No swap beyond the limit either, so going over it is an OOM kill rather than paging.
        resources = home / "small-memory.yaml"
        resources.write_text(yaml.safe_dump({"mem_limit": "64m", "memswap_limit": "64m"}))
        created = takeoff(
            home,
            "queue",
            "create",
            "small-memory",
            "--resource",
            "local-container",
            "--config",
            str(resources),
        )
        assert created.returncode == 0, created.stderr
        agent_log = home / "logs" / "cli-agent.log"
        with agent_log.open("w") as log:
            agent = subprocess.Popen(
                [*TAKEOFF, "agent", "--name", AGENT, "--queue", "containers", "--queue", "small-memory"],
                env=user_environment(home),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: connected_agent(home) or agent.poll() is not None, timeout=60, what="the agent")
        assert agent.poll() is None, agent_log.read_text()
        yield home
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()  # drains: nothing runs by now, so it exits at once
            agent.wait(timeout=60)
        stack.stop()


def connected_agent(home: Path) -> dict[str, Any] | None:
    listed = takeoff(home, "agents", "--json")
    agents = json.loads(listed.stdout) if listed.returncode == 0 else []
    return next((a for a in agents if a["display_name"] == AGENT and a["connected"]), None)


def create_image_job(home: Path, image: str, code: str) -> str:
    job = f"image-{uuid.uuid4().hex[:8]}"
    created = takeoff(
        home, "job", "create", "--name", job, "--image", image, "--entrypoint", f'python3 -c "{code}"'
    )
    assert created.returncode == 0, created.stderr
    return job


def test_an_agent_next_to_the_stack_offers_containers_when_docker_answers(home: Path) -> None:
    agent = connected_agent(home)

    assert agent is not None
    assert set(agent["resources"]) == {"local-process", "local-container"}


@pytest.mark.timeout(300)  # the first use builds the SDK image: pip downloads the SDK's dependencies
def test_an_image_job_with_the_sdk_baked_in_succeeds_with_its_metric(home: Path, sdk_image: str) -> None:
    job = create_image_job(home, sdk_image, JOB_CODE)

    launched = takeoff(home, "launch", job, "--queue", "containers", "--wait", timeout=120)

    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert "SUCCEEDED" in launched.stdout
    run = launched.stdout.split("takeoff logs ", 1)[1].split()[0]
    shown = json.loads(takeoff(home, "runs", "show", run, "--json").stdout)
    assert shown["run"]["state"] == "FINISHED"
    assert shown["metrics"]["answer"]["last"] == 42


def test_an_image_nobody_can_pull_fails_the_launch_saying_so(home: Path, docker_setup: DockerSetup) -> None:
    missing = f"{docker_setup.registry}/takeoff-test/absent-{uuid.uuid4().hex[:8]}:1"
    job = create_image_job(home, missing, "print(1)")

    launched = takeoff(home, "launch", job, "--queue", "containers", "--wait", timeout=120)

    assert launched.returncode == 1, launched.stdout + launched.stderr
    assert "FAILED" in launched.stdout
    assert missing in launched.stdout


def test_a_job_over_its_memory_limit_fails_oomkilled(home: Path, docker_setup: DockerSetup) -> None:
    job = create_image_job(home, docker_setup.base_image, OVER_MEMORY_CODE)

    launched = takeoff(home, "launch", job, "--queue", "small-memory", "--wait", timeout=120)

    assert launched.returncode == 1, launched.stdout + launched.stderr
    assert "JOB_FAILED" in launched.stdout
    assert "OOMKilled" in launched.stdout


@pytest.mark.timeout(420)  # the first demo builds the example's image (pip install) before its two runs
def test_demo_runs_the_example_job_in_containers(takeoff_home: Path, docker_setup: DockerSetup) -> None:
    result = takeoff(
        takeoff_home,
        "demo",
        "--resource",
        "local-container",
        "--base-image",
        docker_setup.base_image,
        timeout=400,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "queue projects/demo/queues/containers (local-container)" in result.stdout
    assert result.stdout.count("FINISHED") == 2
    for metric in ("loss", "weight", "best_loss"):
        assert metric in result.stdout
    assert "stack stopped" in result.stdout
    assert stack_record(takeoff_home) is None
    leftovers = docker_setup.engine.containers.list(all=True, filters={"label": "takeoff.item"})
    assert not [c for c in leftovers if "projects/demo/" in c.labels["takeoff.item"]]


def test_demo_without_docker_says_so(takeoff_home: Path) -> None:
    nowhere = takeoff_home / "no-docker.sock"

    result = takeoff(
        takeoff_home, "demo", "--resource", "local-container", env={"DOCKER_HOST": f"unix://{nowhere}"}
    )

    assert result.returncode == 1
    assert (
        f"Docker is not reachable at unix://{nowhere}; run without --resource or start Docker"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert stack_record(takeoff_home) is None


def test_demo_with_a_base_image_that_cannot_be_had_says_so(
    takeoff_home: Path, docker_setup: DockerSetup
) -> None:
    missing = f"{docker_setup.registry}/takeoff-test/no-base-{uuid.uuid4().hex[:8]}:1"

    result = takeoff(takeoff_home, "demo", "--resource", "local-container", "--base-image", missing)

    assert result.returncode == 1
    assert f"the image {missing} is not on the Docker engine" in result.stderr
    assert "--base-image" in result.stderr
    assert stack_record(takeoff_home) is None
