"""A local Takeoff stack: the registry, queue and builder (and optionally an agent and the web console) as
child processes.

``takeoff up`` and ``takeoff demo`` use it. Each service runs as ``python -m takeoff_<service>`` in its
own process, told where to listen through ``TAKEOFF_*`` variables; it writes its bound addresses to a
ready file, and the stack then waits for its health check to say SERVING. Each child is told the
supervisor's pid and stops when the supervisor dies, even by SIGKILL, so a stack leaves nothing behind.

The agent it starts is given the runners this machine can offer (``local-process`` always,
``local-container`` when a Docker engine answers) and, for jobs, the registry's Unix socket, which a
container runner mounts into its containers; the agent.yaml's own settings win over these.

Keys (``TAKEOFF_HOME/keys``, mode 0700): on its first start the stack writes an admin key,
``admin.key`` (mode 0600), which the registry imports as its bootstrap admin key
(``TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE``) and the CLI and SDK find; with it, it makes a service key for the
queue and for the builder (``queue.key``, ``builder.key``, 0600), each started with
``TAKEOFF_API_KEY_FILE`` naming its file. A later start reuses every file whose key still verifies. The
agent presents the key the stack is given (the CLI's), else the admin key file. No key is ever printed.

The console (``takeoff_console``, an HTTP server) starts last, told the registry's and queue's addresses. It
has no key: it calls the services with each signed-in user's own. The stack writes a one-time sign-in code
to ``run/console-signin.code`` (0600), which the console reads and deletes at start; ``console_signin_url``
is the link ``takeoff up`` prints, which signs a browser in once with the admin key, as Jupyter's token
link does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
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

from takeoff._auth import admin_key_path, channel_credentials, keys_dir
from takeoff._home import DEFAULT_PORTS
from takeoff._stack_file import STACK_FILE, RunningService, StackRecord
from takeoff.v1 import keys_pb2, keys_pb2_grpc
from takeoff_rpc.channels import open_channel

CORE_SERVICES = ("registry", "queue", "builder")
HTTP_SERVICES = frozenset({"console"})
"""Services that answer HTTP, not gRPC: their health is ``GET /healthz``."""
SERVICE_KEYS = {"queue": keys_pb2.SERVICE_ROLE_QUEUE, "builder": keys_pb2.SERVICE_ROLE_BUILDER}
"""The services of a stack that get a service key of their own, and its role."""
KEY_VARIABLES = (
    "TAKEOFF_API_KEY",
    "TAKEOFF_API_KEY_FILE",
    "TAKEOFF_TOKEN",
    "TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE",
)
"""Key settings a child never inherits from the stack's environment: the stack gives each its own."""


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


def write_secret_file(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` readable by this user only (0600, created so: never briefly wider),
    replacing the file atomically; its directory is made 0700 if missing."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    partial.replace(path)


def read_secret_file(path: Path) -> str | None:
    """The key a file holds, or None when it is missing or empty."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def ensure_admin_key(home: Path) -> Path:
    """``home/keys/admin.key``: made on first use with a fresh admin key (``tko_admin_…``); kept after."""
    directory = keys_dir(home)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    path = admin_key_path(home)
    if read_secret_file(path) is None:
        write_secret_file(path, f"tko_admin_{secrets.token_urlsafe(32)}")
    return path


def health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """``SERVING``, ``NOT_SERVING``, ... from the service's health check, or ``UNREACHABLE``. TLS as
    clients use it (``TAKEOFF_TLS_CA_FILE``, ...); no key: health needs none."""
    try:
        credentials = channel_credentials(address)
    except (ValueError, OSError):
        return "UNREACHABLE"
    with open_channel(address, credentials=credentials) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def service_health(service: str, address: str, timeout: float = 2.0) -> str:
    """``SERVING``, ``NOT_SERVING``, ... of a stack's service, or ``UNREACHABLE``: gRPC health for the
    services, ``GET /healthz`` for the console."""
    if service not in HTTP_SERVICES:
        return health_status(address, timeout=timeout)
    import httpx

    try:
        answer = httpx.get(f"http://{address}/healthz", timeout=timeout)
    except httpx.HTTPError:
        return "UNREACHABLE"
    return "SERVING" if answer.status_code == 200 else "NOT_SERVING"


def _verifies(keys: keys_pb2_grpc.KeyServiceStub, secret: str | None, role: int) -> bool:
    """Whether ``secret`` is a live service key for ``role``."""
    if secret is None:
        return False
    answer = keys.VerifyKey(keys_pb2.VerifyKeyRequest(secret=secret), timeout=30)
    return answer.valid and answer.key.kind == keys_pb2.KEY_KIND_SERVICE and answer.key.service == role


def config_gives(config: Path | None, settings: set[str]) -> bool:
    """Whether the agent.yaml ``config`` sets one of ``settings``."""
    if config is None:
        return False
    with contextlib.suppress(OSError, yaml.YAMLError):
        loaded = yaml.safe_load(config.read_text())
        if isinstance(loaded, dict):
            return bool(settings & {str(key) for key in loaded})
    return False


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
        agent_key: str | None = None,
        console_port: int | None = None,
    ) -> None:
        """``agent_key`` is the key the agent presents unless its agent.yaml gives one (``api_key`` or
        ``api_key_file``); None: the stack's admin key file. ``console_port``: also start the web console
        on it (0 picks a free port); None: no console."""
        self.home = home
        self.host = host
        self.base_port = base_port
        self.agent_config = agent_config
        self.base_image = base_image
        self._agent_key = agent_key
        self.console_port = console_port
        self._signin_code: str | None = None
        self.services = [
            *CORE_SERVICES,
            *(("agent",) if agent_config else ()),
            *(("console",) if console_port is not None else ()),
        ]
        self.record = StackRecord(supervisor_pid=os.getpid())
        self._children: dict[str, _Child] = {}
        self._run_dir = home / "run"
        self._log_dir = home / "logs"

    @property
    def registry_socket(self) -> Path:
        return self._run_dir / "registry.sock"

    @property
    def admin_key_file(self) -> Path:
        return admin_key_path(self.home)

    @property
    def admin_key(self) -> str:
        """The stack's admin key (made by :meth:`start`)."""
        key = read_secret_file(self.admin_key_file)
        if key is None:
            raise StackError(f"no admin key in {self.admin_key_file}; start the stack first")
        return key

    @property
    def console_url(self) -> str:
        """The console's base URL, ``http://127.0.0.1:8080`` (once started)."""
        return f"http://{self.record.services['console'].address}"

    @property
    def console_signin_url(self) -> str:
        """The one-time sign-in link of this start: it works once (the console forgets the code after)."""
        if self._signin_code is None:
            raise StackError("this stack started no console")
        return f"{self.console_url}/signin?code={self._signin_code}"

    def _service_key_file(self, service: str) -> Path:
        return keys_dir(self.home) / f"{service}.key"

    def _ensure_service_keys(self) -> None:
        """A service key file per service of SERVICE_KEYS whose key verifies: kept, else made anew."""
        with open_channel(f"unix:{self.registry_socket}", api_key=self.admin_key) as channel:
            keys = keys_pb2_grpc.KeyServiceStub(channel)
            for service, role in SERVICE_KEYS.items():
                path = self._service_key_file(service)
                try:
                    if not _verifies(keys, read_secret_file(path), role):
                        created = keys.CreateKey(
                            keys_pb2.CreateKeyRequest(
                                key=keys_pb2.Key(
                                    kind=keys_pb2.KEY_KIND_SERVICE,
                                    service=role,
                                    display_name=f"{service} service of `takeoff up` in {self.home}",
                                )
                            ),
                            timeout=30,
                        )
                        write_secret_file(path, created.secret)
                except grpc.RpcError as error:
                    if error.code() is grpc.StatusCode.UNIMPLEMENTED:
                        return  # a registry without keys: nothing to present, nothing checked
                    raise StackError(
                        f"the registry did not make a key for the {service}: {error.code().name}"
                        f" {error.details()}"
                    ) from None

    def _port(self, service: str) -> int:
        if service == "console":
            assert self.console_port is not None
            return self.console_port
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
        # The console serves on loopback whatever --host says: it signs browsers in as admin by a link.
        host = "127.0.0.1" if service == "console" else self.host
        listen = [f"{host}:{self._port(service)}"]
        if service == "registry":
            # Job containers reach the registry through this socket, mounted into them (no host network).
            listen.append(f"unix:{self.registry_socket}")
        env = {
            **{name: value for name, value in os.environ.items() if name not in KEY_VARIABLES},
            "TAKEOFF_HOME": str(self.home),
            "TAKEOFF_LISTEN": json.dumps(listen),
            "TAKEOFF_READY_FILE": str(self._run_dir / f"{service}.ready"),
            "TAKEOFF_PARENT_PID": str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
        }
        # Each service is told where the ones started before it are (the registry first, the agent last).
        for peer, running in self.record.services.items():
            env[f"TAKEOFF_{peer.upper()}_ADDRESS"] = running.address
        if service == "registry":
            env["TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE"] = str(self.admin_key_file)
        if service in SERVICE_KEYS and self._service_key_file(service).is_file():
            env["TAKEOFF_API_KEY_FILE"] = str(self._service_key_file(service))
        if service == "console":
            self._signin_code = secrets.token_urlsafe(32)
            code_file = self._run_dir / "console-signin.code"
            write_secret_file(code_file, self._signin_code)
            env["TAKEOFF_SIGNIN_CODE_FILE"] = str(code_file)
        if service == "builder" and self.base_image:
            env["TAKEOFF_DEFAULT_BASE_IMAGE"] = self.base_image
        if service == "agent":
            assert self.agent_config is not None
            env["TAKEOFF_CONFIG_FILE"] = str(self.agent_config)
            env.update(agent_defaults(self.agent_config, f"unix:{self.registry_socket}"))
            if not config_gives(self.agent_config, {"api_key", "api_key_file"}):
                if self._agent_key is not None:
                    env["TAKEOFF_API_KEY"] = self._agent_key
                else:
                    env["TAKEOFF_API_KEY_FILE"] = str(self.admin_key_file)
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
                ready = json.loads(child.ready_file.read_text())
                service = RunningService(
                    child.name,
                    ready["addresses"],
                    child.process.pid,
                    str(child.log),
                    ready.get("metrics_address", ""),
                )
                if service_health(child.name, service.address) == "SERVING":
                    return service
            time.sleep(0.05)
        raise StackError(f"{child.name} did not become healthy in time; its log: {child.log}")

    def start(self, timeout: float = 60.0) -> StackRecord:
        """Start every service and wait until all are SERVING; on any failure stop what was started."""
        self._check_not_running()
        self._run_dir.mkdir(parents=True, exist_ok=True)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        ensure_admin_key(self.home)
        deadline = time.monotonic() + timeout
        try:
            later = [name for name in self.services if name not in CORE_SERVICES]  # the agent, the console
            for wave in (["registry"], ["queue", "builder"], later):
                if "registry" in self.record.services and wave == ["queue", "builder"]:
                    self._ensure_service_keys()
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
