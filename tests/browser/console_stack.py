"""A local stack with the web console, as a user gets it from `takeoff up`: a job with a bounded inputs schema
and a queue made through the CLI, an agent serving the queue, and a headless Chromium signed in through the
one-time link. The browser tests, tools/console_screenshots.py and bench/console.py drive it.

No pytest here: the tool and the bench import it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

from takeoff.stack import LocalStack

PROJECT = "default"
JOB = "train"
QUEUE = "local"
STEPS_DEFAULT = 25
CONFIG_SCHEMA = {
    "type": "object",
    "properties": {
        "lr": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.1, "description": "learning rate"},
        "steps": {"type": "integer", "minimum": 1, "maximum": 100_000, "default": STEPS_DEFAULT},
    },
}
JOB_SCRIPT = """\
import takeoff

run = takeoff.init()
weight = 5.0
for step in range(run.config["steps"]):
    weight -= run.config["lr"] * 2 * weight
    run.log({"loss": weight * weight}, step=step)
print(f"trained for {run.config['steps']} steps with lr={run.config['lr']}")
run.summary["final_loss"] = weight * weight
run.finish()
"""
"""The job: logs one `loss` point a step, prints one line, and reports a summary (the SDK alone)."""

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",  # wide enough for the pages' tables; the screenshots' size too
)
_KEY_VARIABLES = (
    "TAKEOFF_API_KEY",
    "TAKEOFF_TOKEN",
    "TAKEOFF_API_KEY_FILE",
    "TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE",
)


def chromium_paths() -> tuple[Path, Path] | None:
    """The browser and its driver (``TAKEOFF_TEST_CHROMIUM``, ``TAKEOFF_TEST_CHROMEDRIVER``, else Debian's
    paths), when both are installed."""
    binary = Path(os.environ.get("TAKEOFF_TEST_CHROMIUM", "/usr/bin/chromium"))
    driver = Path(os.environ.get("TAKEOFF_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
    if os.access(binary, os.X_OK) and os.access(driver, os.X_OK):
        return binary, driver
    return None


def start_chromium(binary: Path, driver: Path, profile: Path) -> WebDriver:
    """A headless Chromium with a fresh profile that reaches nothing but the pages it is sent to. The driver
    is named outright, so Selenium Manager never runs and nothing is downloaded."""
    options = Options()
    options.binary_location = str(binary)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=str(driver)), options=options)


@dataclass
class ConsoleStack:
    stack: LocalStack
    home: Path

    def cli(self, *args: str, timeout: float = 120) -> str:
        """Run ``takeoff ARGS`` as a user of this stack does (its home, its admin key); its output."""
        environment = {name: value for name, value in os.environ.items() if name not in _KEY_VARIABLES}
        environment |= {"TAKEOFF_HOME": str(self.home), "TAKEOFF_API_KEY": self.stack.admin_key}
        done = subprocess.run(
            [sys.executable, "-m", "takeoff.cli", *args],
            env={**environment, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"takeoff {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def url(self, path: str) -> str:
        return f"{self.stack.console_url}{path}"

    def sign_in(self, browser: WebDriver) -> None:
        """Open the one-time sign-in link: the console signs the browser in and shows the jobs page."""
        browser.get(self.stack.console_signin_url)
        WebDriverWait(browser, 30).until(lambda page: "/signin" not in page.current_url)

    def start_agent(self) -> None:
        config = self.home / "agent.yaml"
        config.write_text(f"name: console-agent\nproject: {PROJECT}\nqueues: [{QUEUE}]\nmax_jobs: 2\n")
        self.stack.start_agent(config)


@contextmanager
def console_stack(home: Path, *, agent: bool = True) -> Iterator[ConsoleStack]:
    """A started stack with the console, job ``train`` (version 0) and queue ``local`` made through the CLI,
    and (with ``agent``) an agent serving the queue. Stopped on exit."""
    stack = LocalStack(home, base_port=0, console_port=0)
    stack.start()
    try:
        console = ConsoleStack(stack, home)
        code = home / "job"
        code.mkdir()
        (code / "train.py").write_text(JOB_SCRIPT)
        (home / "schema.json").write_text(json.dumps(CONFIG_SCHEMA))
        console.cli(
            "job", "create", str(code), "--name", JOB, "--entrypoint", "python train.py",
            "--config-schema", str(home / "schema.json"), "--metric", "loss",
        )  # fmt: skip
        console.cli("queue", "create", QUEUE, "--description", "this machine's processes")
        if agent:
            console.start_agent()
        yield console
    finally:
        stack.stop()
