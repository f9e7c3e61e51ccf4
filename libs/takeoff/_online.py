"""``takeoff.init(mode="online")``: attach to the run in the registry, waiting out a registry that is
briefly away, and hand its data to a :class:`takeoff._sender.RunSender`.

Kept apart from :mod:`takeoff._run` so that offline and disabled runs load none of it. The calls go
through the launching agent's relay when there is one (:mod:`takeoff._run_calls`): then no gRPC either.
"""

from __future__ import annotations

import os
import time

from google.protobuf.message import Message

from takeoff._auth import find_api_key
from takeoff._delivery import warn
from takeoff._home import service_address
from takeoff._run import DEFAULT_TIMEOUT, seconds_from_env
from takeoff._run_calls import R, RunCalls, call_retrying, open_run_calls
from takeoff._sender import CALL_TIMEOUT, RunSender
from takeoff.errors import TakeoffError, UnavailableError
from takeoff.v1 import runs_pb2
from takeoff_rpc.backoff import RetryPolicy

INIT_TIMEOUT_ENV = "TAKEOFF_INIT_TIMEOUT"
INIT_TIMEOUT_OUTSIDE_A_LAUNCH = 5.0
"""A script run by hand learns at once that the registry is away; a launched job waits out a restart."""


def open_online_run(
    project: str,
    wanted: runs_pb2.Run,
    launched: bool,
    resume: runs_pb2.ResumeMode.ValueType = runs_pb2.RESUME_MODE_NEVER,
) -> tuple[runs_pb2.Run, RunSender, runs_pb2.Run | None]:
    """Attach to the run (a launched job's, else one created in ``project``) as ``wanted`` describes it;
    return it, the sender that delivers to it, and the run it continues (``resume``; None if none).
    Raises UnavailableError, naming the address and offline mode, when the registry stays unreachable for
    ``TAKEOFF_INIT_TIMEOUT`` seconds."""
    address = service_address("registry")
    timeout = seconds_from_env(
        INIT_TIMEOUT_ENV, DEFAULT_TIMEOUT if launched else INIT_TIMEOUT_OUTSIDE_A_LAUNCH
    )
    calls = open_run_calls(address, find_api_key())
    caller = _PatientCaller(calls, deadline=time.monotonic() + timeout)
    try:
        attached, resumed_from = _attach(caller, project, wanted, launched, resume=resume)
    except TakeoffError as error:
        calls.close()
        if not error.retryable:
            raise
        raise UnavailableError(
            "UNAVAILABLE",
            "UNAVAILABLE",
            f"cannot reach the registry at {address} within {timeout:g}s ({error.message}). To run without "
            'it, use takeoff.init(mode="offline") or TAKEOFF_MODE=offline and upload the run later with '
            "`takeoff sync`",
        ) from None
    except BaseException:
        calls.close()
        raise
    sender = RunSender(calls, attached.name, first_row_index=attached.history_length)
    return attached, sender, resumed_from


def _attach(
    caller: _PatientCaller,
    project: str,
    wanted: runs_pb2.Run,
    launched: bool,
    *,
    resume: runs_pb2.ResumeMode.ValueType,
) -> tuple[runs_pb2.Run, runs_pb2.Run | None]:
    """The attached run, and the run it continues when ``resume`` asks for one and there is one."""
    if launched:
        run_name = f"projects/{project}/runs/{os.environ['TAKEOFF_RUN_ID']}"
    else:
        # No config here: the config given to CreateRun is the launch's, read-only to UpdateRunConfig.
        described = runs_pb2.Run(
            display_name=wanted.display_name,
            tags=wanted.tags,
            notes=wanted.notes,
            group=wanted.group,
            job_type=wanted.job_type,
        )
        create = runs_pb2.CreateRunRequest(
            parent=f"projects/{project}",
            run=described,
            request_id=os.urandom(16).hex(),  # a retried CreateRun returns the run the first attempt made
        )
        run_name = caller.call("CreateRun", create, runs_pb2.CreateRunResponse).run.name
    attach = runs_pb2.AttachRunRequest(
        name=run_name,
        config=wanted.config,
        display_name=wanted.display_name,
        tags=wanted.tags,
        notes=wanted.notes,
        group=wanted.group,
        job_type=wanted.job_type,
        resume=resume,
    )
    try:
        response = caller.call("AttachRun", attach, runs_pb2.AttachRunResponse)
    except TakeoffError as error:
        if error.reason == "NOTHING_TO_RESUME":
            raise type(error)(
                error.code,
                error.reason,
                f'init(resume="must"): run {run_name} continues no earlier attempt\'s run (a first attempt '
                f'resumes nothing); use resume="allow" to start afresh there',
            ) from None
        # An attempt that failed on the way back may have attached the run: then it is ours already.
        if error.reason != "RUN_ALREADY_ATTACHED" or not caller.retried:
            raise
        attached = caller.call("GetRun", runs_pb2.GetRunRequest(name=run_name), runs_pb2.GetRunResponse).run
        previous = _resumed_run(caller, attached, resume)
    else:
        attached = response.run
        previous = response.resumed_from_run if response.HasField("resumed_from_run") else None
    if previous is not None and previous.summary.fields:
        # AttachRun hands the job the previous summary but does not store it in the new run: stored here,
        # so the new run's summary starts as the previous one's and metric summaries move on from it. Sent
        # once, outside the sender, which would take every key for the code's own.
        summary = runs_pb2.UpdateSummaryRequest(name=run_name, summary=previous.summary)
        caller.call("UpdateSummary", summary, runs_pb2.UpdateSummaryResponse)
    return attached, previous


def _resumed_run(
    caller: _PatientCaller,
    attached: runs_pb2.Run,
    resume: runs_pb2.ResumeMode.ValueType,
) -> runs_pb2.Run | None:
    """The run an attach whose reply was lost resumed: ``resumed_from`` read back (the token reads it
    through GetRun as the attach would have returned it only if allowed; without it, nothing)."""
    if resume in (runs_pb2.RESUME_MODE_UNSPECIFIED, runs_pb2.RESUME_MODE_NEVER) or not attached.resumed_from:
        return None
    try:
        request = runs_pb2.GetRunRequest(name=attached.resumed_from)
        return caller.call("GetRun", request, runs_pb2.GetRunResponse).run
    except TakeoffError:
        return None


class _PatientCaller:
    """Makes calls that wait out an unreachable registry, until a deadline."""

    def __init__(self, calls: RunCalls, deadline: float) -> None:
        self.calls = calls
        self.deadline = deadline
        self.retried = False

    def call(self, method: str, request: Message, response: type[R]) -> R:
        def timeout() -> float:
            return max(0.1, min(CALL_TIMEOUT, self.deadline - time.monotonic()))

        policy = RetryPolicy(deadline=self.deadline - time.monotonic())
        return call_retrying(
            self.calls, method, request, response, policy=policy, timeout=timeout, on_retry=self._on_retry
        )

    def _on_retry(self, error: TakeoffError, failed_attempts: int, delay: float) -> None:
        if not self.retried:
            warn(f"waiting for the registry at {self.calls.target} ({error})")
            self.retried = True
