"""Downsampling a run's metric history for charts, as W&B's sampled history does (ReadMetrics
``max_points``).

The rows ``[start, end)`` are split into ``max_points // 2`` buckets of consecutive indices; each bucket
keeps, for each key, the row holding its minimum and the row holding its maximum, and the first and last
row holding any requested key are kept too.

Choosing rows must not decode 100,000 protobuf rows (reading one value of one row costs about a
microsecond through the protobuf runtime), so every stored chunk of metric rows carries its *columns*
besides its payload: for each key, the offsets of the rows holding a number for it with those numbers, and
the offsets of the rows holding it otherwise (a string, a NaN: neither is a minimum or a maximum, but the
row holds the key). A bucket's extremes are then ``min``/``max`` over a slice of an array, in C, and the
sampler reads the columns chunk after chunk, holding only each key's extremes in the bucket at hand.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from bisect import bisect_left, insort
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, cast

MIN_MAX_POINTS = 4
"""Fewer could not hold one bucket's minimum and maximum besides the first and last row."""
MAX_MAX_POINTS = 100_000
_KEY_HEADER = struct.Struct("<HII")
"""Per key: the key's UTF-8 length, how many rows hold a number for it, how many hold it otherwise."""


def _little_endian(values: array[int] | array[float]) -> bytes:
    if sys.byteorder == "big":
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def _read_array(into: array[Any], data: bytes | memoryview) -> None:
    into.frombytes(data)
    if sys.byteorder == "big":
        into.byteswap()


@dataclass(slots=True)
class Column:
    """One key in one chunk: offsets are row positions in the chunk, in order."""

    offsets: array[int] = field(default_factory=lambda: array("H"))
    values: array[float] = field(default_factory=lambda: array("d"))
    """The number of each row in ``offsets``; never NaN."""
    others: array[int] = field(default_factory=lambda: array("H"))
    """Rows holding the key with a NaN or a value that is not a number."""

    def first(self) -> int:
        return min(self.offsets[:1] + self.others[:1])

    def last(self) -> int:
        return max(self.offsets[-1:] + self.others[-1:])

    def from_row(self, skip: int) -> Column:
        """The column of the rows from offset ``skip`` on, their offsets counted from there."""
        numbers_from = bisect_left(self.offsets, skip)
        return Column(
            _shifted(self.offsets[numbers_from:], skip),
            self.values[numbers_from:],
            _shifted(self.others[bisect_left(self.others, skip) :], skip),
        )


class ColumnsBuilder:
    """Collects a batch's columns: its numbers key by key, the rest row by row."""

    def __init__(self) -> None:
        self._columns: dict[str, Column] = {}

    def _column(self, key: str) -> Column:
        return self._columns.get(key) or self._columns.setdefault(key, Column())

    def add_numbers(self, key: str, values: list[float | None]) -> None:
        """The key's value in each row of the batch, None where a row has none. Reading a protobuf map
        key by key (``map.get``) costs a third of iterating its items, and a key held by every row with a
        number (the usual case) becomes its arrays in C."""
        column = self._column(key)
        numbers = cast("list[float]", values)
        if None not in values and not any(map(math.isnan, numbers)):
            column.offsets = array("H", range(len(numbers)))
            column.values = array("d", numbers)
            return
        for offset, value in enumerate(values):
            if value is None:
                continue
            if math.isnan(value):
                insort(column.others, offset)
            else:
                column.offsets.append(offset)
                column.values.append(value)

    def add_other(self, offset: int, key: str) -> None:
        """A row holding the key with something other than a number, in row order."""
        self._column(key).others.append(offset)

    def columns(self) -> dict[str, Column]:
        return self._columns

    def encode(self, skip: int) -> bytes:
        """The columns of the rows from ``skip`` on, their offsets counted from ``skip``."""
        parts: list[bytes] = []
        for key, whole in self._columns.items():
            column = whole.from_row(skip) if skip else whole
            if not column.offsets and not column.others:
                continue
            name = key.encode()
            parts += (
                _KEY_HEADER.pack(len(name), len(column.offsets), len(column.others)),
                name,
                _little_endian(column.offsets),
                _little_endian(column.values),
                _little_endian(column.others),
            )
        return b"".join(parts)


def _shifted(offsets: array[int], by: int) -> array[int]:
    return array(offsets.typecode, (offset - by for offset in offsets))


def decode_columns(data: bytes) -> dict[str, Column]:
    """The columns :meth:`ColumnsBuilder.encode` wrote."""
    columns: dict[str, Column] = {}
    view = memoryview(data)
    position = 0
    while position < len(view):
        name_length, numbers, others = _KEY_HEADER.unpack_from(view, position)
        position += _KEY_HEADER.size
        key = bytes(view[position : position + name_length]).decode()
        position += name_length
        column = columns[key] = Column()
        for into, size in (
            (column.offsets, 2 * numbers),
            (column.values, 8 * numbers),
            (column.others, 2 * others),
        ):
            _read_array(into, view[position : position + size])
            position += size
    return columns


@dataclass(slots=True)
class _Extremes:
    """A key's minimum and maximum so far in one bucket, with the indices of the rows holding them."""

    bucket: int
    low: float
    low_index: int
    high: float
    high_index: int


class Sampler:
    """Chooses the rows of the history ``[start, end)`` to send, fed the columns of its chunks in order."""

    def __init__(self, *, start: int, end: int, max_points: int, keys: Collection[str]) -> None:
        assert MIN_MAX_POINTS <= max_points < end - start, "only a history longer than max_points is sampled"
        self._start = start
        self._rows = end - start
        self._buckets = max_points // 2
        self._keys = keys
        self._extremes: dict[str, _Extremes] = {}
        self._chosen: set[int] = set()
        self._first: int | None = None
        """With keys asked for: the first and last row holding one of them, sent whatever they hold."""
        self._last: int | None = None
        if not keys:
            # Every row is sent whole when no key is asked for, even a row that holds none.
            self._chosen.update((start, end - 1))

    def _bucket(self, index: int) -> int:
        return (index - self._start) * self._buckets // self._rows

    def _bucket_start(self, bucket: int) -> int:
        """The first index of ``bucket``: the least i with ``_bucket(i) == bucket``."""
        return self._start - (-bucket * self._rows // self._buckets)

    def add(self, first_index: int, columns: dict[str, Column]) -> None:
        """Take in the columns of the chunk whose first row has index ``first_index``."""
        for key, column in columns.items():
            if self._keys and key not in self._keys:
                continue
            if self._keys:
                self._note_presence(first_index + column.first(), first_index + column.last())
            if column.offsets:
                self._take_extremes(key, first_index, column)

    def _note_presence(self, first: int, last: int) -> None:
        if self._first is None or first < self._first:
            self._first = first
        if self._last is None or last > self._last:
            self._last = last

    def _take_extremes(self, key: str, first_index: int, column: Column) -> None:
        offsets, values = column.offsets, column.values
        low_end = self._bucket(first_index + offsets[0])
        high_end = self._bucket(first_index + offsets[-1])
        position = 0
        for bucket in range(low_end, high_end + 1):
            end = bisect_left(offsets, self._bucket_start(bucket + 1) - first_index, lo=position)
            if end > position:
                stretch = values[position:end]
                low, high = min(stretch), max(stretch)
                self._merge(
                    key,
                    _Extremes(
                        bucket,
                        low,
                        first_index + offsets[position + stretch.index(low)],
                        high,
                        first_index + offsets[position + stretch.index(high)],
                    ),
                )
            position = end

    def _merge(self, key: str, found: _Extremes) -> None:
        """Fold a stretch's extremes into the key's bucket; a key's bucket that is over is chosen."""
        held = self._extremes.get(key)
        if held is None or held.bucket != found.bucket:
            if held is not None:
                self._chosen.update((held.low_index, held.high_index))
            self._extremes[key] = found
            return
        # Strictly beyond: of equal values the earlier row is kept, as min() and max() do.
        if found.low < held.low:
            held.low, held.low_index = found.low, found.low_index
        if found.high > held.high:
            held.high, held.high_index = found.high, found.high_index

    def indices(self) -> list[int]:
        """The indices chosen, in order, once every chunk has been added."""
        for held in self._extremes.values():
            self._chosen.update((held.low_index, held.high_index))
        self._extremes.clear()
        if self._first is not None and self._last is not None:
            self._chosen.update((self._first, self._last))
        return sorted(self._chosen)
