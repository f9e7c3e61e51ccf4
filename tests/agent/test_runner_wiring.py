"""How an attempt goes through the runner of its resource kind (docs/design.md §7, §12): what the runner
refuses, what it is given, when it is interrupted, and that every run ends as its attempt does.

The attempt-level tests drive ``Attempt`` against the real registry and builder; the others run a real
agent process.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from takeoff.client import Client
from takeoff.models import Environment
from takeoff.v1 import common_pb2, runs_pb2, runs_pb2_grpc
from takeoff_agent.clients import Builder, LogLine, Runs
from takeoff_agent.domain import (
    Assignment,
    BuildKind,
    FailureReason,
    ItemState,
    JobExit,
    LogStream,
    Outcome,
    ResourceKind,
    RunnerFailure,
    SourceKind,
)
from takeoff_agent.runners.base import JobOutput, Launch, Runner, RunnerContext, RunnerUnavailable
from takeoff_agent.runners.local_process import LocalProcessRunner
from takeoff_agent.wire import AssignmentMessage, assignment_from_proto
from takeoff_agent.work import AgentContext, Attempt, Stop
from takeoff_rpc.channels import open_aio_channel, open_channel
from tests.agent.conftest import PROJECT, Stack, StartAgent, assignment_message, code_job, running_agent
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess
from tests.queue.harness import struct

FAILED = common_pb2.ITEM_STATE_FAILED
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED


class Recorder:
    """The Reporter of an attempt: what it told the queue."""

    def __init__(self) -> None:
        self.reported: list[tuple[ItemState, str]] = []
        self.outcomes: list[Outcome] = []

    async def progress(self, attempt: Attempt, state: ItemState, detail: str) -> bool:
        self.reported.append((state, detail))
        return True

    async def complete(self, attempt: Attempt, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


class Printed:
    """The output of a job that printed ``lines`` at once."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.offset = 0

    def read_lines(self, *, final: bool = False) -> list[str]:
        new, self.offset = self.lines[self.offset :], len(self.lines)
        return new


class StubJob:
    """A job whose start fails with ``start_error``, or ends at once as ``ended`` says, or else waits
    (as for free GPUs) until cancelled. ``before_start`` runs first, when given; ``printed``: its output."""

    def __init__(
        self,
        start_error: BaseException | None,
        ended: JobExit | None,
        before_start: Callable[[Launch], Awaitable[None]] | None = None,
        printed: list[str] | None = None,
    ) -> None:
        self.output = [JobOutput(LogStream.STDOUT, Printed(printed))] if printed else []
        self.before_start = before_start
        self.start_error = start_error
        self.ended = ended
        self.started = False
        self.launch: Launch | None = None
        self.waiting = asyncio.Event()
        self.start_cancelled = False
        self.stopped: list[float] = []

    def log_sources(self) -> list[JobOutput]:
        return self.output

    async def start(self, launch: Launch) -> None:
        self.launch = launch
        if self.before_start is not None:
            await self.before_start(launch)
        if self.start_error is not None:
            raise self.start_error
        if self.ended is not None:
            self.started = True
            return
        assert launch.report is not None
        await launch.report("waiting for 1 GPU: 0 of 1 free")
        self.waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.start_cancelled = True
            raise

    async def until_running(self) -> None:
        raise AssertionError("only for jobs started before a restart")

    async def wait(self) -> JobExit:
        assert self.ended is not None
        return self.ended

    def exit(self) -> JobExit | None:
        return self.ended if self.started else None

    async def stop(self, grace: float) -> None:
        self.stopped.append(grace)

    async def renew_lease(self, until: float) -> None:
        pass


class StubRunner:
    kind = ResourceKind.LOCAL_PROCESS
    needs_pushed_image = False

    def __init__(
        self,
        *,
        start_error: BaseException | None = None,
        ended: JobExit | None = None,
        before_start: Callable[[Launch], Awaitable[None]] | None = None,
        printed: list[str] | None = None,
    ) -> None:
        self.the_job = StubJob(start_error, ended, before_start, printed)

    def build_kind(self, source: SourceKind) -> BuildKind:
        return BuildKind.VENV

    def check(self, assignment: Assignment) -> None:
        pass

    def job(self, assignment: Assignment, lease_dir: Path) -> StubJob:
        return self.the_job

    async def sweep(self, held: object) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture
async def clients(registry: ServiceProcess, builder: ServiceProcess) -> AsyncIterator[tuple[Runs, Builder]]:
    # The agent's own key (here the tests' admin key): an attempt without a run token writes with it.
    runs = Runs(registry.address, channel=open_aio_channel(registry.address, api_key=ADMIN_KEY))
    builds = Builder(builder.address, channel=open_aio_channel(builder.address, api_key=ADMIN_KEY))
    yield runs, builds
    await asyncio.gather(runs.close(), builds.close())


@pytest.fixture
def job_version(client: Client, tmp_path: Path) -> str:
    code = tmp_path / "code"
    code.mkdir()
    # Code of its own, so that its build has output (its code is fetched) whatever was built before.
    (code / "main.py").write_text(f"print('never run here')  # {uuid.uuid4()}\n")
    return client.create_job_version("wired", code, entrypoint=["python", "main.py"]).version.name


class OrderedRuns(Runs):
    """The agent's registry client, noting its log and finish calls in order."""

    calls: list[tuple[str, list[str]]]

    async def append_logs(
        self, run: str, lines: list[LogLine], first_index: int, *, token: str | None = None
    ) -> None:
        self.calls.append(("AppendLogs", [line.text for line in lines]))
        await super().append_logs(run, lines, first_index, token=token)

    async def finish(
        self, run: str, state: common_pb2.RunState.ValueType, **options: Any
    ) -> common_pb2.RunState.ValueType:
        self.calls.append(("FinishRun", []))
        return await super().finish(run, state, **options)


def context_of(runner: Runner, clients: tuple[Runs, Builder]) -> AgentContext:
    return AgentContext(
        agent_name="agents/wiring",
        runs=clients[0],
        builder=clients[1],
        runners={runner.kind: runner},
        stop_grace_seconds=3,
        job_registry_address="unix:/run/takeoff/registry.sock",
    )


def attempt_of(
    runner: Runner,
    clients: tuple[Runs, Builder],
    tmp_path: Path,
    job_version: str,
    resource_config: dict[str, object] | None = None,
) -> tuple[Attempt, Recorder]:
    lease_id = uuid.uuid4().hex[:12]
    assignment = assignment_from_proto(
        assignment_message(lease_id=lease_id, job_version=job_version, resource_config=resource_config)
    )
    recorder = Recorder()
    lease_dir = tmp_path / "leases" / lease_id
    lease_dir.mkdir(parents=True)
    return Attempt(assignment, lease_dir, context_of(runner, clients), recorder), recorder


def build_lines(registry: ServiceProcess, run: str) -> list[str]:
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        batches = runs_pb2_grpc.RunServiceStub(channel).ReadLogs(runs_pb2.ReadLogsRequest(name=run))
        return [
            line.text for batch in batches for line in batch.lines if line.stream == runs_pb2.LOG_STREAM_BUILD
        ]


def wait_for_a_build_line(registry: ServiceProcess, run: str) -> None:
    """Returns once the run holds a build line (a following ReadLogs pushes each line as it is stored)."""
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        following = runs_pb2.ReadLogsRequest(name=run, follow=True)
        batches = runs_pb2_grpc.RunServiceStub(channel).ReadLogs(following)
        for batch in batches:
            if any(line.stream == runs_pb2.LOG_STREAM_BUILD for line in batch.lines):
                batches.cancel()
                return


class AgentDied(BaseException):
    """Stands for the agent process dying (no handler of the agent's catches it)."""


async def test_a_resource_option_the_runner_refuses_fails_the_item_config_invalid_and_its_run(
    registry: ServiceProcess, clients: tuple[Runs, Builder], tmp_path: Path, job_version: str
) -> None:
    runner = LocalProcessRunner(RunnerContext("wiring", tmp_path))
    attempt, recorder = attempt_of(
        runner, clients, tmp_path, job_version, {"env": {"A": "1"}, "gpus": 1, "shm_size": "1g"}
    )

    await attempt.run()

    [outcome] = recorder.outcomes
    assert (outcome.state, outcome.reason) == (ItemState.FAILED, FailureReason.CONFIG_INVALID)
    assert "gpus, shm_size" in outcome.message
    assert recorder.reported == []  # refused before anything was built
    assert await clients[0].state(attempt.assignment.run) == common_pb2.RUN_STATE_FAILED


async def test_a_runner_that_is_unavailable_fails_the_attempt_runner_infra_and_its_run(
    clients: tuple[Runs, Builder], tmp_path: Path, job_version: str
) -> None:
    runner = StubRunner(start_error=RunnerUnavailable("the Docker engine does not answer"))
    attempt, recorder = attempt_of(runner, clients, tmp_path, job_version)

    await attempt.run()

    [outcome] = recorder.outcomes
    assert (outcome.state, outcome.reason) == (ItemState.FAILED, FailureReason.RUNNER_INFRA)
    assert "the Docker engine does not answer" in outcome.message
    assert [state for state, _ in recorder.reported] == [ItemState.BUILDING, ItemState.STARTING]
    assert recorder.reported[0][1] == "venv build"
    assert await clients[0].state(attempt.assignment.run) == common_pb2.RUN_STATE_FAILED


async def test_a_cancel_interrupts_a_start_that_waits_and_is_given_what_the_job_needs(
    clients: tuple[Runs, Builder], tmp_path: Path, job_version: str
) -> None:
    runner = StubRunner()
    attempt, recorder = attempt_of(runner, clients, tmp_path, job_version, {"env": {"EPOCHS": 3}})
    running = asyncio.create_task(attempt.run())
    job = runner.the_job
    await asyncio.wait_for(job.waiting.wait(), timeout=120)

    attempt.request_stop(Stop.CANCELLED)
    await asyncio.wait_for(running, timeout=60)

    [outcome] = recorder.outcomes
    assert outcome.state == ItemState.CANCELLED
    assert job.start_cancelled
    assert job.stopped == [3]  # whatever the start had set up is stopped and removed
    assert (ItemState.STARTING, "waiting for 1 GPU: 0 of 1 free") in recorder.reported
    assert await clients[0].state(attempt.assignment.run) == common_pb2.RUN_STATE_KILLED
    launch = job.launch
    assert launch is not None
    assert launch.registry_address == "unix:/run/takeoff/registry.sock"
    assert launch.secrets == {}
    assignment = attempt.assignment
    assert dict(launch.env) == {
        "EPOCHS": "3",
        "PYTHONUNBUFFERED": "1",
        "TAKEOFF_PROJECT": PROJECT,
        "TAKEOFF_RUN_ID": assignment.run_id,
        "TAKEOFF_JOB": "wired:v" + job_version.rsplit("/", 1)[1],
        "TAKEOFF_QUEUE": assignment.queue,
        "TAKEOFF_ITEM": assignment.item,
        "TAKEOFF_ATTEMPT": "1",
        "TAKEOFF_CONFIG": "{}",
        "TRACEPARENT": "",
    }


@pytest.mark.parametrize(
    ("ended", "expected"),
    [
        (
            JobExit(exit_code=137, signal=9, oom_killed=True),
            (FailureReason.JOB_FAILED, "OOMKilled", common_pb2.RUN_STATE_CRASHED),
        ),
        (
            JobExit(None, failure=RunnerFailure(FailureReason.PREEMPTED, "pod evicted: node drained")),
            (FailureReason.PREEMPTED, "pod evicted: node drained", common_pb2.RUN_STATE_FAILED),
        ),
    ],
)
async def test_an_end_the_runner_reports_becomes_the_outcome_and_the_runs_final_state(
    clients: tuple[Runs, Builder],
    tmp_path: Path,
    job_version: str,
    ended: JobExit,
    expected: tuple[FailureReason, str, int],
) -> None:
    reason, message_start, run_state = expected
    attempt, recorder = attempt_of(StubRunner(ended=ended), clients, tmp_path, job_version)

    await attempt.run()

    [outcome] = recorder.outcomes
    assert (outcome.state, outcome.reason, outcome.exit_code) == (ItemState.FAILED, reason, ended.exit_code)
    assert outcome.message.startswith(message_start)
    assert await clients[0].state(attempt.assignment.run) == run_state


async def test_an_ended_jobs_last_lines_go_with_its_outcome_in_one_call_before_the_run_ends(
    registry: ServiceProcess, clients: tuple[Runs, Builder], tmp_path: Path, job_version: str
) -> None:
    """The output of a job that has ended waits for the line of its outcome, in one AppendLogs where there
    were two, and the log is sent whole before the agent's FinishRun (a follower of the log stops there)."""
    runs = OrderedRuns(registry.address, channel=open_aio_channel(registry.address, api_key=ADMIN_KEY))
    runs.calls = []
    attempt, recorder = attempt_of(
        StubRunner(ended=JobExit(exit_code=0), printed=["epoch 1 done"]),
        (runs, clients[1]),
        tmp_path,
        job_version,
    )
    try:
        await attempt.run()
    finally:
        await runs.close()

    [outcome] = recorder.outcomes
    assert outcome.reason is FailureReason.NO_RUN  # a stub job never calls takeoff.init()
    finish = runs.calls.index(("FinishRun", []))
    sent_before = [lines for method, lines in runs.calls[:finish] if method == "AppendLogs"]
    [together] = [lines for lines in sent_before if "epoch 1 done" in lines]
    assert "[takeoff] job exited with code 0" in together
    assert [method for method, _ in runs.calls[finish:]] == ["FinishRun"]


async def test_an_agent_restarted_before_its_job_started_sends_each_build_line_once(
    registry: ServiceProcess, clients: tuple[Runs, Builder], tmp_path: Path, job_version: str
) -> None:
    async def build_output_delivered(launch: Launch) -> None:
        # The build's last lines go while the job starts (work.py): the death waits for them to be stored.
        await asyncio.to_thread(wait_for_a_build_line, registry, first.assignment.run)

    dying = StubRunner(start_error=AgentDied(), before_start=build_output_delivered)
    first, _ = attempt_of(dying, clients, tmp_path, job_version)
    with pytest.raises(AgentDied):
        await first.run()  # built, its output sent, then gone before the job started
    sent = build_lines(registry, first.assignment.run)
    assert sent  # something to send twice

    again = StubRunner(ended=JobExit(exit_code=0))
    second = Attempt(first.assignment, first.lease_dir, context_of(again, clients), Recorder())
    await second.run()  # builds again: the builder sends the same build's output from its first line

    assert build_lines(registry, first.assignment.run) == sent


def test_a_build_failure_ends_the_item_and_its_run_failed(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text("print('never built')\n")
    client.create_job_version(
        "unbuildable", code, entrypoint=["python", "main.py"], environment=Environment(python_version="3.99")
    )
    queue = stack.new_queue(max_attempts=1)
    with running_agent(start_agent, [queue]):
        item = stack.wait_ended(stack.enqueue(queue, "unbuildable"))

    assert (item.state, item.reason) == (FAILED, common_pb2.FAILURE_REASON_BUILD_FAILED)
    run = stack.run(item.run)
    assert run.state == common_pb2.RUN_STATE_FAILED
    assert "python 3.99 is not available" in run.message


SHOW_ENVIRONMENT = """\
import json, os, pathlib, stat, takeoff
spec = pathlib.Path.cwd().parent / "spec.json"
print("ENV", json.dumps(dict(os.environ)), flush=True)
print("SPEC", oct(stat.S_IMODE(spec.stat().st_mode)), flush=True)
takeoff.init()
"""


def test_a_local_job_sees_the_allow_listed_part_of_the_agents_environment_and_takeoffs_variables(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "environment", SHOW_ENVIRONMENT)
    queue = stack.new_queue(resource_config=struct({"env": {"FROM_QUEUE": 7, "PATH": "/nowhere"}}))
    added = {
        "AGENT_ONLY_SECRET": "s3cret",
        "PASSED_ON": "yes",
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "TZ": "UTC",
        "TMPDIR": str(tmp_path),
    }
    job_registry = f"ipv4:{stack.registry}"  # the same registry, spelled as jobs are to be given it
    with running_agent(
        start_agent,
        [queue],
        env=added,
        runners={"local-process": {"pass_env": ["PASSED_ON"]}},
        job_registry_address=job_registry,
    ) as agent:
        item = stack.wait_ended(stack.enqueue(queue, job))

    assert item.state == SUCCEEDED
    lines = stack.logs(item.run)
    [seen] = [json.loads(line.removeprefix("ENV ")) for line in lines if line.startswith("ENV ")]
    agent_environment = {**os.environ, **added}
    allowed = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "PASSED_ON")
    inherited = {
        name: value for name, value in agent_environment.items() if name in allowed or name.startswith("LC_")
    }
    venv = seen["VIRTUAL_ENV"]
    assert seen == {
        **inherited,
        "PATH": f"{venv}/bin:{agent_environment['PATH']}",  # the queue's env cannot move the venv off PATH
        "VIRTUAL_ENV": venv,
        "PYTHONPATH": seen["PYTHONPATH"],  # the SDK's site directory (same Python as the agent)
        "PYTHONUNBUFFERED": "1",
        "FROM_QUEUE": "7",
        "TAKEOFF_REGISTRY": job_registry,
        "TAKEOFF_RELAY": f"@takeoff-relay-{(agent.state_dir / 'agent_id').read_text()}",
        "TAKEOFF_PROJECT": PROJECT,
        "TAKEOFF_RUN_ID": item.run.rsplit("/", 1)[1],
        "TAKEOFF_JOB": f"{job}:v0",
        "TAKEOFF_QUEUE": queue,
        "TAKEOFF_ITEM": item.name,
        "TAKEOFF_ATTEMPT": "1",
        "TAKEOFF_CONFIG": "{}",
        "TRACEPARENT": seen["TRACEPARENT"],
        "TAKEOFF_TOKEN": "***",  # the job has its run token; the agent masks it in the run's log
    }
    assert "AGENT_ONLY_SECRET" not in seen
    assert "TAKEOFF_HOME" not in seen
    assert "SPEC 0o600" in lines  # the spec file holds the job's secrets


@pytest.mark.parametrize(
    ("runners", "named"),
    [
        ({"local-process": {"bogus_option": 1}}, "bogus_option"),
        ({"local-process": {"pass_env": "PATH"}}, "pass_env"),
        ({"slurm": {}}, "slurm"),
    ],
)
def test_the_agent_refuses_to_start_with_a_runner_config_it_cannot_use_naming_what(
    stack: Stack, start_agent: StartAgent, runners: dict[str, object], named: str
) -> None:
    agent = start_agent([stack.new_queue()], runners=runners)

    assert agent.process.wait(timeout=60) != 0
    said = agent.log_file.read_text()
    assert named in said
    assert "Traceback" not in said


def _no_resource(message: AssignmentMessage) -> None:
    message.resource = common_pb2.RESOURCE_KIND_UNSPECIFIED


def _bad_run(message: AssignmentMessage) -> None:
    message.run = "runs/no-project"


def _no_source(message: AssignmentMessage) -> None:
    message.job_version.ClearField("source")


@pytest.mark.parametrize(
    ("spoil", "named"),
    [(_no_resource, "resource kind 0"), (_bad_run, "run 'runs/no-project'"), (_no_source, "no source")],
)
def test_an_assignment_the_agent_cannot_run_is_refused_naming_why(
    spoil: Callable[[AssignmentMessage], None], named: str
) -> None:
    message = assignment_message()
    spoil(message)
    with pytest.raises(ValueError, match=named):
        assignment_from_proto(message)


class RefusingStarting(Recorder):
    """A queue that has given the lease away by the time the agent reports STARTING."""

    async def progress(self, attempt: Attempt, state: ItemState, detail: str) -> bool:
        await super().progress(attempt, state, detail)
        return state is not ItemState.STARTING


async def test_starting_is_answered_before_the_job_starts_after_a_build_but_not_after_a_cache_hit(
    clients: tuple[Runs, Builder], tmp_path: Path, job_version: str
) -> None:
    """After a build that took its time the lease may have been lost meanwhile: a refused STARTING means no
    start at all. After a cache hit BUILDING was taken a moment ago: the job starts while STARTING is on its
    way, and its refusal stops it."""
    built_first = StubRunner(ended=JobExit(exit_code=0))
    attempt, _ = attempt_of(built_first, clients, tmp_path, job_version)
    refusing = RefusingStarting()
    attempt.reporter = refusing
    await attempt.run()
    assert (ItemState.STARTING, "starting the job") in refusing.reported
    assert built_first.the_job.launch is None, "started though the queue had not taken STARTING"
    assert refusing.outcomes == []  # the lease is the queue's to give: nothing to report

    cached = StubRunner(ended=JobExit(exit_code=0))
    attempt, _ = attempt_of(cached, clients, tmp_path, job_version)
    attempt.reporter = RefusingStarting()
    await attempt.run()
    assert cached.the_job.launch is not None
    assert cached.the_job.stopped, "the job started before the refusal was not stopped"
