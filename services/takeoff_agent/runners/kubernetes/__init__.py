"""The kubernetes runner (docs/design.md §7, §12): each attempt runs as one batch/v1 Job.

The Job is the resource config merged over the runner's defaults (``manifest.py``), named after the lease
so that a create retried after a lost reply finds it, and labelled with the agent, so that a restarted
agent finds its Jobs again. Its state comes from watching this agent's Jobs and pods (``watch.py``, read
by ``status.py``), its output from following its pod's log (``logs.py``). The Job fences itself: its
``activeDeadlineSeconds`` is kept a margin past the agent's lease deadline, so a Job whose agent stopped
renewing ends by itself.

A multi-node launch (``nodes: N``) is an Indexed Job of N pods, one per rank, with a headless Service for
rank 0's address: the attempt runs once every rank runs, and one rank failing ends it and deletes the Job
(every rank stops). Each rank's log is followed apart and labelled with its rank.

The official client blocks: every call runs in a worker thread; the watches and log follows run in
threads of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pydantic
from kubernetes import client, config

from takeoff_agent.domain import Assignment, BuildKind, JobExit, LogStream, ResourceKind, SourceKind
from takeoff_agent.ranks import world_of
from takeoff_agent.runners.base import (
    JobOutput,
    Launch,
    RunnerContext,
    RunnerRefused,
    RunnerUnavailable,
)
from takeoff_agent.runners.kubernetes.api import ApiError, JsonObject, KubeApi
from takeoff_agent.runners.kubernetes.logs import PodLog
from takeoff_agent.runners.kubernetes.manifest import (
    AGENT_LABEL,
    COMPLETION_INDEX,
    DEFAULT_CONTAINER,
    LEASE_LABEL,
    JobSettings,
    base_manifest,
    is_dns_label,
    job_container,
    job_manifest,
    job_name,
    label_value,
    needs_secret,
    owner_reference,
    refusals,
    secret_manifest,
    service_manifest,
)
from takeoff_agent.runners.kubernetes.status import Observed, combine, observe, succeeded
from takeoff_agent.runners.kubernetes.watch import Informer
from takeoff_agent.runners.secrets import check_names

logger = logging.getLogger(__name__)

NOT_PUSHED = "code and git jobs on a kubernetes queue need a builder with a registry to push to"
NO_COMMAND_TO_WRAP = (
    "nodes: a multi-node job needs an entrypoint or its container's command (the agent starts it through "
    "/bin/sh to switch the SDK off on ranks other than 0; an image's own command cannot be wrapped)"
)
RECHECK_SECONDS = 1.0
"""How often a waiting job looks again without news from the watches (to notice an unreachable API)."""
LOG_DRAIN_SECONDS = 30.0
"""How long an ended job's log may take to arrive in full."""
FOLLOW_STOP_SECONDS = 5.0
"""How long ``close`` waits for the log follows it stops (a follow may be in a call to the API server)."""
SETTLE_SECONDS = 30.0
"""How long the Job's end and its pod's may be seen apart (they are watched apart) before the runner
concludes from the half it has."""
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True, slots=True)
class Options:
    kubeconfig: str = ""
    """A kubeconfig file; empty: the agent runs in the cluster, with its service account."""
    context: str = ""
    """The kubeconfig context; empty: its current one."""
    namespace: str = DEFAULT_NAMESPACE
    ttl_seconds_after_finished: int = 3600
    image_pull_secrets: tuple[str, ...] = ()
    fence_margin_seconds: float = 60.0
    """How far past the lease deadline a Job may run on its own. The deadline moves once it is less than
    half this ahead, so a Job whose agent is gone stops within this margin (plus the stop grace) of the
    lease's end, and the Job is updated about once per half margin, not at every heartbeat."""
    unreachable_seconds: float = 120.0
    """How long a running attempt waits for an unreachable API server before it fails RUNNER_INFRA."""


def _options(given: Mapping[str, object]) -> Options:
    known = set(Options.__dataclass_fields__)
    if unknown := sorted(set(given) - known):
        raise ValueError(f"{unknown[0]}: not an option (options: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for name in ("kubeconfig", "context", "namespace"):
        if name in given:
            if not isinstance(given[name], str):
                raise ValueError(f"{name}: must be text")
            values[name] = given[name]
    if not is_dns_label(values.get("namespace", DEFAULT_NAMESPACE)):
        raise ValueError("namespace: must be a DNS label (a-z, 0-9 and '-', at most 63)")
    if values.get("context") and not values.get("kubeconfig"):
        raise ValueError("context: needs a kubeconfig")
    if "ttl_seconds_after_finished" in given:
        ttl = given["ttl_seconds_after_finished"]
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
            raise ValueError("ttl_seconds_after_finished: must be a whole number of seconds >= 0")
        values["ttl_seconds_after_finished"] = ttl
    if "image_pull_secrets" in given:
        secrets = given["image_pull_secrets"]
        if not isinstance(secrets, list) or not all(isinstance(s, str) and is_dns_label(s) for s in secrets):
            raise ValueError("image_pull_secrets: must be a list of Secret names")
        values["image_pull_secrets"] = tuple(secrets)
    for name in ("fence_margin_seconds", "unreachable_seconds"):
        if name in given:
            seconds = given[name]
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not seconds > 0:
                raise ValueError(f"{name}: must be a number of seconds > 0")
            values[name] = float(seconds)
    return Options(**values)


# The client's config loaders are not typed.
_new_client_from_config: Callable[..., client.ApiClient] = config.new_client_from_config
_load_incluster_config: Callable[..., None] = config.load_incluster_config


def _api_client(options: Options) -> client.ApiClient:
    if options.kubeconfig:
        try:
            return _new_client_from_config(
                config_file=options.kubeconfig, context=options.context or None, persist_config=False
            )
        except (config.ConfigException, OSError, ValueError, TypeError) as error:
            raise ValueError(f"kubeconfig: cannot use {options.kubeconfig}: {error}") from None
    configuration = client.Configuration()
    try:
        _load_incluster_config(client_configuration=configuration)
    except config.ConfigException as error:
        raise ValueError(
            f"kubeconfig: not given, and the agent is not running in a cluster ({error})"
        ) from None
    return client.ApiClient(configuration)


def create(options: Mapping[str, object], context: RunnerContext) -> KubernetesRunner:
    settings = _options(options)
    return KubernetesRunner(KubeApi(_api_client(settings)), settings, context)


def _time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _started(job: JsonObject) -> float:
    """What the Job's activeDeadlineSeconds count from: its start, or until then its creation (earlier,
    so a deadline reckoned from it is never later than the real one)."""
    start = (job.get("status") or {}).get("startTime") or job["metadata"].get("creationTimestamp")
    return _time(start) if start else time.time()


def _deadline(job: JsonObject) -> float | None:
    """When the Job's activeDeadlineSeconds run out."""
    seconds = (job.get("spec") or {}).get("activeDeadlineSeconds")
    return None if seconds is None else _started(job) + seconds


def _read_ca(path: Path) -> bytes:
    """The CA certificate the job is given; RunnerUnavailable when the agent cannot read it (its own
    configuration, not the job's)."""
    try:
        return path.read_bytes()
    except OSError as error:
        why = error.strerror or error
        raise RunnerUnavailable(f"cannot read the CA certificate {path} for the job: {why}") from None


class StatusLines:
    """A LogSource of what the runner sees happen to the pod (SYSTEM lines): why it waits, what ended it.
    Best effort across agent restarts: a restarted agent says what it sees from then on."""

    def __init__(self) -> None:
        self.offset = 0
        self._lines: list[str] = []
        self._last: dict[str, str] = {}

    def add(self, text: str, *, about: str = "") -> None:
        """Say ``text``, unless it is what was last said ``about`` the same thing (a rank's pod; '': the
        job)."""
        if text and text != self._last.get(about):
            self._last[about] = text
            self._lines.append(f"[takeoff] {text}")

    def read_lines(self, *, final: bool = False) -> list[str]:
        taken, self._lines = self._lines, []
        self.offset += len(taken)
        return taken


class KubernetesRunner:
    kind = ResourceKind.KUBERNETES
    needs_pushed_image = True
    """Image builds must be pushed to the builder's registry: the cluster pulls them from there."""

    def __init__(self, api: KubeApi, options: Options, context: RunnerContext) -> None:
        self.api = api
        self.options = options
        self.settings = JobSettings(
            namespace=options.namespace,
            agent_id=context.agent_id,
            ttl_seconds_after_finished=options.ttl_seconds_after_finished,
            image_pull_secrets=options.image_pull_secrets,
        )
        self.selector = f"{AGENT_LABEL}={label_value(context.agent_id)}"
        self.lease_until: float | None = None
        """The newest lease deadline any of this runner's jobs was given (the agent's leases share one)."""
        self._jobs: dict[str, KubeJob] = {}
        self.pod_logs: weakref.WeakSet[PodLog] = weakref.WeakSet()
        """The pod logs of the jobs made through this runner (by lease or not: a job made again for the same
        lease has its own), each followed by a thread that ``close`` stops, so none outlives the agent
        trying an API server that is gone. Weak: a log goes once its job is dropped and its follow ended."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.jobs = Informer(api, "jobs", options.namespace, self.selector, self._on_change)
        self.pods = Informer(api, "pods", options.namespace, self.selector, self._on_change)

    def build_kind(self, source: SourceKind) -> BuildKind:
        return BuildKind.NOOP if source is SourceKind.IMAGE else BuildKind.IMAGE

    def check(self, assignment: Assignment) -> None:
        problems = refusals(assignment.resource_config, assignment.container_name, self.settings)
        if not problems:
            manifest = base_manifest(
                assignment, self.settings, stop_grace_seconds=0, active_deadline_seconds=1
            )
            container = job_container(manifest, assignment.container_name)  # made when the config has none
            multi = world_of(assignment.resource_config).multi
            if multi and not (assignment.entrypoint or container.get("command")):
                problems.append(NO_COMMAND_TO_WRAP)
            try:
                client.V1Job.model_validate(manifest)
            except pydantic.ValidationError as error:
                problems += [
                    ".".join(str(part) for part in problem["loc"]) + f": {problem['msg']}"
                    for problem in error.errors()
                ]
        if problems:
            raise RunnerRefused("the Job manifest cannot be run: " + "; ".join(problems))

    def job(self, assignment: Assignment, lease_dir: Path) -> KubeJob:
        job = KubeJob(self, assignment, lease_dir)
        self._jobs[job.lease_label] = job
        return job

    def forget(self, job: KubeJob) -> None:
        if self._jobs.get(job.lease_label) is job:
            del self._jobs[job.lease_label]

    async def watching(self) -> None:
        """Start the watches (once), and wait for their first lists."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self.jobs.start()
            self.pods.start()
        while not (self.jobs.synced.is_set() and self.pods.synced.is_set()):
            self.raise_if_unreachable()
            await asyncio.to_thread(self.jobs.synced.wait, RECHECK_SECONDS)
            await asyncio.to_thread(self.pods.synced.wait, RECHECK_SECONDS)

    def raise_if_unreachable(self) -> None:
        now = time.time()
        for informer in (self.jobs, self.pods):
            since = informer.failing_since
            if since is not None and now - since > self.options.unreachable_seconds:
                raise RunnerUnavailable(
                    f"the Kubernetes API server has not answered for {now - since:.0f} s "
                    f"(watching {informer.kind})"
                )

    def _on_change(self, obj: JsonObject) -> None:
        """From a watch thread: wake the job the object belongs to."""
        lease = (obj["metadata"].get("labels") or {}).get(LEASE_LABEL)
        job = self._jobs.get(lease or "")
        if job is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(job.changed.set)

    async def sweep(self, held: Collection[str]) -> None:
        def kept(obj: JsonObject) -> bool:
            # ``held`` is live (new assignments join it while the sweep runs): look at it now, not before.
            lease = (obj["metadata"].get("labels") or {}).get(LEASE_LABEL)
            return lease in {label_value(lease_id) for lease_id in held}

        namespace = self.options.namespace
        jobs = await asyncio.to_thread(self.api.list_jobs, namespace, self.selector)
        secrets = await asyncio.to_thread(self.api.list_secrets, namespace, self.selector)
        services = await asyncio.to_thread(self.api.list_services, namespace, self.selector)
        for job in jobs.get("items") or []:
            if not kept(job):
                logger.info("deleting Job %s: its lease is no longer this agent's", job["metadata"]["name"])
                await asyncio.to_thread(self.api.delete_job, namespace, job["metadata"]["name"], None)
        # Secrets and Services go with their Jobs; one whose Job was never made (the agent stopped in
        # between) goes here.
        for secret in secrets.get("items") or []:
            if not kept(secret):
                await asyncio.to_thread(self.api.delete_secret, namespace, secret["metadata"]["name"])
        for service in services.get("items") or []:
            if not kept(service):
                await asyncio.to_thread(self.api.delete_service, namespace, service["metadata"]["name"])

    async def close(self) -> None:
        followed = list(self.pod_logs)
        for output in followed:
            output.stop()
        for informer in (self.jobs, self.pods):
            informer.stop()
        for informer in (self.jobs, self.pods):
            await asyncio.to_thread(informer.join, 5.0)
        stopped_by = time.monotonic() + FOLLOW_STOP_SECONDS
        for output in followed:
            await asyncio.to_thread(output.join, max(0.0, stopped_by - time.monotonic()))
        self.pod_logs.clear()
        await asyncio.to_thread(self.api.api_client.close)


class KubeJob:
    """One attempt's Job, found by its name (from the lease) in this agent's watched Jobs and pods."""

    def __init__(self, runner: KubernetesRunner, assignment: Assignment, lease_dir: Path) -> None:
        self._runner = runner
        self._api = runner.api
        self._namespace = runner.options.namespace
        self.assignment = assignment
        self.name = job_name(assignment.lease_id)
        self.lease_label = label_value(assignment.lease_id)
        self.world = world_of(assignment.resource_config)
        self._record = lease_dir / "kubernetes.json"
        self.outputs = [PodLog() for _ in range(self.world.nodes)]
        """Each rank's pod log, by rank (one: a job of one pod)."""
        runner.pod_logs.update(self.outputs)
        self.status = StatusLines()
        self.changed = asyncio.Event()
        self._deadline: float | None = None
        self._exit: JobExit | None = None
        self._making: asyncio.Future[JsonObject] | None = None
        self._deleted = False
        """This agent deleted the Job (``stop``): its end is read from the API server, not only the watch."""
        self._ending_since: dict[int, float] = {}
        """When this agent first saw each rank ending (see ``_settled``), on the monotonic clock."""

    @property
    def started(self) -> bool:
        return self._record.exists()

    def log_sources(self) -> list[JobOutput]:
        if not self.world.multi:
            return [JobOutput(LogStream.STDOUT, self.outputs[0]), JobOutput(LogStream.SYSTEM, self.status)]
        ranks = [JobOutput(LogStream.STDOUT, output, rank) for rank, output in enumerate(self.outputs)]
        return [*ranks, JobOutput(LogStream.SYSTEM, self.status)]

    async def start(self, launch: Launch) -> None:
        if launch.built.kind is BuildKind.IMAGE and not launch.built.pushed:
            raise RunnerRefused(NOT_PUSHED)
        if launch.registry_address.startswith("unix:"):
            raise RunnerRefused(
                f"jobs in a cluster cannot reach the registry at {launch.registry_address}: set the agent's "
                "job_registry_address to an address the cluster can reach"
            )
        settings = self._runner.settings
        until = self._runner.lease_until or time.time()
        active_seconds = math.ceil(until + self._runner.options.fence_margin_seconds - time.time())
        check_names(launch)
        manifest = job_manifest(self.assignment, launch, settings, active_deadline_seconds=active_seconds)
        secret = None
        if needs_secret(launch):
            ca = None if launch.ca_file is None else await asyncio.to_thread(_read_ca, launch.ca_file)
            secret = secret_manifest(self.assignment, launch, settings, ca)
        service = service_manifest(self.assignment, settings) if self.world.multi else None
        # Shielded: a start cancelled meanwhile must not leave a Job made after its stop looked for it.
        self._making = asyncio.ensure_future(asyncio.to_thread(self._make, manifest, secret, service))
        self._deadline = _deadline(await asyncio.shield(self._making))
        await self._until_running(launch.report)

    def _make(
        self, manifest: JsonObject, secret: JsonObject | None, service: JsonObject | None
    ) -> JsonObject:
        """The Secret and the Service first (a pod would wait for its Secret, a rank would not find rank 0
        without the Service), then the Job, then they are made the Job's; recorded as started once the Job
        exists."""
        if secret is not None:
            self._put_secret(secret)
        if service is not None:
            self._put_service(service)
        job = self._create(manifest)
        self._record.write_text(json.dumps({"namespace": self._namespace, "job": self.name}))
        owned = {"metadata": {"ownerReferences": [owner_reference(job)]}}
        if secret is not None:
            self._api.patch_secret(self._namespace, self.name, owned)
        if service is not None:
            self._api.patch_service(self._namespace, self.name, owned)
        return job

    def _put_secret(self, secret: JsonObject) -> None:
        try:
            self._api.create_secret(self._namespace, secret)
        except pydantic.ValidationError as error:
            # Its text would quote the values: only where the problems are.
            where = ", ".join(".".join(str(part) for part in problem["loc"]) for problem in error.errors())
            raise RunnerRefused(f"the job's Secret is not valid: {where}") from None
        except ApiError as error:
            if error.status != 409:
                refused = f"the Kubernetes API server refused the job's Secret: {error.message}"
                raise RunnerRefused(refused) from None
            self._api.patch_secret(self._namespace, self.name, {"data": secret["data"]})

    def _put_service(self, service: JsonObject) -> None:
        try:
            self._api.create_service(self._namespace, service)
        except ApiError as error:
            # 409: made by an earlier try of this start (named as the Job, whose create checks the lease).
            if error.status != 409:
                refused = f"the Kubernetes API server refused the ranks' Service: {error.message}"
                raise RunnerRefused(refused) from None

    def _create(self, manifest: JsonObject) -> JsonObject:
        try:
            return self._api.create_job(self._namespace, manifest)
        except pydantic.ValidationError as error:
            raise RunnerRefused(f"the Job manifest cannot be run: {error}") from None
        except ApiError as error:
            if error.status != 409:
                raise RunnerRefused(f"the Kubernetes API server refused the Job: {error.message}") from None
        existing = self._api.read_job(self._namespace, self.name)
        labels = (existing or {}).get("metadata", {}).get("labels") or {}
        if existing is None or labels.get(LEASE_LABEL) != self.lease_label:
            lease = self.assignment.lease_id
            raise RunnerUnavailable(f"a Job named {self.name} exists, but not for lease {lease}")
        return existing  # made by an earlier try whose answer was lost: the same attempt's Job

    async def until_running(self) -> None:
        await self._until_running(None)

    async def _until_running(self, report: Callable[[str], Awaitable[object]] | None) -> None:
        """Return once the job's container has started (every rank's), or the job has ended or cannot
        start; meanwhile ``report`` hears why a pod waits (unschedulable, an image being pulled)."""
        await self._runner.watching()
        reported = ""
        while not (observed := await self._observe()).running:
            if report is not None and observed.waiting != reported:
                reported = observed.waiting
                await report(reported or f"waiting for the {self._pods} to start")
            await self._next_change()

    @property
    def _pods(self) -> str:
        return f"{self.world.nodes} pods" if self.world.multi else "pod"

    async def wait(self) -> JobExit:
        await self._runner.watching()
        while (ended := (await self._observe()).exit) is None:
            self._runner.raise_if_unreachable()
            await self._next_change()
        if self.world.multi and not self._deleted and not succeeded(ended):
            # One rank failed: the others would wait for it (a rendezvous, a collective) until the deadline.
            await self._delete_job(None)
        drained = time.monotonic() + LOG_DRAIN_SECONDS
        for output in self.outputs:
            if output.following:
                await asyncio.to_thread(output.finished.wait, max(0.0, drained - time.monotonic()))
        # A follow not done by now would try again for as long as the agent runs (for ever, once the API
        # server is gone): the job has ended, and what its log had in time is all the run gets.
        for output in self.outputs:
            output.stop()
        # The Job stays for its TTL (its logs, its status); the values its pod needed do not, nor do the
        # ranks need each other's names any more.
        await self._delete_secret()
        await self._delete_service()
        self._exit = ended
        self._runner.forget(self)
        return ended

    def exit(self) -> JobExit | None:
        if self._exit is None and self._runner.jobs.synced.is_set():
            return self._state(self._known_job()).observed.exit
        return self._exit

    async def stop(self, grace: float) -> None:
        if self._making is not None:
            with contextlib.suppress(Exception):
                await self._making  # a Job still being made is deleted once it exists
        await self._delete_job(math.ceil(grace))
        # The Secret and Service go with their Job (their owner), but those whose owner was never set (the
        # start failed between) would stay until the next sweep: delete them too.
        await self._delete_secret()
        await self._delete_service()

    async def _delete_job(self, grace_seconds: int | None) -> None:
        """Delete the Job and its pods; ``grace_seconds`` None: each pod's own grace (the stop grace)."""
        await asyncio.to_thread(self._api.delete_job, self._namespace, self.name, grace_seconds)
        self._deleted = True

    async def _delete_secret(self) -> None:
        """Delete the Job's Secret, if it has one; gone already is fine, a failure is left to the owner
        reference and the sweep."""
        try:
            await asyncio.to_thread(self._api.delete_secret, self._namespace, self.name)
        except (ApiError, RunnerUnavailable) as error:
            logger.warning("could not delete the Secret of Job %s: %s", self.name, error)

    async def _delete_service(self) -> None:
        """Delete the ranks' Service of a multi-node Job, as ``_delete_secret`` its Secret."""
        if not self.world.multi:
            return
        try:
            await asyncio.to_thread(self._api.delete_service, self._namespace, self.name)
        except (ApiError, RunnerUnavailable) as error:
            logger.warning("could not delete the Service of Job %s: %s", self.name, error)

    async def renew_lease(self, until: float) -> None:
        runner = self._runner
        runner.lease_until = max(runner.lease_until or until, until)
        if not self.started or self._exit is not None:
            return
        margin = runner.options.fence_margin_seconds
        try:
            job = self._known_job() or await asyncio.to_thread(self._api.read_job, self._namespace, self.name)
            if job is None:
                return
            deadline = self._deadline if self._deadline is not None else _deadline(job)
            if deadline is not None and deadline >= until + margin / 2:
                return
            patch = {"spec": {"activeDeadlineSeconds": math.ceil(until + margin - _started(job))}}
            job = await asyncio.to_thread(self._api.patch_job, self._namespace, self.name, patch)
            self._deadline = _deadline(job)
        except (ApiError, RunnerUnavailable) as error:
            # The next renewal tries again; until then the Job runs on to its current deadline.
            logger.warning("could not move the deadline of Job %s: %s", self.name, error)

    async def _next_change(self) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that arrives as
        # the event is set, and a start cancelled at its deadline would then wait on for its pods.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECHECK_SECONDS):
                await self.changed.wait()
        self.changed.clear()

    def _known_job(self) -> JsonObject | None:
        live, _ = self._runner.jobs.select(LEASE_LABEL, self.lease_label)
        return live[-1] if live else None

    async def _observe(self) -> Observed:
        """The job's state, and what follows from it: each rank's log followed once it runs, status lines
        said."""
        job = self._known_job()
        if job is None and self.started and not self._runner.jobs.select(LEASE_LABEL, self.lease_label)[1]:
            # Not among the watched Jobs yet (just made), or deleted while this agent was away: ask.
            job = await asyncio.to_thread(self._api.read_job, self._namespace, self.name)
        elif job is not None and self._deleted:
            # A watch that lags (a loaded API server) would keep a Job this agent deleted alive: ask, and
            # keep what the watch says when the server does not answer.
            with contextlib.suppress(ApiError, RunnerUnavailable):
                job = await asyncio.to_thread(self._api.read_job, self._namespace, self.name)
        state = self._state(job)
        observed = state.observed
        self.status.add(observed.waiting)
        if observed.exit is not None and observed.exit.failure is not None:
            self.status.add(observed.exit.failure.message)
        for rank, rank_state in enumerate(state.ranks):
            self._follow(rank, rank_state, state.container)
        return observed

    def _follow(self, rank: int, state: _RankState, container: str) -> None:
        """Follow the rank's log once its container has started; say that its pod runs."""
        pod = state.pod
        if not state.observed.has_output or pod is None or state.gone:
            return
        pod_name = pod["metadata"]["name"]
        self.outputs[rank].follow(
            self._api,
            self._namespace,
            pod_name,
            container,
            lambda: self._container_ended(pod_name, container),
        )
        phase = (pod.get("status") or {}).get("phase", "")
        self.status.add(f"pod {pod_name} {phase.lower() or 'started'}", about=pod_name)

    def _state(self, job: JsonObject | None) -> _State:
        if job is None and not self.started:
            none = _RankState(Observed(False, None, ""), None, False)
            return _State(Observed(False, None, ""), [none] * self.world.nodes, DEFAULT_CONTAINER)
        newest = self._newest_pods()
        container = self._container(job, next((pod for pod, _ in newest if pod is not None), None))
        ranks = [
            _RankState(
                observe(job, pod, container, pod_gone=gone, settled=self._settled(rank, job, pod, gone)),
                pod,
                gone,
            )
            for rank, (pod, gone) in enumerate(newest)
        ]
        observed = ranks[0].observed if not self.world.multi else combine([rank.observed for rank in ranks])
        return _State(observed, ranks, container)

    def _newest_pods(self) -> list[tuple[JsonObject | None, bool]]:
        """Each rank's newest pod (live or deleted: ``gone``): the one pod of a NonIndexed Job, the pod of
        each completion index of an Indexed one."""
        live, deleted = self._runner.pods.select(LEASE_LABEL, self.lease_label)
        newest: list[tuple[JsonObject | None, bool]] = [(None, False)] * self.world.nodes
        for pod, gone in sorted(
            [(pod, False) for pod in live] + [(pod, True) for pod in deleted],
            key=lambda entry: str(entry[0]["metadata"].get("creationTimestamp", "")),
            reverse=True,  # newest first; of two made in the same second, the live one
        ):
            rank = self._rank_of(pod)
            if rank is not None and newest[rank][0] is None:
                newest[rank] = (pod, gone)
        return newest

    def _rank_of(self, pod: JsonObject) -> int | None:
        if not self.world.multi:
            return 0
        index = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX, "")
        return int(index) if index.isdigit() and int(index) < self.world.nodes else None

    def _settled(self, rank: int, job: JsonObject | None, pod: JsonObject | None, gone: bool) -> bool:
        """Whether the rank was first seen ending (its Job ended or gone, its pod ended or gone) long enough
        ago for the other half of the news to have come, if it ever will."""
        job_ended = job is None or any(
            condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True"
            for condition in (job.get("status") or {}).get("conditions") or []
        )
        pod_ended = gone or (pod or {}).get("status", {}).get("phase") in ("Succeeded", "Failed")
        if not (job_ended or pod_ended):
            self._ending_since.pop(rank, None)
            return False
        since = self._ending_since.setdefault(rank, time.monotonic())
        return time.monotonic() - since > SETTLE_SECONDS

    def _container_ended(self, pod_name: str, container: str) -> bool:
        live, _ = self._runner.pods.select(LEASE_LABEL, self.lease_label)
        for pod in live:
            if pod["metadata"]["name"] == pod_name:
                statuses = (pod.get("status") or {}).get("containerStatuses") or []
                return any(
                    status.get("name") == container and "terminated" in (status.get("state") or {})
                    for status in statuses
                )
        return True  # the pod is gone

    def _container(self, job: JsonObject | None, pod: JsonObject | None) -> str:
        """The container that runs the job: the queue's, else the first of the Job's (or its pod's)."""
        if self.assignment.container_name:
            return self.assignment.container_name
        pod_spec = ((job or {}).get("spec") or {}).get("template", {}).get("spec") or (pod or {}).get("spec")
        containers = (pod_spec or {}).get("containers") or [{"name": DEFAULT_CONTAINER}]
        return str(containers[0]["name"])


@dataclass(frozen=True, slots=True)
class _RankState:
    observed: Observed
    pod: JsonObject | None
    gone: bool


@dataclass(frozen=True, slots=True)
class _State:
    observed: Observed
    ranks: list[_RankState]
    container: str
