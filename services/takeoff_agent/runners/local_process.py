"""The local-process runner: each job runs under a shim (see ``shim.py``) in its own lease directory.

The agent starts the shim and forgets nothing it cannot find again: after a restart, the job of a lease
directory is picked back up from its files, whether it is still running or ended while the agent was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Collection, Mapping
from pathlib import Path

from takeoff_agent.domain import Assignment, BuildKind, JobExit, ResourceKind, SourceKind
from takeoff_agent.log_tail import shim_output
from takeoff_agent.ranks import ONE_PROCESS, World, free_port, rank_environment, world_of
from takeoff_agent.runners.base import (
    JobOutput,
    Launch,
    RunnerContext,
    refuse_other_options,
    venv_build,
)
from takeoff_agent.runners.secrets import (
    CA_FILE_VARIABLE,
    LEASE_SECRETS_DIR,
    SECRETS_DIR_VARIABLE,
    check_names,
    write_secret_files,
)
from takeoff_agent.runners.shims import Shim, ShimStarter, WarmStart, started_shim
from takeoff_agent.sdk_site import matches_agent_python, write_sdk_site
from takeoff_agent.shim import (
    STOPPING,
    start_variables,
    stop_groups,
    warm_startable,
    write_atomically,
    write_private,
)
from takeoff_server.resource_configs import PROCESS_OPTIONS

logger = logging.getLogger(__name__)

EXIT_POLL_SECONDS = 0.1
EXIT_RECORD_SECONDS = 10.0
"""How long a stop waits, beyond the job's grace, for the shim to record the exit of a stopped job (it looks
every ``shim.FENCE_CHECK_SECONDS``, then ends the rest of the group, which is gone by then)."""
PASSED_FROM_AGENT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR")
"""What a job gets from the agent's own environment (and every ``LC_*``): where programs are, whose home
and name it runs under, its locale, time zone and temporary directory. Nothing else: the agent's
credentials and settings (``TAKEOFF_*`` among them) are not the job's business (docs/design.md §16)."""
LOOPBACK = "127.0.0.1"
"""``MASTER_ADDR`` of a multi-node launch on local-process: its ranks all run on the agent's host."""
RELAY_VARIABLE = "TAKEOFF_RELAY"
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def create(options: Mapping[str, object], context: RunnerContext) -> LocalProcessRunner:
    """The runner. ``pass_env`` names more of the agent's variables its jobs get (a GPU host's
    ``LD_LIBRARY_PATH``, a proxy); ``warm_start: false`` starts every job in an interpreter of its own,
    never in a warm one (docs/design.md §7 "Warm interpreters")."""
    unknown = sorted(set(options) - {"pass_env", "warm_start"})
    if unknown:
        raise ValueError(f"unknown option {', '.join(unknown)} (local-process takes: pass_env, warm_start)")
    passed = options.get("pass_env", [])
    if not isinstance(passed, list) or not all(
        isinstance(name, str) and _VARIABLE_NAME.fullmatch(name) for name in passed
    ):
        raise ValueError("pass_env must be a list of environment variable names")
    warm_start = options.get("warm_start", True)
    if not isinstance(warm_start, bool):
        raise ValueError("warm_start must be true or false")
    return LocalProcessRunner(context, tuple(passed), warm_start=warm_start)


def copy_code(code_path: Path, work_dir: Path) -> None:
    """A fresh copy of the built code for one attempt: jobs may write into their working directory."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    shutil.copytree(code_path, work_dir, symlinks=True)


def agent_environment(passed: Collection[str]) -> dict[str, str]:
    """The part of the agent's environment a job is given: PASSED_FROM_AGENT, ``LC_*`` and ``passed``."""
    return {
        name: value
        for name, value in os.environ.items()
        if name in PASSED_FROM_AGENT or name.startswith("LC_") or name in passed
    }


class LocalProcessRunner:
    kind = ResourceKind.LOCAL_PROCESS
    needs_pushed_image = False

    def __init__(
        self, context: RunnerContext, pass_env: tuple[str, ...] = (), *, warm_start: bool = True
    ) -> None:
        self.context = context
        self.pass_env = pass_env
        self.warm_start = warm_start
        self.sdk_site = write_sdk_site(context.state_dir / "sdk")
        self.shims = ShimStarter()

    def build_kind(self, source: SourceKind) -> BuildKind:
        return venv_build(self.kind, source)

    def check(self, assignment: Assignment) -> None:
        self.build_kind(assignment.job_version.source)
        refuse_other_options(self.kind, set(assignment.resource_config) - PROCESS_OPTIONS, PROCESS_OPTIONS)

    def job(self, assignment: Assignment, lease_dir: Path) -> LocalProcessJob:
        return LocalProcessJob(
            lease_dir,
            self.sdk_site,
            self.pass_env,
            world_of(assignment.resource_config),
            relay=self.context.relay,
            shims=self.shims,
            warm_start=self.warm_start,
        )

    async def sweep(self, held: Collection[str]) -> None:
        """Stop the local jobs of lease directories the agent does not hold (it removes the directories;
        other runners' work in them is theirs to stop)."""
        leases = self.context.state_dir / "leases"
        if not leases.is_dir():
            return
        orphans = [LocalProcessJob(lease_dir, self.sdk_site) for lease_dir in leases.iterdir()]
        await asyncio.gather(
            *(job.stop(job.stop_grace_seconds) for job in orphans if job.lease_dir.name not in held)
        )

    async def close(self) -> None:
        await self.shims.close()


class LocalProcessJob:
    """One job under its shim, found through its lease directory: one process, or one per rank of a
    multi-node launch (``nodes: N``: N processes on the agent's host, one shim for them all)."""

    def __init__(
        self,
        lease_dir: Path,
        sdk_site: Path,
        pass_env: tuple[str, ...] = (),
        world: World = ONE_PROCESS,
        *,
        relay: str | None = None,
        shims: ShimStarter | None = None,
        warm_start: bool = False,
    ) -> None:
        """``relay``: the agent's run relay, given to the job as TAKEOFF_RELAY; None (the Slurm runner's
        jobs, which may run on another node) gives none. ``shims``: its runner's, which starts the shim;
        None for a job found in a lease directory, which is only stopped. ``warm_start``: the job may run
        in a warm interpreter of its venv."""
        self.lease_dir = lease_dir
        self.sdk_site = sdk_site
        self.pass_env = pass_env
        self.world = world
        self.relay = relay
        self._shims = shims
        self.warm_start = warm_start
        self._starting: asyncio.Task[Shim] | None = None
        self._log_sources = shim_output(lease_dir, world)

    @property
    def _spec_file(self) -> Path:
        return self.lease_dir / "spec.json"

    @property
    def _shim(self) -> Shim | None:
        """The shim the agent started, once started; None for a job found in a lease directory."""
        return started_shim(self._starting)

    @property
    def started(self) -> bool:
        return self._spec_file.exists()

    @property
    def stop_grace_seconds(self) -> float:
        """The grace the job was started with (for stopping it without its Launch)."""
        try:
            return float(json.loads(self._spec_file.read_text())["stop_grace_seconds"])
        except (OSError, ValueError, KeyError):
            return 0.0

    def log_sources(self) -> list[JobOutput]:
        return self._log_sources

    @property
    def secrets_dir(self) -> Path:
        """The job's secret files (mode 0700, each 0600), removed with the lease directory."""
        return self.lease_dir.absolute() / LEASE_SECRETS_DIR

    def environment(self, launch: Launch) -> dict[str, str]:
        """The job's environment (docs/design.md §7): what it may see of the agent's, then the venv's
        variables (the resource config's ``env`` cannot move the venv off ``PATH``), then the launch's,
        then where its secret files and CA certificate are and how it reaches the registry: directly, and
        through the agent's run relay when that runs (the SDK falls back to the former)."""
        venv = Path(launch.built.venv_path)
        sdk = {"PYTHONPATH": str(self.sdk_site)} if matches_agent_python(venv) else {}
        inherited = agent_environment(self.pass_env)
        files = {SECRETS_DIR_VARIABLE: str(self.secrets_dir)} if launch.secret_files else {}
        ca = {CA_FILE_VARIABLE: str(launch.ca_file.absolute())} if launch.ca_file is not None else {}
        relay = {RELAY_VARIABLE: self.relay} if self.relay is not None else {}
        return {
            **inherited,
            **sdk,
            **launch.env,
            "PATH": os.pathsep.join(filter(None, [str(venv / "bin"), inherited.get("PATH")])),
            "VIRTUAL_ENV": str(venv),
            **launch.secrets,
            **files,
            **ca,
            "TAKEOFF_REGISTRY": launch.registry_address,
            **relay,
        }

    async def start(self, launch: Launch) -> None:
        check_names(launch)
        assignment, built = launch.assignment, launch.built
        if launch.secret_files:
            await asyncio.to_thread(write_secret_files, self.secrets_dir, launch.secret_files)
        work_dir = self.lease_dir / "work"
        await asyncio.to_thread(copy_code, Path(built.code_path), work_dir)
        argv = list(assignment.entrypoint)
        venv_python = argv[:1] in (["python"], ["python3"])
        if venv_python:
            argv[0] = built.python_path or str(Path(built.venv_path) / "bin" / "python")
        context_dir = assignment.job_version.build_context
        env = self.environment(launch)
        spec: dict[str, object] = {
            "argv": argv,
            "env": env,
            "cwd": str(work_dir / context_dir) if context_dir else str(work_dir),
            "stop_grace_seconds": launch.stop_grace_seconds,
        }
        if self.world.multi:
            spec["ranks"] = self.rank_environments()
        write_private(self._spec_file, spec)
        assert self._shims is not None, "a job its runner made: found ones are only stopped"
        warm = (  # the SDK's imports need the agent's Python; the shim checks the rest (shim._main_here)
            WarmStart(argv[0], tuple(sorted(start_variables(env).items())))
            if self.warm_start
            and venv_python
            and matches_agent_python(Path(built.venv_path))
            and warm_startable(env)
            else None
        )
        # A task of its own: a start given up midway (a stop came first) leaves the shim starting, and
        # stop() waits for it, then stops the job it started.
        self._starting = asyncio.create_task(self._shims.start(self.lease_dir, warm))
        await asyncio.shield(self._starting)

    def rank_environments(self) -> list[dict[str, str]]:
        """Each rank's variables, over the job's environment: rank 0 serves at a port free now on the
        loopback address, which the spec file records for the shim and any later agent."""
        master_port = free_port(LOOPBACK)
        return [
            rank_environment(self.world, rank, master_addr=LOOPBACK, master_port=master_port)
            for rank in range(self.world.size)
        ]

    async def until_running(self) -> None:
        """A local job runs from its start on."""

    def exit(self) -> JobExit | None:
        try:
            data = json.loads((self.lease_dir / "exit.json").read_text())
        except (OSError, ValueError):
            return None
        return JobExit(
            exit_code=data["exit_code"], signal=data["signal"], fenced=data["fenced"], rank=data.get("rank")
        )

    def _pids(self) -> tuple[int, list[int]] | None:
        """The shim's pid and the job's processes (each its process group: one per rank); None before the
        shim has started it, and for a lease directory of another runner (a container's shim records no
        job pid)."""
        try:
            data = json.loads((self.lease_dir / "shim.json").read_text())
            return int(data["shim_pid"]), [int(pid) for pid in data.get("rank_pids", [data["job_pid"]])]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _shim_alive(self) -> bool:
        if self._shim is not None:
            return self._shim.running
        pids = self._pids()
        if pids is None:
            return self.started and self.exit() is None
        try:
            os.kill(pids[0], 0)
        except ProcessLookupError:
            return False
        return True

    async def wait(self) -> JobExit:
        """The job's end: from its shim's exit when the agent started it, else by watching its files."""
        while True:
            if self._shim is not None:
                await self._shim.ended()
            if (ended := self.exit()) is not None:
                return ended
            if not self._shim_alive():
                # The shim died without a word (killed, perhaps along with the machine's processes). Its job
                # may live on, unsupervised: stop it, so that the outcome reported is what happened.
                await self.stop(0)
                return JobExit(exit_code=128 + signal.SIGKILL, signal=signal.SIGKILL)
            await asyncio.sleep(EXIT_POLL_SECONDS)

    async def stop(self, grace: float) -> None:
        """SIGTERM the job's process groups, SIGKILL after ``grace``; then wait for the shim to record the
        exit. Until it has, the shim still writes into the lease directory, which the agent removes once
        the job is stopped: a directory removed under the shim's last write would outlive the lease."""
        if self._starting is not None:
            await asyncio.wait({self._starting})
        pids = self._pids()
        while pids is None and self._shim is not None and self._shim.running:
            # Its shim is starting the job (a stop right after the start): until it records the processes.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shim.ended(), EXIT_POLL_SECONDS)
            pids = self._pids()
        if pids is None or self.exit() is not None:
            return
        (self.lease_dir / STOPPING).touch()
        await asyncio.to_thread(stop_groups, pids[1], grace)
        deadline = time.monotonic() + grace + EXIT_RECORD_SECONDS
        while self.exit() is None and self._shim_alive():
            if time.monotonic() > deadline:
                logger.warning("the shim in %s has not recorded its stopped job's exit", self.lease_dir)
                return
            await asyncio.sleep(EXIT_POLL_SECONDS)

    async def renew_lease(self, until: float) -> None:
        """Tell the shim the agent's leases are good until ``until`` (UNIX seconds)."""
        with contextlib.suppress(FileNotFoundError):  # a lease forgotten meanwhile has no shim to tell
            write_atomically(self.lease_dir / "lease_until", until)
