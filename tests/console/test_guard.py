"""The console's guard and pages in this process, without the services: the headers every answer
carries, the cookie's flags, sessions that a flood cannot push out, pages without inline script, and the
heartbeats of a quiet event stream."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from takeoff_console import events, sessions
from takeoff_console.app import PACKAGE, create_app
from takeoff_console.client import ServiceChannels
from takeoff_console.guard import allowed_hosts
from takeoff_console.sessions import OneTimeCode, Sessions
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess

PORT = 8080
UNANSWERED = "127.0.0.1:1"
"""The services' address: nothing these tests ask for calls them."""


@pytest.fixture
async def console() -> AsyncIterator[httpx.AsyncClient]:
    """The console's app over HTTPS (as with ``tls`` set), answering to the default hosts."""
    channels = ServiceChannels.open(UNANSWERED, UNANSWERED)
    app = create_app(
        channels,
        port=PORT,
        allowed=[],
        signin_code=OneTimeCode(None),
        admin_key=lambda: None,
        session_seconds=3600,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=f"https://127.0.0.1:{PORT}") as client:
        yield client
    await channels.close()


async def test_every_answer_forbids_inline_script_framing_sniffing_and_referrers(
    console: httpx.AsyncClient,
) -> None:
    answers = {
        "sign-in form": await console.get("/signin"),
        "health check": await console.get("/healthz"),
        "static file": await console.get("/static/console.js"),
        "unsigned page": await console.get("/projects/p/jobs"),
        "unsigned event stream": await console.get(
            "/projects/p/queues/q/events", headers={"accept": "text/event-stream"}
        ),
        "post without a token": await console.post("/signin", data={"key": "k"}),
        "foreign host": await console.get("/signin", headers={"host": "attacker.example"}),
    }
    assert [answer.status_code for answer in answers.values()] == [200, 200, 200, 303, 401, 403, 400]
    for what, answer in answers.items():
        policy = answer.headers.get("content-security-policy", "")
        assert "script-src 'self';" in policy, what
        assert "frame-ancestors 'none'" in policy, what
        assert "unsafe" not in policy, what
        assert answer.headers.get("x-frame-options") == "DENY", what
        assert answer.headers.get("x-content-type-options") == "nosniff", what
        assert answer.headers.get("referrer-policy") == "no-referrer", what
        stored = what == "static file"
        assert ("no-store" not in answer.headers.get("cache-control", "")) == stored, what


async def test_the_session_cookie_is_secure_when_served_over_https(console: httpx.AsyncClient) -> None:
    cookie = (await console.get("/signin")).headers["set-cookie"]
    assert cookie.startswith(f"takeoff_console_{PORT}=")
    assert {"Path=/", "HttpOnly", "SameSite=Strict", "Secure"} <= set(cookie.split("; "))


def test_no_template_has_inline_script_or_style() -> None:
    """The Content-Security-Policy runs no inline script: an inline handler or ``javascript:`` link would
    silently do nothing, so none may exist."""
    inline = re.compile(
        r"<script(?![^>]*\ssrc=)|\son[a-z]+\s*=|javascript:|\sstyle\s*=|<style", re.IGNORECASE
    )
    found = {
        template.name: inline.findall(template.read_text())
        for template in (PACKAGE / "templates").glob("*.html")
    }
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_no_template_marks_text_safe() -> None:
    """Autoescaping keeps a job's output (a log line, a metric name) text: no template turns it off."""
    unsafe = re.compile(r"\|\s*safe\b|autoescape\s+false|Markup\(")
    assert [t.name for t in (PACKAGE / "templates").glob("*.html") if unsafe.search(t.read_text())] == []


def test_the_console_script_never_parses_text_as_html() -> None:
    script = (PACKAGE / "static" / "console.js").read_text()
    assert (
        re.findall(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", script)
        == []
    )


def test_a_flood_of_anonymous_sessions_does_not_sign_anyone_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "MAX_ANONYMOUS_SESSIONS", 10)
    monkeypatch.setattr(sessions, "MAX_SESSIONS", 10)
    pool = Sessions(3600)
    person = pool.sign_in(pool.new(), "tko_key", "default")
    for _ in range(100):  # any web page can have its visitors' browsers make these
        pool.new()
    assert pool.get(person.id) is person


def test_signing_in_and_out_replace_the_session() -> None:
    pool = Sessions(3600)
    planted = pool.new()
    person = pool.sign_in(planted, "tko_key", "default")
    assert person.id != planted.id
    assert pool.get(planted.id) is None
    after = pool.sign_out(person)
    assert pool.get(person.id) is None
    assert not after.signed_in


async def test_a_quiet_event_stream_sends_heartbeats_and_stops_its_source_when_left() -> None:
    source_stopped = asyncio.Event()

    async def quiet() -> AsyncGenerator[tuple[str, Any], None]:
        try:
            yield "snapshot", {"items": ["<img src=x onerror=alert(1)>"]}
            await asyncio.Event().wait()  # a queue nobody touches
            yield "never", {}
        finally:
            source_stopped.set()

    response = events.event_stream(quiet(), heartbeat_seconds=0.01)
    chunks = aiter(response.body_iterator)
    assert await anext(chunks) == f"retry: {events.RECONNECT_MILLISECONDS}\n\n".encode()
    assert await anext(chunks) == (b'event: snapshot\ndata: {"items":["<img src=x onerror=alert(1)>"]}\n\n')
    assert await anext(chunks) == events.HEARTBEAT
    assert await anext(chunks) == events.HEARTBEAT
    assert not source_stopped.is_set()
    await chunks.aclose()  # type: ignore[attr-defined]
    assert source_stopped.is_set()


async def test_a_service_that_is_down_gives_a_page_saying_so(
    services: tuple[ServiceProcess, ServiceProcess, Path],
) -> None:
    registry = services[0]
    channels = ServiceChannels.open(registry.address, UNANSWERED)
    app = create_app(
        channels,
        port=PORT,
        allowed=[],
        signin_code=OneTimeCode(None),
        admin_key=lambda: None,
        session_seconds=60,
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{PORT}") as browser:
        form = await browser.get("/signin")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token is not None
        data = {"key": ADMIN_KEY, "project": "console", "csrf_token": token.group(1)}
        assert (await browser.post("/signin", data=data)).status_code == 303
        page = await browser.get("/projects/console/queues")
    await channels.close()
    assert page.status_code == 503
    assert page.headers["content-type"].startswith("text/html")
    title = re.search(r'data-testid="error-title">([^<]*)<', page.text)
    reason = re.search(r'data-testid="error-reason">([^<]*)<', page.text)
    assert title is not None
    assert title.group(1) == "The queue service is not answering"
    assert reason is not None
    assert reason.group(1) == "UNAVAILABLE"
    assert "Traceback" not in page.text
    assert ADMIN_KEY not in page.text


async def test_the_sign_in_link_s_next_never_leaves_the_console() -> None:
    """Browsers read a backslash as a slash and drop tabs and newlines, so each of these is another site."""
    targets = {
        "/projects/p/runs?page_token=a": "/projects/p/runs?page_token=a",
        "https://attacker.example/": "/",
        "//attacker.example/": "/",
        "/\\attacker.example/": "/",
        "/\t/attacker.example/": "/",
        "/\n/attacker.example/": "/",
        "\\\\attacker.example/": "/",
    }
    for target, location in targets.items():
        channels = ServiceChannels.open(UNANSWERED, UNANSWERED)
        app = create_app(
            channels,
            port=PORT,
            allowed=[],
            signin_code=OneTimeCode("the-code"),
            admin_key=lambda: ADMIN_KEY,
            session_seconds=60,
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{PORT}") as browser:
            answer = await browser.get("/signin", params={"code": "the-code", "next": target})
        await channels.close()
        assert (answer.status_code, answer.headers["location"]) == (303, location), repr(target)


async def test_signing_out_ends_the_session_on_the_server() -> None:
    """A copy of the cookie taken before sign-out (another tab, a stolen one) opens nothing after it."""
    channels = ServiceChannels.open(UNANSWERED, UNANSWERED)
    app = create_app(
        channels,
        port=PORT,
        allowed=[],
        signin_code=OneTimeCode("the-code"),
        admin_key=lambda: ADMIN_KEY,
        session_seconds=60,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{PORT}") as browser:
        assert (await browser.get("/signin", params={"code": "the-code"})).status_code == 303
        copied = dict(browser.cookies)
        assert (await browser.get("/")).headers["location"] == "/projects/default/jobs"
        token = re.search(r'data-csrf="([^"]+)"', (await browser.get("/signin")).text)
        assert token is not None
        assert (await browser.post("/signout", data={"csrf_token": token.group(1)})).status_code == 303
        browser.cookies.clear()
        browser.cookies.update(copied)
        again = await browser.get("/projects/p/jobs")
    await channels.close()
    assert (again.status_code, again.headers["location"]) == (303, "/signin?next=%2Fprojects%2Fp%2Fjobs")


def test_a_configured_host_name_matches_in_any_case() -> None:
    assert allowed_hosts(["Console.Example:443"], PORT) == {"console.example:443"}
    assert allowed_hosts([], PORT) == {f"127.0.0.1:{PORT}", f"localhost:{PORT}"}
