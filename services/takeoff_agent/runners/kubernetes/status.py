"""How an attempt's Job stands, read from the Job and its pod as the API server last showed them.

Pending until the job's container runs; then running; then ended, with the exit code of the container
(``OOMKilled`` marked), or a runner failure: a pod evicted or preempted ends PREEMPTED (retryable), an image
that will not pull (``ImagePullBackOff``) RUNNER_INFRA, an image name that can never pull CONFIG_INVALID.
An unschedulable pod keeps waiting: the agent's start deadline ends it (START_TIMEOUT).

A multi-node launch has one pod per rank, each read so; the attempt runs once every rank runs, and ends
once every rank has ended well or one has failed (``combine``).
"""

from __future__ import annotations

import dataclasses
import signal as signals
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from takeoff_agent.domain import FailureReason, JobExit, RunnerFailure

JsonObject = Mapping[str, Any]

# Waiting reasons the kubelet will not get past by retrying (ErrImagePull is retried once, as
# ImagePullBackOff, before the attempt gives up on it).
_NEVER_STARTS = {
    "ImagePullBackOff": FailureReason.RUNNER_INFRA,
    "InvalidImageName": FailureReason.CONFIG_INVALID,
    "ErrImageNeverPull": FailureReason.CONFIG_INVALID,
}
_MAX_SIGNAL = 64


@dataclass(frozen=True, slots=True)
class Observed:
    running: bool
    """The job's container has started (or the job has ended)."""
    exit: JobExit | None
    """How the job ended, once it has."""
    waiting: str
    """Why the pod is not running yet, when the API server says ('' otherwise)."""
    has_output: bool = False
    """The job's container has started: it has a log to read."""


def _condition(obj: JsonObject, kind: str) -> JsonObject | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return dict(condition)
    return None


def _container_status(pod: JsonObject, container: str) -> JsonObject:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == container:
            return dict(status)
    return {}


def _signal(terminated: JsonObject, exit_code: int) -> int | None:
    if terminated.get("signal"):
        return int(terminated["signal"])
    # Container runtimes report a process killed by signal n as exit code 128 + n.
    return exit_code - 128 if 128 < exit_code <= 128 + _MAX_SIGNAL else None


def _describe(reason: str | None, message: str | None) -> str:
    return ": ".join(part for part in (reason, message) if part)


def observe(
    job: JsonObject | None,
    pod: JsonObject | None,
    container: str,
    *,
    pod_gone: bool,
    settled: bool = False,
) -> Observed:
    """The attempt's state from its Job (None: gone) and its newest pod (``pod_gone``: deleted since).

    The Job and its pods are watched apart, so one may be seen ended before the other: the container's
    exit waits for the Job's verdict (was it past its deadline?), the Job's end for the container's exit
    (its code), until ``settled`` (the first of them was seen long enough ago).
    """
    terminated: JsonObject = {}
    state: JsonObject = {}
    if pod is not None:
        state = _container_status(pod, container).get("state") or {}
        terminated = state.get("terminated") or {}
    has_output = "running" in state or bool(terminated)
    # A disrupted pod whose job had already ended well is a success (a node drained after it finished).
    succeeded = terminated.get("exitCode") == 0
    if pod is not None and not succeeded and (failure := _disrupted(pod, pod_gone)) is not None:
        return Observed(True, JobExit(terminated.get("exitCode"), failure=failure), "", has_output)
    failed = _condition(job, "Failed") if job is not None else None
    fenced = failed is not None and failed.get("reason") == "DeadlineExceeded"
    job_end = _job_end(job, failed, fenced)
    if terminated and job_end is None and not settled:
        return Observed(True, None, "", True)
    if terminated:
        exit_code = int(terminated.get("exitCode", 0))
        oom_killed = terminated.get("reason") == "OOMKilled"
        return Observed(
            True, JobExit(exit_code, _signal(terminated, exit_code), fenced, oom_killed), "", True
        )
    if job_end is not None:
        pod_settled = pod is None or pod_gone or settled
        return Observed(True, job_end if pod_settled else None, "", has_output)
    if pod is None:
        return Observed(False, None, "")
    if has_output or (pod.get("status") or {}).get("phase") == "Running":
        return Observed(True, None, "", has_output)
    waiting = state.get("waiting") or {}
    if (reason := _NEVER_STARTS.get(waiting.get("reason", ""))) is not None:
        image = _container_image(pod, container)
        why = _describe(waiting["reason"], waiting.get("message"))
        message = f"the image {image} cannot be pulled: {why}"
        return Observed(True, JobExit(None, failure=RunnerFailure(reason, message)), "")
    scheduled = _unscheduled(pod)
    if scheduled:
        return Observed(False, None, scheduled)
    return Observed(False, None, _describe(waiting.get("reason"), waiting.get("message")))


def combine(ranks: Sequence[Observed]) -> Observed:
    """The attempt's state from its ranks' states (a multi-node launch).

    Running once every rank runs; ended once every rank has ended well (rank 0's exit), or at the first
    failure seen, which names its rank (``JobExit.rank``). Ranks stopped because another failed (the job
    controller and the agent stop them with SIGTERM) end at about the same time as the rank that failed:
    its own exit, then the runner's verdict (evicted, an image that will not pull), is preferred over
    theirs; then the lowest rank.
    """
    has_output = any(observed.has_output for observed in ranks)
    ended = [(rank, observed.exit) for rank, observed in enumerate(ranks) if observed.exit is not None]
    failed = [(rank, exit) for rank, exit in ended if not succeeded(exit)]
    if failed:
        rank, exit = min(failed, key=lambda entry: (_stopped_from_outside(entry[1]), entry[0]))
        return Observed(True, dataclasses.replace(exit, rank=rank), "", has_output)
    if len(ended) == len(ranks):
        return Observed(True, ended[0][1], "", has_output)
    waiting = next((observed.waiting for observed in ranks if observed.waiting), "")
    return Observed(all(observed.running for observed in ranks), None, waiting, has_output)


def succeeded(exit: JobExit) -> bool:
    """Whether the job (or a rank) ended well: exit code 0, not fenced, no runner failure."""
    return exit.exit_code == 0 and exit.failure is None and not exit.fenced


def _stopped_from_outside(exit: JobExit) -> int:
    """0: the rank ended by itself; 1: the runner says why it ended; 2: it was stopped (SIGTERM, fenced)."""
    if exit.fenced or exit.signal == signals.SIGTERM:
        return 2
    return 1 if exit.failure is not None else 0


def _job_end(job: JsonObject | None, failed: JsonObject | None, fenced: bool) -> JobExit | None:
    """How the job ended as its Job says (None: the Job has not ended)."""
    if job is None:
        failure = RunnerFailure(FailureReason.RUNNER_INFRA, "the Job was deleted before its pod ended")
        return JobExit(None, failure=failure)
    if fenced:
        return JobExit(None, signals.SIGKILL, fenced=True)
    if _condition(job, "Complete") is not None:
        return JobExit(0)
    if failed is not None:
        # No container exit to go by: the pod went away (deleted, its node lost) before it could end.
        why = _describe(failed.get("reason"), failed.get("message"))
        message = f"the Job failed without its pod ending: {why}"
        return JobExit(None, failure=RunnerFailure(FailureReason.PREEMPTED, message))
    return None


def _disrupted(pod: JsonObject, gone: bool) -> RunnerFailure | None:
    """An evicted or preempted pod (once it has stopped): the work was stopped from outside."""
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return RunnerFailure(FailureReason.PREEMPTED, f"the pod was evicted: {status.get('message', '')}")
    disruption = _condition(pod, "DisruptionTarget")
    ended = gone or status.get("phase") in ("Failed", "Succeeded")
    if disruption is not None and ended:
        text = _describe(disruption.get("reason"), disruption.get("message"))
        return RunnerFailure(FailureReason.PREEMPTED, f"the pod was disrupted: {text}")
    return None


def _unscheduled(pod: JsonObject) -> str:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            text = _describe(condition.get("reason"), condition.get("message"))
            return f"pod {pod['metadata']['name']} not scheduled: {text}"
    return ""


def _container_image(pod: JsonObject, container: str) -> str:
    for spec in (pod.get("spec") or {}).get("containers") or []:
        if spec.get("name") == container:
            return str(spec.get("image", ""))
    return ""
