"""Adversarial cases of the queue forgetting an agent that left holding no lease
(``Dispatcher._forget_if_gone``, docs/design.md §5): a review found each one wrong (D1, D2, D4), and each
is fixed. The case itself is checked with :func:`_case`, which fails the test outright if it was not
reached."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from takeoff.v1 import common_pb2
from takeoff_queue.run_closes import RunClose
from takeoff_queue.settings import QueueSettings
from takeoff_queue.store import QueueWrite
from tests.postgres import postgres_schema_url
from tests.processes import ServiceProcess, until
from tests.queue.harness import InProcessQueue, ScriptedAgent, agent_shown, in_process_queue, watch_until

LEASED = common_pb2.ITEM_STATE_LEASED
WAIT = 30.0
"""Bound of a wait for something the server does at once (a loaded machine included)."""


class CaseNotReached(Exception):
    """The test did not force its case: not the expected failure (an AssertionError)."""


def _case(reached: bool, what: str) -> None:
    if not reached:
        raise CaseNotReached(what)


@pytest.fixture
async def fast(tmp_path: Path, queue_env: dict[str, str], job: str) -> AsyncIterator[InProcessQueue]:
    """The queue in this process, with leases that expire within a second of their agent going."""
    settings = QueueSettings(
        home=tmp_path,
        listen=["127.0.0.1:0"],
        registry_address=queue_env["TAKEOFF_REGISTRY_ADDRESS"],
        database_url=queue_env.get("TAKEOFF_DATABASE_URL"),
        lease_ttl_seconds=1.0,
        heartbeat_interval_seconds=0.2,
    )
    async with in_process_queue(settings) as service:
        yield service


async def _until_disconnected(service: InProcessQueue, agent_id: str) -> None:
    async def away() -> bool:
        shown = await agent_shown(service.queues, agent_id)
        return shown is None or not shown.connected

    await until(away, f"the queue to see agents/{agent_id} leave", within=WAIT)


# D1: the agent, forgotten as the expiry moved its last lease, came back blank when that write failed
# (no expiry, no key): its lease never expired. An agent known only by a lease now gets one TTL (_hold).
async def test_a_lease_whose_expiry_failed_to_commit_still_expires(
    fast: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await fast.new_queue()
    agent = await ScriptedAgent(fast.address).connect([queue])
    name = await fast.enqueue(queue, job)
    await agent.next("assignment")
    insert_run_closes = QueueWrite.insert_run_closes
    failed = asyncio.Event()

    async def failing_once(self: QueueWrite, closes: Sequence[RunClose], now: datetime) -> list[RunClose]:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("the database went away")
        return await insert_run_closes(self, closes, now)

    monkeypatch.setattr(QueueWrite, "insert_run_closes", failing_once)
    await agent.vanish()  # it held one lease: its expiry (1 s on) is the lease's only end
    await asyncio.wait_for(failed.wait(), WAIT)
    _case(failed.is_set(), "the expiry's write never failed")
    # The expiry is tried again a heartbeat interval (0.2 s) later, and commits then.
    await watch_until(fast.queues, name, lambda seen: seen.state != LEASED, within=15)


# D2: an agent that left while its run token was minted was never forgotten: the mint's end now looks.
async def test_an_agent_that_left_while_its_token_was_minted_is_forgotten(
    fast: InProcessQueue, job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await fast.new_queue()
    await fast.enqueue(queue, job)  # PENDING: no agent serves the queue yet
    tokens: Any = fast.parts.dispatcher._tokens
    _case(tokens is not None, "the queue mints no run tokens")
    mint = tokens.mint_run_token
    minting, release, minted = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        minting.set()
        await release.wait()
        try:
            return await mint(*args, **kwargs)
        finally:
            minted.set()

    monkeypatch.setattr(tokens, "mint_run_token", held)
    monkeypatch.setattr(tokens, "signed_run_token", lambda *_: None)  # every token through a mint
    agent = await ScriptedAgent(fast.address).connect([queue])
    await asyncio.wait_for(minting.wait(), WAIT)  # the dispatch pass holds the agent's room meanwhile
    await agent.vanish()
    await _until_disconnected(fast, agent.agent_id)
    _case(
        await agent_shown(fast.queues, agent.agent_id) is not None,
        "the agent was forgotten at its disconnect",
    )
    release.set()
    await asyncio.wait_for(minted.wait(), WAIT)

    async def forgotten() -> bool:
        return await agent_shown(fast.queues, agent.agent_id) is None

    await until(forgotten, f"the queue to forget agents/{agent.agent_id}", within=5)


@pytest.fixture
async def replica(
    tmp_path: Path, registry: ServiceProcess, job: str
) -> AsyncIterator[tuple[InProcessQueue, str]]:
    """One queue replica in this process (replicas: true) on a fresh PostgreSQL schema, and its URL."""
    with postgres_schema_url("queue_review") as url:
        settings = QueueSettings(
            home=tmp_path,
            listen=["127.0.0.1:0"],
            registry_address=registry.address,
            database_url=url,
            replicas=True,
            lease_ttl_seconds=2.0,  # the agent leaves well within it: its expiry is swept after
            heartbeat_interval_seconds=0.2,
        )
        async with in_process_queue(settings) as service:
            yield service, url


@pytest.mark.postgres
# D4: the replicas' sweep made a forgotten agent again (expire_agent): it now reads it, never makes it.
async def test_a_replica_does_not_remake_an_agent_it_forgot_when_its_expiry_is_swept(
    replica: tuple[InProcessQueue, str],
) -> None:
    service, url = replica
    queue = await service.new_queue()
    agent = await ScriptedAgent(service.address).connect([queue])
    await agent.close()  # it held nothing: forgotten at its disconnect

    async def forgotten() -> bool:
        return await agent_shown(service.queues, agent.agent_id) is None

    await until(forgotten, f"the queue to forget agents/{agent.agent_id}", within=WAIT)

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:

        async def swept() -> bool:
            cursor = await connection.execute(
                "SELECT count(*) FROM queue_agents WHERE agent_id = %s", (agent.agent_id,)
            )
            row = await cursor.fetchone()
            return row is not None and row[0] == 0

        await until(swept, "a sweep to deal with the agent's expired leases", within=WAIT)
    assert await agent_shown(service.queues, agent.agent_id) is None
