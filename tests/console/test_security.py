"""The console's guard against a real console process in front of a real registry and queue service:
sign-in, the one-time link, the Host check, CSRF, and a key's own permissions."""

from __future__ import annotations

import re

import httpx

from takeoff.v1 import keys_pb2, queue_pb2, queue_pb2_grpc, runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.console.conftest import JOB, PROJECT, QUEUE, Console, project_key
from tests.keys import ADMIN_KEY

LAUNCH = f"/{JOB}/versions/0/launch"


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'data-csrf="([^"]+)"', page.text)
    assert found, f"no CSRF token on the page:\n{page.text[:500]}"
    return found.group(1)


def signed_in(console: Console, key: str) -> httpx.Client:
    """A browser signed in with ``key`` through the form."""
    browser = console.browser()
    form = browser.get("/signin")
    answer = browser.post(
        "/signin", data={"key": key, "project": PROJECT, "next": "/", "csrf_token": csrf_of(form)}
    )
    assert answer.status_code == 303, answer.text
    return browser


def item_count(console: Console) -> int:
    with open_channel(console.queue, api_key=ADMIN_KEY) as channel:
        answer = queue_pb2_grpc.QueueServiceStub(channel).ListItems(
            queue_pb2.ListItemsRequest(parent=QUEUE, page_size=1000), timeout=30
        )
    return len(answer.items)


def paused(console: Console) -> bool:
    with open_channel(console.queue, api_key=ADMIN_KEY) as channel:
        return (
            queue_pb2_grpc.QueueServiceStub(channel)
            .GetQueue(queue_pb2.GetQueueRequest(name=QUEUE), timeout=30)
            .queue.paused
        )


def test_a_browser_that_has_not_signed_in_gets_no_page(console: Console) -> None:
    browser = console.browser()
    page = browser.get(f"/projects/{PROJECT}/queues/main")
    assert page.status_code == 303
    assert page.headers["location"] == f"/signin?next=%2Fprojects%2F{PROJECT}%2Fqueues%2Fmain"
    events = browser.get(f"/projects/{PROJECT}/queues/main/events", headers={"accept": "text/event-stream"})
    assert events.status_code == 401
    assert browser.get("/signin").status_code == 200


def test_a_host_the_console_does_not_answer_to_is_refused(console: Console) -> None:
    browser = signed_in(console, ADMIN_KEY)
    assert browser.get(f"/projects/{PROJECT}/jobs").status_code == 200
    for host in (f"attacker.example:{console.port}", f"127.0.0.1:{console.port + 1}", "localhost"):
        refused = browser.get(f"/projects/{PROJECT}/jobs", headers={"host": host})
        assert refused.status_code == 400, host
        assert "train" not in refused.text
    assert browser.get("/healthz", headers={"host": f"localhost:{console.port}"}).status_code == 200


def test_a_post_without_the_csrf_token_changes_nothing(console: Console) -> None:
    browser = signed_in(console, ADMIN_KEY)
    token = csrf_of(browser.get(f"/projects/{PROJECT}/queues/main"))
    assert browser.post(f"/projects/{PROJECT}/queues/main/pause").status_code == 403
    assert (
        browser.post(f"/projects/{PROJECT}/queues/main/pause", data={"csrf_token": "x" + token}).status_code
        == 403
    )
    assert not paused(console)
    assert (
        browser.post(f"/projects/{PROJECT}/queues/main/pause", headers={"x-csrf-token": token}).status_code
        == 303
    )
    assert paused(console)
    assert (
        browser.post(f"/projects/{PROJECT}/queues/main/resume", data={"csrf_token": token}).status_code == 303
    )
    assert not paused(console)


def test_the_one_time_link_signs_in_once_with_the_admin_key(console: Console) -> None:
    assert not console.code_file.exists(), "the console keeps the code in memory only"
    first = console.browser()
    answer = first.get(f"/signin?code={console.signin_code}&next=/projects/{PROJECT}/queues")
    assert (answer.status_code, answer.headers["location"]) == (303, f"/projects/{PROJECT}/queues")
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    page = first.get(f"/projects/{PROJECT}/queues")
    assert page.status_code == 200
    assert 'data-queue="main"' in page.text
    assert ADMIN_KEY not in page.text

    second = console.browser()
    again = second.get(f"/signin?code={console.signin_code}")
    assert again.status_code == 403
    assert 'data-testid="signin-error"' in again.text
    assert second.get(f"/projects/{PROJECT}/queues").status_code == 303


def test_a_link_never_sends_the_browser_off_the_console(console: Console) -> None:
    browser = console.browser()
    form = browser.get("/signin")
    for target in ("https://attacker.example/", "//attacker.example/x"):
        answer = browser.post(
            "/signin",
            data={"key": ADMIN_KEY, "project": PROJECT, "next": target, "csrf_token": csrf_of(form)},
        )
        assert (answer.status_code, answer.headers["location"]) == (303, "/")
        browser = console.browser()
        form = browser.get("/signin")


def test_an_unknown_key_does_not_sign_in(console: Console) -> None:
    browser = console.browser()
    form = browser.get("/signin")
    answer = browser.post(
        "/signin", data={"key": "tko_nobody_" + "x" * 43, "project": PROJECT, "csrf_token": csrf_of(form)}
    )
    assert answer.status_code == 403
    assert 'data-testid="signin-error"' in answer.text
    assert browser.get(f"/projects/{PROJECT}/jobs").status_code == 303


def test_a_read_only_key_cannot_enqueue_and_is_told_the_permission(console: Console) -> None:
    browser = signed_in(console, project_key(console.registry, keys_pb2.PROJECT_ROLE_READ))
    form = browser.get(LAUNCH)
    assert form.status_code == 200
    assert 'data-testid="launch-field-lr"' in form.text
    before = item_count(console)
    refused = browser.post(
        LAUNCH, data={"csrf_token": csrf_of(form), "queue": "main", "run_config.lr": "0.5"}
    )
    assert refused.status_code == 403
    assert '<code data-testid="error-permission">items.write</code>' in refused.text
    assert item_count(console) == before


def test_the_server_s_field_violation_is_shown_next_to_its_field(console: Console) -> None:
    browser = signed_in(console, project_key(console.registry, keys_pb2.PROJECT_ROLE_WRITE))
    form = browser.get(LAUNCH)
    before = item_count(console)
    bad = browser.post(LAUNCH, data={"csrf_token": csrf_of(form), "queue": "main", "run_config.lr": "7"})
    assert bad.status_code == 422
    error = re.search(r'data-testid="field-error-run_config.lr">([^<]*)<', bad.text)
    assert error is not None, bad.text
    assert "7" in error.group(1)
    assert item_count(console) == before
    good = browser.post(LAUNCH, data={"csrf_token": csrf_of(form), "queue": "main", "run_config.lr": "0.5"})
    assert good.status_code == 303, re.findall(r"(?:launch-errors|field-error)[^<]*<[^<]*<[^<]*", good.text)
    assert good.headers["location"].startswith(f"/projects/{PROJECT}/queues/main/items/")
    assert item_count(console) == before + 1
    item = browser.get(good.headers["location"])
    assert 'data-testid="item-state" data-state="PENDING"' in item.text
    assert "No agent serves this queue" in item.text


def test_what_a_job_wrote_is_shown_as_text(console: Console) -> None:
    """A run's name, config and tags are the job's own words: markup in them is shown, never parsed."""
    attack = '<img src=x onerror="alert(1)">'
    run = runs_pb2.Run(display_name=attack, tags=[attack])
    run.config.update({"lr": attack})
    with open_channel(console.registry, api_key=ADMIN_KEY) as channel:
        created = runs_pb2_grpc.RunServiceStub(channel).CreateRun(
            runs_pb2.CreateRunRequest(parent=f"projects/{PROJECT}", run=run), timeout=30
        )
    page = signed_in(console, ADMIN_KEY).get("/" + created.run.name)
    assert page.status_code == 200
    assert "<img" not in page.text
    assert "&lt;img src=x onerror=" in page.text
