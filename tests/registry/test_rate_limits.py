"""Per-run rate limits on log lines and metric rows: a registry built with low limits (the Runs domain's
parameters) refuses a batch beyond its run's rate whole, with RESOURCE_EXHAUSTED ``RATE_LIMITED`` and when to
retry, and the SDK's sender waits that out and still delivers every row."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from takeoff._grpc_run_calls import GrpcRunCalls
from takeoff._sender import RunSender
from takeoff.v1 import common_pb2, runs_pb2, runs_pb2_grpc
from takeoff_registry.__main__ import wire
from takeoff_registry.access import RULES
from takeoff_registry.git_source import GitResolver
from takeoff_registry.jobs import Jobs
from takeoff_registry.runs import LOG_LINE_RATE, METRIC_ROW_RATE, Runs
from takeoff_registry.runs_api import RunApi
from takeoff_registry.store import RegistryStore
from takeoff_server.database import Database
from takeoff_server.rate_limits import Rate
from takeoff_server.server import ServiceBinding, TakeoffServer
from tests.keys import ADMIN_KEY
from tests.registry.conftest import failure, keyed_channel, registry_settings

UNLIMITED = Rate(per_second=1_000_000, burst=1_000_000)


@dataclass
class LimitedRegistry:
    address: str
    runs: runs_pb2_grpc.RunServiceAsyncStub
    database: Database

    async def count(self, table: str, run: runs_pb2.Run) -> int:
        """Chunks the run has in ``table``."""
        query = sa.text(
            f"SELECT count(*) FROM {table} c JOIN registry_runs r ON c.run_seq = r.seq "
            "WHERE r.project_id = :project AND r.run_id = :run"
        )
        project, run_id = run.name.split("/")[1], run.name.split("/")[3]
        async with self.database.engine.connect() as connection:
            result = await connection.execute(query, {"project": project, "run": run_id})
            return int(result.scalar_one())


@asynccontextmanager
async def limited_registry(
    home: Path, database_url: str, *, metric_rows: Rate = UNLIMITED, log_lines: Rate = UNLIMITED
) -> AsyncIterator[LimitedRegistry]:
    """A RunService on the registry's database, its keys verified as the registry does, with these limits."""
    settings = registry_settings(home, database_url)
    async with AsyncExitStack() as resources:
        wiring = await wire(settings, resources)  # migrates the database and imports the admin key
        database = Database("registry", settings.database_url or "")
        resources.push_async_callback(database.close)
        store = RegistryStore(database)
        git = GitResolver(settings.git_credentials, timeout=1.0, scratch_dir=home / "git-scratch")
        runs = Runs(store, Jobs(store, git), metric_row_rate=metric_rows, log_line_rate=log_lines)
        binding = ServiceBinding.of(
            runs_pb2.DESCRIPTOR.services_by_name["RunService"],
            runs_pb2_grpc.add_RunServiceServicer_to_server,
            RunApi(runs),
            access=RULES["takeoff.v1.RunService"],
        )
        server = TakeoffServer([binding], listen=["127.0.0.1:0"], verifier=wiring.verifier)
        [address] = await server.start()
        try:
            async with keyed_channel(address, ADMIN_KEY) as channel:
                yield LimitedRegistry(address, runs_pb2_grpc.RunServiceStub(channel), database)
        finally:
            await server.stop(0)


def _rows(count: int, start: int = 0) -> list[runs_pb2.MetricRow]:
    return [runs_pb2.MetricRow(step=start + n, values={"x": float(n)}) for n in range(count)]


def _lines(count: int) -> list[runs_pb2.LogLine]:
    return [runs_pb2.LogLine(text=f"line {n}") for n in range(count)]


async def _new_run(registry: LimitedRegistry) -> runs_pb2.Run:
    return (await registry.runs.CreateRun(runs_pb2.CreateRunRequest(parent="projects/limits"))).run


async def _get(registry: LimitedRegistry, run: runs_pb2.Run) -> runs_pb2.Run:
    return (await registry.runs.GetRun(runs_pb2.GetRunRequest(name=run.name))).run


async def _stream(
    messages: Iterable[runs_pb2.LogMetricsRequest],
) -> AsyncIterator[runs_pb2.LogMetricsRequest]:
    for message in messages:
        yield message


async def test_metric_rows_beyond_a_runs_rate_are_refused_whole(database_url: str, tmp_path: Path) -> None:
    # One row a second, bursts of 100: nothing refills noticeably while the test runs.
    limit = Rate(per_second=1, burst=100)
    async with limited_registry(tmp_path / "home", database_url, metric_rows=limit) as registry:
        run = await _new_run(registry)
        await registry.runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=run.name, rows=_rows(100)))

        refused = await failure(
            registry.runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=run.name, rows=_rows(10)))
        )
        assert (refused.code, refused.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert refused.metadata["resource"] == run.name
        assert refused.metadata["limit"] == "metric rows per run"
        assert 5 < float(refused.metadata["retry_after_seconds"]) <= 10
        # Nothing of the refused batch was stored.
        assert (await _get(registry, run)).history_length == 100
        assert await registry.count("registry_metric_chunks", run) == 1

        # The limit is per run: another run logs its own burst.
        other = await _new_run(registry)
        await registry.runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=other.name, rows=_rows(100)))
        assert (await _get(registry, other)).history_length == 100

        # LogMetrics counts each message: the one beyond the rate ends the stream, those before it are kept.
        streamed = await _new_run(registry)
        messages = [runs_pb2.LogMetricsRequest(name=streamed.name, rows=_rows(60, 60 * n)) for n in range(2)]
        refused = await failure(registry.runs.LogMetrics(_stream(messages)))
        assert (refused.code, refused.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        got = await _get(registry, streamed)
        assert (got.history_length, got.last_step) == (60, 59)
        assert await registry.count("registry_metric_chunks", streamed) == 1


async def test_log_lines_beyond_a_runs_rate_are_refused_whole(database_url: str, tmp_path: Path) -> None:
    limit = Rate(per_second=1, burst=100)
    async with limited_registry(tmp_path / "home", database_url, log_lines=limit) as registry:
        run = await _new_run(registry)
        await registry.runs.AppendLogs(runs_pb2.AppendLogsRequest(name=run.name, lines=_lines(70)))
        refused = await failure(
            registry.runs.AppendLogs(runs_pb2.AppendLogsRequest(name=run.name, lines=_lines(40)))
        )
        assert (refused.code, refused.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert refused.metadata["limit"] == "log lines per run"
        assert float(refused.metadata["retry_after_seconds"]) > 5
        assert (await _get(registry, run)).log_line_count == 70
        assert await registry.count("registry_log_chunks", run) == 1
        # What still fits the bucket is taken; metrics have their own bucket.
        await registry.runs.AppendLogs(runs_pb2.AppendLogsRequest(name=run.name, lines=_lines(30)))
        await registry.runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=run.name, rows=_rows(500)))
        got = await _get(registry, run)
        assert (got.log_line_count, got.history_length) == (100, 500)


def test_the_default_limits_are_generous() -> None:
    assert Rate(per_second=10_000, burst=50_000) == LOG_LINE_RATE
    assert Rate(per_second=10_000, burst=500_000) == METRIC_ROW_RATE  # bench/sdk_log.py, registry_ingest.py


async def _drain(registry: LimitedRegistry, run: runs_pb2.Run, batch: int) -> int:
    """Log batches of ``batch`` rows until the run's bucket refuses one; returns the rows stored."""
    stored = 0
    while True:
        try:
            await registry.runs.BatchLogMetrics(
                runs_pb2.BatchLogMetricsRequest(name=run.name, rows=_rows(batch, stored))
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return stored
        stored += batch


def _finish(run: runs_pb2.Run) -> runs_pb2.FinishRunRequest:
    return runs_pb2.FinishRunRequest(name=run.name, state=common_pb2.RUN_STATE_FINISHED)


def _sqlite(tmp_path: Path) -> str:
    """The SDK's tests need one database only: what they test is the client."""
    return f"sqlite:///{tmp_path / 'registry.db'}"


async def test_the_sdk_waits_out_a_rate_limit_and_delivers_every_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limit = Rate(per_second=500, burst=1000)
    async with limited_registry(tmp_path / "home", _sqlite(tmp_path), metric_rows=limit) as registry:
        run = await _new_run(registry)
        before = await _drain(registry, run, 250)  # the bucket is (about) empty now
        calls = GrpcRunCalls(registry.address, ADMIN_KEY)
        sender = RunSender(calls, run.name, first_row_index=before, interval=0.02)
        for n in range(3000):
            sender.rows.append((before + n, time.time_ns(), {"x": float(n)}))
        await asyncio.to_thread(sender.close, _finish(run), 60.0)
        assert sender.dropped_rows == 0
        assert "rate limiting" in capsys.readouterr().err

        got = await _get(registry, run)
        assert got.state == common_pb2.RUN_STATE_FINISHED
        assert got.history_length == before + 3000
        steps: list[int] = []
        async for message in registry.runs.ReadMetrics(runs_pb2.ReadMetricsRequest(name=run.name)):
            steps += [row.step for row in message.rows]
        assert steps == list(range(before + 3000))


async def test_the_sdk_gives_up_on_a_rate_limit_it_cannot_wait_out_by_its_close_deadline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limit = Rate(per_second=0.01, burst=10)  # a refill takes 1000 s, far beyond any wait the SDK makes
    async with limited_registry(tmp_path / "home", _sqlite(tmp_path), metric_rows=limit) as registry:
        run = await _new_run(registry)
        await _drain(registry, run, 10)
        sender = RunSender(GrpcRunCalls(registry.address, ADMIN_KEY), run.name, first_row_index=10)
        sender.rows.extend((10 + n, time.time_ns(), {"x": 1.0}) for n in range(5))
        # Without the deadline the sender would wait out the refill (1000 s): the guard ends the test.
        await asyncio.wait_for(asyncio.to_thread(sender.close, _finish(run), 2.0), 60)
        assert "5 metric rows" in capsys.readouterr().err
        assert (await _get(registry, run)).history_length == 10
