"""What every request passes before a page sees it: the Host check, the session, sign-in, and CSRF.

One ASGI middleware, so no route can forget a check:

1. **Host.** The Host header must be one of the allowed ``host:port`` values, else 400. A page on another
   site that makes its own name resolve to 127.0.0.1 (DNS rebinding) sends its own name as Host, and so
   never reaches a page or an event stream with the user's session.
2. **Session.** The session cookie (HttpOnly, SameSite=Strict, one name per port) is looked up; a browser
   without one is given an anonymous session. The cookie is written when the session changed (sign-in,
   sign-out).
3. **Sign-in.** Only ``/signin``, ``/healthz`` and ``/static/`` (the last two without a session) are served
   to a browser that has not signed in: a page is redirected to the sign-in form; an event stream, an
   htmx request or a post is 401.
4. **CSRF.** Every request that is not GET or HEAD must carry the session's CSRF token, as the form field
   ``csrf_token`` or the ``X-CSRF-Token`` header (htmx sends it), else 403: the SameSite cookie already
   keeps other sites out, and the token keeps out anything that would get past it.

Every answer, refusals and static files included, carries :data:`SECURITY_HEADERS`: a Content-Security-Policy
that lets a page run only the console's own script files (no inline script, no ``eval``, nothing from another
origin), so text a job wrote that slipped into a page as markup still could not run; no framing
(clickjacking); no MIME sniffing; no Referer (a URL may hold the one-time code). Nothing but the static files
may be stored by the browser (``no-store``): after sign-out, Back must not show a page read with the key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, quote

from takeoff_console.sessions import Session, Sessions, tokens_match

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SESSIONLESS_PREFIXES = ("/healthz", "/static/")
"""Served to anyone past the Host check, without a session: health checks (every few seconds) would
otherwise make a session each, and crowd out those of people."""
PUBLIC_PREFIXES = ("/signin", *SESSIONLESS_PREFIXES)
SAFE_METHODS = frozenset({"GET", "HEAD"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = b"x-csrf-token"
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
        b" form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
MAX_FORM_BYTES = 1024 * 1024
"""The largest form body accepted; a launch form with its JSON fields fits many times over."""


def allowed_hosts(configured: list[str], port: int) -> frozenset[str]:
    """Lower-cased, as the Host header is before it is compared (host names are case-insensitive)."""
    return frozenset(host.lower() for host in configured or [f"127.0.0.1:{port}", f"localhost:{port}"])


class Guard:
    def __init__(self, app: ASGIApp, *, sessions: Sessions, hosts: frozenset[str], cookie_name: str) -> None:
        self._app = app
        self._sessions = sessions
        self._hosts = hosts
        self._cookie = cookie_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets: nothing here would check them
            await send({"type": "websocket.close", "code": 1008})
            return
        send = _with_security_headers(send, store=scope["path"].startswith("/static/"))
        headers = _headers(scope)
        if headers.get(b"host", b"").decode("latin-1").lower() not in self._hosts:
            await _plain(send, 400, "This console does not answer to that host name.")
            return
        path: str = scope["path"]
        if path.startswith(SESSIONLESS_PREFIXES) and scope["method"] in SAFE_METHODS:
            await self._app(scope, receive, send)
            return
        session = self._sessions.get(_cookie(headers, self._cookie)) or self._sessions.new()
        scope.setdefault("state", {})["session"] = session
        if not path.startswith(PUBLIC_PREFIXES) and not session.signed_in:
            await self._refuse_unsigned(scope, headers, send, session)
            return
        if scope["method"] not in SAFE_METHODS:
            body = await _read_body(receive)
            if body is None:
                await _plain(send, 413, "The form is too large.")
                return
            if not tokens_match(_csrf_token(headers, body), session.csrf_token):
                await _plain(send, 403, "The form's security token is missing or stale: reload the page.")
                return
            receive = _replay(body, receive)
        await self._app(scope, receive, self._with_cookie(scope, send, session))

    async def _refuse_unsigned(
        self, scope: Scope, headers: dict[bytes, bytes], send: Send, session: Session
    ) -> None:
        is_page = scope["method"] == "GET" and b"text/event-stream" not in headers.get(b"accept", b"")
        if is_page and b"hx-request" not in headers:
            target = scope["path"] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
            location = "/signin" if target == "/" else f"/signin?next={quote(target, safe='')}"
            extra = [(b"location", location.encode())]
            await _plain(send, 303, "Sign in first.", [*extra, self._set_cookie(scope, session)])
            return
        refusal = [(b"hx-redirect", b"/signin"), self._set_cookie(scope, session)]
        await _plain(send, 401, "Sign in first.", refusal)

    def _with_cookie(self, scope: Scope, send: Send, received: Session) -> Send:
        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                current: Session = scope["state"]["session"]
                if current is not received or not _had_cookie(scope, self._cookie, current):
                    message.setdefault("headers", []).append(self._set_cookie(scope, current))
            await send(message)

        return send_with_cookie

    def _set_cookie(self, scope: Scope, session: Session) -> tuple[bytes, bytes]:
        # Secure when the page came over HTTPS, so the browser never sends the id back over plain HTTP.
        secure = "; Secure" if scope["scheme"] == "https" else ""
        value = f"{self._cookie}={session.id}; Path=/; HttpOnly; SameSite=Strict{secure}"
        return (b"set-cookie", value.encode())


def _with_security_headers(send: Send, *, store: bool) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), *SECURITY_HEADERS]
            if not store and not any(name.lower() == b"cache-control" for name, _ in headers):
                headers.append((b"cache-control", b"no-store"))
            message["headers"] = headers
        await send(message)

    return send_with_headers


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope["headers"]}


def _cookie(headers: dict[bytes, bytes], name: str) -> str | None:
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _had_cookie(scope: Scope, name: str, session: Session) -> bool:
    return _cookie(_headers(scope), name) == session.id


def _csrf_token(headers: dict[bytes, bytes], body: bytes) -> str | None:
    if CSRF_HEADER in headers:
        return headers[CSRF_HEADER].decode("latin-1")
    if headers.get(b"content-type", b"").startswith(b"application/x-www-form-urlencoded"):
        values = parse_qs(body.decode("utf-8", errors="replace")).get(CSRF_FIELD)
        return values[0] if values else None
    return None


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the body already read, then the client's own messages (disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def _plain(
    send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
