"""Signed-in browsers: sessions kept in the console's memory, their CSRF tokens, and the one-time code.

A browser holds only a random session id in an HttpOnly, SameSite=Strict cookie; the key it signed in with
stays here, never in a cookie or a page, so no script in a page can read it. Every session, signed in or
not, has a CSRF token that each form and htmx request must echo. Signing in replaces the session (a new
id), so an id planted before sign-in is worth nothing after. A restart of the console signs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ANONYMOUS_SECONDS = 3600.0
"""How long a session that never signed in is kept (the sign-in form's CSRF token lives as long)."""
MAX_SESSIONS = 10_000
"""Signed-in sessions kept at most; beyond it the least recently used is forgotten (its browser signs in
again)."""
MAX_ANONYMOUS_SESSIONS = 10_000
"""Sessions that have not signed in, kept apart: any web page can have a browser make them (an image pointed
at the console), and a flood of them must not push out the sessions of people who signed in."""


@dataclass
class Session:
    id: str
    csrf_token: str
    expires: float
    key: str | None = field(default=None, repr=False)
    project: str = "default"

    @property
    def signed_in(self) -> bool:
        return self.key is not None


class Sessions:
    """The sessions of one console process."""

    def __init__(self, lifetime_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._lifetime = lifetime_seconds
        self._clock = clock
        self._signed_in: OrderedDict[str, Session] = OrderedDict()
        self._anonymous: OrderedDict[str, Session] = OrderedDict()

    def get(self, session_id: str | None) -> Session | None:
        for pool in (self._signed_in, self._anonymous):
            session = pool.get(session_id or "")
            if session is None:
                continue
            if session.expires <= self._clock():
                del pool[session.id]
                return None
            pool.move_to_end(session.id)
            return session
        return None

    def new(self) -> Session:
        """A session that has not signed in: it carries the sign-in form's CSRF token."""
        session = Session(_token(), _token(), self._clock() + ANONYMOUS_SECONDS)
        return _add(self._anonymous, session, MAX_ANONYMOUS_SESSIONS)

    def sign_in(self, previous: Session | None, key: str, project: str) -> Session:
        """A new signed-in session replacing ``previous``."""
        if previous is not None:
            self._forget(previous)
        session = Session(_token(), _token(), self._clock() + self._lifetime, key, project)
        return _add(self._signed_in, session, MAX_SESSIONS)

    def sign_out(self, session: Session) -> Session:
        self._forget(session)
        return self.new()

    def _forget(self, session: Session) -> None:
        self._signed_in.pop(session.id, None)
        self._anonymous.pop(session.id, None)


def _add(pool: OrderedDict[str, Session], session: Session, most: int) -> Session:
    pool[session.id] = session
    while len(pool) > most:
        pool.popitem(last=False)
    return session


def _token() -> str:
    return secrets.token_urlsafe(32)


def tokens_match(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class OneTimeCode:
    """The sign-in code ``takeoff up`` prints in its link: accepted once, then never again.

    Only its SHA-256 is kept; the file it came in is deleted once read, so the code exists in the link
    alone.
    """

    def __init__(self, code: str | None) -> None:
        self._digest = _digest(code) if code else None

    @classmethod
    def from_file(cls, path: Path | None) -> OneTimeCode:
        if path is None:
            return cls(None)
        code = path.read_text().strip()
        path.unlink()
        return cls(code)

    def redeem(self, code: str) -> bool:
        if self._digest is None or not hmac.compare_digest(_digest(code), self._digest):
            return False
        self._digest = None
        return True


def _digest(code: str) -> bytes:
    return hashlib.sha256(code.encode()).digest()
