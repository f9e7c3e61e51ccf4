"""Console speed: the runs page, a long run's chart data, and a metric's way from a job to an open page.

Starts a local stack with the console (registry, queue, builder, console) in a temporary TAKEOFF_HOME and
seeds project ``bench`` through the registry's API: ``--runs`` runs (10,000), and one more whose history holds
``--points`` rows of one metric (100,000). Then, over loopback with a signed-in session (keep-alive, so each
figure is the console's time plus a loopback round trip):

- ``runs page``: ``GET /projects/bench/runs``, the first 50 of the newest runs (goal: p50 <= 100 ms);
- ``chart data``: ``GET /projects/bench/runs/{run}/metrics?max_points=1000`` of the long run, which the
  registry downsamples keeping each bucket's minimum and maximum (goal: p50 <= 300 ms);
- ``metric -> page``: a job's ``run.log()`` (the SDK, in this process) to the point drawn on the run's page
  open in headless Chromium: the page's chart counts its points in ``data-points``, and a MutationObserver
  stamps each change with the browser's clock, which is this host's (goal: p50 <= 500 ms). The path: the
  SDK's sender (it sends every 0.2 s), the registry's commit, its ReadMetrics follow stream, the console's
  server-sent events, the chart's redraw.

Prints JSON and a table.

    python bench/console.py [--runs 10000] [--points 100000] [--samples 30] [--live 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as shows
from selenium.webdriver.support.wait import WebDriverWait

import takeoff
from takeoff.stack import LocalStack
from takeoff.v1 import runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_aio_channel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.browser

from tests.browser.console_stack import chromium_paths, start_chromium

PROJECT = "bench"
ROWS_PER_CALL = 10_000
"""The most rows one BatchLogMetrics takes."""
SEEDING_CALLS_IN_FLIGHT = 128
GOALS_MS = {"runs page": 100.0, "chart data": 300.0, "metric -> page": 500.0}
STAMP_POINTS = """
const chart = document.querySelector('[data-testid="metric-chart"][data-metric="loss"]');
window.pointsSeenAt = {};
new MutationObserver(() => { window.pointsSeenAt[chart.dataset.points] = Date.now(); })
  .observe(chart, {attributes: true, attributeFilter: ["data-points"]});
"""
"""Stamps each change of the loss chart's point count with the browser's clock (milliseconds since 1970)."""


async def seed(registry: str, key: str, runs: int, points: int) -> str:
    """Create ``runs`` runs and one with ``points`` rows of ``loss``; returns the long run's id."""
    async with open_aio_channel(registry, api_key=key) as channel:
        stub = runs_pb2_grpc.RunServiceStub(channel)
        room = asyncio.Semaphore(SEEDING_CALLS_IN_FLIGHT)

        async def create(index: int) -> None:
            async with room:
                run = runs_pb2.Run(display_name=f"seeded-{index}")
                await stub.CreateRun(runs_pb2.CreateRunRequest(parent=f"projects/{PROJECT}", run=run))

        await asyncio.gather(*(create(index) for index in range(runs)))
        long = (
            await stub.CreateRun(
                runs_pb2.CreateRunRequest(parent=f"projects/{PROJECT}", run=runs_pb2.Run(display_name="long"))
            )
        ).run
        for start in range(0, points, ROWS_PER_CALL):
            rows = [
                runs_pb2.MetricRow(step=step, values={"loss": 1.0 / (step + 1)})
                for step in range(start, min(points, start + ROWS_PER_CALL))
            ]
            await stub.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=long.name, rows=rows))
        return long.name.rsplit("/", 1)[-1]


def timed_gets(client: httpx.Client, path: str, samples: int) -> list[float]:
    """Milliseconds per GET of ``path``, after two that warm caches and connections."""
    for _ in range(2):
        client.get(path).raise_for_status()
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        client.get(path).raise_for_status()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def seen(count: int) -> Callable[[WebDriver], float | Literal[False]]:
    """When the chart first showed ``count`` points (browser clock, ms), once it has."""
    return lambda page: page.execute_script(f"return window.pointsSeenAt['{count}']") or False


def metric_to_page(browser: WebDriver, console_url: str, samples: int) -> list[float]:
    """Milliseconds from ``run.log()`` to the point's count on the open run page, one point at a time."""
    run = takeoff.init(project=PROJECT, name="live")
    try:
        run.log({"loss": 1.0})  # the chart exists once its metric has a point
        browser.get(f"{console_url}/projects/{PROJECT}/runs/{run.id}")
        chart = (By.CSS_SELECTOR, '[data-testid="metric-chart"][data-metric="loss"]')
        WebDriverWait(browser, 60).until(
            shows.text_to_be_present_in_element_attribute(chart, "data-points", "1")
        )
        browser.execute_script(STAMP_POINTS)
        latencies = []
        for step in range(1, samples + 1):
            logged = time.time() * 1e3
            run.log({"loss": 1.0 / (step + 1)})  # no step: the row is written at once, not with the next
            seen_at = WebDriverWait(browser, 30, poll_frequency=0.01).until(seen(step + 1))
            latencies.append(seen_at - logged)
        return latencies
    finally:
        run.finish()


def summary(name: str, times: list[float]) -> dict[str, object]:
    ordered = sorted(times)
    return {
        "measure": name,
        "samples": len(ordered),
        "p50_ms": round(statistics.median(ordered), 1),
        "p90_ms": round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 1),
        "max_ms": round(ordered[-1], 1),
        "goal_p50_ms": GOALS_MS[name],
    }


def measure(args: argparse.Namespace, scratch: Path) -> list[dict[str, object]]:
    home = scratch / "home"
    home.mkdir()
    stack = LocalStack(home, base_port=0, console_port=0)
    record = stack.start()
    paths = chromium_paths()
    if paths is None:
        sys.exit("no Chromium: install Debian's chromium and chromium-driver (.ci/browser-setup.sh)")
    browser = start_chromium(*paths, scratch / "profile")
    try:
        registry = record.services["registry"].address
        os.environ |= {"TAKEOFF_HOME": str(home), "TAKEOFF_API_KEY": stack.admin_key}  # the SDK's "job"
        started = time.perf_counter()
        long_run = asyncio.run(seed(registry, stack.admin_key, args.runs, args.points))
        print(f"seeded {args.runs} runs and {args.points} points in {time.perf_counter() - started:.0f}s")
        browser.get(stack.console_signin_url)
        WebDriverWait(browser, 30).until(lambda page: "/signin" not in page.current_url)
        cookies = {cookie["name"]: cookie["value"] for cookie in browser.get_cookies()}
        with httpx.Client(base_url=stack.console_url, cookies=cookies, timeout=60) as client:
            runs_page = timed_gets(client, f"/projects/{PROJECT}/runs", args.samples)
            chart = timed_gets(
                client, f"/projects/{PROJECT}/runs/{long_run}/metrics?max_points=1000", args.samples
            )
        live = metric_to_page(browser, stack.console_url, args.live)
    finally:
        browser.quit()
        stack.stop()
    return [summary("runs page", runs_page), summary("chart data", chart), summary("metric -> page", live)]


def print_table(rows: list[dict[str, object]]) -> None:
    print(json.dumps(rows, indent=2))
    columns = ("measure", "samples", "p50_ms", "p90_ms", "max_ms", "goal_p50_ms")
    print("\n" + " ".join(f"{name:>14}" for name in columns))
    for row in rows:
        print(" ".join(f"{row[name]!s:>14}" for name in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=30, help="GETs timed per page")
    parser.add_argument("--live", type=int, default=20, help="points timed from run.log() to the page")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="takeoff-bench-") as scratch:
        print_table(measure(args, Path(scratch)))


if __name__ == "__main__":
    main()
