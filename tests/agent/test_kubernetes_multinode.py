"""Multi-node launches on the kubernetes runner, against the stand-in API server (tests/agent/kube_api.py):
``nodes: 2`` runs as an Indexed Job with a headless Service, every rank gets its environment, the ranks
start together or not at all, one rank failing stops them all, and each rank's log is its own
(docs/design.md §7 "Kubernetes", §12).

No cluster can be had here: the test plays the job controller, scheduler and kubelet through the stand-in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from takeoff_agent.domain import Assignment, FailureReason, JobExit, LogStream, RunnerFailure
from takeoff_agent.runners.base import RunnerRefused
from takeoff_agent.runners.kubernetes import KubeJob
from takeoff_agent.runners.kubernetes.manifest import (
    COMPLETION_INDEX,
    LEASE_LABEL,
    job_manifest,
    service_manifest,
)
from takeoff_agent.runners.kubernetes.status import Observed, combine
from tests.agent.kube_api import KubeApiServer
from tests.agent.test_kubernetes_runner import SETTINGS, WAIT_SECONDS, Cluster, assignment, launch
from tests.processes import eventually

NODES = 2


@pytest.fixture
def kube_server() -> Iterator[KubeApiServer]:
    server = KubeApiServer().start()
    yield server
    server.close()


@pytest.fixture
async def cluster(kube_server: KubeApiServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(kube_server, tmp_path)
    yield cluster
    for runner in cluster.runners:
        await runner.close()


def multi_node(**resource_config: Any) -> Assignment:
    return assignment(nodes=NODES, **resource_config)


async def running(cluster: Cluster, job: KubeJob, work: Assignment, **fields: Any) -> None:
    """Start ``job`` and let every rank's pod run."""
    start = asyncio.create_task(job.start(launch(work, **fields)))
    await eventually(lambda: len(cluster.server.names("pods")) == NODES, "a pod per rank")
    for rank in range(NODES):
        cluster.server.run(job.name, rank=rank)
    await asyncio.wait_for(start, WAIT_SECONDS)


def pods_by_rank(server: KubeApiServer, job: str) -> dict[int, dict[str, Any]]:
    return {rank: server.pod_of(job, rank=rank) for rank in range(NODES)}


def pod_environment(pod: dict[str, Any], container: str = "job") -> dict[str, str]:
    """The variables the kubelet would give ``container`` of ``pod``: values, and downward-API fields."""
    (spec,) = (c for c in pod["spec"]["containers"] if c["name"] == container)
    environment = {}
    for entry in spec["env"]:
        if "value" in entry:
            environment[entry["name"]] = entry["value"]
        if "fieldRef" not in entry.get("valueFrom", {}):
            continue  # a value, or a Secret's
        field = entry["valueFrom"]["fieldRef"]["fieldPath"]
        where, _, key = field.partition("['")
        environment[entry["name"]] = pod["metadata"][where.removeprefix("metadata.")][key.removesuffix("']")]
    return environment


async def test_nodes_runs_an_indexed_job_with_a_headless_service_for_rank_0(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    own_variable = {"containers": [{"name": "job", "env": [{"name": "A", "value": "1"}]}]}
    work = multi_node(spec={"template": {"spec": own_variable}})
    runner.check(work)
    job = cluster.job(runner, work)
    await running(cluster, job, work, secrets={"TAKEOFF_TOKEN": "t"})

    stored = server.get("jobs", job.name)
    assert stored is not None
    spec = stored["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        NODES,
        NODES,
        0,
    )
    assert "nodes" not in stored  # the runner's key, not the Job's
    assert spec["template"]["spec"]["subdomain"] == job.name

    service = server.get("services", job.name)
    assert service is not None
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job.name}
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["metadata"]["labels"]["takeoff.lease"] == work.lease_id
    assert [(o["kind"], o["name"], o["uid"]) for o in service["metadata"]["ownerReferences"]] == [
        ("Job", job.name, stored["metadata"]["uid"])
    ]

    pods = pods_by_rank(server, job.name)
    for rank, pod in pods.items():
        assert pod["metadata"]["name"].startswith(f"{job.name}-{rank}-")
        # The selector the Service has picks every rank's pod; MASTER_ADDR is rank 0's name under it.
        assert pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] == job.name
    rank_0 = pods[0]["spec"]
    master_addr = f"{rank_0['hostname']}.{rank_0['subdomain']}"
    assert master_addr == f"{job.name}-0.{job.name}"
    for rank, pod in pods.items():
        environment = pod_environment(pod)
        assert {name: environment[name] for name in ("RANK", "NODE_RANK")} == {
            "RANK": str(rank),
            "NODE_RANK": str(rank),
        }
        assert {
            name: environment[name]
            for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "A")
        } == {
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": "29500",
            "WORLD_SIZE": str(NODES),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "A": "1",
        }
        assert "TAKEOFF_MODE" not in environment  # switched off in the container, for ranks other than 0
        assert pod["metadata"]["annotations"][COMPLETION_INDEX] == str(rank)


def test_ranks_other_than_0_run_with_the_sdk_disabled(tmp_path: Path) -> None:
    """The container's command runs as the kubelet would run it, in each rank's environment: the job
    itself (its arguments intact) runs, with TAKEOFF_MODE=disabled on rank 1 only."""
    probe = "import os, sys; print(sys.argv[1:], os.environ['RANK'], os.environ.get('TAKEOFF_MODE'))"
    work = dataclasses.replace(assignment(nodes=NODES), entrypoint=(sys.executable, "-c", probe, "a b"))
    manifest = job_manifest(work, launch(work), SETTINGS, active_deadline_seconds=90)
    pod_spec = manifest["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    said = []
    for rank in range(NODES):
        pod = {"metadata": {"annotations": {COMPLETION_INDEX: str(rank)}}, "spec": pod_spec}
        environment = {"PATH": os.environ["PATH"], **pod_environment(pod)}
        done = subprocess.run(
            container["command"], env=environment, capture_output=True, text=True, check=True
        )
        said.append(done.stdout.strip())
    assert said == ["['a b'] 0 None", "['a b'] 1 disabled"]


async def test_the_start_waits_for_every_rank_and_a_rank_left_pending_deletes_everything(
    cluster: Cluster,
) -> None:
    server, runner = cluster.server, cluster.runner()
    work = multi_node()
    job = cluster.job(runner, work)
    reported: list[str] = []

    async def report(detail: str) -> None:
        reported.append(detail)

    start = asyncio.create_task(job.start(launch(work, report=report, secrets={"TAKEOFF_TOKEN": "t"})))
    await eventually(lambda: len(server.names("pods")) == NODES, "a pod per rank")
    server.run(job.name, rank=0)
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    server.unschedulable(job.name, message, rank=1)
    pending = server.pod_of(job.name, rank=1)["metadata"]["name"]
    await eventually(lambda: any(pending in detail for detail in reported), "rank 1's wait reported")
    assert not start.done()  # rank 0 runs, rank 1 does not: the attempt has not started
    # The attempt's start deadline passes: it cancels the start and stops the job.
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    await job.stop(5)
    for resource in ("jobs", "pods", "services", "secrets"):
        assert server.names(resource) == [], resource
    ended = await asyncio.wait_for(job.wait(), WAIT_SECONDS)
    assert ended.exit_code != 0


async def test_one_rank_failing_fails_the_attempt_and_deletes_the_job(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    work = multi_node()
    job = cluster.job(runner, work)
    await running(cluster, job, work)
    server.terminate(job.name, 3, rank=1)
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(3, rank=1)
    # The runner deleted the Job (its Service with it), not only the job controller's stopping of rank 0.
    assert [call.path.rsplit("/", 1)[-1] for call in server.calls("DELETE", "/jobs/")] == [job.name]
    for resource in ("jobs", "pods", "services"):
        assert server.names(resource) == [], resource


async def test_the_attempt_ends_once_every_rank_has_ended_well(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    work = multi_node()
    job = cluster.job(runner, work)
    await running(cluster, job, work)
    server.terminate(job.name, 0, rank=0)

    def rank_0_seen_ended() -> bool:
        live, _ = runner.pods.select(LEASE_LABEL, job.lease_label)
        return any(
            pod["metadata"]["annotations"][COMPLETION_INDEX] == "0" and pod["status"]["phase"] == "Succeeded"
            for pod in live
        )

    await eventually(rank_0_seen_ended, "the runner to see rank 0 end")
    assert job.exit() is None  # rank 1 still runs
    server.terminate(job.name, 0, rank=1)
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(0)
    assert server.names("jobs") == [job.name]  # kept for its TTL, as a job of one pod
    assert server.names("services") == []  # the ranks need each other's names no more
    assert server.calls("DELETE", "/jobs/") == []


async def test_each_ranks_log_is_followed_and_labelled_with_its_rank(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    work = multi_node()
    job = cluster.job(runner, work)
    outputs = job.log_sources()
    assert [(output.stream, output.rank) for output in outputs] == [
        (LogStream.STDOUT, 0),
        (LogStream.STDOUT, 1),
        (LogStream.SYSTEM, None),
    ]
    await running(cluster, job, work)
    server.print(job.name, "rank zero\n", rank=0)
    server.print(job.name, "rank one\nagain\n", rank=1)
    assert await eventually(outputs[0].source.read_lines, "rank 0's line") == ["rank zero"]
    assert await eventually(outputs[1].source.read_lines, "rank 1's lines") == ["rank one", "again"]
    pods = pods_by_rank(server, job.name)
    said = outputs[2].source.read_lines()
    assert {f"[takeoff] pod {pod['metadata']['name']} running" for pod in pods.values()} <= set(said)


async def test_a_restarted_agent_takes_back_every_rank_and_stop_removes_the_service(cluster: Cluster) -> None:
    server = cluster.server
    first = cluster.runner()
    work = multi_node()
    job = cluster.job(first, work)
    await running(cluster, job, work)
    server.print(job.name, "before\n", rank=1)
    assert await eventually(job.log_sources()[1].source.read_lines, "rank 1's line") == ["before"]
    offsets = [output.source.offset for output in job.log_sources()]
    await first.close()  # the agent stops; its ranks run on

    server.print(job.name, "meanwhile 0\n", rank=0)
    server.print(job.name, "meanwhile 1\n", rank=1)
    again = cluster.job(cluster.runner(), work)
    assert again.started
    outputs = again.log_sources()
    assert [(output.stream, output.rank) for output in outputs] == [
        (output.stream, output.rank) for output in job.log_sources()
    ]
    for output, offset in zip(outputs, offsets, strict=True):
        output.source.offset = offset  # as the restarted agent's log checkpoint sets them
    await asyncio.wait_for(again.until_running(), WAIT_SECONDS)
    assert await eventually(outputs[0].source.read_lines, "rank 0's line") == ["meanwhile 0"]
    assert await eventually(outputs[1].source.read_lines, "rank 1's new line") == ["meanwhile 1"]
    # Its Service lost its owner (the agent stopped between making it and the Job's): stop removes it.
    server.patch("services", "default", job.name, {"metadata": {"ownerReferences": None}})
    await again.stop(1)
    for resource in ("jobs", "pods", "services"):
        assert server.names(resource) == [], resource


async def test_sweep_deletes_a_service_whose_job_was_never_made(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    kept = multi_node()
    job = cluster.job(runner, kept)
    await running(cluster, job, kept)
    orphan = multi_node()
    # The agent stopped after making the Service of an attempt, before its Job.
    server.create("services", "default", service_manifest(orphan, runner.settings))
    await runner.sweep({kept.lease_id})
    assert server.names("services") == [job.name]
    assert server.names("jobs") == [job.name]


def test_a_multi_node_job_needs_a_command_to_wrap_and_leaves_the_pod_count_to_nodes(
    cluster: Cluster,
) -> None:
    runner = cluster.runner()
    image_job = dataclasses.replace(assignment(nodes=NODES), entrypoint=())
    with pytest.raises(RunnerRefused, match="nodes: a multi-node job needs an entrypoint"):
        runner.check(image_job)
    with_command = {"spec": {"template": {"spec": {"containers": [{"name": "job", "command": ["serve"]}]}}}}
    runner.check(dataclasses.replace(image_job, resource_config={"nodes": NODES, **with_command}))
    indexed = {
        "completions": NODES,
        "completionMode": "Indexed",
        "template": {"spec": with_command["spec"]["template"]["spec"]},
    }
    runner.check(assignment(nodes=NODES, spec=indexed))
    with pytest.raises(RunnerRefused) as refused:
        runner.check(
            assignment(
                nodes=NODES,
                spec={"parallelism": 3, "template": {"spec": {"subdomain": "mine"}}},
            )
        )
    assert "spec.parallelism: must be 2" in str(refused.value)
    assert "spec.template.spec.subdomain" in str(refused.value)
    with pytest.raises(RunnerRefused, match=r"spec\.completionMode: must be 'NonIndexed'"):
        runner.check(assignment(spec={"completionMode": "Indexed"}))  # one pod: as before


async def test_a_job_of_one_pod_has_no_service_and_no_rank_variables(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    job = await cluster.started(runner)
    stored = server.get("jobs", job.name)
    assert stored is not None
    assert stored["spec"]["completionMode"] == "NonIndexed"
    assert "subdomain" not in stored["spec"]["template"]["spec"]
    (container,) = stored["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "train.py"]
    assert not {"RANK", "MASTER_ADDR", "WORLD_SIZE"} & {entry["name"] for entry in container["env"]}
    assert server.names("services") == []
    await job.stop(1)
    assert server.calls("DELETE", "/services/") == []


def test_the_ranks_decide_together_and_the_rank_that_failed_is_named() -> None:
    runs, ended_well = Observed(True, None, ""), Observed(True, JobExit(0), "", True)
    assert combine([ended_well, runs]) == Observed(True, None, "", True)  # rank 1 runs on
    assert combine([ended_well, ended_well]).exit == JobExit(0)
    pending = Observed(False, None, "pod p-1 not scheduled: Unschedulable")
    assert combine([runs, pending]) == Observed(False, None, pending.waiting)
    # Rank 1 failed by itself; rank 0 was stopped for it (SIGTERM), or its pod went with the Job.
    failed, stopped = Observed(True, JobExit(3), "", True), Observed(True, JobExit(143, 15), "", True)
    gone = Observed(True, JobExit(None, failure=RunnerFailure(FailureReason.PREEMPTED, "the Job failed")), "")
    for rank_0, rank_1 in ((stopped, failed), (gone, failed), (stopped, gone)):
        assert rank_1.exit is not None
        assert combine([rank_0, rank_1]).exit == dataclasses.replace(rank_1.exit, rank=1)
