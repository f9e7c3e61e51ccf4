"""The agent end to end on the kubernetes runner: real registry, queue, builder and agent processes, the
builder pushing to the local registry, and the stand-in API server (tests/agent/kube_api.py) as the
cluster, whose pod the test plays (docs/design.md §7, §12). No cluster can be had here: nothing runs the
job's image.
"""

from __future__ import annotations

import base64
import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from takeoff.client import Client
from takeoff.v1 import common_pb2, queue_pb2
from takeoff_server.protovalues import dict_to_struct
from tests.agent.conftest import Stack, StartAgent, code_job, running_agent
from tests.agent.kube_api import KubeApiServer
from tests.conftest import DockerSetup
from tests.processes import ServiceProcess, service_process, wait_for

JOB_REGISTRY = "takeoff-registry.takeoff.svc:50051"
"""What jobs in the cluster are told the registry is (an address the cluster would reach)."""
REPOSITORY = "takeoff-k8s"


@pytest.fixture(scope="module")
def builder(home: Path, registry: ServiceProcess, docker_setup: DockerSetup) -> Iterator[ServiceProcess]:
    env = {
        "TAKEOFF_REGISTRY_ADDRESS": registry.address,
        "TAKEOFF_DEFAULT_BASE_IMAGE": docker_setup.base_image,
        "TAKEOFF_IMAGE_REPOSITORY": REPOSITORY,
        "TAKEOFF_PUSH_REGISTRY": docker_setup.registry,
    }
    with service_process("builder", home, env=env) as process:
        yield process
        process.terminate()


@pytest.fixture(scope="module")
def queue_service(
    home: Path, registry: ServiceProcess, docker_setup: DockerSetup, lease_ttl_seconds: float
) -> Iterator[ServiceProcess]:
    env = {
        "TAKEOFF_REGISTRY_ADDRESS": registry.address,
        "TAKEOFF_LEASE_TTL_SECONDS": str(lease_ttl_seconds),
        "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS": "0.5",
        "TAKEOFF_SHUTDOWN_GRACE_SECONDS": "1",
        "TAKEOFF_BUILDER_PUSH_REGISTRY": docker_setup.registry,
    }
    with service_process("queue", home, env=env) as process:
        yield process
        process.terminate()


@pytest.fixture
def kube_server() -> Iterator[KubeApiServer]:
    server = KubeApiServer().start()
    yield server
    server.close()


def kubernetes_queue(stack: Stack) -> str:
    config = {"spec": {"template": {"spec": {"containers": [{"name": "sidecar"}, {"name": "trainer"}]}}}}
    return stack.new_queue(
        common_pb2.RESOURCE_KIND_KUBERNETES, resource_config=dict_to_struct(config), container_name="trainer"
    )


@dataclass
class Cluster:
    """The stack (its builder pushing to the local registry), a client, and the stand-in cluster."""

    stack: Stack
    client: Client
    docker: DockerSetup
    kube: KubeApiServer
    start_agent: StartAgent


@pytest.fixture
def cluster(
    stack: Stack,
    client: Client,
    docker_setup: DockerSetup,
    kube_server: KubeApiServer,
    start_agent: StartAgent,
) -> Cluster:
    return Cluster(stack, client, docker_setup, kube_server, start_agent)


def the_job_or_end(stack: Stack, kube: KubeApiServer, item: str) -> str | None:
    """The name of the Job the agent made for ``item``; fails if the item ended without one."""
    if names := kube.names("jobs"):
        return names[0]
    ended = stack.item(item)
    assert ended.state not in (common_pb2.ITEM_STATE_FAILED, common_pb2.ITEM_STATE_SUCCEEDED), ended.message
    return None


def assert_token_only_in_the_jobs_secret(kube: KubeApiServer, job: dict[str, Any], agent_log: str) -> None:
    """The run token comes from the Job's own Secret (a secretKeyRef), never as a value in the Job, and
    the agent logs it nowhere."""
    name = job["metadata"]["name"]
    containers = {c["name"]: c for c in job["spec"]["template"]["spec"]["containers"]}
    reference = {"secretKeyRef": {"name": name, "key": "TAKEOFF_TOKEN"}}
    assert {e["name"]: e.get("valueFrom") for e in containers["trainer"]["env"]}["TAKEOFF_TOKEN"] == reference

    def owned_secret() -> dict[str, Any] | None:
        secret = kube.get("secrets", name)
        return secret if secret and secret["metadata"].get("ownerReferences") else None

    secret = wait_for(owned_secret, what="the Job's Secret to be the Job's")
    assert [(o["kind"], o["name"], o["uid"]) for o in secret["metadata"]["ownerReferences"]] == [
        ("Job", name, job["metadata"]["uid"])
    ]
    token = base64.b64decode(secret["data"]["TAKEOFF_TOKEN"]).decode()
    assert token
    for where, text in (("the Job", json.dumps(job)), ("the agent's log", agent_log)):
        assert token not in text, where
        assert secret["data"]["TAKEOFF_TOKEN"] not in text, where


@pytest.mark.timeout(600)  # the image build, on a machine without a cached dependency layer
def test_a_code_job_on_a_kubernetes_queue_runs_as_a_job_of_its_pushed_image(
    cluster: Cluster, tmp_path: Path
) -> None:
    stack, kube_server, docker_setup = cluster.stack, cluster.kube, cluster.docker
    job = code_job(cluster.client, tmp_path, f"k8s-{uuid.uuid4().hex[:6]}", "print('never run here')\n")
    queue = kubernetes_queue(stack)
    settings = {
        "runners": {"kubernetes": {"kubeconfig": str(kube_server.kubeconfig(tmp_path / "kubeconfig"))}},
        "job_registry_address": JOB_REGISTRY,
    }
    with running_agent(cluster.start_agent, [queue], **settings) as agent:
        item = stack.enqueue(queue, job)
        name = wait_for(lambda: the_job_or_end(stack, kube_server, item), timeout=540, what="the Job")
        manifest = kube_server.get("jobs", name)
        assert manifest is not None
        containers = {c["name"]: c for c in manifest["spec"]["template"]["spec"]["containers"]}
        trainer = containers["trainer"]
        assert "image" not in containers["sidecar"]
        image = trainer["image"]
        assert image.startswith(f"{docker_setup.registry}/{REPOSITORY}/{job}:")
        environment = {entry["name"]: entry.get("value") for entry in trainer["env"]}
        assert environment["TAKEOFF_REGISTRY"] == JOB_REGISTRY
        assert environment["TAKEOFF_ITEM"] == item
        assert manifest["metadata"]["labels"]["takeoff.item"] == item.rsplit("/", 1)[1]
        assert_token_only_in_the_jobs_secret(kube_server, manifest, agent.log_file.read_text())

        # The image is in the local registry, where the cluster would pull it from.
        repository, tag = image.removeprefix(f"{docker_setup.registry}/").rsplit(":", 1)
        with urllib.request.urlopen(f"http://{docker_setup.registry}/v2/{repository}/tags/list") as reply:
            assert tag in json.load(reply)["tags"]

        stack.wait_state(item, common_pb2.ITEM_STATE_STARTING)
        kube_server.run(name)
        stack.wait_state(item, common_pb2.ITEM_STATE_RUNNING)
        kube_server.print(name, "step 1\nstep 2\n")
        kube_server.terminate(name, 3)
        ended = stack.wait_ended(item)
        assert (ended.state, ended.reason, ended.exit_code) == (
            common_pb2.ITEM_STATE_FAILED,
            common_pb2.FAILURE_REASON_JOB_FAILED,
            3,
        )
        logs = stack.logs(ended.run)
        assert logs.index("step 1") < logs.index("step 2")
        assert logs.count("step 1") == 1

        # Cancelled while it runs: its Job is deleted, the pod first (its image is the one already pushed).
        second = stack.enqueue(queue, job)
        other = wait_for(
            lambda: next((n for n in kube_server.names("jobs") if n != name), None), what="the second Job"
        )
        kube_server.run(other)
        stack.wait_state(second, common_pb2.ITEM_STATE_RUNNING)
        stack.queues.CancelItem(queue_pb2.CancelItemRequest(name=second))
        assert stack.wait_ended(second).state == common_pb2.ITEM_STATE_CANCELLED
        assert kube_server.get("jobs", other) is None
        (delete,) = kube_server.calls("DELETE", f"/jobs/{other}")
        assert delete.body["propagationPolicy"] == "Foreground"

        run_two_ranks(stack, kube_server, queue, job, known={name, other})


def every_rank_has_a_pod(kube: KubeApiServer, job: str) -> bool:
    try:
        for rank in (0, 1):
            kube.pod_of(job, rank=rank)
    except KeyError:
        return False
    return True


def run_two_ranks(stack: Stack, kube: KubeApiServer, queue: str, job: str, known: set[str]) -> None:
    """Two nodes: an Indexed Job of two pods, each rank's lines labelled in the run; rank 1 failing fails
    the item, names the rank, and takes rank 0, the Job and its Service with it."""
    item = stack.enqueue(queue, job, resource_config=dict_to_struct({"nodes": 2}))
    name = wait_for(
        lambda: next((n for n in kube.names("jobs") if n not in known), None), what="the multi-node Job"
    )
    wait_for(lambda: every_rank_has_a_pod(kube, name), what="a pod per rank")
    assert kube.names("services") == [name]
    for rank in (0, 1):
        kube.run(name, rank=rank)
    stack.wait_state(item, common_pb2.ITEM_STATE_RUNNING)
    for rank in (0, 1):
        kube.print(name, f"from rank {rank}\n", rank=rank)
    wait_for(
        lambda: {"from rank 0", "from rank 1"} <= set(stack.logs(stack.item(item).run)),
        what="both ranks' lines in the run",
    )
    kube.terminate(name, 3, rank=1)
    ended = stack.wait_ended(item)
    assert (ended.state, ended.exit_code) == (common_pb2.ITEM_STATE_FAILED, 3)
    assert "rank 1" in ended.message
    ranks = {line.text: line.rank for line in stack.log_lines(ended.run) if line.HasField("rank")}
    assert ranks == {"from rank 0": 0, "from rank 1": 1}
    wait_for(lambda: not kube.names("services"), what="the Service to go")
    assert kube.get("jobs", name) is None
