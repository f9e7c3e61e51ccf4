"""``takeoff launch|items|job|agent`` as users run them: subprocesses against the session's real registry and
queue, and real agents (``takeoff agent``) running real jobs where a test needs work done."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from takeoff import Client
from takeoff.errors import NotFoundError
from takeoff.models import ItemState
from tests.processes import ServiceProcess, service_process, wait_for
from tests.queue.harness import make_code_job
from tests.sdk.conftest import start_takeoff
from tests.sdk.test_pack import write
from tests.sdk.test_queue_cli import refused_in_one_line

NO_AGENT_LINE = "waiting: no connected agent serves cpu (takeoff agent -q cpu)"

Takeoff = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def takeoff(cli_env: dict[str, str]) -> Takeoff:
    def run(*args: str, columns: int = 200, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "takeoff.cli", *args],
            env={**cli_env, "COLUMNS": str(columns)},
            input=stdin,
            capture_output=True,
            check=False,
            text=True,
            timeout=60,
        )

    return run


@pytest.fixture(scope="module")
def builder(registry: ServiceProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """What a real agent has build a code job's environment."""
    env = {"TAKEOFF_REGISTRY_ADDRESS": registry.address}
    with service_process("builder", tmp_path_factory.mktemp("builder"), env=env) as process:
        yield process


@pytest.fixture
def queues(registry: ServiceProcess, queue_service: ServiceProcess, project: str) -> Iterator[Client]:
    with Client(registry.address, queue=queue_service.address, project=project) as client:
        yield client


@pytest.fixture
def train(registry: ServiceProcess, project: str, tmp_path: Path) -> str:
    make_code_job(registry.address, project, "train", tmp_path)
    return "train"


@pytest.fixture
def start_agent(cli_env: dict[str, str], builder: ServiceProcess, tmp_path: Path) -> Iterator[AgentStarter]:
    starter = AgentStarter({**cli_env, "TAKEOFF_BUILDER_ADDRESS": builder.address}, tmp_path / "home")
    yield starter
    starter.stop_all()


class AgentStarter:
    """``takeoff agent ...`` on this host, every one with the same TAKEOFF_HOME (so the same default state
    directory), in the project given by ``--project`` alone, running only local processes."""

    def __init__(self, cli_env: dict[str, str], home: Path) -> None:
        self.env = {
            **{name: value for name, value in cli_env.items() if name != "TAKEOFF_PROJECT"},
            "TAKEOFF_HOME": str(home),
            "TAKEOFF_RUNNERS": json.dumps({"local-process": {}}),
        }
        self.home = home
        self.started: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        log = (self.home.parent / f"agent-{len(self.started)}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "takeoff.cli", "agent", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # drains: no job is left running
        for process in self.started:
            process.wait(timeout=60)


async def read_until(stream: asyncio.StreamReader, wanted: str, seen: list[str]) -> None:
    """Read lines into ``seen`` until one is ``wanted``."""
    while True:
        line = await asyncio.wait_for(stream.readline(), 60)
        assert line, f"output ended before {wanted!r}: {seen}"
        seen.append(line.decode().rstrip("\n"))
        if seen[-1] == wanted:
            return


async def test_launch_wait_says_no_agent_serves_the_queue_then_streams_the_logs_once_one_arrives(
    cli_env: dict[str, str], queues: Client, train: str, project: str, start_agent: AgentStarter
) -> None:
    queues.create_queue("cpu")
    entrypoint = shlex.join(
        [
            "python",
            "-c",
            "import takeoff; run = takeoff.init(); print('from the -E entrypoint'); run.finish()",
        ]
    )
    launch = await start_takeoff(cli_env, "launch", train, "-q", "cpu", "--logs", "-E", entrypoint)
    try:
        assert launch.stdout is not None
        seen: list[str] = []
        await read_until(launch.stdout, NO_AGENT_LINE, seen)
        agent = start_agent.start("-q", "cpu", "--project", project, "-j", "2")
        stdout, stderr = await asyncio.wait_for(launch.communicate(), 120)
    finally:
        if launch.returncode is None:
            launch.kill()
            await launch.wait()

    assert launch.returncode == 0, (seen, stdout.decode(), stderr.decode())
    lines = seen + stdout.decode().splitlines()
    assert lines.count(NO_AGENT_LINE) == 1
    assert "from the -E entrypoint" in lines, (
        lines
    )  # the overriding entrypoint ran, and its output was streamed
    [run_line] = [line for line in lines if line.startswith("run ")]
    item = queues.get_item(lines[0])
    assert run_line == f"run {item.run.rsplit('/', 1)[-1]}"
    assert item.entrypoint == shlex.split(entrypoint)
    progress = [line for line in lines if re.match(r"\d\d:\d\d:\d\d |run |waiting: ", line)]
    assert [line for line in progress if len(line) > 80] == []
    [served] = [found for found in queues.list_agents(queue="cpu")]
    assert served.capacity == 2  # -j
    assert agent.poll() is None


def test_launch_timeout_exits_124_and_says_the_queue_is_paused(
    takeoff: Takeoff, queues: Client, train: str
) -> None:
    queues.create_queue("cpu", paused=True)

    waited = takeoff("launch", train, "-q", "cpu", "--wait", "--timeout", "1")

    assert waited.returncode == 124, waited.stderr
    assert "waiting: queue cpu is paused (takeoff queue resume cpu)" in waited.stdout.splitlines()
    assert "has not ended after 1s; it carries on" in waited.stderr
    [item] = queues.list_items(queue="cpu")
    assert item.name == waited.stdout.splitlines()[0]
    assert not item.ended


def test_priority_on_a_queue_that_ignores_it_is_warned_about(
    takeoff: Takeoff, queues: Client, train: str
) -> None:
    queues.create_queue("fifo", paused=True)
    queues.create_queue("ranked", paused=True, prioritization=True)

    ignored = takeoff("launch", train, "-q", "fifo", "--priority", "high")
    honoured = takeoff("launch", train, "-q", "ranked", "--priority", "high")

    assert ignored.returncode == honoured.returncode == 0, (ignored.stderr, honoured.stderr)
    assert "warning: queue fifo serves items in launch order, so --priority high changes" in ignored.stderr
    assert honoured.stderr == ""


def test_an_entrypoint_override_on_a_secure_queue_is_refused_in_one_line(
    takeoff: Takeoff, queues: Client, train: str
) -> None:
    queues.create_queue("locked", resource="local-container", paused=True, secure=True)

    refused_in_one_line(
        takeoff("launch", train, "-q", "locked", "-E", "python other.py"),
        "SECURE_QUEUE_OVERRIDE",
        "entrypoint",
    )
    assert takeoff("launch", train, "-q", "locked", "--logs", "--json").returncode == 2


def test_items_are_found_without_their_queue_with_their_place_and_why_they_wait(
    takeoff: Takeoff, queues: Client, train: str
) -> None:
    queues.create_queue("cpu", paused=True)
    first, second = (queues.launch(train, "cpu") for _ in range(2))
    second_id = second.name.rsplit("/", 1)[-1]

    described = takeoff("items", "describe", second_id)
    assert described.returncode == 0, described.stderr
    assert "#2 in queue cpu" in described.stdout
    assert re.search(r"waiting +paused", described.stdout), described.stdout
    listed = takeoff("items", "list", columns=80)
    assert all(len(line) <= 80 for line in listed.stdout.splitlines()), listed.stdout
    assert second_id[:8] in listed.stdout
    assert "#1 paused" in listed.stdout

    cancelled = takeoff("items", "cancel", second_id, "--message", "launched by mistake")
    assert cancelled.returncode == 0, cancelled.stderr
    last = second.refresh().transitions[-1]
    assert (last.to_state, last.message) == (ItemState.CANCELLED, "launched by mistake")
    assert "launched by mistake" in takeoff("items", "describe", second_id).stdout
    assert first.refresh().position == 1


def test_job_create_reads_the_directory_requirements_unless_given_and_says_so(
    takeoff: Takeoff, queues: Client, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    write(code, {"train.py": "print('hi')\n", "requirements.txt": "numpy==2.1\n"})
    other = tmp_path / "other.txt"
    other.write_text("torch==2.5\n")
    create = ["job", "create", str(code), "--name", "train", "--entrypoint", "python train.py"]

    found = takeoff(*create)
    given = takeoff(*create, "--requirements", str(other))

    assert found.returncode == given.returncode == 0, (found.stderr, given.stderr)
    assert found.stderr == f"using {code / 'requirements.txt'} (--requirements FILE to give another)\n"
    assert given.stderr == ""
    v0, v1 = (queues.get_job_version(f"train:v{n}").environment for n in (0, 1))
    assert (v0.requirements, v1.requirements) == ("numpy==2.1\n", "torch==2.5\n")


def test_job_versions_aliases_and_delete_that_asks_first(
    takeoff: Takeoff, queues: Client, tmp_path: Path
) -> None:
    for n in range(2):
        write(tmp_path / f"v{n}", {"train.py": f"print({n})\n"})
        queues.create_job_version("train", tmp_path / f"v{n}", entrypoint=["python", "train.py"])

    assert takeoff("job", "alias", "set", "train", "prod", "v0").stdout == "train:prod → v0\n"
    assert queues.get_job("train").aliases["prod"] == 0
    listed = takeoff("job", "versions", "train", columns=80)
    rows = [line.split()[:2] for line in listed.stdout.splitlines() if re.match(r" ?v\d ", line)]
    assert rows == [["v1", "latest"], ["v0", "prod"]]
    assert "prod" in listed.stdout
    assert takeoff("job", "alias", "delete", "train", "prod").returncode == 0
    assert "prod" not in queues.get_job("train").aliases
    assert takeoff("job", "alias", "set", "train", "prod", "three").returncode == 2

    kept = takeoff("job", "delete", "train", stdin="n\n")
    assert kept.returncode == 1
    assert "delete job train and its 2 version(s)?" in kept.stdout
    assert queues.get_job("train").version_count == 2
    assert takeoff("job", "delete", "train", "--yes").stdout == "deleted job train\n"
    with pytest.raises(NotFoundError):
        queues.get_job("train")


def test_agent_refuses_to_start_without_a_queue(cli_env: dict[str, str], tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "takeoff.cli", "agent", "-j", "2"],
        env={**cli_env, "TAKEOFF_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert refused.returncode == 2
    assert (
        refused.stderr
        == "error: no queue to serve: give --queue QUEUE (repeatable), or queues in the --config-file\n"
    )
    assert not (tmp_path / "agent").exists()


def test_two_agents_on_one_host_are_two_agents(
    queues: Client, project: str, start_agent: AgentStarter
) -> None:
    queues.create_queue("cpu")
    agents = [start_agent.start("-q", "cpu", "-p", project, "--name", name) for name in ("one", "two")]

    def both_connected() -> list[str] | None:
        connected = sorted(agent.display_name for agent in queues.list_agents(queue="cpu"))
        return connected if connected == ["one", "two"] else None

    wait_for(both_connected, timeout=60, what="both agents to be connected at once")
    # Each took a state directory of its own, so an id of its own: the first the default, the other the next.
    state = start_agent.home / "agent"
    ids = {agent.id for agent in queues.list_agents(queue="cpu")}
    assert ids == {read_id(state), read_id(state / "2")}
    assert all(agent.poll() is None for agent in agents)


def read_id(state_dir: Path) -> str:
    return (state_dir / "agent_id").read_text().strip()
