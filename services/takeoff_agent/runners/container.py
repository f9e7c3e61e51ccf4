"""The local-container runner: each job runs in a container on the agent's Docker engine (docs/design.md §7,
§12), owned by a host-side shim (``shim.py``, container mode) exactly as a local process is.

The agent makes sure the image is there (pulled with the configured login when an image job's image is
not), waits for the job's GPUs, creates the container (labelled, named ``takeoff-{lease id}``) and hands
it to the shim, which starts it, follows its output into the lease directory's log files, fences it when
the agent stops renewing, and records how it ended before removing it. The attempt reads the same files
as for a local process, so log tailing, exit records and restart recovery work unchanged.

A multi-node launch (``nodes: N``) is N containers of the same image, ``takeoff-{lease id}`` for rank 0 and
``takeoff-{lease id}-{rank}`` for the others, which join rank 0's network namespace (``MASTER_ADDR`` is
127.0.0.1). One shim owns them all: they start together or not at all, one rank failing stops the others,
and the lease's deadline fences every one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import signal
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import docker
import requests
from docker.types import DeviceRequest, Mount, Ulimit

from takeoff_agent.container_shim import ENGINE_CALL_SECONDS, engine_address, signal_of
from takeoff_agent.domain import (
    Assignment,
    BuildKind,
    FailureReason,
    JobExit,
    ResourceKind,
    RunnerFailure,
    SourceKind,
)
from takeoff_agent.log_tail import shim_output
from takeoff_agent.ranks import World, rank_environment, world_of
from takeoff_agent.runners.base import (
    JobOutput,
    Launch,
    RunnerContext,
    RunnerRefused,
    RunnerUnavailable,
)
from takeoff_agent.runners.gpus import GpuPool, GpuRequest, parse_request
from takeoff_agent.runners.secrets import (
    CA_FILE_VARIABLE,
    CONTAINER_CA_FILE,
    CONTAINER_SECRETS_DIR,
    LEASE_SECRETS_DIR,
    SECRETS_DIR_VARIABLE,
    check_names,
    numeric_user,
    write_secret_files,
)
from takeoff_agent.runners.shims import Shim, ShimStarter, started_shim
from takeoff_agent.shim import shim_alive, write_atomically
from takeoff_server.docker_registry import RegistryLogin, registry_host
from takeoff_server.resource_configs import CONTAINER_OPTIONS, MULTI_NODE_OPTION

T = TypeVar("T")

IPC_MODES = frozenset({"private", "shareable", "none", "host"})
"""``host`` is allowed: jobs that share memory across processes need it (the security model decides
whether secure queues may use it); ``container:…`` would reach into another container and is not."""
ULIMITS = frozenset(
    {
        "core",
        "cpu",
        "data",
        "fsize",
        "locks",
        "memlock",
        "msgqueue",
        "nice",
        "nofile",
        "nproc",
        "rss",
        "rtprio",
        "rttime",
        "sigpending",
        "stack",
    }
)
LABEL = "takeoff"
CONTAINER_REGISTRY_SOCKET = "/run/takeoff/registry.sock"
"""Where a registry on a Unix socket is mounted in the container (a bridge network cannot reach the host's
loopback, and no job gets the host's network)."""
CONTAINER_REGISTRY_VOLUME_DIR = "/run/takeoff-registry"
"""Where the volume holding the registry's socket is mounted (``registry_socket_volume``), read-only."""
NAMED_VOLUME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]+")
"""Docker's rule for volume names; any other source is a path on the host."""
EXIT_POLL_SECONDS = 0.05
SHIM_SETTLE_SECONDS = 60.0
"""How long ``stop`` waits, after the container stopped, for its shim to record the end and remove it."""
MASTER_PORT = 29500
"""``MASTER_PORT`` of a multi-node launch (torchrun's default): the ranks share rank 0's network namespace,
the attempt's own, so no other job can hold the port and none need be probed for."""
LIVE_STATES = frozenset({"created", "running"})
"""Engine states of a container whose shim died that a new shim takes over."""
ENDED_STATES = frozenset({"exited", "dead"})
_IMAGE_MISSING = ("not found", "manifest unknown", "name unknown", "unauthorized", "denied", "no basic auth")
"""Pull errors that are the image's fault (wrong name, tag or login), not an outage."""


@dataclass(frozen=True, slots=True)
class ContainerOptions:
    """``runners: local-container:`` of the agent config."""

    docker_host: str | None = None
    """The engine (the builder's): ``unix:///…``, ``tcp://…``; unset: ``DOCKER_HOST`` or the local socket."""
    gpus: tuple[str, ...] = ()
    """The host's GPU device ids this agent's jobs share."""
    registry_auth: Mapping[str, RegistryLogin] = field(default_factory=dict)
    """Logins for pulling image jobs' images, by registry host (``registry.example.com:5000``)."""
    registry_socket_volume: str | None = None
    """The named volume that holds the registry's Unix socket (the agent's ``job_registry_address``), for an
    agent in a container: the engine sees the agent's paths only as the volume, by its name on the host."""


def parse_options(options: Mapping[str, object]) -> ContainerOptions:
    known = {"docker_host", "gpus", "registry_auth", "registry_socket_volume"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown option {', '.join(unknown)} (local-container takes: {', '.join(sorted(known))})"
        )
    docker_host = options.get("docker_host")
    if docker_host is not None and (not isinstance(docker_host, str) or not docker_host):
        raise ValueError("docker_host must be an engine address: unix:///path or tcp://host:port")
    gpus = options.get("gpus", [])
    if not isinstance(gpus, list) or not all(isinstance(gpu, str | int) and str(gpu) for gpu in gpus):
        raise ValueError('gpus must list the host\'s GPU device ids, e.g. ["0", "1"]')
    if len({str(gpu) for gpu in gpus}) != len(gpus):
        raise ValueError("gpus lists a device twice")
    auth = options.get("registry_auth", {})
    if not isinstance(auth, dict):
        raise ValueError("registry_auth must map registry hosts to {username, password}")
    logins = {}
    for host, login in auth.items():
        if (
            not isinstance(login, dict)
            or set(login) != {"username", "password"}
            or not all(isinstance(value, str) and value for value in login.values())
        ):
            raise ValueError(f"registry_auth.{host} must have exactly a username and a password")
        logins[str(host)] = RegistryLogin(login["username"], login["password"])
    volume = options.get("registry_socket_volume")
    if volume is not None and (not isinstance(volume, str) or not NAMED_VOLUME.fullmatch(volume)):
        raise ValueError("registry_socket_volume must be the name of a Docker volume")
    engine_address(docker_host)  # the shims must reach it too
    return ContainerOptions(docker_host, tuple(str(gpu) for gpu in gpus), logins, volume)


def create(options: Mapping[str, object], context: RunnerContext) -> ContainerRunner:
    return ContainerRunner(parse_options(options), context)


@dataclass(frozen=True, slots=True)
class ContainerSettings:
    """A resource config as the engine takes it: keyword arguments of ``containers.create`` (but the
    devices, which depend on what is free when the job starts), the GPUs asked for (for all ranks), and
    the ranks."""

    create: dict[str, Any]
    gpus: GpuRequest | None
    world: World


def container_settings(resource_config: Mapping[str, Any]) -> ContainerSettings:
    """Raises RunnerRefused naming every option it cannot take."""
    problems: list[str] = [
        f"{name}: not an option of local-container queues"
        for name in sorted(set(resource_config) - CONTAINER_OPTIONS, key=str)
    ]
    settings: dict[str, Any] = {}
    gpus = None
    for name, value in sorted(resource_config.items()):
        if name not in CONTAINER_OPTIONS or name == "env":  # the job's env comes with the Launch
            continue
        try:
            if name == "gpus":
                gpus = parse_request(value)
            elif name == MULTI_NODE_OPTION:
                _nodes(value)
            else:
                settings.update(_OPTIONS[name](value))
        except ValueError as error:
            problems.append(f"{name}: {error}")
    world = world_of(resource_config)
    if gpus is not None and world.multi:
        if gpus.count:
            gpus = GpuRequest(count=gpus.count * world.nodes)
        else:
            problems.append(
                "gpus: with nodes, give a count of GPUs for each rank (each rank's container gets that"
                f" many of the agent's devices), not {gpus.describe()}"
            )
    if problems:
        raise RunnerRefused("resource config refused by local-container: " + "; ".join(problems))
    return ContainerSettings(settings, gpus, world)


def _nodes(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a whole number of containers from 1, not {value!r}")


def _cpus(value: object) -> dict[str, Any]:
    try:
        cpus = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"must be a number of CPUs, not {value!r}") from None
    if not 0 < cpus < 1e6:
        raise ValueError(f"must be a positive number of CPUs, not {value!r}")
    return {"nano_cpus": round(cpus * 1e9)}


def _bytes(name: str, *, unlimited: bool = False) -> Callable[[object], dict[str, Any]]:
    def size(value: object) -> dict[str, Any]:
        if unlimited and value == -1:
            return {name: -1}
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"must be a size such as 512m or a number of bytes, not {value!r}")
        try:
            parsed = docker.utils.parse_bytes(value)
        except docker.errors.DockerException:
            raise ValueError(f"must be a size such as 512m or a number of bytes, not {value!r}") from None
        if parsed < 0:
            raise ValueError(f"cannot be negative ({value!r})")
        return {name: parsed}

    return size


def _volumes(value: object) -> dict[str, Any]:
    """Named volumes, and absolute host paths as bind mounts, as ``{source: {bind, mode}}``,
    ``{source: path}`` or ``["source:path[:ro|rw]"]``. The queue lets host paths through only on a queue
    that allows them (docs/design.md §13, "Host paths"); a relative one (``./x``, ``~/x``) means nothing
    to the engine and is refused."""
    entries: list[tuple[object, object, object]] = []
    if isinstance(value, dict):
        for source, target in value.items():
            if isinstance(target, dict):
                entries.append((source, target.get("bind"), target.get("mode", "rw")))
            else:
                entries.append((source, target, "rw"))
    elif isinstance(value, list):
        for entry in value:
            parts = str(entry).split(":")
            if len(parts) not in (2, 3):
                raise ValueError(f"{entry!r} is not name:path or name:path:mode")
            entries.append((parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"))
    else:
        raise ValueError("must map volume names to paths in the container, or list name:path[:mode]")
    mounts = []
    for source, target, mode in entries:
        host_path = isinstance(source, str) and source.startswith("/")
        if not isinstance(source, str) or not (host_path or NAMED_VOLUME.fullmatch(source)):
            raise ValueError(f"{source!r} is neither a volume name nor an absolute host path")
        if not isinstance(target, str) or not target.startswith("/"):
            raise ValueError(f"volume {source}: {target!r} is not an absolute path in the container")
        if mode not in ("rw", "ro"):
            raise ValueError(f"volume {source}: mode must be rw or ro, not {mode!r}")
        kind = "bind" if host_path else "volume"
        mounts.append(Mount(target=target, source=source, type=kind, read_only=mode == "ro"))
    return {"mounts": mounts}


def _user(value: object) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise ValueError(f"must be a user name or id (user[:group]), not {value!r}")
    return {"user": str(value)}


def _ipc_mode(value: object) -> dict[str, Any]:
    if value not in IPC_MODES:
        raise ValueError(f"must be one of {', '.join(sorted(IPC_MODES))}, not {value!r}")
    return {"ipc_mode": value}


def _ulimits(value: object) -> dict[str, Any]:
    if not isinstance(value, list):
        raise ValueError("must be a list of {name, soft, hard}")
    ulimits = []
    for entry in value:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in ULIMITS:
            raise ValueError(f"{name!r} is not a limit (the limits: {', '.join(sorted(ULIMITS))})")
        assert isinstance(entry, dict)
        soft, hard = entry.get("soft", entry.get("hard")), entry.get("hard", entry.get("soft"))
        if not isinstance(soft, int) or not isinstance(hard, int) or not -1 <= soft <= hard or hard < -1:
            raise ValueError(f"{name}: soft and hard must be integers, soft no more than hard")
        ulimits.append(Ulimit(name=name, soft=soft, hard=hard))
    return {"ulimits": ulimits}


_OPTIONS: dict[str, Callable[[object], dict[str, Any]]] = {
    "cpus": _cpus,
    "mem_limit": _bytes("mem_limit"),
    "memswap_limit": _bytes("memswap_limit", unlimited=True),
    "shm_size": _bytes("shm_size"),
    "volumes": _volumes,
    "user": _user,
    "ipc_mode": _ipc_mode,
    "ulimits": _ulimits,
}


def device_requests(devices: Collection[str]) -> list[DeviceRequest]:
    return [DeviceRequest(device_ids=list(devices), capabilities=[["gpu"]])] if devices else []


def create_options(
    launch: Launch,
    settings: Mapping[str, Any],
    devices: Collection[str],
    *,
    agent: str,
    name: str,
    secrets_dir: Path | None = None,
    registry_socket_volume: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``containers.create`` for a job: its image, command, environment, labels,
    the resource config's ``settings``, the GPU ``devices`` it was given, and, read-only, the host's
    ``secrets_dir`` holding its secret files and the launch's CA certificate. A registry on a Unix socket
    is reached through a bind mount of the socket, or through ``registry_socket_volume``, the volume that
    holds it at its root. Secret values go into the environment only (``docker inspect`` shows them to those
    who are root on the host anyway), never into a label."""
    assignment = launch.assignment
    environment = {**launch.env, **launch.secrets}
    mounts = list(settings.get("mounts", []))
    if secrets_dir is not None:
        source = str(secrets_dir.absolute())
        mounts.append(Mount(target=CONTAINER_SECRETS_DIR, source=source, type="bind", read_only=True))
        environment[SECRETS_DIR_VARIABLE] = CONTAINER_SECRETS_DIR
    if launch.ca_file is not None:
        source = str(launch.ca_file.absolute())
        mounts.append(Mount(target=CONTAINER_CA_FILE, source=source, type="bind", read_only=True))
        environment[CA_FILE_VARIABLE] = CONTAINER_CA_FILE
    if launch.registry_address.startswith("unix:"):
        socket = launch.registry_address.removeprefix("unix:").removeprefix("//")
        if registry_socket_volume is not None:
            volume = Mount(
                CONTAINER_REGISTRY_VOLUME_DIR, registry_socket_volume, type="volume", read_only=True
            )
            mounts.append(volume)
            job_socket = f"{CONTAINER_REGISTRY_VOLUME_DIR}/{PurePosixPath(socket).name}"
        else:
            mounts.append(Mount(target=CONTAINER_REGISTRY_SOCKET, source=socket, type="bind"))
            job_socket = CONTAINER_REGISTRY_SOCKET
        environment["TAKEOFF_REGISTRY"] = f"unix:{job_socket}"
    else:
        environment["TAKEOFF_REGISTRY"] = launch.registry_address
    labels = {
        f"{LABEL}.item": assignment.item,
        f"{LABEL}.agent": agent,
        f"{LABEL}.epoch": str(assignment.epoch),
        f"{LABEL}.run": assignment.run,
        f"{LABEL}.lease": assignment.lease_id,
    }
    if devices:
        labels[f"{LABEL}.gpus"] = ",".join(devices)
    options: dict[str, Any] = {
        **settings,
        "image": launch.built.image or assignment.job_version.image,
        "name": name,
        "labels": labels,
        "environment": environment,
        "mounts": mounts,
        "device_requests": device_requests(devices),
        "init": True,  # the job is not PID 1: SIGTERM ends it as it ends a local process
        "stdin_open": False,
        "tty": False,
        # The shim reads the output through the engine: a driver that keeps it, whatever the default.
        "log_config": docker.types.LogConfig(type="json-file"),
    }
    if assignment.entrypoint:
        options["entrypoint"] = list(assignment.entrypoint)
    return options


def container_names(lease_id: str, world: World) -> list[str]:
    """The names of a job's containers, in rank order: ``takeoff-{lease id}`` (a job of one container is
    rank 0), then ``takeoff-{lease id}-{rank}``."""
    name = f"{LABEL}-{lease_id}"
    return [name, *(f"{name}-{rank}" for rank in range(1, world.nodes))]


def job_create_options(
    launch: Launch,
    settings: ContainerSettings,
    devices: Sequence[str],
    *,
    agent: str,
    secrets_dir: Path | None = None,
    registry_socket_volume: str | None = None,
) -> list[dict[str, Any]]:
    """Keyword arguments of ``containers.create`` for each of the job's containers, in rank order
    (``create_options``): one, or one per rank of a multi-node launch, each rank given its share of the
    ``devices`` (as many as the resource config's ``gpus`` asks for each)."""
    world = settings.world
    names = container_names(launch.assignment.lease_id, world)
    share = len(devices) // world.nodes
    options = [
        create_options(
            launch,
            settings.create,
            devices[rank * share : (rank + 1) * share],
            agent=agent,
            name=name,
            secrets_dir=secrets_dir,
            registry_socket_volume=registry_socket_volume,
        )
        for rank, name in enumerate(names)
    ]
    if not world.multi:
        return options
    return [_ranked(each, world, rank, names[0]) for rank, each in enumerate(options)]


def _ranked(options: Mapping[str, Any], world: World, rank: int, rank_zero: str) -> dict[str, Any]:
    """``options`` of one rank of a multi-node launch: its rank's environment (``MASTER_ADDR`` 127.0.0.1,
    since every rank joins the network namespace of rank 0's container, named ``rank_zero``) over the
    job's, and its ``takeoff.rank`` label."""
    environment = rank_environment(world, rank, master_addr="127.0.0.1", master_port=MASTER_PORT)
    ranked = {
        **options,
        "environment": {**options["environment"], **environment},
        "labels": {**options["labels"], f"{LABEL}.rank": str(rank)},
    }
    if rank:
        ranked["network_mode"] = f"container:{rank_zero}"
    return ranked


class ContainerRunner:
    kind = ResourceKind.LOCAL_CONTAINER
    needs_pushed_image = False  # the engine that built the image runs it

    def __init__(self, options: ContainerOptions, context: RunnerContext) -> None:
        self.options = options
        self.context = context
        self.gpus = GpuPool(options.gpus)
        self.shims = ShimStarter()
        self._client: docker.DockerClient | None = None

    def build_kind(self, source: SourceKind) -> BuildKind:
        return BuildKind.NOOP if source is SourceKind.IMAGE else BuildKind.IMAGE

    def check(self, assignment: Assignment) -> None:
        settings = container_settings(assignment.resource_config)
        if settings.gpus is not None and (problem := self.gpus.problem(settings.gpus)) is not None:
            if (world := settings.world).multi:
                problem += f" ({settings.gpus.count // world.nodes} for each of {world.nodes} ranks)"
            raise RunnerRefused(f"resource config refused by local-container: gpus: {problem}")

    def job(self, assignment: Assignment, lease_dir: Path) -> ContainerJob:
        job = ContainerJob(self, assignment, lease_dir)
        if job.started and job.exit() is None:
            self.gpus.claim(assignment.lease_id, job.devices)  # a job taken back keeps its devices
        return job

    async def sweep(self, held: Collection[str]) -> None:
        """Remove this agent's containers whose lease it no longer holds (their shims record the end)."""
        found = await self.call(
            lambda engine: engine.api.containers(
                all=True, filters={"label": f"{LABEL}.agent={self.context.agent_id}"}
            )
        )
        for container in found:
            lease = (container.get("Labels") or {}).get(f"{LABEL}.lease", "")
            if lease not in held:
                self.gpus.release(lease)
                await self.remove(container["Id"])

    async def close(self) -> None:
        await self.shims.close()
        if self._client is not None:
            self._client.close()
            self._client = None

    async def call(self, action: Callable[[docker.DockerClient], T]) -> T:
        """``action`` on the engine, in a worker thread (the SDK blocks); an engine that cannot be reached
        or fails is RunnerUnavailable."""
        return await asyncio.to_thread(self._call, action)

    def _call(self, action: Callable[[docker.DockerClient], T]) -> T:
        where = self.options.docker_host or "the local Docker engine"
        try:
            if self._client is None:
                self._client = docker.DockerClient(
                    base_url=engine_address(self.options.docker_host),
                    version="auto",
                    timeout=ENGINE_CALL_SECONDS,
                )
            return action(self._client)
        except docker.errors.APIError as error:
            if error.is_client_error():
                raise
            raise RunnerUnavailable(f"{where} failed: {error.explanation or error}") from None
        except (docker.errors.DockerException, requests.RequestException) as error:
            raise RunnerUnavailable(f"{where} cannot be reached: {error}") from None

    async def remove(self, container: str) -> None:
        await self.call(lambda engine: _remove(engine, container))

    def auth_config(self, image: str) -> dict[str, str] | None:
        login = self.options.registry_auth.get(registry_host(image))
        return login.auth_config() if login else None


REMOVAL_SECONDS = 60
"""How long a removal another process started may take before the runner calls the engine unwell."""


def _remove(engine: docker.DockerClient, container: str) -> None:
    """Kill and remove ``container`` (with its anonymous volumes), if it is there; one being removed
    already (by its shim, which removes every rank once one has ended) is waited for: gone on return."""
    try:
        engine.containers.get(container).remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as error:
        if error.status_code != 409 or "already in progress" not in str(error.explanation):
            raise
        with contextlib.suppress(docker.errors.NotFound):  # removed meanwhile
            engine.containers.get(container).wait(condition="removed", timeout=REMOVAL_SECONDS)


def _state(engine: docker.DockerClient, container: str) -> dict[str, Any] | None:
    """The engine's ``State`` of ``container``; None when it is gone."""
    try:
        state: dict[str, Any] = engine.containers.get(container).attrs["State"]
    except docker.errors.NotFound:
        return None
    return state


class ContainerJob:
    """One job's containers (one, or one per rank of a multi-node launch) and their shim, found through the
    lease directory."""

    def __init__(self, runner: ContainerRunner, assignment: Assignment, lease_dir: Path) -> None:
        self.runner = runner
        self.assignment = assignment
        self.lease_dir = lease_dir
        world = world_of(assignment.resource_config)
        self.names = container_names(assignment.lease_id, world)
        self.name = self.names[0]
        self._starting: asyncio.Task[Shim] | None = None
        self._log_sources = shim_output(lease_dir, world)

    @property
    def _spec_file(self) -> Path:
        return self.lease_dir / "spec.json"

    @property
    def _exit_file(self) -> Path:
        return self.lease_dir / "exit.json"

    @property
    def started(self) -> bool:
        return self._spec_file.exists() or self._exit_file.exists()

    @property
    def devices(self) -> tuple[str, ...]:
        """The GPUs the job's containers were given."""
        try:
            return tuple(json.loads(self._spec_file.read_text())["devices"])
        except (OSError, ValueError, KeyError):
            return ()

    def log_sources(self) -> list[JobOutput]:
        return self._log_sources

    async def start(self, launch: Launch) -> None:
        """Image, devices, containers, shim; returns once the shim has started the containers (or recorded
        why it could not: RunnerRefused or RunnerUnavailable, unless the job's command cannot run, which
        is the job's exit 127). Cancelled before the containers exist, it leaves nothing behind; after,
        the job counts as started and ``stop`` ends it."""
        settings = container_settings(self.assignment.resource_config)
        check_names(launch)
        image = launch.built.image or self.assignment.job_version.image
        if (missing := await self._ensure_image(image)) is not None:
            write_atomically(self._exit_file, _exit_record(JobExit(exit_code=None, failure=missing)))
            return
        lease = self.assignment.lease_id
        devices = await self.runner.gpus.acquire(lease, settings.gpus, launch.report) if settings.gpus else ()
        try:
            secrets_dir = self.lease_dir / LEASE_SECRETS_DIR if launch.secret_files else None
            if secrets_dir is not None:
                owner = numeric_user(settings.create.get("user") or await self._image_user(image))
                await asyncio.to_thread(write_secret_files, secrets_dir, launch.secret_files, owner)
            options = job_create_options(
                launch,
                settings,
                devices,
                agent=self.runner.context.agent_id,
                secrets_dir=secrets_dir,
                registry_socket_volume=self.runner.options.registry_socket_volume,
            )
            containers = await self._create(options)
            spec = {
                "mode": "container",
                "container": containers[0],
                "docker_host": self.runner.options.docker_host,
                "stop_grace_seconds": launch.stop_grace_seconds,
                "devices": list(devices),
            }
            if settings.world.multi:
                spec["ranks"] = containers
            write_atomically(self._spec_file, spec)
        except BaseException:
            self.runner.gpus.release(lease)
            raise
        await self._start_shim()
        ended = await self._until_started()
        if ended is not None and ended.failure is not None:
            self.runner.gpus.release(lease)
            if ended.failure.reason is FailureReason.CONFIG_INVALID:
                raise RunnerRefused(ended.failure.message)
            raise RunnerUnavailable(ended.failure.message)

    async def until_running(self) -> None:
        if self.started:
            await self._until_started()

    async def _ensure_image(self, image: str) -> RunnerFailure | None:
        """The image on the engine: already there, else pulled; a failure when the image cannot be had
        (no such image, no access), RunnerUnavailable when the engine or registry is out."""

        def ensure(engine: docker.DockerClient) -> RunnerFailure | None:
            with contextlib.suppress(docker.errors.NotFound):
                engine.images.get(image)
                return None
            repository, tag = _split(image)
            try:
                engine.images.pull(repository, tag, auth_config=self.runner.auth_config(image))
            except docker.errors.APIError as error:
                explanation = str(error.explanation or error)
                if isinstance(error, docker.errors.NotFound) or any(
                    marker in explanation.lower() for marker in _IMAGE_MISSING
                ):
                    return RunnerFailure(FailureReason.BUILD_FAILED, f"cannot pull {image}: {explanation}")
                raise
            return None

        return await self.runner.call(ensure)

    async def _image_user(self, image: str) -> str | None:
        """The user the image runs its command as (``USER``), if it says."""
        try:
            config = await self.runner.call(lambda engine: engine.images.get(image).attrs.get("Config") or {})
        except docker.errors.NotFound:  # removed meanwhile: the create says so
            return None
        return str(config.get("User") or "") or None

    async def _create(self, options: list[dict[str, Any]]) -> list[str]:
        """The containers' ids, in rank order: all are created, or none is left. The engine calls run to
        their end even when the start is cancelled meanwhile, and the containers they made then are
        removed: none is left that no lease directory knows."""
        creating = asyncio.ensure_future(self.runner.call(lambda engine: self._create_all(engine, options)))
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await creating
                await self._remove_all()
            raise

    def _create_all(self, engine: docker.DockerClient, options: list[dict[str, Any]]) -> list[str]:
        created: list[str] = []
        try:
            for each in options:
                created.append(self._create_on(engine, each))
        except BaseException:
            for container in reversed(created):
                _remove(engine, container)
            raise
        return created

    def _create_on(self, engine: docker.DockerClient, options: dict[str, Any]) -> str:
        for attempt in range(2):
            try:
                return str(engine.containers.create(**options).id)
            except docker.errors.APIError as error:
                if error.status_code == 409 and attempt == 0:  # left by an agent that died while creating it
                    _remove(engine, options["name"])
                    continue
                if error.is_client_error():
                    raise RunnerRefused(
                        f"the Docker engine refused the container: {error.explanation or error}"
                    ) from None
                raise
        raise AssertionError("unreachable")

    @property
    def _shim(self) -> Shim | None:
        """The shim the agent started, once started; None for a job found in a lease directory."""
        return started_shim(self._starting)

    async def _start_shim(self) -> None:
        # A task of its own: a start given up midway (a stop came first) leaves the shim starting, and
        # stop() waits for it before it looks for the shim.
        self._starting = asyncio.create_task(self.runner.shims.start(self.lease_dir))
        await asyncio.shield(self._starting)

    async def _until_started(self) -> JobExit | None:
        """Once the shim has started the container: None, or how the job ended already. A container left
        without a shim is given one, or recorded as it ended (``_without_shim``)."""
        while (ended := self.exit()) is None and not self._shim_record().get("started"):
            if not self._alive():
                await self._without_shim()
            await asyncio.sleep(EXIT_POLL_SECONDS)
        return ended

    def _shim_record(self) -> dict[str, Any]:
        try:
            record: dict[str, Any] = json.loads((self.lease_dir / "shim.json").read_text())
        except (OSError, ValueError):
            return {}
        return record

    def exit(self) -> JobExit | None:
        try:
            data = json.loads(self._exit_file.read_text())
        except (OSError, ValueError):
            return None
        failure = data.get("failure")
        return JobExit(
            exit_code=data["exit_code"],
            signal=data.get("signal"),
            fenced=data.get("fenced", False),
            oom_killed=data.get("oom_killed", False),
            failure=RunnerFailure(FailureReason[failure["reason"]], failure["message"]) if failure else None,
            rank=data.get("rank"),
        )

    def _alive(self) -> bool:
        if self._shim is not None:
            return self._shim.running
        return shim_alive(self.lease_dir)

    async def wait(self) -> JobExit:
        """The job's end, from the shim's record; a job whose shim died is ended by the agent."""
        while True:
            if self._shim is not None:
                await self._shim.ended()
            if (ended := self.exit()) is not None:
                break
            if not self._alive() and (ended := await self._without_shim()) is not None:
                break
            await asyncio.sleep(EXIT_POLL_SECONDS * 4)
        self.runner.gpus.release(self.assignment.lease_id)
        return ended

    async def _without_shim(self) -> JobExit | None:
        """The shim is gone without a record (killed, perhaps with the machine's processes, or with the
        agent's own container when the agent runs in one). The containers live on in the engine, so a new
        shim takes them over: ones it never started, or ones still running, which the new shim follows to
        their end (their output continues where the dead shim's copy stopped). Containers that all ended
        are recorded as they ended (the first rank to fail decides); any rank caught between states
        (paused, restarting) or gone ends the job: every rank is removed, and the job recorded as killed
        (exit 137) or lost, since no job runs unsupervised."""
        states = await self.runner.call(lambda engine: [_state(engine, name) for name in self.names])
        ended_states = [state for state in states if state is not None and state["Status"] in ENDED_STATES]
        if all(state is not None and state["Status"] in LIVE_STATES | ENDED_STATES for state in states):
            if len(ended_states) < len(states):
                await self._start_shim()
                return None
            failed = [rank for rank, state in enumerate(ended_states) if state["ExitCode"]]
            rank = min(failed, key=lambda rank: str(ended_states[rank]["FinishedAt"]), default=None)
            state = ended_states[rank or 0]
            code = int(state["ExitCode"])
            ended = JobExit(
                exit_code=code,
                signal=signal_of(code),
                oom_killed=bool(state["OOMKilled"]),
                rank=rank if len(self.names) > 1 else None,
            )
        elif None in states:
            ended = JobExit(
                exit_code=None,
                failure=RunnerFailure(
                    FailureReason.RUNNER_INFRA, "the job's container and its shim are gone without a record"
                ),
            )
        else:
            ended = JobExit(exit_code=128 + signal.SIGKILL, signal=signal.SIGKILL)
        await self._remove_all()
        write_atomically(self._exit_file, _exit_record(ended))
        return ended

    async def _remove_all(self) -> None:
        """Remove every rank's container, the ranks in rank 0's network first."""
        for name in reversed(self.names):
            await self.runner.remove(name)

    async def stop(self, grace: float) -> None:
        """SIGTERM every container, SIGKILL after ``grace``; the shim records the end and removes them."""
        if self._starting is not None:
            await asyncio.wait({self._starting})
        if self.started and await self._until_started() is None:
            await asyncio.gather(*(self._stop_container(name, grace) for name in self.names))
            await self._settle()
        if self.exit() is not None:
            with contextlib.suppress(docker.errors.NotFound, RunnerUnavailable):
                await self._remove_all()
        self.runner.gpus.release(self.assignment.lease_id)

    async def _stop_container(self, name: str, grace: float) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            await self.runner.call(lambda engine: engine.api.stop(name, timeout=math.ceil(grace)))

    async def _settle(self) -> None:
        """Until the shim has recorded the end (or the agent has, for a shim that is gone)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHIM_SETTLE_SECONDS
        while self.exit() is None and loop.time() < deadline:
            if not self._alive():
                await self._without_shim()
            await asyncio.sleep(EXIT_POLL_SECONDS)

    async def renew_lease(self, until: float) -> None:
        """Tell the shim the agent's leases are good until ``until`` (UNIX seconds)."""
        with contextlib.suppress(FileNotFoundError):  # a lease forgotten meanwhile has no shim to tell
            write_atomically(self.lease_dir / "lease_until", until)


def _split(image: str) -> tuple[str, str | None]:
    """``host:5000/team/job:tag`` -> (``host:5000/team/job``, ``tag``); a digest stays in the repository."""
    if "@" in image:
        return image, None
    repository, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:
        return image, "latest"
    return repository, tag


def _exit_record(ended: JobExit) -> dict[str, Any]:
    record: dict[str, Any] = {
        "exit_code": ended.exit_code,
        "signal": ended.signal,
        "fenced": ended.fenced,
        "oom_killed": ended.oom_killed,
    }
    if ended.failure is not None:
        record["failure"] = {"reason": ended.failure.reason.name, "message": ended.failure.message}
    if ended.rank is not None:
        record["rank"] = ended.rank
    return record
