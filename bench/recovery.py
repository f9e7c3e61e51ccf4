"""Recovery: how long a fault costs, over real processes (docs/design.md §5, §16).

Starts the registry, the queue service (lease TTL ``--ttl``, heartbeat every 0.5 s) and the builder on Unix
sockets in a temporary TAKEOFF_HOME, and two agents (one job each) serving one local-process queue. The
job writes the time to a file as its first statement, attaches its run, and waits for a file named by its
run config. Then, ``--repeats`` times each:

- **failover**: an item runs; the agent holding its lease is killed (-9). Measured from the kill: the
  next attempt LEASED and RUNNING (the queue's transition times) and the next attempt's first line. Goal:
  the next attempt runs within TTL + 2 s. The killed agent is started again (it drops the lost lease)
  before the next repetition.
- **queue restart**: both agents run a job and a third item waits; the queue service is killed (-9), the
  two jobs end while it is down, and it is started again ``--down`` seconds after the kill. Measured: from
  the restarted service serving (its ready file) to the waiting item LEASED (goal: within 1.5 s), and the
  service's own start, from its process to its ready file.

Prints JSON and a table (p50 and max of each).

    python bench/recovery.py [--repeats 5] [--ttl 3] [--down 2]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf import struct_pb2

from takeoff.client import Client
from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from takeoff_rpc.channels import open_channel

T = TypeVar("T")

JOB = """\
import json, os, pathlib, time
first_line = time.time()
config = json.loads(os.environ["TAKEOFF_CONFIG"])
attempt = os.environ["TAKEOFF_ITEM"].rsplit("/", 1)[1] + "-" + os.environ["TAKEOFF_ATTEMPT"]
pathlib.Path(config["marks"], attempt).write_text(repr(first_line))
import takeoff
run = takeoff.init()
while not os.path.exists(config["go"]):
    time.sleep(0.05)
run.finish()
"""
LEASED = common_pb2.ITEM_STATE_LEASED
RUNNING = common_pb2.ITEM_STATE_RUNNING
ENDED = {common_pb2.ITEM_STATE_SUCCEEDED, common_pb2.ITEM_STATE_FAILED, common_pb2.ITEM_STATE_CANCELLED}
WAIT_SECONDS = 120.0


def wait_for(probe: Callable[[], T | None], what: str) -> T:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if (value := probe()) not in (None, False):
            return value  # type: ignore[return-value]
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


class Process:
    """A service or agent process that can be killed (-9) and started again with the same settings."""

    def __init__(self, argv: list[str], home: Path, name: str, env: dict[str, str]) -> None:
        self.argv = argv
        self.home = home
        self.name = name
        self.env = env
        self.ready_file = home / f"{name}.ready"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it; once it serves, the time its ready file was written."""
        self.ready_file.unlink(missing_ok=True)
        with (self.home / f"{self.name}.log").open("ab") as log:
            popen = subprocess.Popen(
                self.argv,
                env={**os.environ, "TAKEOFF_HOME": str(self.home), "TAKEOFF_READY_FILE": str(self.ready_file)}
                | self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.popen = popen

        def ready() -> float | None:
            if popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {popen.returncode}; see {self.home}/{self.name}.log"
                )
            return self.ready_file.stat().st_mtime if self.ready_file.exists() else None

        return wait_for(ready, f"{self.name} to serve")

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def service(name: str, home: Path, env: dict[str, str]) -> Process:
    address = f"unix:{home / f'{name}.sock'}"
    return Process(
        [sys.executable, "-m", f"takeoff_{name}"],
        home,
        name,
        {"TAKEOFF_LISTEN": json.dumps([address]), **env},
    )


def address(process: Process) -> str:
    return str(json.loads(process.env["TAKEOFF_LISTEN"])[0])


class Bench:
    def __init__(self, home: Path, ttl: float) -> None:
        self.home = home
        self.marks = home / "marks"
        self.marks.mkdir()
        # One admin key, which the registry imports on its first start and every process presents.
        self.admin_key = f"tko_bench_{secrets.token_urlsafe(32)}"
        key_file = home / "admin.key"
        key_file.write_text(self.admin_key)
        key_file.chmod(0o600)
        self.keys = {"TAKEOFF_API_KEY": self.admin_key, "TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE": str(key_file)}
        self.registry = service("registry", home, self.keys)
        self.queue_service = service(
            "queue",
            home,
            {
                **self.keys,
                "TAKEOFF_REGISTRY_ADDRESS": address(self.registry),
                "TAKEOFF_LEASE_TTL_SECONDS": str(ttl),
                "TAKEOFF_HEARTBEAT_INTERVAL_SECONDS": "0.5",
            },
        )
        self.builder = service(
            "builder", home, {**self.keys, "TAKEOFF_REGISTRY_ADDRESS": address(self.registry)}
        )
        self.agents: list[Process] = []
        self.channel = open_channel(address(self.queue_service), api_key=self.admin_key)
        self.queues = queue_pb2_grpc.QueueServiceStub(self.channel)
        self.queue = ""
        self.items = 0

    def start(self) -> None:
        for process in (self.registry, self.queue_service, self.builder):
            process.start()
        code = self.home / "code"
        code.mkdir()
        (code / "main.py").write_text(JOB)
        with Client(address(self.registry), project="bench", api_key=self.admin_key) as client:
            client.create_job_version("recovery", code, entrypoint=["python", "main.py"])
        self.queue = self.queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent="projects/bench",
                queue_id="recovery",
                queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS, max_attempts=10),
            )
        ).queue.name
        for index in (1, 2):
            config = self.home / f"agent-{index}.json"
            config.write_text(
                json.dumps(
                    {
                        "queues": [self.queue],
                        "max_jobs": 1,
                        "state_dir": str(self.home / f"agent-{index}"),
                        "queue_address": address(self.queue_service),
                        "builder_address": address(self.builder),
                        "registry_address": address(self.registry),
                        "stop_grace_seconds": 1,
                    }
                )
            )
            agent = Process(
                [sys.executable, "-m", "takeoff_agent", "--config", str(config)],
                self.home,
                f"agent-{index}",
                {**self.keys, "TAKEOFF_LISTEN": '["127.0.0.1:0"]'},
            )
            agent.start()
            self.agents.append(agent)
        self.wait_agents_connected()
        go = self.home / "warm"
        go.touch()
        self.wait_item(
            self.enqueue(go), lambda item: item.state in ENDED, "the first item (it builds the venv)"
        )

    def stop(self) -> None:
        for process in [*self.agents, self.builder, self.queue_service, self.registry]:
            process.stop()
        self.channel.close()

    def agent_name(self, agent: Process) -> str:
        return "agents/" + (self.home / agent.name / "agent_id").read_text().strip()

    def wait_agents_connected(self) -> None:
        def connected() -> bool:
            try:
                return all(
                    self.queues.GetAgent(
                        queue_pb2.GetAgentRequest(name=self.agent_name(agent))
                    ).agent.connected
                    for agent in self.agents
                )
            except (grpc.RpcError, OSError):
                return False

        wait_for(connected, "both agents to be connected")

    def enqueue(self, go: Path) -> str:
        config = struct_pb2.Struct()
        config.update({"marks": str(self.marks), "go": str(go)})
        request = queue_pb2.EnqueueRequest(queue=self.queue, job="recovery", run_config=config)
        self.items += 1
        return self.queues.Enqueue(request).item.name

    def item(self, name: str) -> queue_pb2.Item | None:
        try:
            return self.queues.GetItem(queue_pb2.GetItemRequest(name=name), timeout=5).item
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise

    def wait_item(self, name: str, done: Callable[[queue_pb2.Item], bool], what: str) -> queue_pb2.Item:
        def probe() -> queue_pb2.Item | None:
            item = self.item(name)
            return item if item is not None and done(item) else None

        return wait_for(probe, what)

    def first_line(self, item: queue_pb2.Item, attempt: int) -> float:
        mark = self.marks / f"{item.name.rsplit('/', 1)[1]}-{attempt}"

        def written() -> str | None:
            return (mark.read_text() or None) if mark.exists() else None

        return float(wait_for(written, f"{mark.name}'s first line"))

    # ----- the measurements ---------------------------------------------------------------------

    def failover(self) -> dict[str, float]:
        go = self.home / f"go-{self.items}"
        name = self.enqueue(go)
        item = self.wait_item(name, lambda item: item.state == RUNNING, "the item to run")
        [holder] = [agent for agent in self.agents if self.agent_name(agent) == item.agent]
        killed_at = time.time()
        holder.kill()
        item = self.wait_item(
            name, lambda item: item.attempt == 2 and item.state == RUNNING, "the next attempt to run"
        )
        first_line = self.first_line(item, 2)
        go.touch()
        self.wait_item(name, lambda item: item.state in ENDED, "the item to end")
        holder.start()
        self.wait_agents_connected()
        return {
            "leased_s": transition_time(item, 2, LEASED) - killed_at,
            "running_s": transition_time(item, 2, RUNNING) - killed_at,
            "first_line_s": first_line - killed_at,
        }

    def queue_restart(self, down: float) -> dict[str, float]:
        go = self.home / f"go-{self.items}"
        busy = [self.enqueue(go), self.enqueue(go)]
        for name in busy:
            self.wait_item(name, lambda item: item.state == RUNNING, "both agents to run a job")
        finished = self.home / "finished"  # exists: the waiting item's job ends as soon as it starts
        finished.touch()
        waiting = self.enqueue(finished)
        killed_at = time.monotonic()
        self.queue_service.kill()
        go.touch()  # the running jobs end while the queue service is down
        time.sleep(max(0.0, killed_at + down - time.monotonic()))  # the outage is the case
        spawned_at = time.time()
        serving_at = self.queue_service.start()
        item = self.wait_item(waiting, lambda item: item.state in ENDED, "the waiting item to end")
        leased_at = transition_time(item, 1, LEASED)
        return {
            "dispatch_after_serving_s": leased_at - serving_at,
            "serving_after_start_s": serving_at - spawned_at,
            "dispatch_after_start_s": leased_at - spawned_at,
        }


def transition_time(item: queue_pb2.Item, attempt: int, state: common_pb2.ItemState.ValueType) -> float:
    [time_] = [t.time for t in item.transitions if t.attempt == attempt and t.to_state == state]
    return time_.ToNanoseconds() / 1e9


def summarize(samples: list[dict[str, float]]) -> dict[str, dict[str, object]]:
    return {
        key: {
            "p50": round(statistics.median(sample[key] for sample in samples), 3),
            "max": round(max(sample[key] for sample in samples), 3),
            "all": [round(sample[key], 3) for sample in samples],
        }
        for key in samples[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ttl", type=float, default=3.0, help="the queue service's lease TTL, seconds")
    parser.add_argument("--down", type=float, default=2.0, help="how long the queue service stays down")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tk-recovery-") as directory:
        bench = Bench(Path(directory), args.ttl)
        try:
            bench.start()
            failovers = [bench.failover() for _ in range(args.repeats)]
            restarts = [bench.queue_restart(args.down) for _ in range(args.repeats)]
        finally:
            bench.stop()
    tables = {"failover": summarize(failovers), "queue_restart": summarize(restarts)}
    goals = {"failover running_s": args.ttl + 2, "queue_restart dispatch_after_serving_s": 1.5}
    settings = {"repeats": args.repeats, "ttl_s": args.ttl, "down_s": args.down}
    print(json.dumps({**settings, **tables, "goals": goals}, indent=2))
    print(f"\n{'measure':<40} {'p50 s':>8} {'max s':>8} {'goal s':>8}")
    for group, table in tables.items():
        for key, numbers in table.items():
            measure = f"{group} {key}"
            goal = goals.get(measure, "")
            print(f"{measure:<40} {numbers['p50']:>8} {numbers['max']:>8} {goal:>8}")


if __name__ == "__main__":
    main()
