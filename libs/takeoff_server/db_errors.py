"""What a database raises when it fails as a whole, rather than over one change: the server runtime answers
it UNAVAILABLE (a dependency briefly away), and group commit fails the whole batch for it instead of
writing each change alone."""

from __future__ import annotations

import sqlalchemy.exc

DATABASE_OUTAGES = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
)
"""Down, restarting, full or locked past the busy timeout, and a pool with no connection free in time. Not
bugs of ours: those (IntegrityError, ProgrammingError, DataError) are about the change that caused them."""
