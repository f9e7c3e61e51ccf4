"""Secrets reach the job on every runner, and nowhere else (docs/design.md §7 "Secrets and the CA", §16).

Each job compares what it is given by digest (SHA-256) and prints only digests and modes: the values
never appear in a job's output, so a test that finds one anywhere has found a leak.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from takeoff_agent.domain import Assignment, BuildKind, Built, JobExit, JobVersion, ResourceKind, SourceKind
from takeoff_agent.runners.base import Launch, RunnerContext, RunnerRefused, RunnerUnavailable
from takeoff_agent.runners.container import create as create_container
from takeoff_agent.runners.container import create_options
from takeoff_agent.runners.kubernetes import create as create_kubernetes
from takeoff_agent.runners.kubernetes.manifest import (
    CA_KEY,
    CA_VOLUME,
    FILE_KEY_PREFIX,
    SECRETS_VOLUME,
    JobSettings,
    job_manifest,
    job_name,
    refusals,
)
from takeoff_agent.runners.local_process import LocalProcessRunner
from takeoff_agent.runners.secrets import write_secret_files
from tests.agent.kube_api import KubeApiServer
from tests.conftest import DockerSetup
from tests.processes import eventually

WAIT_SECONDS = 60
TOKEN = f"run-token-{uuid.uuid4().hex}"
USER_SECRET = f"user-secret-{uuid.uuid4().hex}"
FILES = {
    "service-account.json": f'{{"key": "{uuid.uuid4().hex}"}}'.encode(),
    "id_rsa": f"-----BEGIN KEY-----\n{uuid.uuid4().hex}\n-----END KEY-----\n".encode(),
}
CA = f"-----BEGIN CERTIFICATE-----\n{uuid.uuid4().hex}\n-----END CERTIFICATE-----\n".encode()
SECRET_VALUES = [TOKEN.encode(), USER_SECRET.encode(), *FILES.values()]
"""What must not be found outside the places made for it (the CA certificate is not secret)."""

CHECKER = """\
import hashlib, json, os, stat, sys, time

def digest(data):
    return hashlib.sha256(data).hexdigest()

def mode(path):
    return oct(stat.S_IMODE(os.stat(path).st_mode))

seen = {"env": {name: digest(os.environ[name].encode()) for name in ("TAKEOFF_TOKEN", "USER_SECRET")
                if name in os.environ}}
directory = os.environ.get("TAKEOFF_SECRETS_DIR")
if directory:
    seen["dir"] = directory
    seen["dir_mode"] = mode(directory)
    seen["files"] = {
        name: [digest(open(os.path.join(directory, name), "rb").read()), mode(os.path.join(directory, name))]
        for name in sorted(os.listdir(directory))
    }
ca = os.environ.get("TAKEOFF_TLS_CA_FILE")
if ca:
    seen["ca"] = [ca, digest(open(ca, "rb").read())]
print(json.dumps(seen), flush=True)
if len(sys.argv) > 1:
    time.sleep(600)  # until stopped: the test looks at the running container
"""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_files() -> dict[str, list[str]]:
    return {name: [digest(value), "0o600"] for name, value in sorted(FILES.items())}


def assert_no_secret(text: str | bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for value in SECRET_VALUES:
        assert value not in data, f"a secret value in {where}"
        assert base64.b64encode(value) not in data, f"a secret value (base64) in {where}"


def assignment(
    kind: ResourceKind, source: SourceKind, entrypoint: tuple[str, ...], image: str = ""
) -> Assignment:
    lease = uuid.uuid4().hex
    return Assignment(
        lease_id=lease,
        epoch=2,
        item=f"projects/p/queues/q/items/{lease[:8]}",
        queue="projects/p/queues/q",
        run=f"projects/p/runs/{lease[:8]}-1",
        attempt=1,
        job_version=JobVersion("projects/p/jobs/j/versions/1", source, image=image, build_context=""),
        resource=kind,
        entrypoint=entrypoint,
    )


def launch(work: Assignment, built: Built, ca_file: Path | None, **fields: Any) -> Launch:
    return Launch(
        assignment=work,
        built=built,
        env=fields.pop("env", {"TAKEOFF_RUN_ID": work.run_id}),
        secrets=fields.pop("secrets", {"TAKEOFF_TOKEN": TOKEN, "USER_SECRET": USER_SECRET}),
        registry_address=fields.pop("registry_address", "registry.example:50051"),
        stop_grace_seconds=5.0,
        secret_files=fields.pop("secret_files", FILES),
        ca_file=ca_file,
        **fields,
    )


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "tls" / "ca.pem"
    path.parent.mkdir()
    path.write_bytes(CA)
    return path


def test_secret_files_are_written_private_and_anew(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o755)
    (directory / "stale").write_text("left by an unfinished start")
    old_umask = os.umask(0)
    try:
        write_secret_files(directory, FILES)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(path.name for path in directory.iterdir()) == sorted(FILES)
    for name, value in FILES.items():
        assert (directory / name).read_bytes() == value
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600


# -- local-process ------------------------------------------------------------------------------------------


async def test_a_local_job_gets_its_secrets_files_and_ca_and_only_its_private_spec_holds_them(
    tmp_path: Path, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    runner = LocalProcessRunner(RunnerContext("secrets-agent", tmp_path / "state"))
    work = assignment(ResourceKind.LOCAL_PROCESS, SourceKind.CODE, ("python", "-c", CHECKER))
    code = tmp_path / "code"
    code.mkdir()
    built = Built(BuildKind.VENV, venv_path=sys.prefix, code_path=str(code), python_path=sys.executable)
    lease_dir = tmp_path / "state" / "leases" / work.lease_id
    lease_dir.mkdir(parents=True)
    job = runner.job(work, lease_dir)
    await job.renew_lease(time.time() + 3600)
    await job.start(launch(work, built, ca_file))
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(0)

    seen = json.loads((lease_dir / "stdout.log").read_text())
    assert (lease_dir / "stderr.log").read_text() == ""
    assert seen == {
        "env": {"TAKEOFF_TOKEN": digest(TOKEN.encode()), "USER_SECRET": digest(USER_SECRET.encode())},
        "dir": str(lease_dir / "secrets"),
        "dir_mode": "0o700",
        "files": expected_files(),
        "ca": [str(ca_file), digest(CA)],
    }
    # The spec (the shim reads the job's environment from it) is the agent's alone; nothing else in the
    # lease directory but the secret files holds a value, and the runner logged none.
    spec = lease_dir / "spec.json"
    assert stat.S_IMODE(spec.stat().st_mode) == 0o600
    for path in lease_dir.rglob("*"):
        if path.is_file() and path != spec and path.parent != lease_dir / "secrets":
            assert_no_secret(path.read_bytes(), str(path.relative_to(lease_dir)))
    assert_no_secret(caplog.text, "the agent's log")


async def test_a_local_job_without_secret_files_or_ca_gets_neither_variable(tmp_path: Path) -> None:
    runner = LocalProcessRunner(RunnerContext("secrets-agent", tmp_path / "state"))
    work = assignment(ResourceKind.LOCAL_PROCESS, SourceKind.CODE, ("python", "-c", CHECKER))
    code = tmp_path / "code"
    code.mkdir()
    built = Built(BuildKind.VENV, venv_path=sys.prefix, code_path=str(code), python_path=sys.executable)
    lease_dir = tmp_path / "state" / "leases" / work.lease_id
    lease_dir.mkdir(parents=True)
    job = runner.job(work, lease_dir)
    await job.start(launch(work, built, None, secrets={}, secret_files={}))
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(0)
    assert json.loads((lease_dir / "stdout.log").read_text()) == {"env": {}}
    assert not (lease_dir / "secrets").exists()


@pytest.mark.parametrize(
    ("field", "name"),
    [
        ("secret_files", "../escape"),
        ("secret_files", ".."),
        ("secret_files", "a/b"),
        ("secret_files", ""),
        ("secrets", "NOT-A-NAME"),
        ("secrets", "A=B"),
    ],
)
async def test_a_secret_name_no_runner_can_take_is_refused_by_name_without_its_value(
    tmp_path: Path, field: str, name: str
) -> None:
    runner = LocalProcessRunner(RunnerContext("secrets-agent", tmp_path / "state"))
    work = assignment(ResourceKind.LOCAL_PROCESS, SourceKind.CODE, ("python", "-c", CHECKER))
    built = Built(BuildKind.VENV, venv_path=sys.prefix, code_path=str(tmp_path), python_path=sys.executable)
    lease_dir = tmp_path / "lease"
    lease_dir.mkdir()
    value = {"secret_files": FILES["id_rsa"], "secrets": TOKEN}[field]
    with pytest.raises(RunnerRefused) as refused:
        await runner.job(work, lease_dir).start(launch(work, built, None, **{field: {name: value}}))
    assert repr(name) in str(refused.value)
    assert_no_secret(str(refused.value), "the refusal")
    assert not (lease_dir / "spec.json").exists()
    assert not (tmp_path.parent / "escape").exists()


# -- local-container ----------------------------------------------------------------------------------------


async def test_a_container_gets_its_secrets_read_only_and_no_label_holds_one(
    docker_setup: DockerSetup, tmp_path: Path, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    runner = create_container({}, RunnerContext(f"test-{uuid.uuid4().hex[:10]}", tmp_path))
    try:
        work = assignment(
            ResourceKind.LOCAL_CONTAINER,
            SourceKind.IMAGE,
            ("python3", "-c", CHECKER, "wait"),
            image=docker_setup.base_image,
        )
        lease_dir = tmp_path / "leases" / work.lease_id
        lease_dir.mkdir(parents=True)
        job = runner.job(work, lease_dir)
        await job.renew_lease(time.time() + 3600)
        await job.start(launch(work, Built(BuildKind.NOOP, image=docker_setup.base_image), ca_file))
        stdout = lease_dir / "stdout.log"
        await eventually(lambda: stdout.exists() and stdout.read_text().endswith("\n"), "the job's report")
        seen = json.loads(stdout.read_text())
        assert seen == {
            "env": {"TAKEOFF_TOKEN": digest(TOKEN.encode()), "USER_SECRET": digest(USER_SECRET.encode())},
            "dir": "/run/takeoff/secrets",
            "dir_mode": "0o700",
            "files": expected_files(),
            "ca": ["/run/takeoff/ca.pem", digest(CA)],
        }

        attrs = docker_setup.engine.containers.get(job.name).attrs
        labels = attrs["Config"]["Labels"]
        assert_no_secret(json.dumps(labels), "the container's labels")
        mounts = {mount["Destination"]: mount for mount in attrs["Mounts"]}
        assert mounts["/run/takeoff/secrets"]["Source"] == str(lease_dir / "secrets")
        assert mounts["/run/takeoff/secrets"]["RW"] is False
        assert mounts["/run/takeoff/ca.pem"]["Source"] == str(ca_file)
        assert mounts["/run/takeoff/ca.pem"]["RW"] is False
        # The environment is where a container's secrets are (§16: Docker access is root on the host).
        assert f"TAKEOFF_TOKEN={TOKEN}" in attrs["Config"]["Env"]
        # No file the job could see on the host but its own secrets: the secret files are in the lease
        # directory's private directory, nothing else there holds a value.
        assert stat.S_IMODE((lease_dir / "secrets").stat().st_mode) == 0o700
        for path in lease_dir.rglob("*"):
            if path.is_file() and path.parent != lease_dir / "secrets":
                assert_no_secret(path.read_bytes(), str(path.relative_to(lease_dir)))

        await job.stop(1)
        ended = await asyncio.wait_for(job.wait(), WAIT_SECONDS)
        assert ended.signal is not None or ended.exit_code is not None
        assert_no_secret(caplog.text, "the agent's log")
    finally:
        await runner.sweep(())
        await runner.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the agent gives the files to the job's uid only as root")
async def test_a_container_that_runs_as_a_numeric_user_can_read_its_files(
    docker_setup: DockerSetup, tmp_path: Path
) -> None:
    runner = create_container({}, RunnerContext(f"test-{uuid.uuid4().hex[:10]}", tmp_path))
    try:
        work = assignment(
            ResourceKind.LOCAL_CONTAINER,
            SourceKind.IMAGE,
            ("python3", "-c", CHECKER),
            image=docker_setup.base_image,
        )
        work = replace(work, resource_config={"user": "4321:4321"})
        lease_dir = tmp_path / "leases" / work.lease_id
        lease_dir.mkdir(parents=True)
        job = runner.job(work, lease_dir)
        await job.renew_lease(time.time() + 3600)
        await job.start(launch(work, Built(BuildKind.NOOP, image=docker_setup.base_image), None))
        assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(0)
        seen = json.loads((lease_dir / "stdout.log").read_text())
        assert (seen["dir_mode"], seen["files"]) == ("0o700", expected_files())
        assert (lease_dir / "secrets").stat().st_uid == 4321
    finally:
        await runner.sweep(())
        await runner.close()


def test_a_container_without_secret_files_or_ca_mounts_neither() -> None:
    work = assignment(
        ResourceKind.LOCAL_CONTAINER, SourceKind.IMAGE, ("python3", "-c", CHECKER), image="img:1"
    )
    built = Built(BuildKind.NOOP, image="img:1")
    options = create_options(
        launch(work, built, None, secret_files={}), {}, (), agent="a", name="takeoff-x", secrets_dir=None
    )
    assert options["mounts"] == []
    assert "TAKEOFF_SECRETS_DIR" not in options["environment"]
    assert "TAKEOFF_TLS_CA_FILE" not in options["environment"]
    assert_no_secret(json.dumps(options["labels"]), "the labels")


# -- kubernetes ---------------------------------------------------------------------------------------------

SETTINGS = JobSettings(namespace="default", agent_id="agent-s", ttl_seconds_after_finished=600)
IMAGE = "registry.example:5000/takeoff/j:0123456789abcdef"


def kube_assignment(**resource_config: Any) -> Assignment:
    work = assignment(ResourceKind.KUBERNETES, SourceKind.CODE, ("python", "train.py"))
    return replace(work, resource_config=resource_config)


def kube_built() -> Built:
    return Built(BuildKind.IMAGE, image=IMAGE, pushed=True)


def test_the_job_manifest_refers_to_its_secret_and_holds_no_value(ca_file: Path) -> None:
    work = kube_assignment(
        spec={"template": {"spec": {"volumes": [{"name": "data", "emptyDir": {}}]}}},
    )
    manifest = job_manifest(work, launch(work, kube_built(), ca_file), SETTINGS, active_deadline_seconds=90)
    assert_no_secret(json.dumps(manifest), "the Job manifest")
    name = job_name(work.lease_id)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    environment = {entry["name"]: entry for entry in container["env"]}
    for variable in ("TAKEOFF_TOKEN", "USER_SECRET"):
        assert environment[variable] == {
            "name": variable,
            "valueFrom": {"secretKeyRef": {"name": name, "key": variable}},
        }
    assert environment["TAKEOFF_SECRETS_DIR"] == {
        "name": "TAKEOFF_SECRETS_DIR",
        "value": "/run/takeoff/secrets",
    }
    assert environment["TAKEOFF_TLS_CA_FILE"] == {
        "name": "TAKEOFF_TLS_CA_FILE",
        "value": "/run/takeoff/ca.pem",
    }
    assert all(
        "value" not in entry or entry["name"] not in ("TAKEOFF_TOKEN", "USER_SECRET")
        for entry in container["env"]
    )
    assert pod["volumes"] == [
        {"name": "data", "emptyDir": {}},
        {
            "name": SECRETS_VOLUME,
            "secret": {
                "secretName": name,
                "items": [{"key": FILE_KEY_PREFIX + file, "path": file} for file in FILES],
                "defaultMode": 0o600,
            },
        },
        {
            "name": CA_VOLUME,
            "secret": {
                "secretName": name,
                "items": [{"key": CA_KEY, "path": "ca.pem"}],
                "defaultMode": 0o444,
            },
        },
    ]
    assert container["volumeMounts"] == [
        {"name": SECRETS_VOLUME, "mountPath": "/run/takeoff/secrets", "readOnly": True},
        {"name": CA_VOLUME, "mountPath": "/run/takeoff/ca.pem", "subPath": "ca.pem", "readOnly": True},
    ]


def test_a_secret_variable_replaces_a_plain_one_of_its_name_whole() -> None:
    """Merged key by key, a ``value`` beside a ``valueFrom`` would be an entry the API server refuses."""
    config_env = [
        {"name": "USER_SECRET", "value": "from the config"},
        {"name": "TAKEOFF_TOKEN", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
        {"name": "KEPT", "value": "1"},
    ]
    work = kube_assignment(spec={"template": {"spec": {"containers": [{"name": "main", "env": config_env}]}}})
    given = launch(work, kube_built(), None, env={"USER_SECRET": "plain", "TAKEOFF_RUN_ID": work.run_id})
    manifest = job_manifest(work, given, SETTINGS, active_deadline_seconds=90)
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    name = job_name(work.lease_id)
    assert container["env"] == [
        {"name": "USER_SECRET", "valueFrom": {"secretKeyRef": {"name": name, "key": "USER_SECRET"}}},
        {"name": "TAKEOFF_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "TAKEOFF_TOKEN"}}},
        {"name": "KEPT", "value": "1"},
        {"name": "TAKEOFF_RUN_ID", "value": work.run_id},
        {"name": "TAKEOFF_REGISTRY", "value": "registry.example:50051"},
        {"name": "TAKEOFF_SECRETS_DIR", "value": "/run/takeoff/secrets"},
    ]


def test_a_resource_config_may_not_name_the_agents_volumes() -> None:
    config = {
        "spec": {"template": {"spec": {"volumes": [{"name": SECRETS_VOLUME, "hostPath": {"path": "/"}}]}}}
    }
    assert refusals(config, "", SETTINGS) == [
        f"spec.template.spec.volumes.{SECRETS_VOLUME}: the agent's volume"
    ]


@pytest.fixture
def kube_server() -> Iterator[KubeApiServer]:
    server = KubeApiServer().start()
    yield server
    server.close()


@pytest.fixture
async def kube_runner(kube_server: KubeApiServer, tmp_path: Path) -> AsyncIterator[Any]:
    runner = create_kubernetes(
        {"kubeconfig": str(kube_server.kubeconfig(tmp_path / "kubeconfig"))},
        RunnerContext(agent_id=f"agent-{uuid.uuid4().hex[:8]}", state_dir=tmp_path),
    )
    yield runner
    await runner.close()


async def test_a_pod_gets_its_secrets_from_a_secret_the_job_owns_and_nothing_else_holds_them(
    kube_server: KubeApiServer,
    kube_runner: Any,
    tmp_path: Path,
    ca_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = kube_server
    work = kube_assignment()
    lease_dir = tmp_path / "leases" / work.lease_id
    lease_dir.mkdir(parents=True)
    job = kube_runner.job(work, lease_dir)
    start = asyncio.create_task(job.start(launch(work, kube_built(), ca_file)))
    await eventually(lambda: server.get("jobs", job.name), "the Job")
    server.run(job.name)
    await asyncio.wait_for(start, WAIT_SECONDS)

    stored_job = server.get("jobs", job.name)
    secret = server.get("secrets", job.name)
    assert stored_job is not None
    assert secret is not None
    # The Secret holds each value under its key, and is the Job's: deleting the Job deletes it.
    data = {key: base64.b64decode(value) for key, value in secret["data"].items()}
    assert data == {
        "TAKEOFF_TOKEN": TOKEN.encode(),
        "USER_SECRET": USER_SECRET.encode(),
        **{FILE_KEY_PREFIX + name: value for name, value in FILES.items()},
        CA_KEY: CA,
    }
    assert secret["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job.name,
            "uid": stored_job["metadata"]["uid"],
            "controller": False,
        }
    ]
    assert_no_secret(json.dumps(secret["metadata"]), "the Secret's labels and annotations")
    # What the pod mounts maps each key to its file (the kubelet projects them so).
    pod = server.pod_of(job.name)
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    projected = {item["path"]: data[item["key"]] for item in volumes[SECRETS_VOLUME]["secret"]["items"]}
    assert projected == FILES
    assert volumes[SECRETS_VOLUME]["secret"]["secretName"] == job.name
    assert [data[item["key"]] for item in volumes[CA_VOLUME]["secret"]["items"]] == [CA]
    # Nothing but the Secret holds a value: the Job, its pod, every request but the Secret's own.
    assert_no_secret(json.dumps(stored_job), "the Job")
    assert_no_secret(json.dumps(pod), "the pod")
    for request in server.requests:
        if "/secrets" not in request.path:
            assert_no_secret(json.dumps(request.body), f"{request.method} {request.path}")
    secret_writes = [r for r in server.requests if "/secrets" in r.path and r.method in ("POST", "PATCH")]
    assert [r.method for r in secret_writes] == ["POST", "PATCH"]
    assert set(secret_writes[1].body) == {"metadata"}  # the owner, not the data again

    server.terminate(job.name, 0)
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(0)
    # The ended Job stays for its TTL; the values its pod needed are gone at once.
    assert server.get("jobs", job.name) is not None
    assert server.get("secrets", job.name) is None
    await job.stop(1)
    assert server.get("jobs", job.name) is None
    assert_no_secret(caplog.text, "the agent's log")
    status = job.log_sources()[1].source
    assert_no_secret("\n".join(status.read_lines()), "the SYSTEM lines")


async def test_a_job_without_secrets_gets_no_secret(
    kube_server: KubeApiServer, kube_runner: Any, tmp_path: Path
) -> None:
    work = kube_assignment()
    lease_dir = tmp_path / "leases" / work.lease_id
    lease_dir.mkdir(parents=True)
    job = kube_runner.job(work, lease_dir)
    start = asyncio.create_task(job.start(launch(work, kube_built(), None, secrets={}, secret_files={})))
    await eventually(lambda: kube_server.get("jobs", job.name), "the Job")
    kube_server.run(job.name)
    await asyncio.wait_for(start, WAIT_SECONDS)
    assert kube_server.names("secrets") == []
    pod_spec = kube_server.pod_of(job.name)["spec"]
    assert "volumes" not in pod_spec
    await job.stop(1)


async def test_a_ca_file_the_agent_cannot_read_fails_the_start_as_infrastructure(
    kube_server: KubeApiServer, kube_runner: Any, tmp_path: Path
) -> None:
    work = kube_assignment()
    lease_dir = tmp_path / "leases" / work.lease_id
    lease_dir.mkdir(parents=True)
    job = kube_runner.job(work, lease_dir)
    with pytest.raises(RunnerUnavailable, match="cannot read the CA certificate") as failed:
        await job.start(launch(work, kube_built(), tmp_path / "missing.pem"))
    assert_no_secret(str(failed.value), "the failure")
    assert kube_server.names("jobs") == []
    assert kube_server.names("secrets") == []
