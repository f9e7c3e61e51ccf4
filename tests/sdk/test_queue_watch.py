"""``Client.watch_queue`` and ``takeoff items list --watch`` against a real queue service (WatchQueue), with
a scripted agent coming and going."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from takeoff import Client, ItemState, PendingReason, QueueChange, QueueView
from tests.processes import ServiceProcess
from tests.queue.harness import ScriptedAgent, make_code_job
from tests.sdk.conftest import Takeoff, start_takeoff

WITHIN = 30.0
"""Seconds a test waits for the watch to show a change (the queue pushes one within 200 ms)."""


class Watch:
    """A ``watch_queue`` stream applied to a :class:`QueueView`, read on a worker thread only while a test
    waits for the view to show something."""

    def __init__(self, changes: Iterator[QueueChange]) -> None:
        self.changes = changes
        self.view = QueueView()
        self.received: list[QueueChange] = []

    async def until(self, shown: Callable[[QueueView], bool]) -> None:
        def read() -> None:
            while not shown(self.view):
                change = next(self.changes)
                self.received.append(change)
                self.view.apply(change)

        await asyncio.wait_for(asyncio.to_thread(read), WITHIN)

    def pending(self) -> list[tuple[str, int, PendingReason | None]]:
        return [(item.name, item.position, item.pending_reason) for item in self.view.in_dispatch_order()]


async def test_watch_queue_sends_the_queue_then_each_change(
    client: Client, registry: ServiceProcess, queue_service: ServiceProcess, project: str, tmp_path: Path
) -> None:
    make_code_job(registry.address, project, "train", tmp_path)
    with Client(registry.address, queue=queue_service.address, project=project) as queues:
        queues.create_queue("cpu")
        first, second = (queues.launch("train", "cpu") for _ in range(2))
        watch = Watch(queues.watch_queue("cpu"))
        try:
            await watch.until(lambda view: bool(view.items))
            snapshot = watch.received[0]
            assert snapshot.snapshot
            assert watch.pending() == [
                (first.name, 1, PendingReason.NO_AGENT),
                (second.name, 2, PendingReason.NO_AGENT),
            ]

            await asyncio.to_thread(queues.pause_queue, "cpu")
            await watch.until(lambda view: watch.pending()[0][2] is PendingReason.QUEUE_PAUSED)
            await asyncio.to_thread(queues.cancel_item, first.name)
            await watch.until(lambda view: first.name not in view.items)
            assert watch.pending() == [(second.name, 1, PendingReason.QUEUE_PAUSED)]
            assert any(
                item.state is ItemState.CANCELLED for change in watch.received for item in change.items
            )
            assert not any(change.snapshot for change in watch.received[1:])

            agent = await ScriptedAgent(queue_service.address).connect([f"projects/{project}/queues/cpu"])
            await watch.until(lambda view: f"agents/{agent.agent_id}" in view.agents)
            await agent.close()
            await watch.until(lambda view: not view.agents)
        finally:
            watch.changes.close()  # type: ignore[attr-defined]


async def test_items_list_watch_prints_each_change_until_ctrl_c(
    cli_env: dict[str, str], takeoff: Takeoff, registry: ServiceProcess, project: str, tmp_path: Path
) -> None:
    make_code_job(registry.address, project, "train", tmp_path)
    await asyncio.to_thread(takeoff, "queue", "create", "cpu")
    item = (await asyncio.to_thread(takeoff, "launch", "train", "-q", "cpu")).stdout.strip()
    shown = f"cpu/{item.rsplit('/', 1)[-1]}"
    watching = await start_takeoff(cli_env, "items", "list", "--queue", "cpu", "--watch")
    as_json = await start_takeoff(cli_env, "items", "list", "--queue", "cpu", "--watch", "--json")
    try:
        assert "watching: 1 open items, 0 agents" in await next_line(watching)
        assert (await next_line(watching)).startswith(f"{shown} PENDING #1 no agent: ")
        snapshot = json.loads(await next_line(as_json))
        assert snapshot["snapshot"] is True
        assert [(found["name"], found["position"]) for found in snapshot["items"]] == [(item, 1)]

        await asyncio.to_thread(takeoff, "queue", "pause", "cpu")
        assert (await next_line(watching)).startswith(f"{shown} PENDING #1 paused")
        change = json.loads(await next_line(as_json))
        assert (change["snapshot"], change["items"][0]["pending_reason"]) == (False, "QUEUE_PAUSED")
        await asyncio.to_thread(takeoff, "items", "cancel", item)
        assert await next_line(watching) == f"{shown} CANCELLED"
    finally:
        stopped = [await interrupt(process) for process in (watching, as_json)]
    assert stopped == [(0, ""), (0, "")]


async def test_items_list_watch_on_a_terminal_redraws_one_table(
    cli_env: dict[str, str], takeoff: Takeoff, registry: ServiceProcess, project: str, tmp_path: Path
) -> None:
    make_code_job(registry.address, project, "train", tmp_path)
    await asyncio.to_thread(takeoff, "queue", "create", "cpu", "--paused")
    item_id = (
        (await asyncio.to_thread(takeoff, "launch", "train", "-q", "cpu")).stdout.strip().rsplit("/", 1)[-1]
    )
    terminal = {**cli_env, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "TERM": "xterm"}
    watching = await start_takeoff(terminal, "items", "list", "--queue", "cpu", "--watch")
    try:
        drawn = ""
        while "no agent serves this queue" not in drawn:  # the table's last line, not ended by a newline
            assert watching.stdout is not None
            more = await asyncio.wait_for(watching.stdout.read(4096), WITHIN)
            assert more, f"the command ended: {(await watching.communicate())[1].decode()}"
            drawn += more.decode()
        assert item_id[:8] in drawn
        assert "paused" in drawn
        assert "open items in cpu: 1" in drawn
    finally:
        stopped = await interrupt(watching)
    assert stopped == (0, ""), stopped[1]  # the whole of stderr: CI once saw a thread's traceback there


def test_watch_needs_a_queue(takeoff: Takeoff) -> None:
    refused = takeoff("items", "list", "--watch")

    assert (refused.returncode, refused.stderr) == (
        2,
        "error: --watch follows one queue: give --queue QUEUE\n",
    )


async def next_line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), WITHIN)
    assert line, f"the command ended: {(await process.communicate())[1].decode()}"
    text = line.decode().rstrip("\n")
    # Lines of the line-per-change output begin with the time they were printed.
    return text.split(" ", 1)[1] if text[:2].isdigit() and text[2:3] == ":" else text


async def interrupt(process: asyncio.subprocess.Process) -> tuple[int | None, str]:
    """Ctrl-C the command; its exit code and what it wrote to stderr."""
    process.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(process.communicate(), WITHIN)
    return process.returncode, stderr.decode()
