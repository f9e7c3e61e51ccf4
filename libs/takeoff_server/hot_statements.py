"""Statements of a hot path, run on SQLite by sqlite3 itself (docs/design.md §9 "Databases").

SQLAlchemy spends about 80 µs of CPU on a statement it has cached (its execution context, parameter
processing, the asyncio adapter's greenlet hand-offs and result set-up) where sqlite3 spends 2-4 µs on a
service's small indexed statements. On the queue's dispatch path that is a fifth of the time from Enqueue
to Assignment. A :class:`HotStatement` is compiled once per set of parameter names, with the
bind processors of its columns (JSON, date-times), and on SQLite run on the transaction's own sqlite3
connection (``sqlite_inline``, which every service's SQLite engine uses: locked out, it waits off the event
loop as any statement does); elsewhere (PostgreSQL, whose cost is the server's round trip) it is an ordinary
SQLAlchemy statement.

Only what needs nothing of SQLAlchemy's execution qualifies, and compiling says so at the first use:
parameters given for every value (no Python-side column defaults), no expanding ``IN`` parameters, and
results read only as :class:`Outcome` has them (a row's presence, counts, an integer primary key).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import SQLCompiler

from takeoff_server.sqlite_inline import InlineConnection, InlineCursor

Parameters = Mapping[str, Any] | Sequence[Mapping[str, Any]] | None


class Outcome(Protocol):
    """What a hot statement's result offers: SQLAlchemy's ``CursorResult`` has these too."""

    @property
    def rowcount(self) -> int: ...

    @property
    def inserted_primary_key(self) -> Any: ...

    def first(self) -> Any: ...


@dataclass(frozen=True)
class _SqliteOutcome:
    rows: Sequence[Any]
    rowcount: int
    lastrowid: int | None

    @property
    def inserted_primary_key(self) -> tuple[int | None]:
        return (self.lastrowid,)

    def first(self) -> Any:
        return self.rows[0] if self.rows else None


@dataclass(frozen=True)
class _Compiled:
    sql: str
    slots: tuple[tuple[str, Callable[[Any], Any] | None], ...]
    """Each position's key in the given values (or in ``fixed``) and its column's bind processor."""
    fixed: Mapping[str, Any]
    """The values the statement itself holds (a literal in a WHERE), by a key no caller can give."""

    def positional(self, parameters: Mapping[str, Any]) -> tuple[Any, ...]:
        given = {**self.fixed, **parameters} if self.fixed else parameters
        return tuple(
            [
                given[key] if process is None else process(given[key])  # None too: JSON stores 'null'
                for key, process in self.slots
            ]
        )


class HotStatement:
    """``statement``, built once at import; executed with a mapping of values, or a list of them for an
    executemany."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._compiled: dict[frozenset[str], _Compiled] = {}
        """By the names of the parameters given (SQLite's only: elsewhere SQLAlchemy runs it)."""

    async def execute(self, connection: AsyncConnection, parameters: Parameters = None) -> Outcome:
        dialect = connection.dialect
        # The transaction's connection as it stands (get_raw_connection() would pay a greenlet hand-off).
        begun = connection.sync_connection
        driver = begun.connection.driver_connection if begun is not None else None
        if not isinstance(driver, InlineConnection):
            return await connection.execute(self.statement, parameters)
        many = isinstance(parameters, Sequence)
        rows = list(parameters) if isinstance(parameters, Sequence) else [parameters or {}]
        if not rows:
            return _SqliteOutcome((), 0, None)
        compiled = self._compile(dialect, rows[0].keys())
        try:
            values = [compiled.positional(row) for row in rows]
        except Exception as error:  # a value a column's processing refuses (a naive date-time)
            raise StatementError(f"({type(error).__name__}) {error}", compiled.sql, rows, error) from error
        cursor = InlineCursor(driver)
        try:
            if many:
                await cursor.executemany(compiled.sql, values)
            else:
                await cursor.execute(compiled.sql, values[0])
            outcome = _SqliteOutcome(await cursor.fetchall(), cursor.rowcount, cursor.lastrowid)
        except sqlite3.Error as error:
            await cursor.close()
            # As SQLAlchemy raises it: callers tell a refused change (IntegrityError) from an outage by it.
            raise DBAPIError.instance(compiled.sql, values, error, sqlite3.Error, dialect=dialect) from error
        # Not closed when cancelled: a statement locked out may still run on a worker thread (sqlite_inline
        # finishes it before the connection's next operation), and closing its cursor would break it.
        await cursor.close()
        return outcome

    def _compile(self, dialect: Dialect, keys: Iterable[str]) -> _Compiled:
        names = frozenset(keys)
        found = self._compiled.get(names)
        if found is None:
            found = self._compiled[names] = _compile(self.statement, dialect, names)
        return found


def _compile(statement: Executable, dialect: Dialect, keys: frozenset[str]) -> _Compiled:
    compiled = statement.compile(dialect=dialect, column_keys=sorted(keys))  # type: ignore[attr-defined]
    assert isinstance(compiled, SQLCompiler)
    if compiled.insert_prefetch or compiled.update_prefetch:
        raise TypeError(f"{statement} needs SQLAlchemy's Python-side defaults: not a hot statement")
    if any(bind.expanding for bind in compiled.binds.values()):
        raise TypeError(f"{statement} has an expanding parameter: not a hot statement")
    if compiled.positiontup is None:
        raise TypeError(f"{dialect.name} takes named parameters: hot statements are positional")
    processors = compiled._bind_processors  # SQLAlchemy's own per-column conversions, as it would apply
    if any(not callable(process) for process in processors.values()):
        raise TypeError(f"{statement} has a tuple parameter: not a hot statement")
    # Where each position's value comes from, as SQLCompiler.construct_params finds it (the bind's key
    # given, else its name given, else the statement's own value), settled once for this set of keys.
    binds = {name: bind for bind, name in compiled.bind_names.items()}
    slots, fixed = [], {}
    for name in compiled.positiontup:
        bind = binds[name]
        if bind.key in keys or name in keys:
            key = bind.key if bind.key in keys else name
        elif bind.required or bind.callable:
            raise TypeError(f"{statement} needs a value for {bind.key!r}: not a hot statement without it")
        else:
            key = f"\0{name}"
            fixed[key] = bind.value
        slots.append((key, cast(Callable[[Any], Any] | None, processors.get(name))))
    return _Compiled(sql=compiled.string, slots=tuple(slots), fixed=fixed)
