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
"""Sessions kept at most; beyond it the least recently used is forgotten (its browser signs in again)."""


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
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, session_id: str | None) -> Session | None:
        session = self._sessions.get(session_id or "")
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._sessions[session.id]
            return None
        self._sessions.move_to_end(session.id)
        return session

    def new(self) -> Session:
        """A session that has not signed in: it carries the sign-in form's CSRF token."""
        return self._add(Session(_token(), _token(), self._clock() + ANONYMOUS_SECONDS))

    def sign_in(self, previous: Session | None, key: str, project: str) -> Session:
        """A new signed-in session replacing ``previous``."""
        if previous is not None:
            self._sessions.pop(previous.id, None)
        return self._add(Session(_token(), _token(), self._clock() + self._lifetime, key, project))

    def sign_out(self, session: Session) -> Session:
        self._sessions.pop(session.id, None)
        return self.new()

    def _add(self, session: Session) -> Session:
        self._sessions[session.id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
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
