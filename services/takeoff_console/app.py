"""The console's Starlette app: routes to the page handlers, behind the guard (Host, session, CSRF)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from takeoff_console import pages
from takeoff_console.client import CallFailed, ServiceChannels
from takeoff_console.guard import Guard, allowed_hosts
from takeoff_console.sessions import OneTimeCode, Sessions

PACKAGE = Path(__file__).parent

P = "/projects/{project}"
A = P + "/artifactCollections/{artifact}"
ROUTES = [
    Route("/healthz", pages.healthz),
    Route("/signin", pages.signin_form, methods=["GET"]),
    Route("/signin", pages.signin, methods=["POST"]),
    Route("/signout", pages.signout, methods=["POST"]),
    Route("/", pages.home),
    Route(f"{P}/jobs", pages.jobs),
    Route(f"{P}/jobs/{{job}}", pages.job),
    Route(f"{P}/jobs/{{job}}/versions/{{version:int}}", pages.version),
    Route(f"{P}/jobs/{{job}}/versions/{{version:int}}/files", pages.files),
    Route(f"{P}/jobs/{{job}}/versions/{{version:int}}/files/{{path:path}}", pages.files),
    Route(f"{P}/jobs/{{job}}/versions/{{version:int}}/launch", pages.launch, methods=["GET", "POST"]),
    Route(f"{P}/queues", pages.queues),
    Route(f"{P}/queues/{{queue}}", pages.queue),
    Route(f"{P}/queues/{{queue}}/events", pages.queue_events),
    Route(f"{P}/queues/{{queue}}/pause", pages.set_paused, methods=["POST"]),
    Route(f"{P}/queues/{{queue}}/resume", pages.set_paused, methods=["POST"]),
    Route(f"{P}/queues/{{queue}}/items/{{item}}", pages.item),
    Route(f"{P}/queues/{{queue}}/items/{{item}}/events", pages.item_events),
    Route(f"{P}/queues/{{queue}}/items/{{item}}/cancel", pages.cancel_item, methods=["POST"]),
    Route(f"{P}/queues/{{queue}}/items/{{item}}/relaunch", pages.relaunch_item, methods=["POST"]),
    Route(f"{P}/runs", pages.runs),
    Route(f"{P}/runs/{{run}}", pages.run),
    Route(f"{P}/runs/{{run}}/metrics", pages.run_metrics),
    Route(f"{P}/runs/{{run}}/metrics/events", pages.metric_events),
    Route(f"{P}/runs/{{run}}/logs/events", pages.log_events),
    Route(f"{P}/compare", pages.compare),
    Route(f"{P}/artifactCollections", pages.artifacts),
    Route(f"{A}", pages.artifact),
    Route(f"{A}/versions/{{version:int}}", pages.artifact_version),
    Route(f"{A}/versions/{{version:int}}/files/{{path:path}}", pages.artifact_file),
    Mount("/static", StaticFiles(directory=PACKAGE / "static"), name="static"),
]


def create_app(
    channels: ServiceChannels,
    *,
    port: int,
    allowed: list[str],
    signin_code: OneTimeCode,
    admin_key: Callable[[], str | None],
    session_seconds: float,
) -> Starlette:
    """The app; ``port`` is the one it is served on (the Host check and the cookie's name use it)."""
    sessions = Sessions(session_seconds)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await channels.close()

    app = Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(
                Guard,
                sessions=sessions,
                hosts=allowed_hosts(allowed, port),
                cookie_name=f"takeoff_console_{port}",
            )
        ],
        exception_handlers={CallFailed: pages.call_failed},
        lifespan=lifespan,
    )
    templates = Jinja2Templates(directory=PACKAGE / "templates")
    app.state.console = pages.Console(channels, sessions, signin_code, admin_key, templates, OrderedDict())
    return app
