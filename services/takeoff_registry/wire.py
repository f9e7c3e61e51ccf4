"""Proto conversions the registry's servicers share, and the encoding of stored metric and log chunks.

A chunk's payload is the batch's rows (lines) serialized as field 1 of ``ReadMetricsResponse``
(``ReadLogsResponse``): what arrived is stored as it came, and reading it back is one parse. Indexes and
missing times are not stored per entry; they follow from the chunk's first index and store time. Every
other field travels inside the payload, so a field added to a row or line (a log line's ``rank``) is
stored and read back with no change to the tables.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection, Iterable, Iterator, Sequence

from google.protobuf import timestamp_pb2

from takeoff.v1 import runs_pb2
from takeoff_registry.runs import MAX_METRIC_KEY, Chunk, EncodedBatch
from takeoff_registry.sampling import Column, ColumnsBuilder
from takeoff_server.errors import FieldViolation, InvalidArgument
from takeoff_server.protovalues import timestamp
from takeoff_server.validation import text_problem

MAX_LINE_BYTES = 64 * 1024
MAX_ENTRIES_PER_MESSAGE = 1000
MAX_ROW_DATA_BYTES = 64 * 1024
"""A metric row's ``data`` Struct, encoded."""
_LOG_STREAMS = frozenset(runs_pb2.LogStream.values()) - {runs_pb2.LOG_STREAM_UNSPECIFIED}


# The range google.protobuf.Timestamp may hold (timestamp.proto): 0001-01-01 to 9999-12-31, UTC.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def _time_problem(time: timestamp_pb2.Timestamp) -> str | None:
    if _MIN_SECONDS <= time.seconds <= _MAX_SECONDS and 0 <= time.nanos < 1_000_000_000:
        return None
    return "not a valid google.protobuf.Timestamp (years 1 to 9999, see timestamp.proto)"


def _invalid(violations: list[FieldViolation]) -> InvalidArgument:
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return InvalidArgument(
        "ARGUMENT_INVALID", f"{first.field}: {first.description}{more}", violations=violations
    )


def metric_batch(rows: Sequence[runs_pb2.MetricRow]) -> EncodedBatch:
    """Check a batch of rows and wrap it for the store, with its columns for sampling. One pass over the
    rows, then one per key: this is the hot path."""
    violations: list[FieldViolation] = []
    maps = []
    numeric_keys: set[str] = set()
    columns = ColumnsBuilder()
    max_step = 0
    for position, row in enumerate(rows):
        step = row.step
        if step < 0:
            violations.append(FieldViolation(f"rows[{position}].step", f"must be >= 0 (got {step})"))
        elif step > max_step:
            max_step = step
        values = row.values
        maps.append(values)
        numeric_keys.update(values)
        if row.HasField("time") and (problem := _time_problem(row.time)):
            violations.append(FieldViolation(f"rows[{position}].time", problem))
        if row.HasField("data"):
            data_keys = row.data.fields.keys()
            if clash := data_keys & values.keys():
                violations.append(
                    FieldViolation(f"rows[{position}].data", f"keys {sorted(clash)} are also in values")
                )
            if row.data.ByteSize() > MAX_ROW_DATA_BYTES:
                violations.append(
                    FieldViolation(
                        f"rows[{position}].data", f"must be at most {MAX_ROW_DATA_BYTES} bytes encoded"
                    )
                )
            for key in data_keys:
                columns.add_other(position, key)
    keys = frozenset(numeric_keys.union(columns.columns()))
    violations.extend(
        FieldViolation("rows", f"metric key {key[:40]!r}: {problem}")
        for key in keys
        if (problem := text_problem(key, max_chars=MAX_METRIC_KEY))
    )
    if violations:
        raise _invalid(violations)
    for key in numeric_keys:
        columns.add_numbers(key, [values.get(key) for values in maps])

    def encode(skip: int) -> bytes:
        return runs_pb2.ReadMetricsResponse(rows=rows[skip:]).SerializeToString()

    return EncodedBatch(
        count=len(rows), encode=encode, max_step=max_step, keys=keys, encode_columns=columns.encode
    )


def metric_columns(payload: bytes) -> dict[str, Column]:
    """The columns of a chunk stored without them (before migration 0005), from its rows."""
    rows = runs_pb2.ReadMetricsResponse.FromString(payload).rows
    columns = ColumnsBuilder()
    for position, row in enumerate(rows):
        for key in row.data.fields:
            columns.add_other(position, key)
    for key in {key for row in rows for key in row.values}:
        columns.add_numbers(key, [row.values.get(key) for row in rows])
    return columns.columns()


def log_batch(lines: Sequence[runs_pb2.LogLine]) -> EncodedBatch:
    violations: list[FieldViolation] = []
    for position, line in enumerate(lines):
        text = line.text
        # Encoding only the lines that could be too long keeps the common case cheap.
        if len(text) > MAX_LINE_BYTES // 4 and len(text.encode()) > MAX_LINE_BYTES:
            violations.append(
                FieldViolation(f"lines[{position}].text", f"must be at most {MAX_LINE_BYTES} bytes")
            )
        if line.HasField("time") and (problem := _time_problem(line.time)):
            violations.append(FieldViolation(f"lines[{position}].time", problem))
        if line.stream and line.stream not in _LOG_STREAMS:
            violations.append(FieldViolation(f"lines[{position}].stream", f"unknown stream {line.stream}"))
        if line.rank < 0:
            violations.append(FieldViolation(f"lines[{position}].rank", f"must be >= 0 (got {line.rank})"))
    if violations:
        raise _invalid(violations)

    def encode(skip: int) -> bytes:
        return runs_pb2.ReadLogsResponse(lines=lines[skip:]).SerializeToString()

    return EncodedBatch(count=len(lines), encode=encode)


def metric_rows(chunk: Chunk, *, start: int, keys: Collection[str]) -> Iterator[runs_pb2.MetricRow]:
    """The chunk's rows from index ``start`` on, with index and time filled, reduced to ``keys`` (if any)."""
    return _sent_rows(chunk, range(max(0, start - chunk.first_index), chunk.count), keys)


def chosen_metric_rows(
    chunk: Chunk, indices: Sequence[int], *, keys: Collection[str]
) -> Iterator[runs_pb2.MetricRow]:
    """The chunk's rows at ``indices`` (in order; those outside the chunk are passed over), as
    :func:`metric_rows` sends them."""
    inside = indices[
        bisect_left(indices, chunk.first_index) : bisect_left(indices, chunk.first_index + chunk.count)
    ]
    return _sent_rows(chunk, [index - chunk.first_index for index in inside], keys)


def _sent_rows(chunk: Chunk, offsets: Iterable[int], keys: Collection[str]) -> Iterator[runs_pb2.MetricRow]:
    stored_at = timestamp(chunk.store_time)
    rows = runs_pb2.ReadMetricsResponse.FromString(chunk.payload).rows
    for offset in offsets:
        row = rows[offset]
        if keys:
            for key in [key for key in row.values if key not in keys]:
                del row.values[key]
            for key in [key for key in row.data.fields if key not in keys]:
                del row.data.fields[key]
            if not row.values and not row.data.fields:
                continue
        row.index = chunk.first_index + offset
        if not row.HasField("time"):
            row.time.CopyFrom(stored_at)
        yield row


def log_lines(chunk: Chunk, *, start: int, streams: Collection[int]) -> Iterator[runs_pb2.LogLine]:
    """The chunk's lines from index ``start`` on, with index, stream and time filled, of ``streams``
    (if any)."""
    stored_at = timestamp(chunk.store_time)
    lines = runs_pb2.ReadLogsResponse.FromString(chunk.payload).lines
    for offset in range(max(0, start - chunk.first_index), chunk.count):
        line = lines[offset]
        if not line.stream:
            line.stream = runs_pb2.LOG_STREAM_STDOUT
        if streams and line.stream not in streams:
            continue
        line.index = chunk.first_index + offset
        if not line.HasField("time"):
            line.time.CopyFrom(stored_at)
        yield line
