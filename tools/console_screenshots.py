"""Screenshots of the console's main pages for the README, taken in headless Chromium against a real local
stack (the browser tests' setup, tests/browser/console_stack.py): the jobs page, the launch form showing a
field error, a paused queue with the pending reason of its items, and a run with its chart and logs.

    python tools/console_screenshots.py [--out docs/images]

Writes console-jobs.png, console-launch.png, console-queue.png and console-run.png. Each page is taken once
what it shows is there (waits on the page, never on time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as shows
from selenium.webdriver.support.wait import WebDriverWait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.browser

from tests.browser.console_stack import (
    JOB,
    PROJECT,
    QUEUE,
    ConsoleStack,
    chromium_paths,
    console_stack,
    start_chromium,
)

RUN_STEPS = 300
WAIT_SECONDS = 300


def by_testid(name: str, more: str = "") -> tuple[str, str]:
    return By.CSS_SELECTOR, f'[data-testid="{name}"]{more}'


def take(browser: WebDriver, out: Path, name: str, shown: tuple[str, str]) -> None:
    WebDriverWait(browser, WAIT_SECONDS).until(shows.visibility_of_element_located(shown))
    path = out / f"console-{name}.png"
    browser.save_screenshot(str(path))
    print(f"wrote {path}")


def shoot(console: ConsoleStack, browser: WebDriver, out: Path) -> None:
    console.sign_in(browser)
    launch = ["launch", JOB, "--queue", QUEUE, "--config", f"steps={RUN_STEPS}", "--config", "lr=0.01"]
    finished = json.loads(console.cli(*launch, "--wait", "--json", timeout=WAIT_SECONDS))
    run = finished["run"].rsplit("/", 1)[-1]

    browser.get(console.url(f"/projects/{PROJECT}/jobs"))
    take(browser, out, "jobs", by_testid("job-row"))

    browser.get(console.url(f"/projects/{PROJECT}/jobs/{JOB}/versions/0/launch?queue={QUEUE}"))
    field = WebDriverWait(browser, WAIT_SECONDS).until(
        shows.visibility_of_element_located(by_testid("launch-field-lr"))
    )
    field.clear()
    field.send_keys("5")
    browser.find_element(*by_testid("launch-submit")).click()
    take(browser, out, "launch", by_testid("field-error-run_config.lr"))

    console.cli("queue", "pause", QUEUE)
    for _ in range(3):
        console.cli("launch", JOB, "--queue", QUEUE)
    browser.get(console.url(f"/projects/{PROJECT}/queues/{QUEUE}"))
    take(browser, out, "queue", by_testid("item-pending-reason"))
    console.cli("queue", "resume", QUEUE)

    browser.get(console.url(f"/projects/{PROJECT}/runs/{run}"))
    chart = by_testid("metric-chart", '[data-metric="loss"]')
    WebDriverWait(browser, WAIT_SECONDS).until(
        shows.text_to_be_present_in_element_attribute(chart, "data-points", str(RUN_STEPS))
    )
    take(browser, out, "run", by_testid("log-line"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    paths = chromium_paths()
    if paths is None:
        sys.exit("no Chromium: install Debian's chromium and chromium-driver (.ci/browser-setup.sh)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="takeoff-shots-") as scratch:
        home = Path(scratch) / "home"
        home.mkdir()
        with console_stack(home) as console:
            browser = start_chromium(*paths, Path(scratch) / "profile")
            try:
                shoot(console, browser, args.out)
            finally:
                browser.quit()


if __name__ == "__main__":
    main()
