"""``takeoff sync``: upload runs written in offline mode (``takeoff._offline``), each exactly once.

Every call is one the registry answers the same way when it is sent again, so a sync that stopped half way
(a crash, a lost connection) is finished by running it again:

- CreateRun names the run by its offline id, with a request id made from its name: a retry returns the run
  the first attempt made, and ALREADY_EXISTS means an earlier sync made it.
- AttachRun records the config as it ended up (the offline config changes folded in), the display name,
  tags, notes, group and job type. RUN_ALREADY_ATTACHED means an earlier sync got this far.
- BatchLogMetrics sends the rows in order, numbered from 0 (``first_row_index``): the registry skips the
  rows it has already.
- UpdateSummary merges the summary as it ended up, and FinishRun records the final state: CRASHED when the
  process ended without one.

RUN_ENDED on any call before FinishRun means that another sync (an earlier one, or one running now) got to
its last call, so everything is uploaded already.

Then ``synced.json`` is written in the run's directory, and later syncs of it make no call at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc

from takeoff._delivery import LoggedRow
from takeoff._offline import (
    RUN_DIRECTORY_PREFIX,
    OfflineRun,
    OfflineRunError,
    is_offline_run,
    read_offline_run,
    write_atomically,
)
from takeoff._sender import MAX_BATCH_BYTES, MAX_ROWS_PER_BATCH, RATE_LIMITED_MAX_WAIT, _fill_row
from takeoff._values import RunState, dict_to_struct
from takeoff.client import Client
from takeoff.errors import TakeoffError
from takeoff.v1 import runs_pb2
from takeoff_rpc.backoff import RetryPolicy
from takeoff_rpc.retries import call_with_retries

SYNCED_FILE = "synced.json"
CRASHED: dict[str, Any] = {
    "state": "CRASHED",
    "exit_code": None,
    "message": "the job ended without finishing the run",
}
"""The final state of an offline run whose job ended without one (killed, say)."""
RETRY_SECONDS = 5.0
"""How long a call is sent again while the registry is unreachable, before the sync gives up."""
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


@dataclass(frozen=True)
class SyncResult:
    """What syncing one offline run directory did."""

    directory: Path
    run: str
    """The run's resource name, ``projects/{project}/runs/{id}``."""
    rows: int
    state: RunState
    already_synced: bool
    """True when an earlier sync finished: nothing was sent this time."""
    finished_offline: bool
    """False when the job ended without finishing the run, which was then synced as CRASHED."""


def find_offline_runs(path: Path) -> list[Path]:
    """``path`` if it is an offline run, else the offline runs it holds (also under ``path/takeoff``)."""
    if is_offline_run(path):
        return [path]
    found = [
        candidate
        for pattern in (f"{RUN_DIRECTORY_PREFIX}*", f"takeoff/{RUN_DIRECTORY_PREFIX}*")
        for candidate in sorted(path.glob(pattern))
        if is_offline_run(candidate)
    ]
    if not found:
        raise OfflineRunError(
            f"{path} is not an offline run, nor a directory holding {RUN_DIRECTORY_PREFIX}* run directories"
        )
    return found


def sync_run(directory: Path, client: Client, *, project: str | None = None) -> SyncResult:
    """Upload the offline run in ``directory`` (into ``project`` instead of its own, if given)."""
    if (marker := _read_marker(directory)) is not None:
        return marker
    offline = read_offline_run(directory)
    name = f"projects/{project or offline.project}/runs/{offline.run_id}"
    uploader = _Uploader(client, name)
    uploader.create(offline)
    try:
        uploader.attach(offline)
        uploader.send_rows(offline.rows())
        if offline.summary:
            uploader.update_summary(offline)
    except TakeoffError as error:
        if error.reason != "RUN_ENDED":  # another sync got to FinishRun: everything is uploaded
            raise
    finished = uploader.finish(offline)
    result = SyncResult(
        directory,
        name,
        rows=finished.history_length,
        state=RunState._from_proto(finished.state),
        already_synced=False,
        finished_offline=offline.finish is not None,
    )
    _write_marker(result)
    return result


class _Uploader:
    """The calls that upload one offline run, each retried while the registry is unreachable."""

    def __init__(self, client: Client, name: str) -> None:
        self._stub = client._runs
        self._registry = client.registry
        self._name = name

    def create(self, offline: OfflineRun) -> None:
        project, run_id = self._name.split("/")[1], offline.run_id
        request = runs_pb2.CreateRunRequest(
            parent=f"projects/{project}",
            run_id=run_id,
            run=runs_pb2.Run(display_name=offline.display_name),
            request_id=f"takeoff-sync:{self._name}",
        )
        try:
            self._call(self._stub.CreateRun, request)
        except TakeoffError as error:
            if error.reason != "RUN_ALREADY_EXISTS":  # an earlier sync created it
                raise

    def attach(self, offline: OfflineRun) -> None:
        request = runs_pb2.AttachRunRequest(
            name=self._name,
            config=dict_to_struct(offline.config),
            display_name=offline.display_name,
            tags=offline.tags,
            notes=offline.notes,
            group=offline.group,
            job_type=offline.job_type,
        )
        try:
            self._call(self._stub.AttachRun, request)
        except TakeoffError as error:
            if error.reason != "RUN_ALREADY_ATTACHED":  # an earlier sync got this far
                raise

    def send_rows(self, rows: Iterable[LoggedRow]) -> None:
        """Send every row, numbered from 0 so that the registry skips those it has already."""
        sent = 0
        for batch in _batches(self._name, rows):
            batch.first_row_index = sent
            self._call(self._stub.BatchLogMetrics, batch)
            sent += len(batch.rows)

    def update_summary(self, offline: OfflineRun) -> None:
        request = runs_pb2.UpdateSummaryRequest(name=self._name, summary=dict_to_struct(offline.summary))
        self._call(self._stub.UpdateSummary, request)

    def finish(self, offline: OfflineRun) -> runs_pb2.Run:
        """End the run as the job did (CRASHED if it did not); the run as the registry has it then."""
        final = offline.finish or CRASHED
        request = runs_pb2.FinishRunRequest(
            name=self._name, state=RunState(final["state"])._to_proto(), message=final["message"]
        )
        if final["exit_code"] is not None:
            request.exit_code = final["exit_code"]
        return self._call(self._stub.FinishRun, request).run

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        """Call until answered: unreachable, retried for RETRY_SECONDS; rate limited, after the wait the
        registry names. Raises TakeoffError for other refusals."""
        policy = RetryPolicy(deadline=RETRY_SECONDS)
        while True:
            try:
                return call_with_retries(lambda: method(request, timeout=RETRY_SECONDS), policy)
            except grpc.RpcError as rpc_error:
                error = TakeoffError.from_rpc_error(rpc_error, target=self._registry)
            if error.reason != "RATE_LIMITED":
                raise error
            time.sleep(min(RATE_LIMITED_MAX_WAIT, float(error.metadata.get("retry_after_seconds", "1"))))


def _batches(name: str, rows: Iterable[LoggedRow]) -> Iterator[runs_pb2.BatchLogMetricsRequest]:
    """The rows as BatchLogMetrics requests within the registry's limits."""
    batch, size = runs_pb2.BatchLogMetricsRequest(name=name), 0
    for step, time_ns, values in rows:
        row = batch.rows.add()
        _fill_row(row, step, time_ns, values)
        size += row.ByteSize()
        if len(batch.rows) == MAX_ROWS_PER_BATCH or size >= MAX_BATCH_BYTES:
            yield batch
            batch, size = runs_pb2.BatchLogMetricsRequest(name=name), 0
    if batch.rows:
        yield batch


def _read_marker(directory: Path) -> SyncResult | None:
    try:
        marker = json.loads((directory / SYNCED_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise OfflineRunError(f"cannot read {directory / SYNCED_FILE}: {error}") from None
    try:
        return SyncResult(
            directory,
            marker["run"],
            marker["rows"],
            RunState(marker["state"]),
            already_synced=True,
            finished_offline=marker["finished_offline"],
        )
    except (KeyError, ValueError) as error:
        raise OfflineRunError(f"{directory / SYNCED_FILE} is not a sync record ({error!r})") from None


def _write_marker(result: SyncResult) -> None:
    marker = {
        "run": result.run,
        "rows": result.rows,
        "state": result.state.value,
        "finished_offline": result.finished_offline,
        "sync_time": datetime.now(UTC).isoformat(),
    }
    write_atomically(result.directory / SYNCED_FILE, json.dumps(marker, indent=2) + "\n")
