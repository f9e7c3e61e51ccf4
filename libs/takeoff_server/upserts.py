"""``INSERT ... ON CONFLICT`` statements built once per table and column set, as text.

SQLAlchemy never caches the dialects' own ``on_conflict_do_nothing`` / ``on_conflict_do_update`` inserts
(they have no cache key), so one of them compiles again at every execution, even when the statement object
is built once: compiling cost more CPU than running it (a registry key minted per job, a builder record per
cache hit). A text statement compiles once per engine and is cached from then on. The text is the same on
SQLite (3.35+ for RETURNING) and PostgreSQL; every value is a bound parameter named after its column and
typed by it, so the columns' own types (JSON, UTC timestamps) still convert what goes in and comes back.
"""

from __future__ import annotations

import functools

import sqlalchemy as sa


def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _insert(table: sa.Table, columns: tuple[str, ...]) -> str:
    placeholders = ", ".join(f":{name}" for name in columns)
    return f'INSERT INTO "{table.name}" ({_quoted(columns)}) VALUES ({placeholders})'


def _bound(statement: sa.TextClause, table: sa.Table, columns: tuple[str, ...]) -> sa.TextClause:
    return statement.bindparams(*(sa.bindparam(name, type_=table.c[name].type) for name in columns))


@functools.cache
def insert_unless_present(table: sa.Table, columns: tuple[str, ...]) -> sa.TextualSelect:
    """``INSERT`` of these columns ``ON CONFLICT DO NOTHING RETURNING`` the first key column: a row comes
    back when one went in (RETURNING, not rowcount: the async PostgreSQL driver reports no row count here).
    Any unique constraint's conflict stores nothing. Executed with a list of rows, each is inserted unless
    present."""
    key = table.primary_key.columns[0]
    text = sa.text(f'{_insert(table, columns)} ON CONFLICT DO NOTHING RETURNING "{key.name}"')
    return _bound(text, table, columns).columns(key)


@functools.cache
def upsert(
    table: sa.Table,
    columns: tuple[str, ...],
    *,
    conflict: tuple[str, ...],
    update: tuple[str, ...],
    returning: tuple[str, ...] = (),
) -> sa.TextClause | sa.TextualSelect:
    """``INSERT`` of these columns; a row whose ``conflict`` columns (a unique key) match one stored
    instead sets that row's ``update`` columns to the values given. With ``returning``, the stored row's
    values of those columns come back (the row as inserted or as updated)."""
    assignments = ", ".join(f'"{name}" = excluded."{name}"' for name in update)
    text = f"{_insert(table, columns)} ON CONFLICT ({_quoted(conflict)}) DO UPDATE SET {assignments}"
    if not returning:
        return _bound(sa.text(text), table, columns)
    text += f" RETURNING {_quoted(returning)}"
    return _bound(sa.text(text), table, columns).columns(*(table.c[name] for name in returning))
