"""Page handlers: read the request, call the services as the signed-in user, render a view.

Each handler is small: path parameters name the resource, :class:`~takeoff_console.client.UserClient` calls
the services, :mod:`~takeoff_console.views` turns the answers into what the template shows. A failed call
raises :class:`~takeoff_console.client.CallFailed`, which :func:`call_failed` turns into a page that says
what went wrong (a 403 names the permission the key lacks).
"""

from __future__ import annotations

import asyncio
import io
import secrets
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.templating import Jinja2Templates

from takeoff.v1 import queue_pb2, runs_pb2
from takeoff_console import events, launch_form, views
from takeoff_console.client import CallFailed, ServiceChannels, UserClient
from takeoff_console.sessions import OneTimeCode, Session, Sessions
from takeoff_server.protovalues import dict_to_struct, struct_to_dict

MAX_SHOWN_FILE_BYTES = 512 * 1024
"""A file of a code version larger than this is listed but not shown."""


@dataclass
class Console:
    """What the handlers share: the channels, the sessions, the one-time code and the templates."""

    channels: ServiceChannels
    sessions: Sessions
    signin_code: OneTimeCode
    admin_key: Callable[[], str | None]
    """The stack's admin key, for the one-time link (read when the link is used)."""
    templates: Jinja2Templates
    archives: OrderedDict[str, bytes]


def console(request: Request) -> Console:
    found: Console = request.app.state.console
    return found


def session(request: Request) -> Session:
    found: Session = request.state.session
    return found


def client(request: Request) -> UserClient:
    key = session(request).key
    assert key is not None  # the guard serves signed-in sessions only past /signin
    return console(request).channels.as_user(key)


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
    return console(request).templates.TemplateResponse(
        request, template, {"session": session(request), **context}, status_code=status_code
    )


def project_of(request: Request) -> str:
    return str(request.path_params["project"])


# Sign-in.


def _local_path(target: str | None) -> str:
    """``target`` when it is a path on this console, else ``/``: a sign-in link never sends a browser away.

    Browsers read ``/\\host`` as ``//host`` and drop tabs and newlines from a URL, so a target holding a
    backslash or any control character is refused too, rather than trusting the redirect's quoting."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(ord(character) < 0x20 or ord(character) == 0x7F for character in target)
        or urlsplit(target).netloc
    ):
        return "/"
    return target


async def signin_form(request: Request) -> Response:
    code = request.query_params.get("code")
    next_path = _local_path(request.query_params.get("next"))
    if code is None:
        return render(request, "signin.html", next=next_path, error="", project="default")
    this = console(request)
    if not this.signin_code.redeem(code):
        error = "This sign-in link was already used or is not valid. Sign in with an API key."
        return render(request, "signin.html", 403, next=next_path, error=error, project="default")
    key = this.admin_key()
    if key is None:
        error = "The stack's admin key file is gone, so the link cannot sign in. Sign in with an API key."
        return render(request, "signin.html", 503, next=next_path, error=error, project="default")
    request.state.session = this.sessions.sign_in(session(request), key, "default")
    return RedirectResponse(next_path, status_code=303)


async def signin(request: Request) -> Response:
    form = await request.form()
    key = str(form.get("key", "")).strip()
    project = str(form.get("project", "")).strip() or "default"
    next_path = _local_path(str(form.get("next", "/")))
    this = console(request)
    try:
        valid = bool(key) and await this.channels.as_user(key).key_is_valid(project)
    except CallFailed as failure:
        message = f"Cannot check the key: {failure.status.message}"
        return render(request, "signin.html", 503, next=next_path, error=message, project=project)
    if not valid:
        message = "The registry does not know this key (or it was revoked)."
        return render(request, "signin.html", 403, next=next_path, error=message, project=project)
    request.state.session = this.sessions.sign_in(session(request), key, project)
    return RedirectResponse(next_path, status_code=303)


async def signout(request: Request) -> Response:
    request.state.session = console(request).sessions.sign_out(session(request))
    return RedirectResponse("/signin", status_code=303)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def home(request: Request) -> Response:
    return RedirectResponse(f"/projects/{session(request).project}/jobs", status_code=303)


# Jobs.


async def jobs(request: Request) -> Response:
    project = project_of(request)
    found = await client(request).list_jobs(project)
    return render(request, "jobs.html", project=project, jobs=found, last=views.last_segment, when=views.when)


async def job(request: Request) -> Response:
    project, job_id = project_of(request), request.path_params["job"]
    name = f"projects/{project}/jobs/{job_id}"
    user = client(request)
    found, versions = await user.get_job(name), await user.list_versions(name)
    return render(
        request,
        "job.html",
        project=project,
        job=found,
        job_id=job_id,
        versions=versions,
        sources={v.version: views.source_view(v) for v in versions},
        when=views.when,
    )


async def version(request: Request) -> Response:
    project, job_id, number = project_of(request), request.path_params["job"], request.path_params["version"]
    found = await client(request).get_version(f"projects/{project}/jobs/{job_id}/versions/{number}")
    return render(
        request,
        "version.html",
        project=project,
        job_id=job_id,
        version=found,
        source=views.source_view(found),
        schema=views.pretty_json(struct_to_dict(found.inputs.schema)),
        defaults=views.pretty_json(struct_to_dict(found.inputs.defaults)),
        when=views.when,
    )


async def files(request: Request) -> Response:
    project, job_id, number = project_of(request), request.path_params["job"], request.path_params["version"]
    path = request.path_params.get("path", "")
    user = client(request)
    found = await user.get_version(f"projects/{project}/jobs/{job_id}/versions/{number}")
    source = views.source_view(found)
    if source.kind != "code":
        return render(
            request, "error.html", 404, title="No files", message="Only code versions have files here."
        )
    data = await _archive(request, user, f"projects/{project}/artifacts/{source.code_sha256}")
    if data is None:
        message = "The code tarball is too large to open here."
        return render(request, "error.html", 413, title="Too large", message=message)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name)
        shown = next((m for m in members if m.name.removeprefix("./") == path), None) if path else None
        if path and shown is None:
            message = f"{path} is not in this version."
            return render(request, "error.html", 404, title="No such file", message=message)
        content = None
        if shown is not None and shown.size <= MAX_SHOWN_FILE_BYTES:
            extracted = archive.extractfile(shown)
            content = extracted.read().decode("utf-8", errors="replace") if extracted else ""
    return render(
        request,
        "files.html",
        project=project,
        job_id=job_id,
        version=found,
        members=members,
        path=path,
        shown=shown,
        content=content,
    )


async def _archive(request: Request, user: UserClient, name: str) -> bytes | None:
    """The code tarball's bytes. The last few are kept, since an artifact never changes (its name is its
    digest); a kept one is shown only after this user's key has read the version that names it."""
    cache = console(request).archives
    if name not in cache:
        data = await user.download_artifact(name)
        if data is None:
            return None
        cache[name] = data
        while len(cache) > 4:
            cache.popitem(last=False)
    cache.move_to_end(name)
    return cache[name]


# Launch.


async def launch(request: Request) -> Response:
    project, job_id, number = project_of(request), request.path_params["job"], request.path_params["version"]
    version_name = f"projects/{project}/jobs/{job_id}/versions/{number}"
    user = client(request)
    found = await user.get_version(version_name)
    queues = [views.queue_view(q) for q in await user.list_queues(project)]
    submitted = await _submitted(request)
    chosen = submitted.get(launch_form.QUEUE) or request.query_params.get("queue")
    queue = next((q for q in queues if q.id == chosen), queues[0] if queues else None)
    form = launch_form.LaunchForm.build(
        struct_to_dict(found.inputs.schema),
        struct_to_dict(found.inputs.defaults),
        {name: spec["schema"] for name, spec in (queue.template_variables if queue else {}).items()},
        request_id=secrets.token_hex(16),
    )

    def page(status_code: int = 200) -> Response:
        context = {"project": project, "job_id": job_id, "version": found, "queues": queues, "queue": queue}
        return render(request, "launch.html", status_code, form=form, **context)

    if request.method != "POST" or queue is None:
        return page()
    submission = form.read(submitted)
    if submission is None:
        return page(422)
    try:
        item = await user.enqueue(
            _enqueue_request(f"projects/{project}/queues/{queue.id}", version_name, submission)
        )
    except CallFailed as failure:
        if failure.code is not grpc.StatusCode.INVALID_ARGUMENT:
            raise
        form.refused(failure.status.violations, failure.status.message)
        return page(422)
    return RedirectResponse(views.ItemName.parse(item.name).url, status_code=303)


async def _submitted(request: Request) -> dict[str, str]:
    if request.method != "POST":
        return {}
    return {name: value for name, value in (await request.form()).items() if isinstance(value, str)}


def _enqueue_request(
    queue: str, version: str, submission: launch_form.Submission
) -> queue_pb2.EnqueueRequest:
    request = queue_pb2.EnqueueRequest(
        queue=queue,
        job=version,
        run_config=dict_to_struct(submission.run_config),
        template_variables=dict_to_struct(submission.template_variables),
        priority=views.PRIORITIES.get(submission.priority, views.PRIORITIES["medium"]),
        request_id=submission.request_id,
    )
    if submission.resource_config is not None:
        request.resource_config.CopyFrom(dict_to_struct(submission.resource_config))
    return request


# Queues and items.


async def queues(request: Request) -> Response:
    project = project_of(request)
    found = [views.queue_view(q) for q in await client(request).list_queues(project)]
    return render(request, "queues.html", project=project, queues=found)


async def queue(request: Request) -> Response:
    project, queue_id = project_of(request), request.path_params["queue"]
    found = await client(request).get_queue(f"projects/{project}/queues/{queue_id}")
    return render(request, "queue.html", project=project, queue=views.queue_view(found))


async def queue_events(request: Request) -> Response:
    name = f"projects/{project_of(request)}/queues/{request.path_params['queue']}"
    return events.event_stream(events.queue_events(client(request), name))


async def set_paused(request: Request) -> Response:
    project, queue_id = project_of(request), request.path_params["queue"]
    paused = request.url.path.endswith("/pause")
    found = await client(request).set_paused(f"projects/{project}/queues/{queue_id}", paused)
    if "hx-request" in request.headers:
        return render(request, "_queue_controls.html", project=project, queue=views.queue_view(found))
    return RedirectResponse(f"/projects/{project}/queues/{queue_id}", status_code=303)


def _item_name(request: Request) -> str:
    queue_id, item_id = request.path_params["queue"], request.path_params["item"]
    return f"projects/{project_of(request)}/queues/{queue_id}/items/{item_id}"


async def item(request: Request) -> Response:
    user = client(request)
    found = views.item_view(await user.get_item(_item_name(request)))
    return render(request, "item.html", project=project_of(request), item=found)


async def item_events(request: Request) -> Response:
    return events.event_stream(events.item_events(client(request), _item_name(request)))


async def cancel_item(request: Request) -> Response:
    await client(request).cancel_item(_item_name(request))
    return _back_to(request, views.ItemName.parse(_item_name(request)).url)


async def relaunch_item(request: Request) -> Response:
    form = await request.form()
    request_id = str(form.get("request_id", "")) or secrets.token_hex(16)
    new = await client(request).relaunch_item(_item_name(request), request_id)
    return _back_to(request, views.ItemName.parse(new.name).url)


def _back_to(request: Request, url: str) -> Response:
    if "hx-request" in request.headers:
        return Response(status_code=204, headers={"hx-redirect": url})
    return RedirectResponse(url, status_code=303)


# Runs.


async def runs(request: Request) -> Response:
    project = project_of(request)
    page_token = request.query_params.get("page_token", "")
    answer = await client(request).list_runs(project, page_token=page_token)
    return render(
        request,
        "runs.html",
        project=project,
        runs=[views.run_view(r) for r in answer.runs],
        next_page_token=answer.next_page_token,
    )


def _run_name(request: Request) -> str:
    return f"projects/{project_of(request)}/runs/{request.path_params['run']}"


async def run(request: Request) -> Response:
    user = client(request)
    found = await user.get_run(_run_name(request))
    (chain, resumed_by), (logged, used, lineage_refused) = await asyncio.gather(
        user.run_attempts(found), _lineage(user, found)
    )
    return render(
        request,
        "run.html",
        project=project_of(request),
        run=views.run_view(found),
        attempts=[views.run_view(r) for r in chain],
        resumed_by=[views.run_view(r) for r in resumed_by],
        logged=logged,
        used=used,
        lineage_refused=lineage_refused,
    )


LINEAGE_VERSIONS = 100
"""Artifact versions listed each way on a run page, newest first (a run that logged more shows these)."""


async def _lineage(
    user: UserClient, run: runs_pb2.Run
) -> tuple[list[views.ArtifactVersionView], list[views.ArtifactVersionView], str]:
    """The artifact versions ``run`` logged and used. A key that may read the run but not the project's
    artifacts still sees the run: the section names the permission instead."""
    every = f"{run.name.rpartition('/runs/')[0]}/artifactCollections/-"
    try:
        logged, used = await asyncio.gather(
            user.list_artifact_versions(every, logged_by=run.name, page_size=LINEAGE_VERSIONS),
            user.list_artifact_versions(every, used_by=run.name, page_size=LINEAGE_VERSIONS),
        )
    except CallFailed as failure:
        if failure.code is not grpc.StatusCode.PERMISSION_DENIED:
            raise
        return [], [], failure.status.metadata.get("permission", "")
    return (
        [views.artifact_version_view(v) for v in logged.versions],
        [views.artifact_version_view(v) for v in used.versions],
        "",
    )


async def run_metrics(request: Request) -> Response:
    """A run's chart data as JSON: one segment per attempt (the runs it continues, oldest first, then
    itself), each its history downsampled to ``max_points``."""
    try:
        max_points = int(request.query_params.get("max_points", events.CHART_POINTS))
    except ValueError:
        return PlainTextResponse("max_points must be a number", status_code=400)
    user = client(request)
    chain, _ = await user.run_attempts(await user.get_run(_run_name(request)))
    segments = []
    for attempt in chain:
        rows: list[dict[str, Any]] = []
        async for batch in user.read_metrics(attempt.name, max_points=max_points, follow=False):
            rows.extend(views.metric_rows(batch))
        segments.append({**views.attempt_segment(attempt), "rows": rows})
    return JSONResponse({"segments": segments})


async def metric_events(request: Request) -> Response:
    """The run's rows, following it live. With ``attempts=1`` (the run page), the earlier attempts' rows
    come first, each attempt announced by a ``segment`` event; the compare page shows the run alone."""
    if request.query_params.get("attempts") == "1":
        return events.event_stream(events.attempt_metric_events(client(request), _run_name(request)))
    return events.event_stream(events.metric_events(client(request), _run_name(request)))


async def log_events(request: Request) -> Response:
    return events.event_stream(events.log_events(client(request), _run_name(request)))


async def compare(request: Request) -> Response:
    project = project_of(request)
    ids = [r for value in request.query_params.getlist("runs") for r in value.split(",") if r.strip()]
    user = client(request)
    found = [views.run_view(await user.get_run(f"projects/{project}/runs/{r.strip()}")) for r in ids[:10]]
    keys = sorted({key for r in found for key in r.metric_keys})
    return render(request, "compare.html", project=project, runs=found, metric_keys=keys)


# Named artifacts.


async def artifacts(request: Request) -> Response:
    project = project_of(request)
    page_token = request.query_params.get("page_token", "")
    answer = await client(request).list_artifact_collections(project, page_token=page_token)
    return render(
        request,
        "artifacts.html",
        project=project,
        collections=[views.artifact_collection_view(c) for c in answer.collections],
        next_page_token=answer.next_page_token,
    )


def _collection_name(request: Request) -> str:
    return f"projects/{project_of(request)}/artifactCollections/{request.path_params['artifact']}"


async def artifact(request: Request) -> Response:
    name = _collection_name(request)
    page_token = request.query_params.get("page_token", "")
    user = client(request)
    found = await user.get_artifact_collection(name)
    answer = await user.list_artifact_versions(name, page_token=page_token)
    return render(
        request,
        "artifact.html",
        project=project_of(request),
        collection=views.artifact_collection_view(found),
        versions=[views.artifact_version_view(v) for v in answer.versions],
        next_page_token=answer.next_page_token,
    )


def _artifact_version_name(request: Request) -> str:
    return f"{_collection_name(request)}/versions/{request.path_params['version']}"


async def artifact_version(request: Request) -> Response:
    found = await client(request).get_artifact_version(_artifact_version_name(request))
    view = views.artifact_version_view(found)
    return render(request, "artifact_version.html", project=project_of(request), version=view)


async def artifact_file(request: Request) -> Response:
    """One file of a version, downloaded: the registry's chunks relayed as they come (never the whole file
    in memory), with the length from the file's entry, so a download cut short shows as failed."""
    download = await client(request).read_artifact_file(
        _artifact_version_name(request), request.path_params["path"]
    )
    headers = {
        "content-length": str(download.file.size_bytes),
        "content-disposition": views.attachment(download.file.path),
    }
    if request.method == "HEAD":
        download.cancel()
        return Response(media_type="application/octet-stream", headers=headers)
    return StreamingResponse(download.chunks, media_type="application/octet-stream", headers=headers)


# Failures.


async def call_failed(request: Request, failure: Exception) -> Response:
    assert isinstance(failure, CallFailed)
    status = failure.status
    if failure.code is grpc.StatusCode.UNAUTHENTICATED:
        request.state.session = console(request).sessions.sign_out(session(request))
        return RedirectResponse("/signin", status_code=303)
    if failure.code is grpc.StatusCode.PERMISSION_DENIED:
        permission = status.metadata.get("permission", "")
        resource = status.metadata.get("resource", "")
        message = f"Your key lacks the permission {permission}" + (f" on {resource}." if resource else ".")
        return render(request, "error.html", 403, title="Not allowed", message=message, permission=permission)
    codes = {
        grpc.StatusCode.NOT_FOUND: (404, "Not found"),
        grpc.StatusCode.INVALID_ARGUMENT: (400, "Not a valid request"),
        grpc.StatusCode.FAILED_PRECONDITION: (409, "Not possible now"),
        grpc.StatusCode.UNAVAILABLE: (503, f"The {failure.service} service is not answering"),
        grpc.StatusCode.DEADLINE_EXCEEDED: (503, f"The {failure.service} service is not answering"),
    }
    code, title = codes.get(failure.code, (502, f"The {failure.service} service failed"))
    # The reason (ErrorInfo's, or the code's name) is what to search for or quote when asking for help.
    return render(
        request, "error.html", code, title=title, message=status.message, permission="", reason=status.reason
    )
