"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Text
from sqlalchemy.dialects.sqlite import DATETIME
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

_NAIVE = "naive datetime: use an aware one, e.g. datetime.now(UTC)"
# How SQLite's DATETIME writes a value unless told otherwise, its fields by name; and the same by position.
_SQLITE_TEXT = DATETIME._storage_format
_SQLITE_TUPLE_TEXT = "%04d-%02d-%02d %02d:%02d:%02d.%06d"


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC ``datetime`` in, the same out, whatever the database keeps.

    SQLite stores no zone and hands back naive values; PostgreSQL's ``timestamptz`` answers in the
    session's zone. Both come back as UTC here.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(_NAIVE)
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def bind_processor(self, dialect: Dialect) -> Callable[[datetime | None], Any] | None:
        if getattr(dialect.type_descriptor(self.impl_instance), "_storage_format", None) != _SQLITE_TEXT:
            return super().bind_processor(dialect)

        # SQLite's DATETIME text in one step, not through this type's and DATETIME's processors (about a
        # third of the time): the queue binds some twenty date-times in each item's life cycle.
        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            if value.tzinfo is None:
                raise ValueError(_NAIVE)
            utc = value.astimezone(UTC)
            return _SQLITE_TUPLE_TEXT % (
                utc.year,
                utc.month,
                utc.day,
                utc.hour,
                utc.minute,
                utc.second,
                utc.microsecond,
            )

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JsonText(TypeDecorator[Any]):
    """JSON kept as text, NaN and infinities included (PostgreSQL's ``json`` refuses them, metrics have
    them). Assign a new value to change it: in-place changes are not tracked."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else json.loads(value)
