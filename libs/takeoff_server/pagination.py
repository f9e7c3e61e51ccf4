"""List paging as the v1 API defines it (AIP-158): page sizes and opaque, signed page tokens.

A token carries the keyset position after the last item of a page (``cursor``: a tuple of strings and
integers, e.g. the last job id) and an HMAC-SHA256 over that cursor, the list method being called and
its query (every other field of the request). Only this server can issue one, and it continues only the
request it was issued for: another method, another query, an edited cursor, or bytes that are not a
token at all are ``PAGE_TOKEN_INVALID``, never a store error. The page size is not part of the query: a
client may change it between pages.

The signing key is per server: :func:`use_signing_key` installs the one a service keeps in its home
directory (:func:`load_signing_key`), so tokens survive a restart; until then a random key is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import Message

from takeoff_server.call_context import method_var
from takeoff_server.errors import FieldViolation, InvalidArgument
from takeoff_server.validation import field_error

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_PAGE_BYTES = 3 * 1024 * 1024
"""A list response stays under gRPC's default 4 MiB receive size: a page ends early (with a token) when its
items would encode to more than this. One item always fits: the per-field limits bound each item."""

KEY_BYTES = 32
_MAC_BYTES = 16

Cursor = tuple[str | int, ...]
M = TypeVar("M", bound=Message)


class _SigningKey:
    current = secrets.token_bytes(KEY_BYTES)


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


def use_signing_key(key: bytes) -> None:
    """Sign and verify page tokens with ``key`` from now on (tokens signed with another key stop working)."""
    if len(key) < KEY_BYTES:
        raise ValueError(f"a page token key needs at least {KEY_BYTES} bytes")
    _SigningKey.current = key


def load_signing_key(path: Path) -> bytes:
    """The key kept at ``path``, created (random, readable by the owner only) if there is none yet.

    Services sharing a home directory share the file; creating it is atomic, so the first one wins.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(secrets.token_bytes(KEY_BYTES))
        try:
            os.link(partial, path)  # fails if another process created it meanwhile: keep theirs
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    return path.read_bytes()


def _mac(query: Mapping[str, object], cursor_json: str) -> bytes:
    signed = json.dumps(
        {"method": method_var.get(), "query": query, "after": cursor_json},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hmac.new(_SigningKey.current, signed.encode(), hashlib.sha256).digest()[:_MAC_BYTES]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode((text + "=" * (-len(text) % 4)).encode())


def next_page_token(query: Mapping[str, object], cursor: Cursor) -> str:
    """The token that continues ``query`` (in the list method being called) after ``cursor``."""
    cursor_json = json.dumps(list(cursor), separators=(",", ":"))
    return f"{_b64encode(cursor_json.encode())}.{_b64encode(_mac(query, cursor_json))}"


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
    not_issued = _invalid_token("was not issued by this server for this request (same method and fields)")
    encoded_cursor, dot, encoded_mac = page_token.partition(".")
    try:
        cursor_json = _b64decode(encoded_cursor).decode()
        mac = _b64decode(encoded_mac)
    except (ValueError, binascii.Error):
        raise not_issued from None
    if not dot or not hmac.compare_digest(mac, _mac(query, cursor_json)):
        raise not_issued
    after = json.loads(cursor_json)
    if (
        not isinstance(after, list)
        or len(after) != len(cursor_types)
        or not all(type(value) is expected for value, expected in zip(after, cursor_types, strict=True))
    ):
        raise not_issued  # signed by this server, but for a list with another cursor shape
    return PageRequest(size, tuple(after))


def page_response(
    items: Sequence[tuple[M, Cursor]], *, more: bool, query: Mapping[str, object]
) -> tuple[list[M], str]:
    """The items of a page that fit in one response, and the token that continues after the last of them
    ("" when nothing follows). ``items`` pairs each item, as sent, with the cursor just after it; ``more``
    says whether the store has items after the last one."""
    kept: list[M] = []
    size = 0
    for item, _ in items:
        size += item.ByteSize()
        if kept and size > MAX_PAGE_BYTES:
            break
        kept.append(item)
    if len(kept) < len(items) or (more and kept):
        return kept, next_page_token(query, items[len(kept) - 1][1])
    return kept, ""
