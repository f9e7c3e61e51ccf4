"""A local copy of the Jobs or pods that carry this agent's label, kept current by list and watch.

One thread per kind: list (its resourceVersion says how current it is), then watch from that
resourceVersion; a watch that ends or drops resumes from the last resourceVersion seen (an event's or a
bookmark's), so no change is missed or seen twice; a resourceVersion the server no longer keeps (410 Gone)
means list again. Objects deleted since are kept a while, so a job's end can still be read from its pod.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import urllib3

from takeoff_agent.runners.base import RunnerUnavailable
from takeoff_agent.runners.kubernetes.api import ApiError, JsonObject, KubeApi, interrupt, lines

logger = logging.getLogger(__name__)

WATCH_SECONDS = 300
"""How long the server keeps one watch open before the informer opens the next (from the same point)."""
RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 10.0
GONE_KEPT = 1000
"""Deleted objects remembered (the newest), for jobs that read how they ended after the fact."""
GONE = 410


class _Expired(Exception):
    """The resourceVersion to watch from is older than the server keeps: list again."""


class Informer:
    def __init__(
        self,
        api: KubeApi,
        kind: str,
        namespace: str,
        selector: str,
        on_change: Callable[[JsonObject], None],
    ) -> None:
        self._api = api
        self.kind = kind
        self._namespace = namespace
        self._selector = selector
        self._on_change = on_change
        self._lock = threading.Lock()
        self._live: dict[str, JsonObject] = {}
        self._gone: OrderedDict[str, JsonObject] = OrderedDict()
        self._stopping = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"kubernetes-{kind}-informer", daemon=True)
        self.synced = threading.Event()
        """Set once the first list has been read."""
        self.failing_since: float | None = None
        """When calls to the API server began to fail (None: the last one worked)."""
        self.resource_version: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._response is not None:
            interrupt(self._response)

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def select(self, label: str, value: str) -> tuple[list[JsonObject], list[JsonObject]]:
        """The live and the deleted objects whose label ``label`` is ``value``, oldest first."""

        def matching(objects: dict[str, JsonObject]) -> list[JsonObject]:
            found = [o for o in objects.values() if (o["metadata"].get("labels") or {}).get(label) == value]
            return sorted(found, key=lambda o: str(o["metadata"].get("creationTimestamp", "")))

        with self._lock:
            return matching(self._live), matching(dict(self._gone))

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
                failures = 0
            except _Expired:
                self.resource_version = None
            except (RunnerUnavailable, ApiError, OSError, ValueError) as error:
                if self._stopping.is_set():
                    return
                if isinstance(error, ApiError) and error.status == GONE:
                    self.resource_version = None
                    continue
                failures += 1
                if self.failing_since is None:
                    self.failing_since = time.time()
                logger.warning("watching %s failed (%s); trying again", self.kind, error)
                self._stopping.wait(min(MAX_RETRY_SECONDS, RETRY_SECONDS * 2 ** (failures - 1)))

    def _list(self) -> None:
        listing = self._api.list_or_watch(self.kind, self._namespace, self._selector)
        items = {item["metadata"]["name"]: item for item in listing.get("items") or []}
        with self._lock:
            vanished = [self._live[name] for name in self._live.keys() - items.keys()]
            self._live = items
            for obj in vanished:
                self._forget(obj)
        self.resource_version = listing["metadata"]["resourceVersion"]
        self.failing_since = None
        self.synced.set()
        for obj in [*items.values(), *vanished]:
            self._on_change(obj)

    def _forget(self, obj: JsonObject) -> None:
        name = obj["metadata"]["name"]
        self._gone[name] = obj
        self._gone.move_to_end(name)
        while len(self._gone) > GONE_KEPT:
            self._gone.popitem(last=False)

    def _watch(self) -> None:
        response = self._api.list_or_watch(
            self.kind,
            self._namespace,
            self._selector,
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _request_timeout=(10.0, WATCH_SECONDS + 30.0),
        )
        self._response = response
        self.failing_since = None
        try:
            if self._stopping.is_set():
                return
            for line in lines(response):
                self._apply(json.loads(line))
        except urllib3.exceptions.ProtocolError:
            pass  # the stream broke off: watch again from the last resourceVersion seen
        finally:
            self._response = None
            response.close()

    def _apply(self, event: JsonObject) -> None:
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":
            if obj.get("code") == GONE:
                raise _Expired()
            raise ApiError(int(obj.get("code") or 0), str(obj.get("reason", "")), str(obj.get("message", "")))
        self.resource_version = obj["metadata"]["resourceVersion"]
        if kind == "BOOKMARK":
            return
        name = obj["metadata"]["name"]
        with self._lock:
            if kind == "DELETED":
                self._live.pop(name, None)
                self._forget(obj)
            else:
                self._live[name] = obj
                self._gone.pop(name, None)
        self._on_change(obj)
