"""The job's output, followed from its pod's log (stdout and stderr merged, as the kubelet keeps them).

``offset`` counts the lines the attempt has taken. Reading always starts at the beginning of the pod's
log and skips the first ``offset`` lines, so a restarted agent, or a follow that broke off, sends every line
exactly once. (A log the kubelet has rotated since starts later: lines rotated away are then lost.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import urllib3

from takeoff_agent.log_tail import split_long_line
from takeoff_agent.runners.base import RunnerUnavailable
from takeoff_agent.runners.kubernetes.api import ApiError, KubeApi, interrupt, lines

logger = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
MAX_WAITING_LINES = 10_000
"""Lines read ahead of the attempt at most: beyond them the follow waits (the attempt holds back while
earlier lines wait to be sent), so a chatty job with its registry away does not fill the agent's memory."""


class PodLog:
    """A LogSource fed by a thread that follows the pod's log."""

    def __init__(self) -> None:
        self.offset = 0
        self._lock = threading.Condition()
        self._lines: list[str] = []
        """Lines past ``offset`` not taken yet; the last one is incomplete when ``_partial``."""
        self._partial = False
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._response: Any = None
        self.finished = threading.Event()
        """The log has been read to its end (the container ended) or cannot be read any more."""

    def read_lines(self, *, final: bool = False) -> list[str]:
        with self._lock:
            complete = len(self._lines) - (1 if self._partial and not final else 0)
            taken, self._lines = self._lines[:complete], self._lines[complete:]
            self.offset += len(taken)
            if final:
                self._partial = False
            self._lock.notify_all()
        return [piece for line in taken for piece in split_long_line(line)]

    def follow(
        self, api: KubeApi, namespace: str, pod: str, container: str, ended: Callable[[], bool]
    ) -> None:
        """Start following ``pod``'s log, once; ``ended`` says whether the container has ended (a stream that
        stops before then broke off, and is opened again). A log stopped already is not followed: the
        runner's ``close`` stops every log, and a job still observing its pods must not start a follow
        after it, which nothing would stop."""
        if self._thread is None and not self._stopping.is_set():
            self._thread = threading.Thread(
                target=self._follow,
                args=(api, namespace, pod, container, ended),
                name=f"kubernetes-log-{pod}",
                daemon=True,
            )
            self._thread.start()

    @property
    def following(self) -> bool:
        return self._thread is not None

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        if self._response is not None:
            interrupt(self._response)

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the follow to end (after ``stop``)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _follow(
        self, api: KubeApi, namespace: str, pod: str, container: str, ended: Callable[[], bool]
    ) -> None:
        try:
            while not self._stopping.is_set():
                was_ended = ended()  # before reading: a stream that then stops has all there is
                try:
                    response = api.follow_log(namespace, pod, container)
                except ApiError as error:
                    if error.status == 404:
                        return  # the pod is gone, and its log with it
                    logger.info("log of pod %s not readable yet (%s)", pod, error)
                except RunnerUnavailable as error:
                    logger.warning("cannot read the log of pod %s (%s); trying again", pod, error)
                else:
                    self._read(response)
                    if was_ended or self._stopping.is_set():
                        return
                    if ended():
                        continue  # read to the end once more: now nothing can follow
                self._stopping.wait(RETRY_SECONDS)
        finally:
            self.finished.set()

    def _read(self, response: Any) -> None:
        self._response = response
        if self._stopping.is_set():
            # ``stop`` came while the stream was being opened, before it could interrupt it: a follow left
            # reading a log that never ends would outlive the runner.
            self._response = None
            response.close()
            return
        with self._lock:
            skip = self.offset + len(self._lines) - (1 if self._partial else 0)
            if self._partial:
                self._lines.pop()  # read again in full
                self._partial = False
        try:
            for raw in lines(response):
                if skip:
                    skip -= 1
                    continue
                text = raw.decode("utf-8", errors="replace")
                with self._lock:
                    while len(self._lines) >= MAX_WAITING_LINES and not self._stopping.is_set():
                        self._lock.wait()
                    self._lines.append(text.removesuffix("\n"))
                    self._partial = not text.endswith("\n")
        except (urllib3.exceptions.HTTPError, OSError):
            pass  # the follow broke off: opened again from the start, skipping what was read
        finally:
            self._response = None
            response.close()
