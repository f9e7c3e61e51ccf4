"""The console's event streams relay the services' streams as they change: an item page's stream sends the
item at once, then its cancellation, then ``end``; a queue page's stream its snapshot, then the change."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from takeoff.v1 import queue_pb2, queue_pb2_grpc
from takeoff_queue.settings import QueueSettings
from takeoff_rpc.channels import open_channel
from tests.console.conftest import JOB, PROJECT, QUEUE, Console, console_process
from tests.console.test_security import signed_in
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, eventually
from tests.queue.harness import in_process_queue


def events(answer: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a server-sent event stream, each as soon as it arrives."""
    name = ""
    for line in answer.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))


def enqueue(console: Console) -> queue_pb2.Item:
    with open_channel(console.queue, api_key=ADMIN_KEY) as channel:
        request = queue_pb2.EnqueueRequest(queue=QUEUE, job=f"{JOB}/versions/0")
        return queue_pb2_grpc.QueueServiceStub(channel).Enqueue(request, timeout=30).item


def cancel(console: Console, item: str) -> None:
    with open_channel(console.queue, api_key=ADMIN_KEY) as channel:
        queue_pb2_grpc.QueueServiceStub(channel).CancelItem(
            queue_pb2.CancelItemRequest(name=item), timeout=30
        )


def test_an_item_page_stream_sends_the_item_then_each_change_then_ends(console: Console) -> None:
    item = enqueue(console)
    browser = signed_in(console, ADMIN_KEY)
    url = "/" + item.name + "/events"
    with browser.stream("GET", url, headers={"accept": "text/event-stream"}, timeout=60) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        stream = events(answer)
        name, first = next(stream)
        assert (name, first["state"], first["pending_reason"]) == (
            "item",
            "PENDING",
            "No agent serves this queue",
        )
        cancel(console, item.name)
        name, cancelled = next(stream)
        assert (name, cancelled["state"], cancelled["failure"]) == ("item", "CANCELLED", "It was cancelled")
        assert [t["to_state"] for t in cancelled["transitions"]] == ["PENDING", "CANCELLED"]
        assert next(stream)[0] == "end"


def test_a_queue_page_stream_sends_the_open_items_then_the_new_one(console: Console) -> None:
    browser = signed_in(console, ADMIN_KEY)
    url = f"/projects/{PROJECT}/queues/main/events"
    with browser.stream("GET", url, headers={"accept": "text/event-stream"}, timeout=60) as answer:
        stream = events(answer)
        name, change = next(stream)
        while not change["snapshot_done"]:
            name, change = next(stream)
        assert name == "snapshot"
        assert next(stream) == ("queue", {"paused": False})
        item = enqueue(console)
        item_id = item.name.rsplit("/", 1)[1]
        name, change = next(stream)
        while item_id not in [i["id"] for i in change.get("items", [])]:  # each next() waits for an event
            name, change = next(stream)
        assert name == "changes"
        cancel(console, item.name)


async def test_a_page_that_goes_away_ends_its_service_stream(
    services: tuple[ServiceProcess, ServiceProcess, Path], tmp_path: Path
) -> None:
    """The queue service runs in this process here, so that its watchers can be counted: the console's
    WatchQueue must end when the browser leaves, not hold a stream per closed tab."""
    registry = services[0]
    settings = QueueSettings(home=tmp_path, listen=["127.0.0.1:0"], registry_address=registry.address)
    async with in_process_queue(settings) as queue:
        name = await queue.new_queue()
        watchers = queue.parts.dispatcher._queue_watchers
        with console_process(tmp_path, registry.address, queue.address) as console:
            cookies = signed_in(console, ADMIN_KEY).cookies
            async with httpx.AsyncClient(base_url=console.url, cookies=cookies, timeout=60) as browser:
                url = f"/{name}/events"
                async with browser.stream("GET", url, headers={"accept": "text/event-stream"}) as answer:
                    lines = answer.aiter_lines()
                    while not (await anext(lines)).startswith("event: snapshot"):
                        pass
                    assert len(watchers.get(name, ())) == 1
            await eventually(
                lambda: name not in watchers or None, "the queue's watcher of the closed page to end"
            )
