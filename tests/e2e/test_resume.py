"""Checkpoints that outlive an agent (issue 18): a job that logs a checkpoint artifact every few steps is
killed (-9) with its agent mid-run; the item's next attempt runs on the other agent, resumes from the
checkpoint, and its steps continue after the last step the killed attempt logged. Lineage shows the
version the first run logged and the second used; the second run's ``resumed_from`` is the first.

Real processes throughout (tests/chaos/stack.py): registry, queue service and builder on Unix sockets, two
agents with one job each on one local-process queue. The job reports what it restored into a control
directory and, in its first attempt, waits there after its second checkpoint for a file the test never
writes, so the test kills it at a known point.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from takeoff import Client, ItemState, RunState
from takeoff.models import Item
from tests.agent.conftest import code_job
from tests.chaos.stack import Agent, Service
from tests.keys import ADMIN_KEY
from tests.processes import wait_for

pytestmark = pytest.mark.chaos

PROJECT = "resume"
LEASE_TTL_SECONDS = 3.0
LAST_STEP = 9
KILLED_AFTER_STEP = 6
"""The first attempt logs steps 0-6 (checkpoints after steps 2 and 5), then waits to be killed."""

JOB = """\
import json, os, pathlib, threading
config = json.loads(os.environ["TAKEOFF_CONFIG"])
os.environ["TAKEOFF_CACHE_DIR"] = config["cache"]
control = pathlib.Path(config["control"])
attempt = int(os.environ["TAKEOFF_ATTEMPT"])
import takeoff

run = takeoff.init(resume="allow")
state = {"step": -1, "total": 0}
if run.resumed_from:
    restored = run.use_artifact("ckpt:latest").download()
    state = json.loads((restored / "state.json").read_text())
report = {"pid": os.getpid(), "resumed_from": run.resumed_from, "restored": state, "next_step": run.step}
(control / f"attempt-{attempt}.json").write_text(json.dumps(report))
while run.step <= config["last_step"]:
    step = run.step
    state = {"step": step, "total": state["total"] + step}
    run.log({"loss": 1 / (step + 1), "total": state["total"]})
    if step % 3 == 2:
        checkpoint = pathlib.Path("ckpt")
        checkpoint.mkdir(exist_ok=True)
        (checkpoint / "state.json").write_text(json.dumps(state))
        run.log_artifact(checkpoint, name="ckpt", type="checkpoint")  # stored when it returns
    if attempt == 1 and step == config["killed_after_step"]:
        (control / "waiting").write_text(str(step))
        threading.Event().wait()  # until the test kills it
run.finish()
"""


@dataclass
class Stack:
    client: Client
    agents: list[Agent]
    queue: str
    control: Path
    cache: Path


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with ExitStack() as exits:
        registry = Service("registry", tmp_path, {})
        queue_service = Service(
            "queue",
            tmp_path,
            {
                "TAKEOFF_REGISTRY_ADDRESS": registry.address,
                "TAKEOFF_LEASE_TTL_SECONDS": str(LEASE_TTL_SECONDS),
                "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS": "0.5",
                "TAKEOFF_SHUTDOWN_GRACE_SECONDS": "1",
            },
        )
        builder = Service("builder", tmp_path, {"TAKEOFF_REGISTRY_ADDRESS": registry.address})
        services = [registry, queue_service, builder]
        for service in services:
            service.spawn()
            exits.callback(service.stop)
        for service in services:
            service.wait_serving()
        client = exits.enter_context(
            Client(registry.address, queue=queue_service.address, project=PROJECT, api_key=ADMIN_KEY)
        )
        queue = client.create_queue("resume", resource="local-process", max_attempts=3).name
        config = {
            "max_jobs": 1,
            "queues": [queue],
            "queue_address": queue_service.address,
            "builder_address": builder.address,
            "registry_address": registry.address,
            "stop_grace_seconds": 2,
        }
        agents = [Agent(index, tmp_path, config) for index in (1, 2)]
        for agent in agents:
            agent.start()
            exits.callback(agent.kill)
        control = tmp_path / "control"
        control.mkdir()
        yield Stack(client, agents, queue, control, tmp_path / "cache")


@pytest.mark.timeout(150)
def test_a_job_killed_with_its_agent_resumes_from_its_checkpoint_on_the_other_agent(stack: Stack) -> None:
    client = stack.client
    code_job(client, stack.control.parent, "trainer", JOB)
    config = {
        "control": str(stack.control),
        "cache": str(stack.cache),
        "last_step": LAST_STEP,
        "killed_after_step": KILLED_AFTER_STEP,
    }
    item = client.launch("trainer", stack.queue, config=config)

    # The first attempt has logged its steps and two checkpoints, and waits.
    wait_for((stack.control / "waiting").exists, timeout=90, what="the first attempt to wait")
    first = client.get_item(item.name)
    first_run = first.run
    wait_for(
        lambda: client.get_run(first_run).history_length == KILLED_AFTER_STEP + 1,
        what="the first attempt's rows to arrive",
    )
    [holder] = [agent for agent in stack.agents if agent.name == first.agent]
    [other] = [agent for agent in stack.agents if agent is not holder]
    holder.kill()
    first_report = json.loads((stack.control / "attempt-1.json").read_text())
    os.kill(first_report["pid"], signal.SIGKILL)

    ended = wait_for(lambda: ended_item(client, item.name), timeout=90, what="the item to end")
    assert (ended.state, ended.attempt) == (ItemState.SUCCEEDED, 2), ended
    assert {t.attempt: t.run for t in ended.transitions if t.run}[1] == first_run
    assert ended.agent == other.name  # the killed agent never came back
    second_run = ended.run

    # The second attempt resumed the first run from its latest checkpoint (after step 5).
    report = json.loads((stack.control / "attempt-2.json").read_text())
    assert report["resumed_from"] == first_run
    assert report["restored"] == {"step": 5, "total": sum(range(6))}
    assert report["next_step"] == KILLED_AFTER_STEP + 1
    resumed = client.get_run(second_run)
    assert (resumed.resumed_from, resumed.state, resumed.last_step) == (
        first_run,
        RunState.FINISHED,
        LAST_STEP,
    )
    rows = list(client.read_metrics(second_run))
    assert [row.step for row in rows] == list(range(KILLED_AFTER_STEP + 1, LAST_STEP + 1))
    assert rows[0].values["total"] == sum(range(6)) + KILLED_AFTER_STEP + 1  # built on the restored state
    assert client.get_run(first_run).state is RunState.KILLED

    # Lineage both ways: the first run logged v0 and v1; the second used v1 and logged v2 (after step 8).
    [used] = client.list_artifact_versions(used_by=second_run)
    assert (used.ref, used.run, used.used_by) == ("ckpt:v1", first_run, [second_run])
    logged = {version.ref: version.run for version in client.list_artifact_versions("ckpt")}
    assert logged == {"ckpt:v0": first_run, "ckpt:v1": first_run, "ckpt:v2": second_run}


def ended_item(client: Client, name: str) -> Item | None:
    item = client.get_item(name)
    return item if item.ended else None
