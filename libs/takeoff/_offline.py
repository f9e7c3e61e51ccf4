"""Offline mode: a run written to a local directory, for ``takeoff sync`` to upload later.

``open_offline_run`` makes ``{dir}/takeoff/offline-run-{YYYYmmdd_HHMMSS}-{id}/`` holding:

- ``run.json``: what CreateRun and AttachRun need (project, id, display name, tags, notes, group, job
  type, config), the SDK version and the format version. Written whole before anything else (a temporary
  file renamed into place), so a run directory always has a complete header.
- ``rows.jsonl``: one ``run.log`` row per line, ``{"step": ..., "time_ns": ..., "values": {...}}``.
- ``events.jsonl``: one change per line, in order: ``{"summary": {...}}``, ``{"config": {...}}`` (a null
  value removes a key), and last ``{"finish": {"state": ..., "exit_code": ..., "message": ...}}``.

Both files are only appended to, and a background thread hands what it wrote to the operating system
every ``interval``, so a process killed mid-run leaves everything up to its last round: at worst the last
line is cut short, and readers ignore it. A run with no ``finish`` line was not finished by the SDK;
``takeoff sync`` uploads it as CRASHED. ``close`` fsyncs both files. While a process writes a run it holds
a lock on ``events.jsonl`` (``flock``, dropped by the system when the process ends however it ends), and
``takeoff sync`` refuses a run whose lock is held rather than upload half of it.

The run id is made like the registry's own (12 random lowercase letters and digits), so ``takeoff sync``
creates the run under the same id, and syncing again finds it rather than making a second one.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import string
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from takeoff import __version__
from takeoff._delivery import LoggedRow, MetricSummaries, warn
from takeoff._values import RunState, jsonable, struct_to_dict
from takeoff.v1 import runs_pb2

FORMAT_VERSION = 1
HEADER_FILE = "run.json"
ROWS_FILE = "rows.jsonl"
EVENTS_FILE = "events.jsonl"
RUN_DIRECTORY_PREFIX = "offline-run-"
_RUN_ID_ALPHABET = string.ascii_lowercase + string.digits
_RUN_ID_LENGTH = 12
_encode = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON; NaN and infinities as JSON's common extension (NaN, Infinity), which json.loads reads."""


class OfflineRunError(Exception):
    """A directory is not an offline run this SDK can read."""


def open_offline_run(
    directory: str | os.PathLike[str], project: str, run: runs_pb2.Run, *, interval: float = 0.2
) -> tuple[runs_pb2.Run, OfflineWriter]:
    """Start writing ``run`` (display name, tags, notes, group, job type, config) under ``directory``.

    Returns the run as the SDK sees it (named, RUNNING, started now) and the delivery that writes its rows,
    summary, config changes and final state.
    """
    run_id = "".join(secrets.choice(_RUN_ID_ALPHABET) for _ in range(_RUN_ID_LENGTH))
    now_ns = time.time_ns()
    started = datetime.fromtimestamp(now_ns / 1e9).strftime("%Y%m%d_%H%M%S")
    run_directory = Path(directory) / "takeoff" / f"{RUN_DIRECTORY_PREFIX}{started}-{run_id}"
    run_directory.mkdir(parents=True)
    header = {
        "format": FORMAT_VERSION,
        "sdk_version": __version__,
        "project": project,
        "id": run_id,
        "display_name": run.display_name,
        "tags": list(run.tags),
        "notes": run.notes,
        "group": run.group,
        "job_type": run.job_type,
        "config": struct_to_dict(run.config),
        "start_time_ns": now_ns,
    }
    write_atomically(run_directory / HEADER_FILE, json.dumps(header, indent=2) + "\n")
    started_run = runs_pb2.Run()
    started_run.CopyFrom(run)
    started_run.name = f"projects/{project}/runs/{run_id}"
    started_run.state = RunState.RUNNING._to_proto()
    started_run.create_time.FromNanoseconds(now_ns)
    started_run.start_time.FromNanoseconds(now_ns)
    return started_run, OfflineWriter(run_directory, interval=interval)


class OfflineWriter:
    """The :class:`takeoff._delivery.Delivery` of an offline run: appends to its files in the background."""

    def __init__(self, run_directory: Path, *, interval: float) -> None:
        self.rows: deque[LoggedRow] = deque()
        self.directory = run_directory
        self._rows_file = open(run_directory / ROWS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._events_file = open(run_directory / EVENTS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        # Held while this process writes the run (the system drops it when the process ends, killed or not):
        # a sync meanwhile would upload half a run.
        fcntl.flock(self._events_file, fcntl.LOCK_EX)
        self._summaries = MetricSummaries()
        self._events: list[dict[str, Any]] = []
        self._events_lock = threading.Lock()
        self._interval = interval
        self._wake = threading.Event()
        self._closing = False
        self._warned = False
        self._failed = False
        self._thread = threading.Thread(target=self._write_until_closed, name="takeoff-offline", daemon=True)
        self._thread.start()

    def update_summary(self, changes: Mapping[str, Any]) -> None:
        self._summaries.set_explicitly(changes)
        with self._events_lock:
            self._events.append({"summary": dict(changes)})

    def update_config(self, changes: Mapping[str, Any]) -> None:
        with self._events_lock:
            self._events.append({"config": dict(changes)})

    def define_metric(self, name: str, summary: str | None, step_metric: str | None) -> None:
        self._summaries.define(name, summary, step_metric)

    def close(self, finish: runs_pb2.FinishRunRequest, timeout: float) -> None:
        """Write what is buffered and the final state, fsync, and tell the user how to upload the run."""
        final: dict[str, Any] = {
            "state": RunState._from_proto(finish.state).value,
            "exit_code": finish.exit_code if finish.HasField("exit_code") else None,
            "message": finish.message,
        }
        with self._events_lock:
            self._events.append({"finish": final})
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            warn(f"could not finish writing the offline run in {self.directory} within {timeout:g}s")
        elif not self._failed:  # a failure was said when it happened
            warn(
                f"the run is saved offline in {self.directory}; upload it with: takeoff sync {self.directory}"
            )

    def _write_until_closed(self) -> None:
        try:
            while True:
                self._wake.wait(self._interval)
                closing = self._closing  # read before the last round, so nothing logged before close is left
                self._write_round()
                if closing:
                    break
            for file in (self._rows_file, self._events_file):
                os.fsync(file.fileno())
                file.close()
        except OSError as error:  # a full disk, say: the job goes on, the run's data stops here
            self._failed = True
            warn(f"cannot write the offline run in {self.directory}: {error}")

    def _write_round(self) -> None:
        lines = []
        take = self.rows.popleft
        for _ in range(len(self.rows)):
            step, time_ns, values = take()
            self._summaries.observe(values)
            try:
                # Formatted here rather than by json for the whole object: a third less time per row.
                lines.append(f'{{"step":{step},"time_ns":{time_ns},"values":{_encode(values)}}}\n')
            except Exception as error:  # whatever a logged value does, this thread must go on
                self._warn_once(f"dropped a metric row that cannot be stored ({error!r})")
        _append(self._rows_file, lines)
        metric_summaries = self._summaries.take_changes()
        with self._events_lock:
            events, self._events = self._events, []
        if metric_summaries:
            events.insert(0, {"summary": metric_summaries})
        _append(self._events_file, [_json_line(jsonable(event)) for event in events])

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warn(message)


@dataclass
class OfflineRun:
    """An offline run directory as read back: its header and the net effect of its events."""

    directory: Path
    project: str
    run_id: str
    display_name: str
    tags: list[str]
    notes: str
    group: str
    job_type: str
    config: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    finish: dict[str, Any] | None = None
    """The final state the SDK recorded; None when the process ended without one."""

    def rows(self) -> Iterator[LoggedRow]:
        """The rows in the order they were logged (a line the writer did not complete is left out)."""
        for record in _records(self.directory / ROWS_FILE):
            yield record["step"], record["time_ns"], record["values"]


def is_offline_run(directory: Path) -> bool:
    return (directory / HEADER_FILE).is_file()


def read_offline_run(directory: Path) -> OfflineRun:
    """The run written in ``directory``; raises OfflineRunError when it is not an offline run."""
    try:
        header = json.loads((directory / HEADER_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OfflineRunError(f"{directory} is not an offline run (it has no {HEADER_FILE})") from None
    except (OSError, ValueError) as error:
        raise OfflineRunError(f"cannot read {directory / HEADER_FILE}: {error}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        found = header.get("format") if isinstance(header, dict) else None
        raise OfflineRunError(
            f"{directory} holds an offline run in format {found!r}; this SDK reads format {FORMAT_VERSION}"
        )
    _refuse_if_being_written(directory)
    try:
        run = OfflineRun(
            directory=directory,
            project=header["project"],
            run_id=header["id"],
            display_name=header["display_name"],
            tags=header["tags"],
            notes=header["notes"],
            group=header["group"],
            job_type=header["job_type"],
            config=header["config"],
        )
    except KeyError as missing:
        raise OfflineRunError(f"{directory / HEADER_FILE} has no {missing}") from None
    for event in _records(directory / EVENTS_FILE):
        if "summary" in event:
            _merge(run.summary, event["summary"])
        elif "config" in event:
            _merge(run.config, event["config"])
        elif "finish" in event:
            run.finish = event["finish"]
    return run


def _refuse_if_being_written(directory: Path) -> None:
    try:
        events = open(directory / EVENTS_FILE, encoding="utf-8")  # noqa: SIM115
    except FileNotFoundError:
        return
    with events:
        try:
            fcntl.flock(events, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OfflineRunError(
                f"{directory} is still being written by a running job; sync it once the job has ended"
            ) from None


def _records(path: Path) -> Iterator[Any]:
    """The JSON lines of ``path``, leaving out a last line cut short by a crash."""
    try:
        file = open(path, encoding="utf-8")  # noqa: SIM115
    except FileNotFoundError:  # killed before the writer thread created it
        return
    with file:
        for number, line in enumerate(file, 1):
            if not line.endswith("\n"):
                return  # the last line, torn
            try:
                yield json.loads(line)
            except ValueError as error:
                raise OfflineRunError(f"{path}:{number} is not a JSON line: {error}") from None


def _merge(values: dict[str, Any], changes: Mapping[str, Any]) -> None:
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value


def _json_line(value: Any) -> str:
    return _encode(value) + "\n"


def _append(file: IO[str], lines: list[str]) -> None:
    if lines:
        file.write("".join(lines))
        file.flush()  # to the operating system: a killed process loses nothing it wrote


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    temporary.rename(path)
