"""List paging as the v1 API defines it (AIP-158): page sizes and opaque, query-bound page tokens.

A token carries the keyset position after the last item of a page (``cursor``: a tuple of strings and
integers, e.g. the last job id) and a digest of the query that produced it. A token presented with a
different query, a cursor of the wrong shape, or bytes that are not a token at all is
``PAGE_TOKEN_INVALID``. The page size is not part of the query: a client may change it between pages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from takeoff_server.errors import FieldViolation, InvalidArgument
from takeoff_server.validation import field_error

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

Cursor = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class PageRequest:
    """One page to read: at most ``size`` items after ``after`` (None: from the start)."""

    size: int
    after: Cursor | None


def page_size(requested: int, *, field: str = "page_size") -> int:
    """0 means the default, values over the maximum are capped, negative ones are refused."""
    if requested < 0:
        raise field_error(field, f"must not be negative (got {requested})")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _query_digest(query: Mapping[str, object]) -> str:
    canonical = json.dumps(query, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def next_page_token(query: Mapping[str, object], cursor: Cursor) -> str:
    """The token that continues ``query`` after ``cursor``."""
    payload = json.dumps({"q": _query_digest(query), "after": list(cursor)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _invalid_token(problem: str) -> InvalidArgument:
    return InvalidArgument(
        "PAGE_TOKEN_INVALID",
        f"page_token {problem}; start again without a page token",
        violations=[FieldViolation("page_token", problem)],
    )


def page_request(
    *,
    page_size_requested: int,
    page_token: str,
    query: Mapping[str, object],
    cursor_types: Sequence[type],
) -> PageRequest:
    """Validate a List request's paging fields against ``query`` (every other field of the request)."""
    size = page_size(page_size_requested)
    if not page_token:
        return PageRequest(size, None)
    try:
        padded = page_token + "=" * (-len(page_token) % 4)
        decoded = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, binascii.Error):
        raise _invalid_token("is not a token this server issued") from None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("after"), list):
        raise _invalid_token("is not a token this server issued")
    if decoded.get("q") != _query_digest(query):
        raise _invalid_token("was issued for a request with different parameters")
    after = decoded["after"]
    if len(after) != len(cursor_types) or not all(
        type(value) is expected for value, expected in zip(after, cursor_types, strict=True)
    ):
        raise _invalid_token("is not a token this server issued")
    return PageRequest(size, tuple(after))
