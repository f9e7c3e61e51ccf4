"""Warm interpreters (docs/design.md §7 "Warm interpreters"): a job run in a fork of its venv's warm
interpreter sees what it would see in an interpreter of its own, and ends as it would. Each case runs the
same job both ways, through real fork servers and shims, and compares."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import zipapp
from pathlib import Path

import pytest

from takeoff_agent.runners.local_process import create
from takeoff_agent.runners.shims import ShimStarter, WarmStart
from takeoff_agent.shim import start_variables, warm_startable, write_atomically
from tests.processes import eventually

WITHIN = 60.0
ENV = {"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1", "JOB_VALUE": "from the spec"}
WARM = WarmStart(sys.executable, tuple(sorted(start_variables(ENV).items())))

LOOK = """\
import atexit, json, os, signal, sys, threading, time
def ended():
    threading.main_thread().join()  # still running when the main code ends: the exit waits for it
    print("thread ended", flush=True)
threading.Thread(target=ended).start()
atexit.register(print, "atexit ran")
unclosed = open("unclosed.txt", "w")  # never closed: the interpreter's exit flushes it
unclosed.write("written")
def annotated(x: int) -> None: ...
seen = {
    "annotations": repr(annotated.__annotations__),
    "globals": sorted(name for name in globals() if name.startswith("__")),
    "loader": getattr(__loader__, "__name__", type(__loader__).__name__),
    "argv": sys.argv,
    "path": sys.path,
    "name": __name__,
    "file": globals().get("__file__"),
    "main": sys.modules["__main__"].__dict__ is globals(),
    "env": os.environ.get("JOB_VALUE"),
    "environ": sorted(os.environ),
    "cwd": os.getcwd(),
    "group leader": os.getpgid(0) == os.getpid(),
    "sigpipe ignored": signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN,
    "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "stdout": [sys.stdout.encoding, sys.stdout.write_through, sys.stdout.isatty(), sys.stdout.seekable()],
    "stderr": [sys.stderr.errors, sys.stderr.line_buffering, sys.__stderr__ is sys.stderr],
    "stdin": [sys.stdin.read(), sys.stdin.seekable()],
    "streams": [repr(sys.stdin), repr(sys.stdout), repr(sys.stderr)],
    "warm": b"serve_warm" + b"_forks" in open("/proc/self/cmdline", "rb").read(),
    "server": int(open(f"/proc/{os.getppid()}/stat").read().rsplit(")", 1)[1].split()[1]),  # shim's parent
}
print(json.dumps(seen), flush=True)
sys.exit(3)
"""
FORMS = {
    "script": lambda work: [sys.executable, str(work / "look.py"), "an", "argument"],
    "relative script": lambda work: [sys.executable, "look.py", "an", "argument"],
    "module": lambda work: [sys.executable, "-m", "look", "an", "argument"],
    "command": lambda work: [sys.executable, "-c", LOOK, "an", "argument"],
}


def lease_dir(home: Path, name: str, argv_of: object, env: dict[str, str] = ENV) -> Path:
    lease = home / name
    work = lease / "work"
    work.mkdir(parents=True)
    (work / "look.py").write_text(LOOK)
    argv = argv_of(work) if callable(argv_of) else argv_of
    spec = {"argv": argv, "env": env, "cwd": str(work), "stop_grace_seconds": 5}
    write_atomically(lease / "spec.json", spec)
    return lease


async def run(starter: ShimStarter, lease: Path, warm: WarmStart | None) -> dict[str, object]:
    shim = await starter.start(lease, warm)
    async with asyncio.timeout(WITHIN):
        await shim.ended()
    ended: dict[str, object] = json.loads((lease / "exit.json").read_text())
    return ended


def output(lease: Path) -> tuple[dict[str, object], list[str]]:
    """What the LOOK job saw, and the lines it printed after."""
    first, *rest = (lease / "stdout.log").read_text().splitlines()
    return json.loads(first), rest


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


async def warmed(starter: ShimStarter, home: Path, warm: WarmStart = WARM, env: dict[str, str] = ENV) -> int:
    """Start jobs until one runs warm: the first starts ``warm``'s interpreter, which is ready a little
    later (its imports), and the jobs meanwhile start as before. The warm interpreter's pid."""
    for attempt in range(200):
        lease = lease_dir(home, f"probe-{attempt}", FORMS["script"], env)
        await run(starter, lease, warm)
        seen = output(lease)[0]
        if seen["warm"]:
            return int(str(seen["server"]))
    raise AssertionError("no job ran in the warm interpreter")


@pytest.mark.parametrize("form", sorted(FORMS))
async def test_a_job_run_warm_sees_and_does_what_it_would_in_an_interpreter_of_its_own(
    tmp_path: Path, form: str
) -> None:
    starter = ShimStarter()
    try:
        await warmed(starter, tmp_path)
        warm_lease = lease_dir(tmp_path, "warm", FORMS[form])
        cold_lease = lease_dir(tmp_path, "cold", FORMS[form])
        warm_exit = await run(starter, warm_lease, WARM)
        cold_exit = await run(starter, cold_lease, None)
    finally:
        await starter.close()
    warm_seen, warm_after = output(warm_lease)
    cold_seen, cold_after = output(cold_lease)
    assert (warm_seen.pop("warm"), cold_seen.pop("warm")) == (True, False)
    assert warm_seen.pop("server") != cold_seen.pop("server")
    # The paths name each lease's own directory: the same once that is set aside.
    assert json.loads(json.dumps(warm_seen).replace("/warm/", "/LEASE/")) == json.loads(
        json.dumps(cold_seen).replace("/cold/", "/LEASE/")
    )
    assert warm_seen["env"] == "from the spec"
    assert warm_after == cold_after == ["thread ended", "atexit ran"]
    assert (warm_lease / "work" / "unclosed.txt").read_text() == "written"
    assert warm_exit == cold_exit == {"exit_code": 3, "signal": None, "fenced": False}


@pytest.mark.parametrize(
    ("ending", "code", "killed_by", "said"),
    [
        ("1 / 0", 1, None, "ZeroDivisionError: division by zero"),
        ("raise SystemExit('given up')", 1, None, "given up"),
        ("raise SystemExit(300)", 300 & 0xFF, None, ""),
        ("raise KeyboardInterrupt", 128 + signal.SIGINT, signal.SIGINT, "KeyboardInterrupt"),
        ("os.kill(os.getpid(), signal.SIGTERM)", 128 + signal.SIGTERM, signal.SIGTERM, ""),
        ("raise SystemExit(2**70)", 255, None, ""),
        ("import sys; sys.stdout.close()", 0, None, ""),
        (  # a SIGTERM handler exits while the exit waits for a thread: reported, ignored, atexit runs
            "import sys, threading, atexit\n"
            "atexit.register(print, 'atexit ran', flush=True)\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
            "def stopper():\n"
            "    threading.main_thread().join()\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    threading.Event().wait(1)\n"
            "threading.Thread(target=stopper).start()",
            0,
            None,
            "SystemExit: 143",
        ),
    ],
)
async def test_a_job_run_warm_ends_as_it_would_in_an_interpreter_of_its_own(
    tmp_path: Path, ending: str, code: int, killed_by: int | None, said: str
) -> None:
    job = f"import os, signal\nprint('started', flush=True)\n{ending}\n"
    starter = ShimStarter()
    try:
        await warmed(starter, tmp_path)
        ends = {}
        for name, warm in (("warm", WARM), ("cold", None)):
            lease = lease_dir(tmp_path, name, [sys.executable, "-c", job])
            ends[name] = (await run(starter, lease, warm), (lease / "stderr.log").read_text())
    finally:
        await starter.close()
    (warm_exit, warm_err), (cold_exit, cold_err) = ends["warm"], ends["cold"]
    assert warm_exit == cold_exit == {"exit_code": code, "signal": killed_by, "fenced": False}
    assert said in warm_err
    assert warm_err == cold_err  # the job's frames alone, as the interpreter shows them


@pytest.mark.parametrize(
    ("variable", "value", "check"),
    [
        ("PYTHONHASHSEED", "0", "import sys; print(sys.flags.hash_randomization)"),
        (
            "LD_LIBRARY_PATH",
            "/opt/job-libs",
            "print(open('/proc/self/environ', 'rb').read().count(b'/opt/job-libs'))",
        ),
        (
            "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION",
            "python",
            "from google.protobuf.internal import api_implementation as a; print(a.Type() == 'python' and 0)",
        ),
    ],
)
async def test_a_job_whose_start_would_read_other_variables_starts_an_interpreter_of_its_own(
    tmp_path: Path, variable: str, value: str, check: str
) -> None:
    """Its environment sets what the warm interpreter's start did not read (a hash seed, the dynamic
    loader's path, protobuf's implementation, imported before the fork): run in it, the job would not
    get what it asked for. Each check prints 0 when the job got it."""
    changed = {**ENV, variable: value}
    starter = ShimStarter()
    try:
        await warmed(starter, tmp_path)
        lease = lease_dir(tmp_path, "changed", [sys.executable, "-c", check], changed)
        await run(starter, lease, WARM)  # asked of the warm interpreter, whose shim starts it anew
        probe = lease_dir(tmp_path, "changed-look", FORMS["script"], changed)
        await run(starter, probe, WARM)
    finally:
        await starter.close()
    assert (lease / "stdout.log").read_text() in ("0\n", "1\n")
    assert output(probe)[0]["warm"] is False


async def test_a_job_that_brings_a_module_imported_already_or_runs_a_zipapp_starts_an_interpreter_of_its_own(
    tmp_path: Path,
) -> None:
    """Its own ``random.py`` beside its script: the warm interpreter imported the standard one, which the
    job would not have. A zipapp is no source to compile."""
    starter = ShimStarter()
    try:
        await warmed(starter, tmp_path)
        shadowing = lease_dir(tmp_path, "shadowing", FORMS["script"])
        (shadowing / "work" / "random.py").write_text("MINE = True\n")
        (shadowing / "work" / "look.py").write_text(
            "import random\n" + LOOK.replace("seen = {", "seen = {'mine': random.MINE,")
        )
        await run(starter, shadowing, WARM)
        app = tmp_path / "app"
        app.mkdir()
        (app / "__main__.py").write_text("print('from the zipapp')\n")
        zipapp.create_archive(app, tmp_path / "app.pyz")
        zipped = lease_dir(tmp_path, "zipped", [sys.executable, str(tmp_path / "app.pyz")])
        await run(starter, zipped, WARM)
    finally:
        await starter.close()
    seen = output(shadowing)[0]
    assert (seen["mine"], seen["warm"]) == (True, False)
    assert (zipped / "stdout.log").read_text() == "from the zipapp\n"


async def test_a_killed_warm_interpreter_costs_no_start_and_is_started_again(tmp_path: Path) -> None:
    starter = ShimStarter()
    try:
        server = await warmed(starter, tmp_path)
        os.kill(server, signal.SIGKILL)
        # Asked before it is gone, it may have read the question and died unanswered: that start fails
        # RUNNER_INFRA as any whose fork server died so (test_shim_forks.py). Asked once it is gone:
        await eventually(lambda: not alive(server), "the warm interpreter gone")
        after = lease_dir(tmp_path, "after", FORMS["script"])
        assert (await run(starter, after, WARM))["exit_code"] == 3
        assert await warmed(starter, tmp_path / "again") != server
    finally:
        await starter.close()


def test_the_runner_takes_warm_start_true_or_false(tmp_path: Path) -> None:
    context = type("Context", (), {"state_dir": tmp_path})()
    assert create({}, context).warm_start is True
    assert create({"warm_start": False}, context).warm_start is False
    with pytest.raises(ValueError, match="warm_start must be true or false"):
        create({"warm_start": "no"}, context)


async def test_jobs_forked_from_one_warm_interpreter_draw_numbers_of_their_own(tmp_path: Path) -> None:
    """``random`` and the SDK's retry jitter (imported by the warm interpreter) are reseeded in each fork:
    jobs that retry together do not wait alike."""
    draw = (
        "import random\nfrom takeoff_rpc import backoff\nprint(random.random(), backoff.jitter_rng.random())"
    )
    starter = ShimStarter()
    try:
        await warmed(starter, tmp_path)
        leases = [lease_dir(tmp_path, f"draw-{index}", [sys.executable, "-c", draw]) for index in range(2)]
        for lease in leases:
            await run(starter, lease, WARM)
    finally:
        await starter.close()
    first, second = ((lease / "stdout.log").read_text().split() for lease in leases)
    assert first[0] != second[0]
    assert first[1] != second[1]


LEAVES_FILES_OPEN = """\
import json, threading, time
json.held = open("held.txt", "w")  # a helper module's file, never closed
json.held.write("held by a module")
class Holder: ...
holder = Holder()
holder.itself, holder.file = holder, open("cycle.txt", "w")  # a file in a reference cycle
holder.file.write("held in a cycle")
del holder
def heartbeat():  # a daemon thread still using the script's globals as the interpreter exits
    while True:
        time.monotonic()
threading.Thread(target=heartbeat, daemon=True).start()
print("done")
"""


async def test_a_warm_jobs_files_left_open_are_written_at_its_exit_as_they_would_be(tmp_path: Path) -> None:
    """The interpreter's exit releases every module's globals and collects: the files a job never closed
    are flushed as they close, wherever it held them (in a reference cycle, the interpreter may close the
    file under the buffer first: then both lose it), while daemon threads still run on its globals."""
    starter = ShimStarter()
    try:
        await warmed(starter, tmp_path)
        leases = {
            name: lease_dir(tmp_path, name, [sys.executable, "-c", LEAVES_FILES_OPEN])
            for name in ("warm", "cold")
        }
        ends = {
            name: await run(starter, lease, WARM if name == "warm" else None)
            for name, lease in leases.items()
        }
    finally:
        await starter.close()
    assert ends["warm"] == ends["cold"] == {"exit_code": 0, "signal": None, "fenced": False}
    left = {
        name: [
            (lease / "stderr.log").read_text(),
            *((lease / "work" / f).read_text() for f in ("held.txt", "cycle.txt")),
        ]
        for name, lease in leases.items()
    }
    assert (
        left["warm"] == left["cold"]
    )  # a file in a cycle, finalized after its buffer, as the interpreter does
    assert left["warm"][:2] == ["", "held by a module"]


async def test_a_job_with_a_relative_pythonpath_starts_an_interpreter_of_its_own(tmp_path: Path) -> None:
    """``site`` makes a relative PYTHONPATH entry absolute against the working directory of the
    interpreter's start: the warm interpreter's is not the job's."""
    relative = {**ENV, "PYTHONPATH": "src"}
    warm = WarmStart(sys.executable, tuple(sorted(start_variables(relative).items())))
    starter = ShimStarter()
    try:
        leases = []
        for attempt in range(3):  # the first starts the warm interpreter: the others may find it ready
            lease = lease_dir(tmp_path, f"relative-{attempt}", FORMS["script"], relative)
            (lease / "work" / "src").mkdir()
            (lease / "work" / "src" / "mine.py").write_text("")
            (lease / "work" / "look.py").write_text("import mine\n" + LOOK)
            await run(starter, lease, warm)
            leases.append(lease)
    finally:
        await starter.close()
    assert not warm_startable(relative)
    assert [output(lease)[0]["warm"] for lease in leases] == [False, False, False]


@pytest.mark.parametrize("interpreter", ["missing", "exits at once", "prints before it is ready"])
async def test_a_warm_interpreter_that_cannot_serve_costs_no_job_its_start(
    tmp_path: Path, interpreter: str
) -> None:
    """A venv's interpreter gone, one that exits at once, one whose start prints on its answers' pipe: each
    job still starts (through the fork server), once, with its own exit."""
    python = {
        "missing": tmp_path / "gone" / "python",
        "exits at once": Path("/bin/false"),
        "prints before it is ready": tmp_path / "chatty-python",
    }[interpreter]
    if interpreter == "prints before it is ready":
        python.write_text(f'#!/bin/sh\necho "hello from a sitecustomize"\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
    warm = WarmStart(str(python), WARM.start_variables)
    starter = ShimStarter()
    try:
        codes = []
        for attempt in range(3):
            lease = lease_dir(
                tmp_path, f"job-{attempt}", [sys.executable, "-c", f"raise SystemExit({attempt})"]
            )
            codes.append((await run(starter, lease, warm))["exit_code"])
    finally:
        async with asyncio.timeout(WITHIN):
            await starter.close()
    assert codes == [0, 1, 2]


async def test_closing_does_not_wait_for_a_warm_interpreter_still_in_its_imports(tmp_path: Path) -> None:
    """One not ready has started no shim: it is ended at once, not at the end of its stdin, which it would
    read only after its imports (here: never, within the test)."""
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nexec sleep 600\n")  # never gets to its stdin
    slow.chmod(0o755)
    starter = ShimStarter()
    try:
        lease = lease_dir(tmp_path, "job", [sys.executable, "-c", "pass"])
        await run(starter, lease, WarmStart(str(slow), WARM.start_variables))
    finally:
        async with asyncio.timeout(WITHIN):  # a guard: ended by its stdin alone, it would take 600 s
            await starter.close()


async def test_a_warm_job_with_a_safe_path_keeps_its_pythonpath(tmp_path: Path) -> None:
    """PYTHONSAFEPATH: the interpreter puts no script directory first, nor removes one."""
    library = tmp_path / "library"
    library.mkdir()
    (library / "mine.py").write_text("")
    safe = {**ENV, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(library)}
    warm = WarmStart(sys.executable, tuple(sorted(start_variables(safe).items())))
    job = "import mine\n" + LOOK
    starter = ShimStarter()
    try:
        await warmed(starter, tmp_path, warm, safe)
        leases = {
            name: lease_dir(tmp_path, name, [sys.executable, "-c", job], safe) for name in ("warm", "cold")
        }
        for name, lease in leases.items():
            assert (await run(starter, lease, warm if name == "warm" else None))["exit_code"] == 3
    finally:
        await starter.close()
    warm_seen, cold_seen = output(leases["warm"])[0], output(leases["cold"])[0]
    assert (warm_seen["warm"], cold_seen["warm"]) == (True, False)
    assert warm_seen["path"] == cold_seen["path"]
    path = warm_seen["path"]
    assert isinstance(path, list)
    assert path[0] == str(library)
