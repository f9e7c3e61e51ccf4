"""A local Takeoff stack: the registry, queue and builder (and optionally an agent) as child processes.

``takeoff up`` and ``takeoff demo`` use it. Each service runs as ``python -m takeoff_<service>`` in its
own process, told where to listen through ``TAKEOFF_*`` variables; it writes its bound addresses to a
ready file, and the stack then waits for its health check to say SERVING. Each child is told the
supervisor's pid and stops when the supervisor dies, even by SIGKILL, so a stack leaves nothing behind.

The agent it starts is given the runners this machine can offer (``local-process`` always,
``local-container`` when a Docker engine answers) and, for jobs, the registry's Unix socket, which a
container runner mounts into its containers; the agent.yaml's own settings win over these.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from takeoff._home import DEFAULT_PORTS, STACK_FILE, RunningService, StackRecord
from takeoff_rpc.channels import open_channel

CORE_SERVICES = ("registry", "queue", "builder")


class StackError(Exception):
    """The stack could not start or a service in it failed; the message says which and why."""


def docker_location() -> str:
    """Where the Docker client looks for an engine: ``DOCKER_HOST``, else the local socket."""
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def docker_answers(timeout: float = 5.0) -> bool:
    """Whether a Docker engine answers at :func:`docker_location` (the builder and agent use the same)."""
    import docker  # only the stack asks Docker anything: `import takeoff` stays light

    try:
        with contextlib.closing(docker.from_env(timeout=timeout)) as engine:
            engine.ping()
    except docker.errors.DockerException:
        return False
    return True


def agent_defaults(config: Path | None, job_registry_address: str | None) -> dict[str, str]:
    """``TAKEOFF_*`` variables for the agent settings that neither ``config`` nor the environment gives:
    the runners this machine offers (``local-process``; ``local-container`` when a Docker engine answers)
    and ``job_registry_address`` (on one host, the registry's Unix socket: a container runner mounts it)."""
    given = {  # TAKEOFF_RUNNERS__KUBERNETES__NAMESPACE gives `runners` too
        name.removeprefix("TAKEOFF_").split("__")[0].lower()
        for name in os.environ
        if name.startswith("TAKEOFF_")
    }
    if config is not None:
        with contextlib.suppress(OSError, yaml.YAMLError):
            settings = yaml.safe_load(config.read_text())
            if isinstance(settings, dict):
                given |= {str(key) for key in settings}
    defaults: dict[str, str] = {}
    if "runners" not in given:
        runners: dict[str, dict[str, object]] = {"local-process": {}}
        if docker_answers():
            runners["local-container"] = {}
        defaults["TAKEOFF_RUNNERS"] = json.dumps(runners)
    if job_registry_address and "job_registry_address" not in given:
        defaults["TAKEOFF_JOB_REGISTRY_ADDRESS"] = job_registry_address
    return defaults


def ensure_image(reference: str) -> None:
    """Make sure the Docker engine has ``reference``: use it if present, else pull it; StackError if neither
    works, saying why."""
    import docker

    try:
        with contextlib.closing(docker.from_env()) as engine:
            try:
                engine.images.get(reference)
            except docker.errors.ImageNotFound:
                engine.images.pull(reference)
    except docker.errors.DockerException as error:
        explanation = getattr(error, "explanation", None) or str(error)
        raise StackError(
            f"the image {reference} is not on the Docker engine at {docker_location()} and cannot be pulled"
            f" ({explanation})"
        ) from None


def health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """``SERVING``, ``NOT_SERVING``, ... from the service's health check, or ``UNREACHABLE``."""
    with open_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    ready_file: Path
    log: Path

    def log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalStack:
    """Start, watch and stop the services of one ``TAKEOFF_HOME``."""

    def __init__(
        self,
        home: Path,
        *,
        host: str = "127.0.0.1",
        base_port: int = DEFAULT_PORTS["registry"],
        agent_config: Path | None = None,
        base_image: str | None = None,
    ) -> None:
        self.home = home
        self.host = host
        self.base_port = base_port
        self.agent_config = agent_config
        self.base_image = base_image
        self.services = [*CORE_SERVICES, *(("agent",) if agent_config else ())]
        self.record = StackRecord(supervisor_pid=os.getpid())
        self._children: dict[str, _Child] = {}
        self._run_dir = home / "run"
        self._log_dir = home / "logs"

    @property
    def registry_socket(self) -> Path:
        return self._run_dir / "registry.sock"

    def _port(self, service: str) -> int:
        if self.base_port == 0:
            return 0
        return self.base_port + DEFAULT_PORTS[service] - DEFAULT_PORTS["registry"]

    def _check_not_running(self) -> None:
        existing = StackRecord.read(self.home)
        if existing is None:
            return
        try:
            os.kill(existing.supervisor_pid, 0)
        except ProcessLookupError:
            return
        raise StackError(
            f"a stack is already running under {self.home} (supervisor pid {existing.supervisor_pid});"
            " see `takeoff status`, or stop it first"
        )

    def _environment(self, service: str) -> dict[str, str]:
        listen = [f"{self.host}:{self._port(service)}"]
        if service == "registry":
            # Job containers reach the registry through this socket, mounted into them (no host network).
            listen.append(f"unix:{self.registry_socket}")
        env = {
            **os.environ,
            "TAKEOFF_HOME": str(self.home),
            "TAKEOFF_LISTEN": json.dumps(listen),
            "TAKEOFF_READY_FILE": str(self._run_dir / f"{service}.ready"),
            "TAKEOFF_PARENT_PID": str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
        }
        # Each service is told where the ones started before it are (the registry first, the agent last).
        for peer, running in self.record.services.items():
            env[f"TAKEOFF_{peer.upper()}_ADDRESS"] = running.address
        if service == "builder" and self.base_image:
            env["TAKEOFF_DEFAULT_BASE_IMAGE"] = self.base_image
        if service == "agent":
            assert self.agent_config is not None
            env["TAKEOFF_CONFIG_FILE"] = str(self.agent_config)
            env.update(agent_defaults(self.agent_config, f"unix:{self.registry_socket}"))
        return env

    def _spawn(self, service: str) -> _Child:
        ready_file = self._run_dir / f"{service}.ready"
        ready_file.unlink(missing_ok=True)
        log = self._log_dir / f"{service}.log"
        with log.open("ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", f"takeoff_{service}"],
                env=self._environment(service),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
            )
        child = _Child(service, process, ready_file, log)
        self._children[service] = child
        return child

    def _await_ready(self, child: _Child, deadline: float) -> RunningService:
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise StackError(
                    f"{child.name} exited with code {child.process.returncode} while starting:\n"
                    f"{child.log_tail()}"
                )
            if child.ready_file.exists():
                addresses = json.loads(child.ready_file.read_text())["addresses"]
                service = RunningService(child.name, addresses, child.process.pid, str(child.log))
                if health_status(service.address) == "SERVING":
                    return service
            time.sleep(0.05)
        raise StackError(f"{child.name} did not become healthy in time; its log: {child.log}")

    def start(self, timeout: float = 60.0) -> StackRecord:
        """Start every service and wait until all are SERVING; on any failure stop what was started."""
        self._check_not_running()
        self._run_dir.mkdir(parents=True, exist_ok=True)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        try:
            for wave in (["registry"], ["queue", "builder"], ["agent"] if self.agent_config else []):
                children = [self._spawn(name) for name in wave]
                for child in children:
                    self.record.services[child.name] = self._await_ready(child, deadline)
        except BaseException:
            self.stop()
            raise
        self.record.write(self.home)
        return self.record

    def start_agent(self, config: Path, timeout: float = 60.0) -> RunningService:
        """Add an agent to a running stack (for queues created after the stack started)."""
        self.agent_config = config
        child = self._spawn("agent")
        try:
            self.record.services["agent"] = self._await_ready(child, time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        self.record.write(self.home)
        return self.record.services["agent"]

    def wait(self, should_stop: Callable[[], bool]) -> _Child | None:
        """Block until a child exits (returned) or ``should_stop()`` turns true (None)."""
        while not should_stop():
            for child in self._children.values():
                if child.process.poll() is not None:
                    return child
            time.sleep(0.1)
        return None

    def stop(self, grace: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every child (agent first), SIGKILL those still alive after ``grace``; return exit codes."""
        order: Sequence[_Child] = list(reversed(self._children.values()))
        for child in order:
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in order:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        if (record := StackRecord.read(self.home)) is not None and record.supervisor_pid == os.getpid():
            (self.home / STACK_FILE).unlink(missing_ok=True)
        return {child.name: child.process.returncode for child in order}
