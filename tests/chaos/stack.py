"""A stack of real processes, each of which can be killed (-9) and started again at the same address.

Every service listens on a Unix socket in the stack's home, so a restarted one is found where its peers
already look (a TCP port given back by a dead process could be taken by anything in the meantime). Output
goes to a log file per service, appended across restarts, rather than to a pipe nobody reads: a chatty
service would block on a full pipe in the middle of the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import grpc

from takeoff.v1 import agent_pb2, common_pb2, queue_pb2, queue_pb2_grpc, runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.agent.conftest import AgentProcess
from tests.keys import ADMIN_KEY
from tests.processes import wait_for

LOG_TAIL_LINES = 30


class Service:
    """``python -m takeoff_<name>`` on ``unix:{home}/{name}.sock``, restartable."""

    def __init__(self, name: str, home: Path, env: dict[str, str]) -> None:
        self.name = name
        self.home = home
        self.env = env
        self.address = f"unix:{home / f'{name}.sock'}"
        self.log = home / f"{name}.log"
        self.ready_file = home / f"{name}.ready"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it serves."""
        self.spawn()
        self.wait_serving()

    def spawn(self) -> None:
        """Start it (its peers find it once it serves: :meth:`wait_serving`)."""
        self.ready_file.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", f"takeoff_{self.name}"],
                env={
                    **os.environ,
                    "TAKEOFF_HOME": str(self.home),
                    "TAKEOFF_LISTEN": json.dumps([self.address]),
                    "TAKEOFF_READY_FILE": str(self.ready_file),
                    **self.env,
                },
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.process = process

    def wait_serving(self) -> None:
        process = self.process
        assert process is not None

        def serving() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {process.returncode}:\n{self.log_tail()}")
            return self.ready_file.exists()

        wait_for(serving, timeout=60, what=f"{self.name} to serve")

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        except OSError:
            return ""


class Agent:
    """``python -m takeoff_agent`` with one config and state directory, so a restart takes its leases back."""

    def __init__(self, index: int, home: Path, config: dict[str, object]) -> None:
        self.index = index
        self.home = home
        self.state_dir = home / f"agent-{index}"
        self.config_file = home / f"agent-{index}.yaml"
        self.config_file.write_text(json.dumps({**config, "state_dir": str(self.state_dir)}))
        self.log = home / f"agent-{index}.log"
        self.process: AgentProcess | None = None

    @property
    def name(self) -> str:
        """``agents/{id}``: the id the agent keeps in its state directory."""
        agent_id = wait_for(
            lambda: (
                (self.state_dir / "agent_id").exists() and (self.state_dir / "agent_id").read_text().strip()
            ),
            what=f"agent {self.index} to have an id",
        )
        return f"agents/{agent_id}"

    def start(self) -> None:
        ready_file = self.home / f"agent-{self.index}-{uuid.uuid4().hex[:6]}.ready"
        with self.log.open("a") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "takeoff_agent", "--config", str(self.config_file)],
                env={
                    **os.environ,
                    "TAKEOFF_HOME": str(self.home),
                    "TAKEOFF_LISTEN": '["127.0.0.1:0"]',
                    "TAKEOFF_READY_FILE": str(ready_file),
                },
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.process = AgentProcess(process, self.state_dir, ready_file, self.log)

    def connected(self) -> bool:
        """Whether this agent says it holds a session with the queue service."""
        if self.process is None or self.process.process.poll() is not None:
            return False
        try:
            return self.process.status().connected
        except grpc.RpcError:
            return False

    def running(self) -> list[agent_pb2.ActiveWork]:
        """What this agent, connected, says it runs now (nothing while it cannot be asked)."""
        if self.process is None or self.process.process.poll() is not None:
            return []
        try:
            status = self.process.status()
        except grpc.RpcError:
            return []
        return [work for work in status.work if status.connected and work.state == RUNNING]

    def kill(self) -> None:
        if self.process is not None and self.process.process.poll() is None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None and self.process.process.poll() is None:
            try:
                self.process.terminate(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


RUNNING = common_pb2.ITEM_STATE_RUNNING
TERMINAL = frozenset(
    {common_pb2.ITEM_STATE_SUCCEEDED, common_pb2.ITEM_STATE_FAILED, common_pb2.ITEM_STATE_CANCELLED}
)


class Observer:
    """The test's own view of the queue and the registry, through channels that find a restarted service
    again within a couple of seconds (takeoff_rpc's options); a call that finds a service down answers
    None instead of failing the test."""

    def __init__(self, queue_address: str, registry_address: str) -> None:
        self._queue_channel = open_channel(queue_address, api_key=ADMIN_KEY)
        self.queues = queue_pb2_grpc.QueueServiceStub(self._queue_channel)
        self._registry_channel = open_channel(registry_address, api_key=ADMIN_KEY)
        self.runs = runs_pb2_grpc.RunServiceStub(self._registry_channel)

    def items(self, queue: str) -> list[queue_pb2.Item] | None:
        """Every item of ``queue`` with its history, or None while the queue service is away."""
        items: list[queue_pb2.Item] = []
        token = ""
        try:
            while True:
                reply = self.queues.ListItems(
                    queue_pb2.ListItemsRequest(parent=queue, page_size=1000, page_token=token), timeout=10
                )
                items.extend(reply.items)
                if not (token := reply.next_page_token):
                    return items
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise

    def run(self, name: str) -> runs_pb2.Run | None:
        """The run, or None if it was never created."""
        try:
            return self.runs.GetRun(runs_pb2.GetRunRequest(name=name), timeout=10).run
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def agent_leases(self, agent: str) -> list[queue_pb2.AgentLease] | None:
        """The leases the queue service says ``agent`` holds, or None while the service is away."""
        try:
            return list(self.queues.GetAgent(queue_pb2.GetAgentRequest(name=agent), timeout=10).agent.leases)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return []
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise

    def close(self) -> None:
        self._queue_channel.close()
        self._registry_channel.close()
