"""The shim of a local process on its own: its self-fence and the end of its job (docs/design.md §7)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from takeoff_agent.runners.local_process import LocalProcessJob
from takeoff_agent.shim import (
    FENCE_CHECK_SECONDS,
    LAPSE_MARGIN_SECONDS,
    stop_groups,
    until_fence_check,
    write_atomically,
)
from tests.processes import pid_alive, wait_for

SLEEPER = "import time; print('ready', flush=True); time.sleep(600)"
"""Ends on SIGTERM (Python's default action), long before any grace runs out."""


def test_the_self_fence_records_the_exit_as_soon_as_the_job_is_gone(tmp_path: Path) -> None:
    """A job that ends on SIGTERM is recorded at once: the shim does not wait out the stop grace (600 s,
    far past this test's wait) on a group kept alive only by its own unreaped child."""
    write_atomically(
        tmp_path / "spec.json",
        {"argv": [sys.executable, "-c", SLEEPER], "env": {}, "cwd": str(tmp_path), "stop_grace_seconds": 600},
    )
    write_atomically(tmp_path / "lease_until", time.time() + 3600)
    shim = subprocess.Popen([sys.executable, "-m", "takeoff_agent.shim", str(tmp_path)])
    try:
        stdout = tmp_path / "stdout.log"
        wait_for(lambda: stdout.exists() and b"ready" in stdout.read_bytes(), what="the job to start")
        write_atomically(tmp_path / "lease_until", time.time() - 1)  # the agent stopped renewing

        exit_file = tmp_path / "exit.json"
        wait_for(exit_file.exists, timeout=60, what="the shim to record the fenced job's exit")
        assert json.loads(exit_file.read_text()) == {"exit_code": 143, "signal": 15, "fenced": True}
        assert shim.wait(timeout=60) == 0
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()


LEAVES_A_CHILD = """\
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
"""
"""Exits at once, leaving a child in its process group."""


def test_processes_the_job_left_behind_are_stopped_before_its_exit_is_recorded(tmp_path: Path) -> None:
    write_atomically(
        tmp_path / "spec.json",
        {
            "argv": [sys.executable, "-c", LEAVES_A_CHILD],
            "env": {},
            "cwd": str(tmp_path),
            "stop_grace_seconds": 5,
        },
    )
    shim = subprocess.run([sys.executable, "-m", "takeoff_agent.shim", str(tmp_path)], timeout=60, check=True)

    assert shim.returncode == 0
    assert json.loads((tmp_path / "exit.json").read_text()) == {
        "exit_code": 0,
        "signal": None,
        "fenced": False,
    }
    child = int((tmp_path / "stdout.log").read_text().split()[1])
    assert not pid_alive(child)


RANK_JOB = """\
import os, sys, time
rank = os.environ["RANK"]
print("rank", rank, os.environ["SHARED"], flush=True)
if rank == os.environ.get("FAILING_RANK"):
    sys.exit(3)
if os.environ.get("HOLD"):
    time.sleep(600)
"""
"""Prints its rank and a variable all ranks share; ``FAILING_RANK`` exits 3, the others end at once unless
``HOLD`` keeps them (until SIGTERM)."""


def write_ranks_spec(lease_dir: Path, **env: str) -> None:
    """A spec of two ranks running RANK_JOB, each told its RANK over the shared environment ``env``."""
    write_atomically(
        lease_dir / "spec.json",
        {
            "argv": [sys.executable, "-c", RANK_JOB],
            "env": {"SHARED": "both", **env},
            "cwd": str(lease_dir),
            "stop_grace_seconds": 600,
            "ranks": [{"RANK": "0"}, {"RANK": "1"}],
        },
    )


def test_each_rank_gets_its_variables_and_its_own_output_files(tmp_path: Path) -> None:
    write_ranks_spec(tmp_path)
    subprocess.run([sys.executable, "-m", "takeoff_agent.shim", str(tmp_path)], timeout=60, check=True)

    assert (tmp_path / "stdout.rank0.log").read_text() == "rank 0 both\n"
    assert (tmp_path / "stdout.rank1.log").read_text() == "rank 1 both\n"
    assert not (tmp_path / "stdout.log").exists()
    assert json.loads((tmp_path / "exit.json").read_text()) == {
        "exit_code": 0,
        "signal": None,
        "fenced": False,
    }
    assert len(json.loads((tmp_path / "shim.json").read_text())["rank_pids"]) == 2


def test_a_failing_rank_stops_the_others_and_its_exit_is_recorded(tmp_path: Path) -> None:
    """Rank 0 would sleep for 10 minutes: only the shim stopping it (it ends on SIGTERM) ends it in time."""
    write_ranks_spec(tmp_path, FAILING_RANK="1", HOLD="1")
    subprocess.run([sys.executable, "-m", "takeoff_agent.shim", str(tmp_path)], timeout=60, check=True)

    assert json.loads((tmp_path / "exit.json").read_text()) == {
        "exit_code": 3,
        "signal": None,
        "fenced": False,
        "rank": 1,
    }
    rank_pids = json.loads((tmp_path / "shim.json").read_text())["rank_pids"]
    assert not any(pid_alive(pid) for pid in rank_pids)


def test_the_self_fence_stops_every_rank(tmp_path: Path) -> None:
    write_ranks_spec(tmp_path, HOLD="1")
    write_atomically(tmp_path / "lease_until", time.time() + 3600)
    shim = subprocess.Popen([sys.executable, "-m", "takeoff_agent.shim", str(tmp_path)])
    try:
        outputs = [tmp_path / "stdout.rank0.log", tmp_path / "stdout.rank1.log"]
        wait_for(
            lambda: all(out.exists() and out.read_bytes() for out in outputs), what="both ranks to start"
        )
        write_atomically(tmp_path / "lease_until", time.time() - 1)

        assert shim.wait(timeout=60) == 0
        assert json.loads((tmp_path / "exit.json").read_text()) == {
            "exit_code": 143,
            "signal": 15,
            "fenced": True,
        }
        rank_pids = json.loads((tmp_path / "shim.json").read_text())["rank_pids"]
        assert not any(pid_alive(pid) for pid in rank_pids)
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()


FAILS_AFTER_ITS_PEER = """\
import os, socket, sys, time
address = os.path.join(os.getcwd(), "rank0.sock")
if os.environ["RANK"] == "1":
    connection = socket.socket(socket.AF_UNIX)
    while connection.connect_ex(address):  # until rank 0 listens
        time.sleep(0.005)
    sys.exit(3)
with socket.socket(socket.AF_UNIX) as server:
    server.bind(address)
    server.listen()
    peer, _ = server.accept()
    peer.recv(1)  # the connection closes as rank 1 exits
time.sleep(0.2)  # a collective noticing its lost peer: rank 0 fails because rank 1 has gone
sys.exit(5)
"""
"""Rank 1 connects to rank 0 and exits 3; rank 0 exits 5 a moment after the connection closes. Rank 0
ends second, though first in rank order."""


def test_the_rank_that_failed_first_is_named_not_the_peer_that_failed_for_it(tmp_path: Path) -> None:
    write_atomically(
        tmp_path / "spec.json",
        {
            "argv": [sys.executable, "-c", FAILS_AFTER_ITS_PEER],
            "env": {},
            "cwd": str(tmp_path),
            "stop_grace_seconds": 600,
            "ranks": [{"RANK": "0"}, {"RANK": "1"}],
        },
    )
    subprocess.run([sys.executable, "-m", "takeoff_agent.shim", str(tmp_path)], timeout=60, check=True)

    assert json.loads((tmp_path / "exit.json").read_text()) == {
        "exit_code": 3,
        "signal": None,
        "fenced": False,
        "rank": 1,
    }


SHUTS_DOWN_SLOWLY = """\
import os, signal, time
terms = 0
def count_term(signum, frame):
    global terms
    terms += 1
    print("SIGTERM", terms, flush=True)
if os.environ["RANK"] == "0":
    signal.signal(signal.SIGTERM, count_term)
print("ready", flush=True)
while not terms:
    time.sleep(0.01)
time.sleep(1)  # a checkpoint written on SIGTERM, while rank 1 has died of it at once
"""
"""Rank 0 shuts down for a second after its first SIGTERM, counting every SIGTERM; rank 1 dies of it."""


def test_a_stopped_job_gets_one_sigterm_though_a_rank_ends_before_the_others(tmp_path: Path) -> None:
    write_atomically(
        tmp_path / "spec.json",
        {
            "argv": [sys.executable, "-c", SHUTS_DOWN_SLOWLY],
            "env": {},
            "cwd": str(tmp_path),
            "stop_grace_seconds": 600,
            "ranks": [{"RANK": "0"}, {"RANK": "1"}],
        },
    )
    shim = subprocess.Popen([sys.executable, "-m", "takeoff_agent.shim", str(tmp_path)])
    try:
        outputs = [tmp_path / "stdout.rank0.log", tmp_path / "stdout.rank1.log"]
        wait_for(
            lambda: all(out.exists() and out.read_bytes() for out in outputs), what="both ranks to start"
        )
        asyncio.run(LocalProcessJob(tmp_path, sdk_site=tmp_path).stop(600))  # as the agent stops it

        assert shim.wait(timeout=60) == 0
        assert (tmp_path / "stdout.rank0.log").read_text() == "ready\nSIGTERM 1\n"
        assert json.loads((tmp_path / "exit.json").read_text())["rank"] == 1
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()


def test_the_fence_is_looked_at_as_the_lease_ends_not_up_to_a_check_later(tmp_path: Path) -> None:
    assert until_fence_check(tmp_path) == FENCE_CHECK_SECONDS  # no deadline written yet
    (tmp_path / "lease_until").write_text(str(time.time() + 3600))
    assert until_fence_check(tmp_path) == FENCE_CHECK_SECONDS
    ends_in = FENCE_CHECK_SECONDS / 2
    before = time.time()
    (tmp_path / "lease_until").write_text(str(before + ends_in))
    assert LAPSE_MARGIN_SECONDS <= until_fence_check(tmp_path) <= ends_in + LAPSE_MARGIN_SECONDS
    (tmp_path / "lease_until").write_text(str(before - 1))
    assert until_fence_check(tmp_path) == LAPSE_MARGIN_SECONDS  # lapsed: looked at again at once


def test_a_stop_with_no_grace_sends_no_sigterm_for_a_handler_to_act_on(tmp_path: Path) -> None:
    marker = tmp_path / "sigterm"
    handles_sigterm = (
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: pathlib.Path({str(marker)!r}).touch())\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    job = subprocess.Popen(
        [sys.executable, "-c", handles_sigterm], stdout=subprocess.PIPE, start_new_session=True
    )
    assert job.stdout is not None
    assert job.stdout.readline() == b"ready\n"

    stop_groups([job.pid], 0)  # as the agent stops the job of a shim that died

    assert job.wait(timeout=60) == -signal.SIGKILL
    assert not marker.exists()
