"""The web console in a real headless Chromium against a real stack (registry, queue, builder, console and an
agent running local processes), with the job and the queue made through the CLI: launching from the form (a
value out of the schema's bounds shows its field error, a valid one runs), the item reaching SUCCEEDED and the
run's chart and logs filling in on open pages, and a paused queue's pending reason. One stack and one browser
serve the whole module; every wait is on a condition of the page (WebDriverWait), none on time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as shows
from selenium.webdriver.support.wait import WebDriverWait

from tests.browser.console_stack import JOB, PROJECT, QUEUE, ConsoleStack, console_stack

FIRST_RUN_SECONDS = 150
"""Enough for the job's first venv build and its run, on a loaded CI machine."""


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, browser: WebDriver) -> Iterator[ConsoleStack]:
    with console_stack(tmp_path_factory.mktemp("console")) as console:
        console.sign_in(browser)
        yield console


def by_testid(name: str, more: str = "") -> tuple[str, str]:
    return By.CSS_SELECTOR, f'[data-testid="{name}"]{more}'


def wait(browser: WebDriver, seconds: float = 30) -> WebDriverWait[WebDriver]:
    """Waits on the page; an element replaced while read (a live update) is read again."""
    return WebDriverWait(browser, seconds, ignored_exceptions=(StaleElementReferenceException,))


def fill(browser: WebDriver, field: tuple[str, str], value: str) -> None:
    element: WebElement = wait(browser).until(shows.visibility_of_element_located(field))
    element.clear()
    element.send_keys(value)


def live(browser: WebDriver) -> None:
    """Wait until the page's event streams are connected, and mark the page: a reload would lose the mark."""
    wait(browser).until(shows.presence_of_element_located((By.CSS_SELECTOR, "body[data-live=open]")))
    browser.execute_script("window.notReloaded = true")


def not_reloaded(browser: WebDriver) -> bool:
    return browser.execute_script("return window.notReloaded === true") is True


@pytest.mark.timeout(FIRST_RUN_SECONDS + 90)  # also starts the module's stack (about 30 s) and browser
def test_the_launch_form_shows_a_bound_broken_inline_then_the_run_succeeds_with_its_chart_and_logs_live(
    browser: WebDriver, console: ConsoleStack
) -> None:
    browser.get(console.url(f"/projects/{PROJECT}/jobs/{JOB}/versions/0/launch?queue={QUEUE}"))
    fill(browser, by_testid("launch-field-lr"), "5")  # the schema's maximum is 1
    fill(browser, by_testid("launch-field-steps"), "30")
    browser.find_element(*by_testid("launch-submit")).click()
    error = wait(browser).until(shows.visibility_of_element_located(by_testid("field-error-run_config.lr")))
    assert error.text == "5 is greater than the maximum of 1"
    assert "/launch" in browser.current_url  # nothing was enqueued

    fill(browser, by_testid("launch-field-lr"), "0.5")
    browser.find_element(*by_testid("launch-submit")).click()
    wait(browser).until(lambda page: "/items/" in page.current_url)
    live(browser)
    wait(browser, FIRST_RUN_SECONDS).until(
        shows.text_to_be_present_in_element_attribute(by_testid("item-state"), "data-state", "SUCCEEDED")
    )
    assert not_reloaded(browser)

    browser.find_element(*by_testid("item-run-link")).click()
    chart = by_testid("metric-chart", '[data-metric="loss"]')
    wait(browser).until(shows.text_to_be_present_in_element_attribute(chart, "data-points", "30"))
    assert browser.find_element(*chart).get_attribute("data-points") == "30"  # every logged point drawn
    assert browser.find_elements(By.CSS_SELECTOR, '[data-testid="metric-chart"][data-metric="loss"] canvas')
    wait(browser).until(
        shows.text_to_be_present_in_element(by_testid("log-lines"), "trained for 30 steps with lr=0.5")
    )


def test_an_item_launched_on_a_paused_queue_shows_why_it_waits_on_the_open_queue_page_then_runs_once_resumed(
    browser: WebDriver, console: ConsoleStack
) -> None:
    browser.get(console.url(f"/projects/{PROJECT}/queues/{QUEUE}"))
    live(browser)
    console.cli("queue", "pause", QUEUE)
    item = console.cli("launch", JOB, "--queue", QUEUE).strip().rsplit("/", 1)[-1]
    row = f'[data-testid="item-row"][data-item="{item}"]'
    reason = (By.CSS_SELECTOR, f'{row} [data-testid="item-pending-reason"]')
    wait(browser).until(shows.text_to_be_present_in_element(reason, "paused"))
    assert browser.find_elements(*by_testid("queue-paused"))
    assert not_reloaded(browser)

    browser.find_element(*by_testid("queue-resume")).click()
    # Dispatched once resumed, and followed to its end on the open page.
    wait(browser, 90).until(
        shows.presence_of_element_located((By.CSS_SELECTOR, f'{row}[data-state="SUCCEEDED"]'))
    )
    assert not browser.find_elements(*by_testid("queue-paused"))
    assert browser.find_elements(*by_testid("agent-row"))  # the agent serving the queue
    assert not_reloaded(browser)
