"""The agent's state kept across its restarts, against a real registry: each log line stored exactly once
whenever the agent dies, and what it decided about a job taken up again (docs/design.md §7)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from takeoff.v1 import runs_pb2, runs_pb2_grpc
from takeoff_agent import work
from takeoff_agent.clients import Builder, LogLine, Runs
from takeoff_agent.domain import ItemState, LogStream, Outcome
from takeoff_agent.log_tail import MAX_LINE_BYTES, LogTail
from takeoff_agent.runners.base import JobOutput, RunnerContext
from takeoff_agent.runners.local_process import LocalProcessRunner
from takeoff_agent.wire import assignment_from_proto, record_assignment, recorded_assignment
from takeoff_agent.work import AgentContext, Attempt, RunLog, Stop
from takeoff_rpc.channels import open_aio_channel, open_channel
from tests.agent.conftest import PROJECT, assignment_message
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess

STDOUT, STDERR, SYSTEM = runs_pb2.LOG_STREAM_STDOUT, runs_pb2.LOG_STREAM_STDERR, runs_pb2.LOG_STREAM_SYSTEM


class AgentDied(Exception):
    """Stands for the agent process dying in the middle of a flush."""


class DiesAfterCalls(Runs):
    """The registry client of an agent that dies once ``calls`` AppendLogs calls have been stored."""

    def __init__(self, address: str, calls: int) -> None:
        super().__init__(address, channel=open_aio_channel(address, api_key=ADMIN_KEY))
        self.calls_left = calls

    async def append_logs(
        self, run: str, lines: list[LogLine], first_index: int, *, token: str | None = None
    ) -> None:
        if self.calls_left == 0:
            raise AgentDied
        self.calls_left -= 1
        await super().append_logs(run, lines, first_index, token=token)


@pytest.fixture
async def runs(registry: ServiceProcess) -> AsyncIterator[Runs]:
    runs = Runs(registry.address, channel=open_aio_channel(registry.address, api_key=ADMIN_KEY))
    yield runs
    await runs.close()


@pytest.fixture
async def run(runs: Runs) -> str:
    name = f"projects/{PROJECT}/runs/r{uuid.uuid4().hex[:12]}"
    await runs.create(name, job_version="", item="", attempt=1, config={}, display_name="")
    return name


class JobFiles:
    """The files a job's shim appends its output to, and the run logs that follow them."""

    def __init__(self, directory: Path) -> None:
        self.stdout = directory / "stdout.log"
        self.stderr = directory / "stderr.log"
        self.checkpoint = directory / "log_checkpoint.json"

    def write(self, stdout: str = "", stderr: str = "") -> None:
        with self.stdout.open("a") as out, self.stderr.open("a") as err:
            out.write(stdout)
            err.write(stderr)

    def run_log(self, runs: Runs, run: str) -> RunLog:
        """The log as an agent (re)started now finds it."""
        log = RunLog(
            runs,
            run,
            self.checkpoint,
            [
                JobOutput(LogStream.STDOUT, LogTail(self.stdout)),
                JobOutput(LogStream.STDERR, LogTail(self.stderr)),
            ],
        )
        log.restore()
        return log


def stored(registry: ServiceProcess, run: str) -> list[tuple[int, str]]:
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        reply = runs_pb2_grpc.RunServiceStub(channel).ReadLogs(runs_pb2.ReadLogsRequest(name=run))
        return [(line.stream, line.text) for batch in reply for line in batch.lines]


async def send_all(log: RunLog) -> None:
    log.read_job_output()
    await log.flush()
    log.read_job_output()
    await log.flush()


@pytest.fixture(autouse=True)
def small_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two lines a call, so that a flush of five lines takes three calls."""
    monkeypatch.setattr(work, "MAX_LINES_PER_CALL", 2)


@pytest.mark.parametrize("stored_calls", [0, 1, 2, 3])
async def test_an_agent_dying_at_any_call_of_a_flush_loses_and_repeats_no_line(
    registry: ServiceProcess, runs: Runs, run: str, tmp_path: Path, stored_calls: int
) -> None:
    files = JobFiles(tmp_path)
    files.write(stdout="out 0\nout 1\nout 2\n", stderr="err 0\n")
    dying = files.run_log(DiesAfterCalls(registry.address, stored_calls), run)
    dying.read_job_output()
    dying.system("stopping")
    with contextlib.suppress(AgentDied):
        await dying.flush()
    # While the agent is away the job writes on, stdout first, so that a restarted agent reading the
    # files again would order the lines differently from the batch it may have sent in part.
    files.write(stdout="out 3\n", stderr="err 1\n")

    await send_all(files.run_log(runs, run))

    assert stored(registry, run) == [
        (STDOUT, "out 0"),
        (STDOUT, "out 1"),
        (STDOUT, "out 2"),
        (STDERR, "err 0"),
        (SYSTEM, "[takeoff] stopping"),
        (STDOUT, "out 3"),
        (STDERR, "err 1"),
    ]


async def test_restarts_between_flushes_continue_where_the_log_stood(
    registry: ServiceProcess, runs: Runs, run: str, tmp_path: Path
) -> None:
    files = JobFiles(tmp_path)
    for number in range(4):
        files.write(stdout=f"line {number}\n")
        await send_all(files.run_log(runs, run))  # a new agent process each time
    files.write(stdout="no newline yet")
    log = files.run_log(runs, run)
    await send_all(log)
    log.read_job_output(final=True)
    await log.flush()

    printed = ["line 0", "line 1", "line 2", "line 3", "no newline yet"]
    assert [text for _, text in stored(registry, run)] == printed
    assert list(log.last_lines) == printed  # what a failure message quotes, printed before restarts too


async def test_a_line_longer_than_the_registry_takes_arrives_in_pieces(
    registry: ServiceProcess, runs: Runs, run: str, tmp_path: Path
) -> None:
    files = JobFiles(tmp_path)
    long_line = "é" * MAX_LINE_BYTES  # two bytes a character: twice the limit
    files.write(stdout=f"{long_line}\nafter\n")

    await send_all(files.run_log(runs, run))

    texts = [text for _, text in stored(registry, run)]
    assert len(texts) == 3
    assert "".join(texts[:2]) == long_line
    assert all(len(text.encode()) <= MAX_LINE_BYTES for text in texts)
    assert texts[2] == "after"


async def test_secret_values_are_masked_before_they_are_recorded_or_sent(
    registry: ServiceProcess, runs: Runs, run: str, tmp_path: Path
) -> None:
    files = JobFiles(tmp_path)
    log = files.run_log(runs, run)
    log.mask(["hunter22", b"-----BEGIN KEY-----\nline-two-secret\n", "abc"])
    files.write(stdout="password hunter22\nkey line-two-secret\nabc is too short to mask\n")

    log.read_job_output()
    await log.flush()

    assert [text for _, text in stored(registry, run)] == [
        "password ***",
        "key ***",
        "abc is too short to mask",
    ]
    recorded = files.checkpoint.read_text()  # what a restarted agent sends again
    assert "hunter22" not in recorded
    assert "line-two-secret" not in recorded
    assert "password ***" in list(log.last_lines)  # what a failure message quotes


class NoReports:
    async def progress(self, attempt: Attempt, state: ItemState, detail: str) -> bool:
        raise AssertionError("not reached")

    async def complete(self, attempt: Attempt, outcome: Outcome) -> None:
        raise AssertionError("not reached")


@pytest.mark.parametrize(
    ("reason", "kept"),
    [
        (Stop.MAX_RUN_TIME, Stop.MAX_RUN_TIME),
        (Stop.CANCELLED, Stop.CANCELLED),
        (Stop.DRAINED, Stop.DRAINED),
        (Stop.REVOKED, None),  # the Welcome after the restart says whether the lease still holds
        (Stop.FENCED, None),
    ],
)
async def test_a_restarted_agent_keeps_when_the_job_began_and_why_it_was_stopped(
    registry: ServiceProcess, tmp_path: Path, reason: Stop, kept: Stop | None
) -> None:
    context = AgentContext(
        agent_name="agents/a",
        runs=Runs(registry.address, channel=open_aio_channel(registry.address, api_key=ADMIN_KEY)),
        builder=Builder(registry.address),
        runners={runner.kind: runner for runner in [LocalProcessRunner(RunnerContext("a", tmp_path))]},
        stop_grace_seconds=1,
        job_registry_address=registry.address,
    )
    message = assignment_message(lease_id="l1", max_run_time=Duration(seconds=3600))
    lease_dir = tmp_path / "leases" / "l1"
    record_assignment(message, lease_dir)
    before = Attempt(assignment_from_proto(message), lease_dir, context, NoReports())
    before.running_since = 1_000_000.0
    before.request_stop(reason)

    recorded = recorded_assignment(lease_dir)
    assert recorded is not None
    after = Attempt(recorded, lease_dir, context, NoReports())

    assert after.running_since == 1_000_000.0  # the max run time counts from the job's start, not now
    assert after.stop_reason is kept
    await asyncio.gather(context.runs.close(), context.builder.close())
