"""CPU a launched job costs: CPU-seconds per run of a cached local-process job, and where they go.

Two measurements on local stacks (each in a temporary TAKEOFF_HOME):

- ``stack``: ``--runs`` launches of a cached job through the queue and an agent, one after another, each
  waited for as a client waits (``launch().wait()``: a WatchItem stream). Each service's CPU (utime + stime
  from ``/proc/PID/stat``) is read before and after (the runs' logs are read later); the job side is the
  shims' fork server's and the warm interpreters' own and *children* time (``cutime + cstime``: the shims
  they waited for and, through them, their jobs), with the agent's children time (what it waited for
  itself: a server, had it ended). The
  total is everything the machine spent on the runs; the goal is <= 0.2 CPU-seconds per run (issue 17).
  Measured twice, each on a stack of its own: with the agent's run relay on (the default: the job's SDK
  calls the registry through the agent and imports no gRPC, docs/design.md §8) and off.
- ``direct``: what the agent does to start a job (a lease directory, ``spec.json``, the shim forked by
  the shims' fork server), done ``--runs`` times by this script against the same registry, each shim's
  CPU the growth of the server's children time once it has reaped it (clock ticks: means, not medians,
  so that the ticks average out), with variants that split it: the shim with ``/bin/true`` as its job
  (the shim alone); the venv's interpreter started and stopped (``python -c pass``, with the SDK's
  ``sitecustomize``); the job itself, which records its own CPU (``getrusage``) at its first line, after
  ``import takeoff``, after ``takeoff.init()`` and after ``finish()``, and each thread's CPU before the
  finish (its CPU clock, ``pthread_getcpuclockid``), so the rest of the total is the interpreter's exit;
  and the job with system metrics off.

CPU times, not wall times: two cores shared with the services and other work make wall time noisy, while a
process's CPU time is its own (cache misses and a busy machine still inflate it: upper bounds).

    python bench/job_cpu.py [--runs 20] [--only stack|direct]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from takeoff.client import Client
from takeoff.models import ItemState, ResourceKind
from takeoff.stack import LocalStack
from takeoff.v1 import runs_pb2, runs_pb2_grpc
from takeoff_agent.runners.shims import SERVER_COMMAND
from takeoff_agent.sdk_site import write_sdk_site
from takeoff_rpc.channels import open_channel

MARK = "job_cpu "
JOB = f"""\
import resource as _resource  # a small C module: the first mark is the interpreter's start alone


def _cpu():
    usage = _resource.getrusage(_resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_marks = {{"start": _cpu()}}
import takeoff

_marks["import takeoff"] = _cpu()
run = takeoff.init()
_marks["init"] = _cpu()
run.log({{"loss": 0.5}})
import json as _json, threading as _threading, time as _time  # loaded by init already

_threads = {{
    thread.name: _time.clock_gettime(_time.pthread_getcpuclockid(thread.ident))
    for thread in _threading.enumerate()
    if thread.ident is not None
}}
_marks["before finish"] = _cpu()
run.finish()
_marks["finish"] = _cpu()
print("{MARK}" + _json.dumps({{"marks": _marks, "threads": _threads}}), flush=True)
"""
PROJECT = "bench"


def _stat_times(pid: int) -> tuple[float, float]:
    """(own CPU seconds, waited-for children's CPU seconds) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, (int(fields[13]) + int(fields[14])) / ticks


def _children(pid: int) -> list[int]:
    """The process's live children (the agent's: its shims' fork server)."""
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def _shim_side(agent: int) -> float:
    """CPU seconds of the shims and their jobs so far: the agent's waited-for children's (the shims it
    started before the fork server) and its live children's own and waited-for children's (the fork server
    and the warm interpreters, each the parent of the shims it forked, which waits for each)."""
    return _stat_times(agent)[1] + sum(sum(_stat_times(child)) for child in _children(agent))


def _job_marks(text: str) -> dict[str, object]:
    for line in text.splitlines():
        if line.startswith(MARK):
            parsed: dict[str, object] = json.loads(line.removeprefix(MARK))
            return parsed
    raise RuntimeError(f"the job printed no line starting {MARK!r}")


def _median(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 1) if values else 0.0


def _job_parts(records: list[dict[str, object]]) -> dict[str, float]:
    """Median milliseconds of each step the job recorded, and of each thread before the finish."""
    steps: dict[str, list[float]] = {}
    for record in records:
        marks = record["marks"]
        assert isinstance(marks, dict)
        previous = 0.0
        for name, value in marks.items():
            steps.setdefault(f"job: -> {name}", []).append(value - previous)
            previous = value
        threads = record["threads"]
        assert isinstance(threads, dict)
        for name, value in threads.items():
            if name != "MainThread":
                steps.setdefault(f"job thread {name} (before finish)", []).append(value)
    return {name: _median(values) for name, values in steps.items()}


def measure_stack(stack: LocalStack, client: Client, runs: int, *, run_relay: bool) -> dict[str, float]:
    relay = "relayed" if run_relay else "direct"
    queue = client.create_queue(f"job-cpu-{relay}", resource=ResourceKind.LOCAL_PROCESS).name
    config = stack.home / f"agent-{relay}.yaml"
    config.write_text(yaml.safe_dump({"queues": [queue], "max_jobs": 1, "run_relay": run_relay}))
    agent = stack.start_agent(config)
    client.launch("job-cpu", queue).wait(timeout=600)  # builds the venv: not measured
    pids = {name: service.pid for name, service in stack.record.services.items()}
    before = {name: _stat_times(pid) for name, pid in pids.items()}
    shim_side = _shim_side(pids["agent"])
    ran = []
    for _ in range(runs):
        item = client.launch("job-cpu", queue).wait(timeout=600)
        if item.state is not ItemState.SUCCEEDED:
            raise RuntimeError(f"{item.name} ended {item.state}: {item.message}")
        ran.append(item.run)
    after = {name: _stat_times(pid) for name, pid in pids.items()}
    shim_side = _shim_side(pids["agent"]) - shim_side
    # Read once the CPU is taken: the registry's work for this bench's reads is not the runs'.
    records = [_job_marks("\n".join(line.text for line in client.read_logs(run))) for run in ran]
    figures = {f"{name} (own)": (after[name][0] - before[name][0]) / runs * 1e3 for name in pids}
    figures["shim + job (the fork servers' children)"] = shim_side / runs * 1e3
    figures = {name: round(value, 1) for name, value in figures.items()}
    figures["total"] = round(sum(figures.values()), 1)
    del agent
    return figures | _job_parts(records)


class Direct:
    """Starts shims as the agent's local-process runner does, against the stack's registry."""

    def __init__(self, stack: LocalStack, registry: str, home: Path) -> None:
        self.home = home
        self.registry = registry
        self.channel = open_channel(registry, api_key=stack.admin_key)
        self.runs = runs_pb2_grpc.RunServiceStub(self.channel)
        self.admin_key = stack.admin_key
        venv = home / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        self.python = str(venv / "bin" / "python")
        sdk = write_sdk_site(home / "sdk")
        self.env = {
            "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/"),
            "PYTHONPATH": str(sdk),
            "VIRTUAL_ENV": str(venv),
            "PYTHONUNBUFFERED": "1",
            "TAKEOFF_PROJECT": PROJECT,
            "TAKEOFF_REGISTRY": registry,
            "TAKEOFF_TOKEN": self.admin_key,
        }
        self.count = 0
        self.server = subprocess.Popen(SERVER_COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _lease_dir(self, argv: list[str], env: dict[str, str]) -> Path:
        self.count += 1
        lease_dir = self.home / "leases" / str(self.count)
        (lease_dir / "work").mkdir(parents=True)
        (lease_dir / "work" / "main.py").write_text(JOB)
        spec = {"argv": argv, "env": env, "cwd": str(lease_dir / "work"), "stop_grace_seconds": 10}
        (lease_dir / "spec.json").write_text(json.dumps(spec))
        (lease_dir / "lease_until").write_text(str(time.time() + 3600))
        return lease_dir

    def _run_env(self, **more: str) -> dict[str, str]:
        run = self.runs.CreateRun(runs_pb2.CreateRunRequest(parent=f"projects/{PROJECT}")).run
        return {**self.env, "TAKEOFF_RUN_ID": run.name.rsplit("/", 1)[1], **more}

    def shim(self, argv: list[str], env: dict[str, str]) -> tuple[float, Path]:
        """CPU seconds of the shim and its job, started as the agent starts them: forked by the fork
        server, whose waited-for children's CPU grows by theirs once it has reaped the shim."""
        lease_dir = self._lease_dir(argv, env)
        assert self.server.stdin is not None
        assert self.server.stdout is not None
        before = _stat_times(self.server.pid)[1]
        self.server.stdin.write(bytes(lease_dir) + b"\0")
        self.server.stdin.flush()
        _, pid = self.server.stdout.readline().split()
        if self.server.stdout.readline().split() != [b"ended", pid]:
            raise RuntimeError("the fork server answered out of turn")
        if json.loads((lease_dir / "exit.json").read_text())["exit_code"]:
            raise RuntimeError(f"the job in {lease_dir} failed: {(lease_dir / 'stderr.log').read_text()}")
        return _stat_times(self.server.pid)[1] - before, lease_dir

    def measure(self, runs: int) -> dict[str, float]:
        variants: dict[str, Callable[[], tuple[float, Path]]] = {
            "direct: shim + job": lambda: self.shim([self.python, "main.py"], self._run_env()),
            "direct: shim + job, system metrics off": lambda: self.shim(
                [self.python, "main.py"], self._run_env(TAKEOFF_SYSTEM_METRICS="0")
            ),
            "direct: shim alone (job /bin/true)": lambda: self.shim(["/bin/true"], self.env),
            "direct: shim + venv python -c pass": lambda: self.shim([self.python, "-c", "pass"], self.env),
        }
        self.shim([self.python, "main.py"], self._run_env())  # compiles nothing later runs pay for
        times: dict[str, list[float]] = {name: [] for name in variants}
        records = []
        for _ in range(runs):  # the variants take turns, so a load that comes and goes spreads over all
            for name, variant in variants.items():
                seconds, lease_dir = variant()
                times[name].append(seconds)
                if name == "direct: shim + job":
                    records.append(_job_marks((lease_dir / "stdout.log").read_text()))
        figures = {name: round(statistics.mean(values) * 1e3, 1) for name, values in times.items()}
        parts = _job_parts(records)
        job_total = figures["direct: shim + job"] - figures["direct: shim alone (job /bin/true)"]
        recorded = sum(value for name, value in parts.items() if name.startswith("job: ->"))
        parts["job: -> exit (the rest)"] = round(job_total - recorded, 1)
        return figures | parts


@contextlib.contextmanager
def _stack() -> Iterator[tuple[LocalStack, Client]]:
    """A started local stack in a temporary home, with the code job ``job-cpu``; stopped after."""
    with tempfile.TemporaryDirectory(prefix="takeoff-bench-") as directory:
        home = Path(directory)
        code = home / "code"
        code.mkdir()
        (code / "main.py").write_text(JOB)
        stack = LocalStack(home, base_port=0)
        record = stack.start()
        try:
            registry = record.services["registry"].address
            with Client(
                registry, queue=record.services["queue"].address, project=PROJECT, api_key=stack.admin_key
            ) as client:
                client.create_job_version("job-cpu", code, entrypoint=["python", "main.py"])
                yield stack, client
        finally:
            stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", choices=["stack", "direct"])
    args = parser.parse_args()
    figures: dict[str, float] = {}
    # The agent's run relay on and off (docs/design.md §8), each on a stack of its own (an agent per home).
    for run_relay in (True, False) if args.only != "direct" else ():
        with _stack() as (stack, client):
            measured = measure_stack(stack, client, args.runs, run_relay=run_relay)
        relay = "relay on" if run_relay else "relay off"
        figures |= {f"stack, {relay}: {name}": value for name, value in measured.items()}
    if args.only != "stack":
        with _stack() as (stack, client):
            figures |= Direct(stack, stack.record.services["registry"].address, stack.home).measure(args.runs)
    print(json.dumps({"runs": args.runs, "cpu_ms_per_run": figures}, indent=2))
    print(f"\nCPU milliseconds per run (means for the direct parts, medians for the job's), {args.runs} runs")
    for name, value in figures.items():
        print(f"{value:>9.1f}  {name}")


if __name__ == "__main__":
    main()
