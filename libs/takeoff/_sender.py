"""The background thread that delivers a run's metrics, summary and final state to the registry.

``run.log`` only appends ``(step, time_ns, values)`` to :attr:`RunSender.rows`, a deque (appending is
atomic, so the training thread takes no lock and builds no protobuf). Every ``interval`` the thread drains
the deque into ``BatchLogMetrics`` calls, turning values into ``MetricRow`` messages and metric summaries
(``takeoff._delivery.MetricSummaries``) as it goes, then sends the summary keys changed since the last round
in one ``UpdateSummary`` and the config keys changed in one ``UpdateRunConfig``.

Delivery is exactly once: each batch carries the history index of its first row (``first_row_index``),
so a batch resent after a lost reply is skipped by the registry rather than stored twice. While the
registry is unreachable, calls are retried with exponential backoff and the rows stay in memory; the job
is told once on stderr and never sees an exception. A call the registry refuses as rate limited
(``RATE_LIMITED``: the run logs more rows per second than it accepts) is sent again after the wait the
registry names, with jitter: the rows are delivered late, never dropped.

A traced job (``takeoff._trace``) records each batch delivered as a ``takeoff.batch`` span; the last
round and ``FinishRun`` go under the ``takeoff.finish`` span that ``close`` was called in.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from google.protobuf.message import Message

from takeoff import _trace
from takeoff._delivery import LoggedRow, MetricSummaries, warn
from takeoff._run_calls import R, RunCalls, call_retrying
from takeoff._values import dict_to_struct
from takeoff.errors import TakeoffError
from takeoff.v1 import runs_pb2
from takeoff_rpc.backoff import RetryPolicy, jitter_rng

MAX_ROWS_PER_BATCH = 10_000  # the registry's limit per call
MAX_BATCH_BYTES = 2 * 1024 * 1024  # well under gRPC's 4 MiB default message limit
CALL_TIMEOUT = 10.0
RATE_LIMITED_MAX_WAIT = 10.0
"""The longest wait before resending a rate-limited call, whatever the registry says to wait."""
RATE_LIMITED_MIN_WAIT = 0.01


class _GaveUp(Exception):
    """The flush deadline passed while the registry was still unreachable."""


class RunSender:
    """The :class:`takeoff._delivery.Delivery` to the registry: ``close`` flushes everything, then
    finishes the run."""

    def __init__(
        self, calls: RunCalls, run_name: str, *, first_row_index: int, interval: float = 0.2
    ) -> None:
        """``calls`` are closed with the sender."""
        self.rows: deque[LoggedRow] = deque()
        self.dropped_rows = 0
        self._calls = calls
        self._run_name = run_name
        self._next_row_index = first_row_index
        self._interval = interval
        self._summaries = MetricSummaries()
        self._summary_changes: dict[str, Any] = {}
        self._config_changes: dict[str, Any] = {}
        self._changes_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._finish_request: runs_pb2.FinishRunRequest | None = None
        self._finish_span: object | None = None
        self._give_up_at = math.inf
        self._unreachable_since: float | None = None
        self._warned_about: set[str] = set()
        self._thread = threading.Thread(target=self._deliver_until_closed, name="takeoff-sender", daemon=True)
        self._thread.start()

    def update_summary(self, changes: Mapping[str, Any]) -> None:
        self._summaries.set_explicitly(changes)
        with self._changes_lock:
            self._summary_changes.update(changes)

    def update_config(self, changes: Mapping[str, Any]) -> None:
        with self._changes_lock:
            self._config_changes.update(changes)

    def define_metric(self, name: str, summary: str | None, step_metric: str | None) -> None:
        self._summaries.define(name, summary, step_metric)

    def close(self, finish: runs_pb2.FinishRunRequest, timeout: float) -> None:
        """Deliver what is buffered, then ``finish``; give up (with a warning) after ``timeout`` s."""
        self._finish_request = finish
        self._finish_span = _trace.current()
        self._give_up_at = time.monotonic() + timeout
        self._closing = True
        self._wake.set()
        self._thread.join(timeout + CALL_TIMEOUT)
        self._calls.close()
        undelivered = self.dropped_rows + len(self.rows)
        if undelivered:
            warn(f"{undelivered} metric rows of {self._run_name} could not be delivered")

    def _deliver_until_closed(self) -> None:
        while True:
            self._wake.wait(self._interval)
            closing = self._closing  # read before the last flush, so nothing logged before close is left
            try:
                with _trace.within(self._finish_span if closing else None):
                    self._flush()
                    if closing and self._finish_request is not None:
                        self._send("FinishRun", self._finish_request, runs_pb2.FinishRunResponse)
            except _GaveUp:
                warn(f"gave up on the registry; {self._run_name} may not be marked finished")
                return
            except TakeoffError as error:
                self._warn_once(error.reason, f"the registry refused to finish {self._run_name}: {error}")
            if closing:
                return

    def _flush(self) -> None:
        while self.rows:
            request = self._next_batch()
            if request.rows:
                self._deliver_rows(request)
        metric_summaries = self._summaries.take_changes()
        with self._changes_lock:
            # The code's own summary values win over metric summaries of the same keys.
            summary = {**metric_summaries, **self._summary_changes}
            config = self._config_changes
            self._summary_changes, self._config_changes = {}, {}
        if summary:
            summary_request = runs_pb2.UpdateSummaryRequest(
                name=self._run_name, summary=dict_to_struct(summary)
            )
            self._send_changes("UpdateSummary", summary_request, runs_pb2.UpdateSummaryResponse, "summary")
        if config:
            config_request = runs_pb2.UpdateRunConfigRequest(
                name=self._run_name, config=dict_to_struct(config)
            )
            self._send_changes("UpdateRunConfig", config_request, runs_pb2.UpdateRunConfigResponse, "config")

    def _send_changes(self, method: str, request: Message, response: type[Message], what: str) -> None:
        """Send a summary or config change; a refusal (``CONFIG_KEY_READ_ONLY``, a registry too old for
        ``UpdateRunConfig``...) is said once, never raised into the training code."""
        try:
            self._send(method, request, response)
        except TakeoffError as error:
            self._warn_once(error.reason, f"the registry refused the {what} of {self._run_name}: {error}")

    def _next_batch(self) -> runs_pb2.BatchLogMetricsRequest:
        request = runs_pb2.BatchLogMetricsRequest(name=self._run_name)
        add_row = request.rows.add
        take = self.rows.popleft
        size = 0
        for _ in range(min(len(self.rows), MAX_ROWS_PER_BATCH)):
            step, time_ns, values = take()
            row = add_row()
            try:
                self._summaries.observe(values)  # first: it may add the step metric to the row
                _fill_row(row, step, time_ns, values)
            except Exception as error:  # whatever a logged value does, this thread must go on
                del request.rows[-1]
                self.dropped_rows += 1
                self._warn_once("bad row", f"dropped a metric row that cannot be stored ({error!r})")
                continue
            size += row.ByteSize()
            if size >= MAX_BATCH_BYTES:
                break
        return request

    def _deliver_rows(self, request: runs_pb2.BatchLogMetricsRequest) -> None:
        request.first_row_index = self._next_row_index
        try:
            try:
                with _trace.span(
                    "takeoff.batch",
                    client=True,
                    **{
                        "rpc.system": "grpc",
                        "rpc.service": "takeoff.v1.RunService",
                        "rpc.method": "BatchLogMetrics",
                        "takeoff.rows": len(request.rows),
                        "takeoff.first_row_index": request.first_row_index,
                    },
                ):
                    self._send("BatchLogMetrics", request, runs_pb2.BatchLogMetricsResponse)
            except TakeoffError as error:
                if error.reason != "SEQUENCE_GAP":
                    raise
                # The registry has fewer rows than it acknowledged (restored from a backup, say): continue
                # from what it has rather than failing every batch from now on.
                request.first_row_index = int(error.metadata["length"])
                lost = self._next_row_index - request.first_row_index
                warn(f"the registry lost {lost} metric rows of {self._run_name} it had stored; continuing")
                self._send("BatchLogMetrics", request, runs_pb2.BatchLogMetricsResponse)
        except TakeoffError as error:
            self.dropped_rows += len(request.rows)
            self._warn_once(error.reason, f"the registry refused metrics of {self._run_name}: {error}")
            return
        except _GaveUp:
            self.dropped_rows += len(request.rows)
            raise
        self._next_row_index = request.first_row_index + len(request.rows)

    def _send(self, method: str, request: Message, response: type[R]) -> R:
        """Call until it succeeds, retrying errors that may pass and waiting out rate limits; raise
        TakeoffError for errors that won't pass.

        Retries go on until ``close``'s deadline, which may be set while they do: each attempt checks it.
        """
        while True:
            try:
                return self._send_retrying(method, request, response)
            except TakeoffError as error:
                if error.reason != "RATE_LIMITED":
                    raise
                self._warn_once(
                    error.reason,
                    f"the registry is rate limiting {self._run_name} ({error.message}); "
                    "slowing down, nothing is dropped",
                )
                self._wait_out(error)

    def _wait_out(self, error: TakeoffError) -> None:
        """Sleep as long as a rate-limit refusal says, with up to 20% more so that writers refused together
        spread out; raise _GaveUp if ``close``'s deadline comes first."""
        try:
            hint = float(error.metadata.get("retry_after_seconds", "1"))
        except ValueError:
            hint = 1.0
        if not math.isfinite(hint):
            hint = RATE_LIMITED_MAX_WAIT
        delay = min(RATE_LIMITED_MAX_WAIT, max(RATE_LIMITED_MIN_WAIT, hint)) * jitter_rng.uniform(1.0, 1.2)
        until = time.monotonic() + delay
        while (now := time.monotonic()) < until:
            if until > self._give_up_at:
                raise _GaveUp
            # Short sleeps: ``close`` may bring the deadline forward meanwhile.
            time.sleep(min(until - now, 0.25))

    def _send_retrying(self, method: str, request: Message, response: type[R]) -> R:
        """Call until it succeeds, retrying errors that may pass; raise TakeoffError for those that won't."""

        def timeout() -> float:
            left = self._give_up_at - time.monotonic()
            if left <= 0:
                raise _GaveUp
            # The calls wait for a restarting registry to come back within this instead of failing at
            # once. Every call here is safe to repeat.
            return min(CALL_TIMEOUT, left)

        # Waits of at most a second: ``close`` may bring the deadline forward while one is under way.
        policy = RetryPolicy(max_delay=1.0, deadline=self._give_up_at - time.monotonic())
        try:
            reply = call_retrying(
                self._calls,
                method,
                request,
                response,
                policy=policy,
                timeout=timeout,
                on_retry=self._report_unreachable,
            )
        except TakeoffError as error:
            if error.retryable:
                raise _GaveUp from None
            raise
        if self._unreachable_since is not None:
            warn(f"reached the registry again after {time.monotonic() - self._unreachable_since:.1f}s")
            self._unreachable_since = None
        return reply

    def _report_unreachable(self, error: TakeoffError, failed_attempts: int, delay: float) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            warn(f"cannot reach the registry ({error}); keeping the run's data and retrying")

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned_about:
            self._warned_about.add(topic)
            warn(message)


def _fill_row(row: runs_pb2.MetricRow, step: int, time_ns: int, values: Mapping[str, Any]) -> None:
    """Numbers go to ``values``, the rest (strings, booleans, None, lists, dicts: checked by ``run.log``)
    to ``data``."""
    row.step = step
    row.time.seconds, row.time.nanos = divmod(time_ns, 1_000_000_000)
    numbers = row.values
    data: dict[str, Any] = {}
    for key, value in values.items():
        kind = type(value)
        if kind is float or kind is int:
            numbers[key] = value
        else:
            data[key] = value
    if data:
        row.data.update(data)
