"""Server-sent events: the services' streams (WatchQueue, WatchItem, ReadMetrics, ReadLogs) relayed to a page.

Each event stream holds one gRPC stream open with the user's key for as long as the page is open, and
forwards each message as it comes as one event whose data is JSON made by :mod:`takeoff_console.views`.
Nothing here polls: when the browser leaves, Starlette cancels the response and with it the gRPC call. A
stream that ends (an item reached its end, a run finished) sends ``end``, and the page closes its source
instead of letting the browser reconnect; a failed call sends ``failed`` with the reason in words.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
from starlette.responses import StreamingResponse

from takeoff.v1 import runs_pb2
from takeoff_console import views
from takeoff_console.client import CallFailed, UserClient

CHART_POINTS = 1000
"""Points per chart drawn from a run's history (ReadMetrics ``max_points``): the service keeps each bucket's
minimum and maximum, so a spike in 100,000 rows still shows; rows logged later are added as they come."""
LOG_TAIL = 1000
"""Log lines a run page starts with; the rest of a long log stays a ``takeoff logs`` away."""
RECONNECT_MILLISECONDS = 2000
HEARTBEAT_SECONDS = 15.0
"""A quiet stream (a queue nobody touches) sends a comment line this often: proxies close connections idle
for 30-60 s, and a write is also how a browser that left without a word is noticed."""
HEARTBEAT = b": heartbeat\n\n"


def event_stream(
    events: AsyncGenerator[tuple[str, Any], None], heartbeat_seconds: float = HEARTBEAT_SECONDS
) -> StreamingResponse:
    return StreamingResponse(
        _encoded(_with_heartbeats(events, heartbeat_seconds)),
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


async def _with_heartbeats(
    events: AsyncGenerator[tuple[str, Any], None], seconds: float
) -> AsyncGenerator[tuple[str, Any] | None, None]:
    """``events``, with ``None`` after each ``seconds`` without one. The wait for the next event is a task
    left running across heartbeats (a timeout would cancel it, and with it the gRPC stream). When the
    reader stops, ``events`` is closed at once (cancelling its gRPC stream), not whenever it is collected."""
    next_event: asyncio.Task[tuple[str, Any]] | None = None
    try:
        while True:
            if next_event is None:
                next_event = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({next_event}, timeout=seconds)
            if not done:
                yield None
                continue
            try:
                event = next_event.result()
            except StopAsyncIteration:
                return
            next_event = None
            yield event
    finally:
        if next_event is not None:
            next_event.cancel()
            await asyncio.gather(next_event, return_exceptions=True)
        await events.aclose()


async def _encoded(events: AsyncGenerator[tuple[str, Any] | None, None]) -> AsyncIterator[bytes]:
    yield f"retry: {RECONNECT_MILLISECONDS}\n\n".encode()
    try:
        async with aclosing(events):
            async for event in events:
                if event is None:
                    yield HEARTBEAT
                    continue
                name, data = event
                yield f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
    except CallFailed as failure:
        if failure.code is grpc.StatusCode.UNAUTHENTICATED:
            said = "your key is no longer valid: sign in again"
        else:
            said = f"the {failure.service} service answered {failure.status.reason}: {failure.status.message}"
        yield f"event: failed\ndata: {json.dumps({'message': said})}\n\n".encode()
        return
    yield b"event: end\ndata: {}\n\n"


async def queue_events(client: UserClient, queue: str) -> AsyncGenerator[tuple[str, Any], None]:
    """The queue's items and agents from WatchQueue, and whether it is paused. WatchQueue carries no queue
    settings, so each of its messages (a pause changes every pending item's reason) is followed by a GetQueue,
    and ``queue`` is sent when ``paused`` changed: at most WatchQueue's 5 messages a second, never a poll."""
    paused: bool | None = None
    async for change in client.watch_queue(queue):
        yield (
            "snapshot" if change.snapshot else "changes",
            {
                "snapshot_done": change.snapshot_done,
                "items": [views.item_view(item).as_json() for item in change.items],
                "agents": [views.agent_view(agent).as_json() for agent in change.agents],
                "removed_agents": [views.last_segment(name) for name in change.removed_agents],
            },
        )
        if not change.snapshot or change.snapshot_done:
            now = (await client.get_queue(queue)).paused
            if now != paused:
                paused = now
                yield "queue", {"paused": paused}


async def item_events(client: UserClient, item: str) -> AsyncGenerator[tuple[str, Any], None]:
    async for change in client.watch_item(item):
        yield "item", views.item_view(change.item).as_json()


async def metric_events(client: UserClient, run: str) -> AsyncGenerator[tuple[str, Any], None]:
    async for rows in client.read_metrics(run, max_points=CHART_POINTS, follow=True):
        yield "rows", views.metric_rows(rows)
    yield "run", _run_json(await client.get_run(run))


async def attempt_metric_events(client: UserClient, run: str) -> AsyncGenerator[tuple[str, Any], None]:
    """The rows of each attempt's run, ``run``'s earlier attempts first (``resumed_from``), each attempt's
    rows after a ``segment`` event naming it, so the page draws one line per metric with a segment per
    attempt. Only ``run`` is followed: the earlier ones ended before it began."""
    chain, _ = await client.run_attempts(await client.get_run(run))
    *earlier, current = chain
    for attempt in earlier:
        yield "segment", views.attempt_segment(attempt)
        async for rows in client.read_metrics(attempt.name, max_points=CHART_POINTS, follow=False):
            yield "rows", views.metric_rows(rows)
    yield "segment", views.attempt_segment(current)
    async for event in metric_events(client, current.name):
        yield event


async def log_events(client: UserClient, run: str) -> AsyncGenerator[tuple[str, Any], None]:
    async for lines in client.read_logs(run, tail=LOG_TAIL, follow=True):
        yield "lines", views.log_lines(lines)


def _run_json(run: runs_pb2.Run) -> dict[str, Any]:
    view = views.run_view(run)
    return {
        "state": view.state,
        "state_words": view.state_words,
        "exit_code": view.exit_code,
        "failure": view.failure,
        "summary": view.summary,
    }
