"""How the shim starts a local job, started itself as the agent starts it (a fork of the shims' fork server,
``python -I -S shim.py``): the job gets what ``subprocess`` would give it, a job that cannot start is
recorded, and the shim imports only the standard library's leanest parts (docs/design.md §7, "The shim and
the lease directory")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from takeoff_agent.runners.shims import SERVER_COMMAND
from takeoff_agent.shim import write_atomically

JOB = """\
import json, os, sys
print(json.dumps({
    "session_leader": os.getsid(0) == os.getpid(),
    "cwd": os.getcwd(),
    "stdin": sys.stdin.read(),
    "env": os.environ.get("ONLY"),
    "argv": sys.argv[1:],
}))
print("to stderr", file=sys.stderr)
"""


def run_shim(
    lease_dir: Path, argv: list[str], env: dict[str, str], preexec_fn: Callable[[], object] | None = None
) -> dict[str, object]:
    work = lease_dir / "work"
    work.mkdir()
    write_atomically(
        lease_dir / "spec.json", {"argv": argv, "env": env, "cwd": str(work), "stop_grace_seconds": 5}
    )
    run_shims([lease_dir], preexec_fn=preexec_fn)
    exit_record: dict[str, object] = json.loads((lease_dir / "exit.json").read_text())
    return exit_record


def run_shims(
    lease_dirs: list[Path],
    command: tuple[str, ...] = SERVER_COMMAND,
    preexec_fn: Callable[[], object] | None = None,
) -> str:
    """Have a fork server started by ``command`` start a shim for each lease directory, and wait until each
    has ended, as the agent does; the server's stderr."""
    with subprocess.Popen(  # the test's only thread starts it: preexec_fn is safe here
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=preexec_fn,  # noqa: PLW1509
    ) as server:
        assert server.stdin is not None
        assert server.stdout is not None
        server.stdin.write(b"".join(bytes(lease_dir) + b"\0" for lease_dir in lease_dirs))
        server.stdin.flush()
        answers = [server.stdout.readline().split() for _ in range(2 * len(lease_dirs))]
        server.stdin.close()
        assert server.wait(60) == 0
        assert server.stderr is not None
        errors = server.stderr.read().decode()
    started = [pid for word, pid in answers if word == b"started"]
    assert sorted(pid for word, pid in answers if word == b"ended") == sorted(started), answers
    assert len(set(started)) == len(lease_dirs)
    return errors


def test_the_job_starts_as_subprocess_would_start_it(tmp_path: Path) -> None:
    """In its own session, in the spec's directory with the spec's environment (nothing else), stdin
    empty."""
    ended = run_shim(tmp_path, [sys.executable, "-c", JOB, "an argument"], {"ONLY": "this"})

    assert ended == {"exit_code": 0, "signal": None, "fenced": False}
    assert json.loads((tmp_path / "stdout.log").read_text()) == {
        "session_leader": True,
        "cwd": str(tmp_path / "work"),
        "stdin": "",
        "env": "this",
        "argv": ["an argument"],
    }
    assert (tmp_path / "stderr.log").read_text() == "to stderr\n"
    assert set(json.loads((tmp_path / "shim.json").read_text())) == {"shim_pid", "job_pid"}


def _signal_masks(status_text: str) -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in status_text.splitlines())
    return int(status["SigBlk"], 16), int(status["SigIgn"], 16)


def test_the_job_gets_no_signal_blocked_or_ignored_beyond_what_the_agent_had(tmp_path: Path) -> None:
    """Not the shim's blocked SIGCHLD, nor SIGPIPE and SIGXFSZ, which the shim's Python ignores (a job that
    is not Python, here cat reading its own status, would keep what it inherits). What the agent itself was
    started with ignored (SIGINT and SIGQUIT in a background shell job) is passed on, as subprocess does."""
    run_shim(tmp_path, ["cat", "/proc/self/status"], {"PATH": os.environ["PATH"]})
    direct = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True, check=True)

    blocked, ignored = _signal_masks((tmp_path / "stdout.log").read_text())
    assert blocked == 0
    assert ignored == _signal_masks(direct.stdout)[1]


def test_a_command_that_does_not_exist_is_recorded_as_exit_127(tmp_path: Path) -> None:
    ended = run_shim(tmp_path, ["takeoff-no-such-command"], {"PATH": str(tmp_path)})

    assert ended == {"exit_code": 127, "signal": None, "fenced": False}
    assert (tmp_path / "stderr.log").read_text() == (
        "takeoff: cannot start 'takeoff-no-such-command': No such file or directory\n"
    )
    assert not (tmp_path / "shim.json").exists()


def test_a_job_killed_by_a_signal_is_recorded_with_it(tmp_path: Path) -> None:
    ended = run_shim(
        tmp_path, [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], {}
    )

    assert ended == {"exit_code": 137, "signal": 9, "fenced": False}


def test_a_shim_started_with_sigchld_ignored_records_the_jobs_exit_all_the_same(tmp_path: Path) -> None:
    """As a batch system's step may start it: with SIGCHLD ignored the kernel reaps the job itself and
    leaves no exit status to wait for. The job gets SIGCHLD as the shim got it, as subprocess passes it on."""
    job = "import signal, sys; print(signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN); sys.exit(3)"

    def ignore_sigchld() -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)

    ended = run_shim(tmp_path, [sys.executable, "-c", job], {}, preexec_fn=ignore_sigchld)

    assert ended == {"exit_code": 3, "signal": None, "fenced": False}
    assert (tmp_path / "stdout.log").read_text() == "True\n"


def test_the_shim_imports_no_site_packages_and_nothing_heavy(tmp_path: Path) -> None:
    """Every local job pays for its shim's start: ``-X importtime`` names each module it loads."""
    work = tmp_path / "work"
    work.mkdir()
    write_atomically(tmp_path / "spec.json", {"argv": ["/bin/true"], "env": {}, "cwd": str(work)})
    errors = run_shims([tmp_path], (SERVER_COMMAND[0], "-X", "importtime", *SERVER_COMMAND[1:]))
    imported = {
        line.split("|")[-1].strip() for line in errors.splitlines() if line.startswith("import time:")
    }

    assert json.loads((tmp_path / "exit.json").read_text())["exit_code"] == 0
    heavy = {
        "site",
        "json",
        "re",
        "enum",
        "signal",
        "subprocess",
        "threading",
        "pathlib",
        "typing",
        "takeoff",
    }
    assert imported & heavy == set()
    assert "_json" in imported  # the probe sees the shim's imports at all
