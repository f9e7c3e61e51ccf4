"""The kubernetes runner against a stand-in API server (tests/agent/kube_api.py): the Job it makes, how it
reads the Job's and pod's states, its watches, deadline, logs, stop and sweep (docs/design.md §7, §12).

No cluster can be had here: the test plays the cluster's controllers through the stand-in.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from takeoff_agent.domain import (
    Assignment,
    BuildKind,
    Built,
    FailureReason,
    JobExit,
    JobVersion,
    LogStream,
    ResourceKind,
    SourceKind,
)
from takeoff_agent.runners.base import Launch, RunnerContext, RunnerRefused, RunnerUnavailable
from takeoff_agent.runners.kubernetes import KubeJob, KubernetesRunner, create
from takeoff_agent.runners.kubernetes.logs import PodLog
from takeoff_agent.runners.kubernetes.manifest import JobSettings, job_manifest, job_name
from takeoff_agent.runners.kubernetes.status import observe
from tests.agent.kube_api import KubeApiServer
from tests.processes import eventually

WAIT_SECONDS = 45
"""Above the runner's SETTLE_SECONDS (30 s: an ended container waits for its Job's verdict, seen by another
watch): on a loaded machine the two watches can be that far apart."""
IMAGE = "registry.example:5000/takeoff/j:0123456789abcdef"


def assignment(container_name: str = "", **resource_config: Any) -> Assignment:
    lease = uuid.uuid4().hex
    return Assignment(
        lease_id=lease,
        epoch=4,
        item=f"projects/p/queues/q/items/{lease[:8]}",
        queue="projects/p/queues/q",
        run=f"projects/p/runs/{lease[:8]}-1",
        attempt=1,
        job_version=JobVersion("projects/p/jobs/j/versions/2", SourceKind.CODE, build_context="."),
        resource=ResourceKind.KUBERNETES,
        entrypoint=("python", "train.py"),
        resource_config=resource_config,
        container_name=container_name,
    )


def launch(work: Assignment, **fields: Any) -> Launch:
    return Launch(
        assignment=work,
        built=fields.pop("built", Built(BuildKind.IMAGE, image=IMAGE, pushed=True)),
        env=fields.pop("env", {"TAKEOFF_RUN_ID": work.run_id, "TAKEOFF_ATTEMPT": "1"}),
        secrets=fields.pop("secrets", {}),
        registry_address=fields.pop("registry_address", "registry.takeoff.svc:50051"),
        stop_grace_seconds=fields.pop("stop_grace_seconds", 10.0),
        **fields,
    )


SETTINGS = JobSettings(namespace="default", agent_id="agent-7", ttl_seconds_after_finished=600)


def container(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        c for c in manifest["spec"]["template"]["spec"]["containers"] if c["name"] == name
    )
    return found


def env(entry: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in entry["env"]}


def test_the_resource_config_merges_over_the_defaults() -> None:
    work = assignment(
        metadata={"labels": {"team": "vision"}},
        spec={
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "sidecar",
                            "image": "proxy:1",
                            "env": [{"name": "MODE", "value": "x"}],
                        },
                        {
                            "name": "main",
                            "env": [
                                {"name": "TAKEOFF_RUN_ID", "value": "forged"},
                                {"name": "LR", "value": "0.1"},
                            ],
                            "resources": {"limits": {"cpu": 4, "memory": "8Gi"}},
                        },
                    ],
                    "nodeSelector": {"pool": "gpu"},
                }
            }
        },
    )
    manifest = job_manifest(work, launch(work), SETTINGS, active_deadline_seconds=90)

    assert manifest["apiVersion"] == "batch/v1"
    assert manifest["kind"] == "Job"
    meta, spec = manifest["metadata"], manifest["spec"]
    assert meta["name"] == job_name(work.lease_id)
    assert meta["namespace"] == "default"
    ours = {
        "takeoff.item": work.item.rsplit("/", 1)[1],
        "takeoff.agent": "agent-7",
        "takeoff.epoch": "4",
        "takeoff.run": work.run_id,
        "takeoff.lease": work.lease_id,
    }
    assert meta["labels"] == {**ours, "team": "vision"}
    assert spec["template"]["metadata"]["labels"] == ours
    assert spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["activeDeadlineSeconds"] == 90
    pod_spec = spec["template"]["spec"]
    assert pod_spec["restartPolicy"] == "Never"
    assert pod_spec["terminationGracePeriodSeconds"] == 10
    assert pod_spec["nodeSelector"] == {"pool": "gpu"}
    # No container named by the queue: the first gets the job.
    first = container(manifest, "sidecar")
    assert first["image"] == IMAGE
    assert first["command"] == ["python", "train.py"]
    assert env(first) == {
        "MODE": "x",
        "TAKEOFF_RUN_ID": work.run_id,
        "TAKEOFF_ATTEMPT": "1",
        "TAKEOFF_REGISTRY": "registry.takeoff.svc:50051",
    }
    assert container(manifest, "main")["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}


def test_the_queue_names_the_container_and_env_merges_by_name() -> None:
    work = assignment(
        "main",
        spec={
            "template": {
                "spec": {
                    "containers": [
                        {"name": "sidecar", "image": "proxy:1"},
                        {
                            "name": "main",
                            "env": [
                                {"name": "TAKEOFF_RUN_ID", "value": "forged"},
                                {"name": "LR", "value": "0.1"},
                            ],
                        },
                    ],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                }
            }
        },
    )
    manifest = job_manifest(
        work, launch(work, secrets={"TAKEOFF_TOKEN": "s3cret"}), SETTINGS, active_deadline_seconds=90
    )
    main = container(manifest, "main")
    assert main["image"] == IMAGE
    assert container(manifest, "sidecar")["image"] == "proxy:1"
    secret_ref = {"secretKeyRef": {"name": job_name(work.lease_id), "key": "TAKEOFF_TOKEN"}}
    assert env(main) == {
        "TAKEOFF_RUN_ID": work.run_id,  # the agent's value wins over the config's, in the config's place
        "LR": "0.1",
        "TAKEOFF_ATTEMPT": "1",
        "TAKEOFF_REGISTRY": "registry.takeoff.svc:50051",
        "TAKEOFF_TOKEN": secret_ref,
    }
    assert "s3cret" not in str(manifest)
    assert manifest["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]


class Cluster:
    """The stand-in API server, and runners of one agent talking to it."""

    def __init__(self, server: KubeApiServer, tmp_path: Path) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
        self.agent_id = f"agent-{uuid.uuid4().hex[:8]}"
        self.runners: list[KubernetesRunner] = []

    def runner(self, **options: Any) -> KubernetesRunner:
        runner = create(
            {"kubeconfig": str(self.kubeconfig), "ttl_seconds_after_finished": 600, **options},
            RunnerContext(agent_id=self.agent_id, state_dir=self.tmp_path),
        )
        self.runners.append(runner)
        return runner

    def job(self, runner: KubernetesRunner, work: Assignment) -> KubeJob:
        lease_dir = self.tmp_path / "leases" / work.lease_id
        lease_dir.mkdir(parents=True, exist_ok=True)
        return runner.job(work, lease_dir)

    async def started(
        self, runner: KubernetesRunner, work: Assignment | None = None, **fields: Any
    ) -> KubeJob:
        """A job whose pod the test has let run."""
        work = work or assignment()
        job = self.job(runner, work)
        start = asyncio.create_task(job.start(launch(work, **fields)))
        await eventually(lambda: self._pod(job), "the Job's pod")
        self.server.run(job.name)
        await asyncio.wait_for(start, WAIT_SECONDS)
        return job

    async def watching(self) -> None:
        """Both watches (Jobs, pods) are open."""

        def open_watches() -> set[str]:
            return {watch.resource for watch in self.server.watches if not watch.ended}

        await eventually(lambda: open_watches() == {"jobs", "pods"}, "the watches to open")

    def _pod(self, job: KubeJob) -> bool:
        try:
            self.server.pod_of(job.name)
        except KeyError:
            return False
        return True


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


async def test_a_job_runs_as_a_job_with_its_secret_and_its_output_is_read(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    work = assignment()
    job = cluster.job(runner, work)
    started_before = job.started
    start = asyncio.create_task(job.start(launch(work, secrets={"TAKEOFF_TOKEN": "s3cret"})))
    await eventually(lambda: server.get("jobs", job.name), "the Job")
    assert not started_before
    assert not start.done()  # pending: start returns once the pod runs
    server.run(job.name)
    await asyncio.wait_for(start, WAIT_SECONDS)
    assert job.started

    stored = server.get("jobs", job.name)
    assert stored is not None
    assert stored["metadata"]["labels"]["takeoff.lease"] == work.lease_id
    secret = server.get("secrets", job.name)
    assert secret is not None
    assert base64.b64decode(secret["data"]["TAKEOFF_TOKEN"]) == b"s3cret"
    assert secret["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job.name,
            "uid": stored["metadata"]["uid"],
            "controller": False,
        }
    ]
    assert "s3cret" not in str(stored)

    server.print(job.name, "epoch 1\nepoch 2\n")
    stdout, status = (output.source for output in job.log_sources())
    assert await eventually(stdout.read_lines, "the first lines") == ["epoch 1", "epoch 2"]
    server.print(job.name, "done, no newline")
    server.terminate(job.name, 0)
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(0)
    assert stdout.read_lines(final=True) == ["done, no newline"]
    assert stdout.offset == 3
    assert job.exit() == JobExit(0)
    assert any("running" in line for line in status.read_lines())


@pytest.mark.parametrize(
    ("exit_code", "reason", "expected"),
    [
        (3, "", JobExit(3)),
        (137, "OOMKilled", JobExit(137, 9, oom_killed=True)),
    ],
)
async def test_a_container_exit_is_the_jobs_exit(
    cluster: Cluster, exit_code: int, reason: str, expected: JobExit
) -> None:
    runner = cluster.runner()
    job = await cluster.started(runner)
    cluster.server.terminate(job.name, exit_code, reason)
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == expected


@pytest.mark.parametrize("disruption", ["evict", "preempt"])
async def test_an_evicted_or_preempted_pod_is_preempted(cluster: Cluster, disruption: str) -> None:
    runner = cluster.runner()
    job = await cluster.started(runner)
    getattr(cluster.server, disruption)(job.name)
    ended = await asyncio.wait_for(job.wait(), WAIT_SECONDS)
    assert ended.failure is not None
    assert ended.failure.reason is FailureReason.PREEMPTED
    assert (
        "evicted: The node was low on resource" if disruption == "evict" else "PreemptionByScheduler"
    ) in (ended.failure.message)


async def test_an_image_that_will_not_pull_fails_the_start(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    work = assignment()
    job = cluster.job(runner, work)
    reported: list[str] = []

    async def report(detail: str) -> None:
        reported.append(detail)

    start = asyncio.create_task(job.start(launch(work, report=report)))
    await eventually(lambda: server.get("jobs", job.name), "the Job")
    server.waiting(job.name, "ErrImagePull", f'failed to pull image "{IMAGE}": not found')
    await eventually(lambda: any("ErrImagePull" in line for line in reported), "the pull error reported")
    assert not start.done()  # the kubelet tries again
    server.waiting(job.name, "ImagePullBackOff", f'Back-off pulling image "{IMAGE}"')
    await asyncio.wait_for(start, WAIT_SECONDS)
    ended = await asyncio.wait_for(job.wait(), WAIT_SECONDS)
    assert ended.exit_code is None
    assert ended.failure is not None
    assert ended.failure.reason is FailureReason.RUNNER_INFRA
    assert ended.failure.message == (
        f'the image {IMAGE} cannot be pulled: ImagePullBackOff: Back-off pulling image "{IMAGE}"'
    )


async def test_an_unschedulable_pod_waits_and_is_reported_until_stopped(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    work = assignment()
    job = cluster.job(runner, work)
    reported: list[str] = []

    async def report(detail: str) -> None:
        reported.append(detail)

    start = asyncio.create_task(job.start(launch(work, report=report)))
    await eventually(lambda: server.get("jobs", job.name), "the Job")
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    server.unschedulable(job.name, message)
    pod = server.pod_of(job.name)["metadata"]["name"]
    assert await eventually(lambda: reported[-1:], "the reason reported") == [
        f"pod {pod} not scheduled: Unschedulable: {message}"
    ]
    assert not start.done()
    # The attempt's start deadline passes: it cancels the start and stops the job.
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    await job.stop(10)
    ended = await asyncio.wait_for(job.wait(), WAIT_SECONDS)
    assert ended.exit_code is None
    assert ended.failure is not None
    assert server.get("jobs", job.name) is None


async def test_stop_deletes_the_job_with_foreground_propagation(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    job = await cluster.started(runner, secrets={"TAKEOFF_TOKEN": "t"})
    await job.stop(7.5)
    (delete,) = server.calls("DELETE", "/jobs/")
    assert delete.body["propagationPolicy"] == "Foreground"
    assert delete.body["gracePeriodSeconds"] == 8
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(143, 15)
    assert server.get("jobs", job.name) is None
    assert server.get("secrets", job.name) is None
    assert server.names("pods") == []


async def test_stop_deletes_a_secret_its_job_never_came_to_own(cluster: Cluster) -> None:
    """A start that failed between the Job's create and the Secret's owner leaves a Secret no garbage
    collector removes: the stop removes it, not only the next sweep."""
    server, runner = cluster.server, cluster.runner()
    job = await cluster.started(runner, secrets={"TAKEOFF_TOKEN": "t"})
    server.patch("secrets", "default", job.name, {"metadata": {"ownerReferences": None}})
    await job.stop(1)
    assert server.get("jobs", job.name) is None
    assert server.get("secrets", job.name) is None
    assert [call.path.rsplit("/", 1)[-1] for call in server.calls("DELETE", "/secrets/")] == [job.name]


async def test_a_start_cancelled_while_its_job_is_made_leaves_no_job(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    work = assignment()
    job = cluster.job(runner, work)
    server.answer_creates.clear()
    start = asyncio.create_task(job.start(launch(work)))
    await eventually(lambda: server.calls("POST", "/jobs"), "the create to reach the server")
    start.cancel()  # as the attempt does when the job must stop before it runs
    stop = asyncio.create_task(job.stop(10))
    await asyncio.sleep(0)
    assert not stop.done()  # the stop waits for the Job being made
    server.answer_creates.set()
    await asyncio.wait_for(stop, WAIT_SECONDS)
    with pytest.raises(asyncio.CancelledError):
        await start
    assert server.names("jobs") == []
    assert len(server.calls("DELETE", f"/jobs/{job.name}")) == 1


async def test_a_job_past_its_deadline_is_fenced(cluster: Cluster) -> None:
    runner = cluster.runner()
    job = await cluster.started(runner)
    cluster.server.exceed_deadline(job.name)
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(143, 15, fenced=True)


async def test_the_deadline_moves_past_the_lease_but_not_at_every_renewal(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner(fence_margin_seconds=60)
    now = time.time()
    work = assignment()
    job = cluster.job(runner, work)
    await job.renew_lease(now + 30)  # before the start: the Job is made with it
    start = asyncio.create_task(job.start(launch(work)))
    await eventually(lambda: server.get("jobs", job.name), "the Job")
    server.run(job.name)
    await asyncio.wait_for(start, WAIT_SECONDS)

    def deadline() -> float:
        stored = server.get("jobs", job.name)
        assert stored is not None
        started = stored["status"].get("startTime") or stored["metadata"]["creationTimestamp"]
        return datetime.fromisoformat(started).timestamp() + float(stored["spec"]["activeDeadlineSeconds"])

    first = deadline()
    assert now + 30 + 60 - 2 <= first <= now + 30 + 60 + 2
    for renewal in (40, 50, 55):  # the deadline is still over half the margin past each
        await job.renew_lease(now + renewal)
    assert server.calls("PATCH", "/jobs/") == []
    await job.renew_lease(now + 70)  # 20 s short of the deadline: less than half the margin left
    (patch,) = server.calls("PATCH", "/jobs/")
    assert patch.content_type == "application/merge-patch+json"
    assert set(patch.body) == {"spec"}
    assert set(patch.body["spec"]) == {"activeDeadlineSeconds"}
    assert now + 70 + 60 - 2 <= deadline() <= now + 70 + 60 + 2
    await job.renew_lease(now + 80)
    assert len(server.calls("PATCH", "/jobs/")) == 1


async def test_a_dropped_watch_resumes_from_the_last_resource_version(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    job = await cluster.started(runner)
    await cluster.watching()
    server.drop_watches()
    server.terminate(job.name, 4)
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(4)
    for resource in ("jobs", "pods"):
        watches = [w for w in server.watches if w.resource == resource and w.selector == runner.selector]
        dropped = [i for i, watch in enumerate(watches) if watch.ended == "dropped"]
        # The next watch starts where the dropped one stopped: nothing missed, nothing twice, no new list.
        assert len(dropped) == 1
        assert watches[dropped[0] + 1].since == watches[dropped[0]].last_sent
        lists = [c for c in server.calls("GET") if c.path.endswith(f"/{resource}") and "watch" not in c.query]
        assert len(lists) == 1


async def test_a_watch_resumes_from_a_bookmark(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    job = await cluster.started(runner)
    await cluster.watching()
    # Changes this agent does not watch move the resourceVersion on; a bookmark tells the watch so.
    (cluster.tmp_path / "other").mkdir()
    other_agent = Cluster(server, cluster.tmp_path / "other")
    try:
        await other_agent.started(other_agent.runner())
    finally:
        for other in other_agent.runners:
            await other.close()
    await cluster.watching()
    server.bookmark()
    jobs = server.listing("jobs", "default", "")["items"]
    newest = max(int(obj["metadata"]["resourceVersion"]) for obj in jobs)
    await eventually(lambda: int(runner.jobs.resource_version or 0) >= newest, "the bookmark")
    server.drop_watches()
    server.terminate(job.name, 0)
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(0)
    jobs_watches = [w for w in server.watches if w.resource == "jobs" and w.selector == runner.selector]
    dropped = next(i for i, watch in enumerate(jobs_watches) if watch.ended == "dropped")
    assert jobs_watches[dropped + 1].since >= newest


async def test_an_expired_resource_version_lists_again(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    job = await cluster.started(runner)
    await cluster.watching()
    server.expire_history()
    server.drop_watches()
    server.terminate(job.name, 0)
    assert await asyncio.wait_for(job.wait(), WAIT_SECONDS) == JobExit(0)
    for resource in ("jobs", "pods"):
        lists = [c for c in server.calls("GET") if c.path.endswith(f"/{resource}") and "watch" not in c.query]
        assert len(lists) == 2  # the first list, and the one after 410 Gone
        assert any(watch.ended == "expired" for watch in server.watches if watch.resource == resource)


async def test_logs_reach_the_run_once_across_a_restart_and_a_broken_follow(cluster: Cluster) -> None:
    server = cluster.server
    first = cluster.runner()
    work = assignment()
    job = await cluster.started(first, work)
    server.print(job.name, "one\ntwo\n")
    stdout = job.log_sources()[0].source
    assert await eventually(stdout.read_lines, "the first lines") == ["one", "two"]
    offset = stdout.offset
    await first.close()  # the agent stops; its job runs on

    server.print(job.name, "three\n")
    again = cluster.job(cluster.runner(), work)
    assert again.started
    again_stdout = again.log_sources()[0].source
    again_stdout.offset = offset  # as the restarted agent's log checkpoint sets it
    await asyncio.wait_for(again.until_running(), WAIT_SECONDS)
    assert await eventually(again_stdout.read_lines, "the line printed meanwhile") == ["three"]
    server.drop_logs()
    server.print(job.name, "four\n")
    assert await eventually(again_stdout.read_lines, "the line after the follow broke") == ["four"]
    server.terminate(job.name, 0)
    assert await asyncio.wait_for(again.wait(), WAIT_SECONDS) == JobExit(0)
    assert again_stdout.read_lines(final=True) == []
    assert again_stdout.offset == 4


async def test_a_create_whose_answer_was_lost_finds_its_job(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    work = assignment()
    job = await cluster.started(runner, work)
    retried = KubeJob(runner, work, cluster.tmp_path / "retry")
    (cluster.tmp_path / "retry").mkdir()
    await asyncio.wait_for(retried.start(launch(work)), WAIT_SECONDS)
    assert len(server.calls("POST", "/jobs")) == 2
    assert server.names("jobs") == [job.name]


async def test_sweep_deletes_the_jobs_of_leases_not_held(cluster: Cluster) -> None:
    server, runner = cluster.server, cluster.runner()
    kept = await cluster.started(runner, secrets={"TAKEOFF_TOKEN": "a"})
    orphan = await cluster.started(runner, secrets={"TAKEOFF_TOKEN": "b"})
    (cluster.tmp_path / "other").mkdir()
    other_agent = Cluster(server, cluster.tmp_path / "other")
    foreign = await other_agent.started(other_agent.runner())
    try:
        await runner.sweep({kept.assignment.lease_id})
        assert server.names("jobs") == sorted([kept.name, foreign.name])
        assert server.names("secrets") == [kept.name]
        (delete,) = [c for c in server.calls("DELETE", "/jobs/") if orphan.name in c.path]
        assert delete.body["propagationPolicy"] == "Foreground"
    finally:
        for other in other_agent.runners:
            await other.close()


async def test_an_unreachable_api_server_is_runner_unavailable(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = KubeApiServer()
    config = server.kubeconfig(tmp_path / "kubeconfig")
    config.write_text(config.read_text().replace(server.url, f"http://127.0.0.1:{port}"))
    runner = create({"kubeconfig": str(config)}, RunnerContext(agent_id="a", state_dir=tmp_path))
    work = assignment()
    (tmp_path / "lease").mkdir()
    job = runner.job(work, tmp_path / "lease")
    try:
        with pytest.raises(RunnerUnavailable, match="cannot be reached"):
            await job.start(launch(work))
        with pytest.raises(RunnerUnavailable):
            await runner.sweep(set())
    finally:
        await runner.close()


async def test_an_api_server_gone_while_a_job_runs_fails_it_as_unavailable(cluster: Cluster) -> None:
    runner = cluster.runner(unreachable_seconds=1)
    job = await cluster.started(runner)
    cluster.server.close()
    with pytest.raises(RunnerUnavailable, match="has not answered for"):
        await asyncio.wait_for(job.wait(), WAIT_SECONDS)


async def test_what_the_runner_cannot_run_is_refused_by_name(cluster: Cluster) -> None:
    runner = cluster.runner()
    refused = assignment(
        "trainer",
        metadata={"name": "mine", "labels": {"takeoff.lease": "x"}},
        spec={
            "backoffLimit": 3,
            "activeDeadlineSeconds": 100,
            "template": {"spec": {"restartPolicy": "OnFailure", "containers": [{"name": "main"}]}},
        },
    )
    with pytest.raises(RunnerRefused) as error:
        runner.check(refused)
    for named in (
        "metadata.name",
        "spec.backoffLimit",
        "spec.activeDeadlineSeconds",
        "spec.template.spec.restartPolicy",
        "metadata.labels.takeoff.lease",
        "no container named 'trainer'",
    ):
        assert named in str(error.value)
    with pytest.raises(RunnerRefused, match=r"spec\.template\.spec\.bogus: Extra inputs are not permitted"):
        runner.check(assignment(spec={"template": {"spec": {"bogus": 1}}}))
    runner.check(assignment(spec={"backoffLimit": 0, "template": {"spec": {"containers": [{"name": "a"}]}}}))
    runner.check(assignment())  # no containers: the job gets one of its own

    work = assignment()
    job = cluster.job(runner, work)
    not_pushed = Built(BuildKind.IMAGE, image=IMAGE, pushed=False)
    with pytest.raises(RunnerRefused, match="need a builder with a registry to push to"):
        await job.start(launch(work, built=not_pushed))
    with pytest.raises(RunnerRefused, match=r"cannot reach the registry at unix:/run/takeoff\.sock"):
        await job.start(launch(work, registry_address="unix:/run/takeoff.sock"))
    assert cluster.server.names("jobs") == []
    assert runner.build_kind(SourceKind.IMAGE) is BuildKind.NOOP
    assert runner.build_kind(SourceKind.GIT) is BuildKind.IMAGE


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"namespace": "Not_A_Label"}, "namespace"),
        ({"ttl_seconds_after_finished": -1}, "ttl_seconds_after_finished"),
        ({"fence_margin_seconds": 0}, "fence_margin_seconds"),
        ({"image_pull_secrets": "regcred"}, "image_pull_secrets"),
        ({"kubeconfg": "x"}, "kubeconfg: not an option"),
        ({"kubeconfig": "/nonexistent/kubeconfig"}, "kubeconfig"),
    ],
)
def test_bad_options_are_refused_by_name(tmp_path: Path, options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named}"):
        create(options, RunnerContext(agent_id="a", state_dir=tmp_path))


def test_system_lines_and_stdout_are_the_log_sources(tmp_path: Path, kube_server: KubeApiServer) -> None:
    runner = create(
        {"kubeconfig": str(kube_server.kubeconfig(tmp_path / "kubeconfig"))},
        RunnerContext(agent_id="a", state_dir=tmp_path),
    )
    job = runner.job(assignment(), tmp_path)
    assert [output.stream for output in job.log_sources()] == [LogStream.STDOUT, LogStream.SYSTEM]
    asyncio.run(runner.close())


def _pod(state: dict[str, Any], phase: str = "Running", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "job", "image": IMAGE}, {"name": "sidecar", "image": "proxy:1"}]},
        "status": {"phase": phase, "containerStatuses": [{"name": "job", "state": state}], **status},
    }


RUNNING_JOB: dict[str, Any] = {"metadata": {"name": "j"}, "spec": {}, "status": {"active": 1}}


def test_a_container_exit_waits_for_the_jobs_verdict_until_settled() -> None:
    ended = _pod({"terminated": {"exitCode": 0, "reason": "Completed"}})  # a sidecar keeps the pod Running
    assert observe(RUNNING_JOB, ended, "job", pod_gone=False).exit is None
    assert observe(RUNNING_JOB, ended, "job", pod_gone=False, settled=True).exit == JobExit(0)


def test_the_jobs_end_waits_for_its_pods_exit_until_the_pod_is_gone() -> None:
    running = _pod({"running": {"startedAt": "2026-12-01T00:00:00Z"}})
    assert observe(None, running, "job", pod_gone=False).exit is None
    gone = observe(None, running, "job", pod_gone=True).exit
    assert gone is not None
    assert gone.failure is not None
    assert gone.failure.reason is FailureReason.RUNNER_INFRA


def test_a_pod_disrupted_after_its_job_succeeded_is_a_success() -> None:
    disruption = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
    done = _pod({"terminated": {"exitCode": 0}}, "Succeeded", conditions=[disruption])
    complete = {**RUNNING_JOB, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert observe(complete, done, "job", pod_gone=True).exit == JobExit(0)


class _EndlessLog:
    """A followed pod log that never ends: it blocks its reader until its socket is shut down."""

    def __init__(self) -> None:
        self.shut = threading.Event()
        self.closed = False
        self.connection = self
        self.sock = self

    def shutdown(self, _how: int) -> None:
        self.shut.set()

    def stream(self, **_: Any) -> Iterator[bytes]:
        self.shut.wait(60)
        yield from ()

    def close(self) -> None:
        self.closed = True


def test_a_log_stopped_while_its_stream_opens_is_not_read_on() -> None:
    opening, opened = threading.Event(), threading.Event()
    log_stream = _EndlessLog()

    class Api:
        def follow_log(self, namespace: str, pod: str, container: str) -> _EndlessLog:
            opening.set()
            opened.wait(60)
            return log_stream

    log = PodLog()
    log.follow(Api(), "default", "pod", "job", ended=lambda: False)  # type: ignore[arg-type]
    assert opening.wait(60)
    log.stop()  # as the runner's close stops it, before the stream is there to interrupt
    opened.set()

    assert log.finished.wait(10), "the follow read on a log nobody will stop"
    assert log_stream.closed
