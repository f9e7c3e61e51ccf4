"""``takeoff.init`` / ``run.log`` / ``run.finish`` in real job processes reporting to a real registry."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from takeoff import Client, RunState
from takeoff.v1 import common_pb2, runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, service_process, wait_for
from tests.sdk.conftest import (
    ReplyLosingProxy,
    free_port,
    job_stderr,
    run_job,
    start_job,
    wait_for_a_connection_attempt,
)
from tests.sdk.conftest import job_environment as any_job_environment


def job_environment(registry_address: str, project: str, **extra: str) -> dict[str, str]:
    """A job's environment without system metrics, whose rows would mix with the rows these tests count."""
    return any_job_environment(registry_address, project, TAKEOFF_SYSTEM_METRICS="0", **extra)


TEN_THOUSAND_ROWS = """
    import takeoff

    run = takeoff.init(config={"lr": 0.01, "epochs": 3}, name="ten-thousand")
    for i in range(10_000):
        run.log({"loss": 1 / (i + 1), "i": i, "phase": "train" if i % 2 else "eval"})
    run.summary["best_loss"] = 1 / 10_000
    run.summary["dropped"] = True
    del run.summary["dropped"]
    run.finish()
    print(run.id)
"""

ONE_ROW = "import takeoff\nrun = takeoff.init()\nrun.log({'x': 1.0})\nrun.finish()\nprint(run.id)\n"


def test_a_job_logs_ten_thousand_rows_that_all_arrive_in_order(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    result = run_job(tmp_path, TEN_THOUSAND_ROWS, job_environment(registry.address, project))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    run = client.get_run(result.stdout.strip())
    assert run.state is RunState.FINISHED
    assert run.display_name == "ten-thousand"
    assert run.config == {"lr": 0.01, "epochs": 3}
    # The code's value, and each metric's last one.
    assert run.summary == {"best_loss": 1 / 10_000, "loss": 1 / 10_000, "i": 9_999, "phase": "train"}
    assert run.history_length == 10_000
    assert run.last_step == 9_999

    rows = list(client.read_metrics(run.id))
    assert [row.index for row in rows] == list(range(10_000))
    assert [row.step for row in rows] == list(range(10_000))
    assert [row.values["i"] for row in rows] == list(range(10_000))
    assert rows[3].values["loss"] == pytest.approx(1 / 4)
    assert rows[3].data == {"phase": "train"}
    assert all(row.time is not None for row in rows)


def test_a_job_reports_through_the_registrys_unix_socket(project: str, takeoff_home: Path) -> None:
    socket = f"unix:{takeoff_home / 'registry.sock'}"  # what the agent mounts into a job's container
    with service_process("registry", takeoff_home, listen=["127.0.0.1:0", socket]) as server:
        result = run_job(takeoff_home, ONE_ROW, job_environment(socket, project))
        assert result.returncode == 0, result.stderr
        with Client(server.address, project=project) as client:
            run = client.get_run(result.stdout.strip())
    assert (run.state, run.history_length) == (RunState.FINISHED, 1)


def test_steps_follow_wandb_rows_build_up_until_committed_and_never_go_back(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    code = """
        import takeoff

        takeoff.init()
        takeoff.log({"a": 1}, step=10)
        takeoff.log({"b": 2}, step=10)  # the same step: the same row
        takeoff.log({"c": 3})  # into that row, which is written; the step moves on to 11
        try:
            takeoff.log({"d": object()})
        except TypeError as error:
            print(error)
        takeoff.log({"e": 5}, step=4)  # before 11: dropped, with a warning
        takeoff.log({"f": 6}, step=3)  # dropped too, and not warned about again
        takeoff.log({"g": 7}, commit=False)
        takeoff.log({"h": 8})
        takeoff.log({"i": 9}, step=20)  # written by finish
        takeoff.finish()
    """
    result = run_job(tmp_path, code, job_environment(registry.address, project))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("run.log value 'd' has type object")
    assert result.stderr.count("run.log(step=4) is before the current step 11") == 1
    assert "step=3" not in result.stderr
    [run] = client.list_runs()
    rows = [(row.step, row.values) for row in client.read_metrics(run.id)]
    # The refused call used no step: "g" and "h" share step 11.
    assert rows == [(10, {"a": 1, "b": 2, "c": 3}), (11, {"g": 7, "h": 8}), (20, {"i": 9})]
    assert run.state is RunState.FINISHED


def test_a_launched_job_attaches_to_its_run_and_the_launch_config_wins(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        created = runs_pb2_grpc.RunServiceStub(channel).CreateRun(
            runs_pb2.CreateRunRequest(parent=f"projects/{project}", run_id="attempt-1"), timeout=10
        )
    assert created.run.state == common_pb2.RUN_STATE_STARTING
    code = """
        import json
        import takeoff

        run = takeoff.init(project="ignored-when-launched", config={"lr": 0.1, "epochs": 3, "batch": 32})
        try:
            run.config["lr"] = 1.0
        except takeoff.ReadOnlyConfigError as error:
            print("refused:", error)
        run.config["batch"] = 64
        print(json.dumps({"id": run.id, "project": run.project, "config": dict(run.config)}))
    """
    env = job_environment(
        registry.address, project, TAKEOFF_RUN_ID="attempt-1", TAKEOFF_CONFIG='{"lr": 0.5, "epochs": 2}'
    )
    result = run_job(tmp_path, code, env)
    assert result.returncode == 0, result.stderr

    refusal, report = result.stdout.strip().splitlines()
    assert refusal.startswith("refused: config key 'lr' was set by the launch")
    # Said once: the project and the config key the launch changed, not the one it left as it was.
    assert result.stderr == (
        "takeoff: the launch overrides what init() was given: project 'ignored-when-launched' (the run is "
        f"in {project!r}); config lr=0.1 (launched with 0.5); config epochs=3 (launched with 2)\n"
    )
    assert json.loads(report) == {
        "id": "attempt-1",
        "project": project,
        "config": {"lr": 0.5, "epochs": 2, "batch": 64},
    }
    run = client.get_run("attempt-1")
    assert run.state is RunState.FINISHED  # finished at exit, without an explicit finish()
    assert run.start_time is not None
    assert run.config == {"lr": 0.5, "epochs": 2, "batch": 64}  # with the job's own change


def test_attaching_to_a_run_that_was_already_attached_fails_clearly(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        stub = runs_pb2_grpc.RunServiceStub(channel)
        stub.CreateRun(runs_pb2.CreateRunRequest(parent=f"projects/{project}", run_id="taken"), timeout=10)
        stub.AttachRun(runs_pb2.AttachRunRequest(name=f"projects/{project}/runs/taken"), timeout=10)
    code = "import takeoff\ntakeoff.init()\n"
    result = run_job(tmp_path, code, job_environment(registry.address, project, TAKEOFF_RUN_ID="taken"))
    assert result.returncode == 1
    assert "takeoff.errors.FailedPreconditionError: RUN_ALREADY_ATTACHED" in result.stderr


def test_an_attach_whose_reply_was_lost_is_sent_again_and_carries_on_with_the_run(
    client: Client, lossy_registry: ReplyLosingProxy, project: str, tmp_path: Path
) -> None:
    with open_channel(client.registry, api_key=ADMIN_KEY) as channel:
        runs_pb2_grpc.RunServiceStub(channel).CreateRun(
            runs_pb2.CreateRunRequest(parent=f"projects/{project}", run_id="lost-reply"), timeout=10
        )
    lossy_registry.lose_next_reply("RunService/AttachRun")

    env = job_environment(lossy_registry.address, project, TAKEOFF_RUN_ID="lost-reply")
    result = run_job(tmp_path, ONE_ROW, env)

    assert result.returncode == 0, result.stderr
    [lost] = lossy_registry.lost["RunService/AttachRun"]
    # Sent again, refused as attached already (by the first try), then taken as this job's own run.
    assert lossy_registry.requests["RunService/AttachRun"] == [lost, lost]
    run = client.get_run("lost-reply")
    assert (run.state, run.history_length) == (RunState.FINISHED, 1)


def test_a_create_run_whose_reply_was_lost_makes_one_run(
    client: Client, lossy_registry: ReplyLosingProxy, project: str, tmp_path: Path
) -> None:
    lossy_registry.lose_next_reply("RunService/CreateRun")

    result = run_job(tmp_path, ONE_ROW, job_environment(lossy_registry.address, project))

    assert result.returncode == 0, result.stderr
    [lost] = lossy_registry.lost["RunService/CreateRun"]
    assert lossy_registry.requests["RunService/CreateRun"] == [lost, lost]  # the same request_id again
    assert [run.id for run in client.list_runs()] == [result.stdout.strip()]


@pytest.mark.parametrize(
    ("raised", "ending"),
    [
        (
            'RuntimeError("loss diverged at step 5")',
            (1, RunState.FAILED, "RuntimeError: loss diverged at step 5"),
        ),
        ("KeyboardInterrupt", (-2, RunState.KILLED, "KeyboardInterrupt")),  # Ctrl-C: a stop on purpose
    ],
)
def test_an_uncaught_exception_ends_the_run_with_its_message(
    client: Client, project: str, tmp_path: Path, raised: str, ending: tuple[int, RunState, str]
) -> None:
    code = f"""
        import takeoff

        run = takeoff.init()
        print(run.id, flush=True)
        for step in range(5):
            run.log({{"loss": 10.0 * step}})
        raise {raised}
    """
    result = run_job(tmp_path, code, job_environment(client.registry, project))
    assert "Traceback" in result.stderr  # the usual report still reaches the user

    run = client.get_run(result.stdout.strip())
    assert (result.returncode, run.state, run.message) == ending
    assert run.history_length == 5


def test_a_with_block_finishes_the_run_failed_on_error(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    code = """
        import takeoff

        try:
            with takeoff.init() as run:
                print(run.id, flush=True)
                raise KeyError("labels")
        except KeyError:
            pass
        assert takeoff.current_run() is None
    """
    result = run_job(tmp_path, code, job_environment(registry.address, project))
    assert result.returncode == 0, result.stderr
    run = client.get_run(result.stdout.strip())
    assert run.state is RunState.FAILED
    assert run.message == "KeyError: 'labels'"


ROWS_JOB = """
    import takeoff

    run = takeoff.init()
    print(run.id, flush=True)
    for i in range({rows}):
        run.log({{"i": i}})
    run.finish()
"""

PHASED_JOB = """
    import pathlib, time
    import takeoff

    run = takeoff.init()
    print(run.id, flush=True)
    for phase in range(3):
        while not pathlib.Path(f"go-{phase}").exists():
            time.sleep(0.01)
        for i in range(100):
            run.log({"i": phase * 100 + i})
    run.finish()
"""
"""Logs 100 rows each time the test creates the file ``go-0``, ``go-1``, ``go-2``."""


def test_the_registry_restarting_mid_run_loses_and_duplicates_nothing(tmp_path: Path, project: str) -> None:
    port, home = free_port(), tmp_path / "home"
    home.mkdir()
    listen = [f"127.0.0.1:{port}"]
    with service_process("registry", home, listen=listen) as first:
        job = start_job(tmp_path, PHASED_JOB, job_environment(first.address, project))
        assert job.stdout is not None
        run_id = job.stdout.readline().strip()
        (tmp_path / "go-0").touch()
        with Client(first.address, project=project) as client:
            wait_for(lambda: client.get_run(run_id).history_length == 100, what="the first rows")
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    (tmp_path / "go-1").touch()  # rows logged while the registry is down
    wait_for_a_connection_attempt(port)  # the job tries to send them

    with service_process("registry", home, listen=listen) as second:
        (tmp_path / "go-2").touch()
        job.communicate(timeout=60)
        assert job.returncode == 0, job_stderr(tmp_path)
        with Client(second.address, project=project) as client:
            run = client.get_run(run_id)
            assert run.state is RunState.FINISHED
            assert [row.values["i"] for row in client.read_metrics(run_id)] == list(range(300))


def test_a_reply_lost_on_the_way_back_does_not_store_rows_twice(
    client: Client, lossy_registry: ReplyLosingProxy, project: str, tmp_path: Path
) -> None:
    lossy_registry.lose_next_reply("RunService/BatchLogMetrics")

    result = run_job(tmp_path, ROWS_JOB.format(rows=3000), job_environment(lossy_registry.address, project))

    assert result.returncode == 0, result.stderr
    [lost] = lossy_registry.lost["RunService/BatchLogMetrics"]
    sent = lossy_registry.requests["RunService/BatchLogMetrics"]
    assert sent[:2] == [lost, lost]  # stored, its reply lost, then sent again as it was
    assert runs_pb2.BatchLogMetricsRequest.FromString(lost).rows
    assert [row.values["i"] for row in client.read_metrics(result.stdout.strip())] == list(range(3000))


def test_a_registry_restored_from_an_older_backup_receives_the_rows_that_follow(
    tmp_path: Path, project: str
) -> None:
    port, home, backup = free_port(), tmp_path / "home", tmp_path / "backup"
    home.mkdir()
    listen = [f"127.0.0.1:{port}"]

    def deliver_phase(phase: int, expected_rows: int) -> None:
        (tmp_path / f"go-{phase}").touch()
        with Client(listen[0], project=project) as client:
            wait_for(lambda: client.get_run(run_id).history_length == expected_rows, what=f"phase {phase}")

    with service_process("registry", home, listen=listen) as server:
        job = start_job(tmp_path, PHASED_JOB, job_environment(server.address, project))
        assert job.stdout is not None
        run_id = job.stdout.readline().strip()
        deliver_phase(0, expected_rows=100)
        server.terminate()
    shutil.copytree(home, backup)
    with service_process("registry", home, listen=listen) as server:
        deliver_phase(1, expected_rows=200)
        server.terminate()
    shutil.rmtree(home)
    shutil.copytree(backup, home)
    with service_process("registry", home, listen=listen) as server:
        (tmp_path / "go-2").touch()
        job.communicate(timeout=60)
        assert job.returncode == 0, job_stderr(tmp_path)
        assert "the registry lost 100 metric rows" in job_stderr(tmp_path)
        with Client(server.address, project=project) as client:
            values = [row.values["i"] for row in client.read_metrics(run_id)]
    assert values == [*range(100), *range(200, 300)]  # rows 100-199 went with the registry's lost data


def test_a_job_started_before_the_registry_waits_for_it(tmp_path: Path, project: str) -> None:
    port, home = free_port(), tmp_path / "home"
    home.mkdir()
    address = f"127.0.0.1:{port}"
    # A launched job's patience: outside a launch init gives up after 5 s.
    env = job_environment(address, project, TAKEOFF_INIT_TIMEOUT="60")
    job = start_job(tmp_path, ROWS_JOB.format(rows=100), env)
    wait_for_a_connection_attempt(port)
    assert job.poll() is None
    with service_process("registry", home, listen=[address]):
        stdout, _ = job.communicate(timeout=60)
        assert job.returncode == 0, job_stderr(tmp_path)
        with Client(address, project=project) as client:
            run = client.get_run(stdout.strip())
            assert (run.state, run.history_length) == (RunState.FINISHED, 100)


def test_a_registry_gone_for_good_costs_the_job_its_metrics_but_not_its_exit_status(
    tmp_path: Path, project: str
) -> None:
    code = """
        import pathlib, time
        import takeoff

        run = takeoff.init()
        print(run.id, flush=True)
        while not pathlib.Path("registry-stopped").exists():
            time.sleep(0.01)
        for i in range(10):
            run.log({"i": i})
        run.finish()
        print("finished", flush=True)
    """
    home = tmp_path / "home"
    home.mkdir()
    with service_process("registry", home) as server:
        env = job_environment(server.address, project, TAKEOFF_FLUSH_TIMEOUT="1")
        job = start_job(tmp_path, code, env)
        assert job.stdout is not None
        job.stdout.readline()
        server.terminate()
    (tmp_path / "registry-stopped").touch()
    stdout, _ = job.communicate(timeout=30)  # TAKEOFF_FLUSH_TIMEOUT's 1 s, not the default minute
    stderr = job_stderr(tmp_path)
    assert job.returncode == 0, stderr
    assert stdout.strip() == "finished"
    assert "gave up on the registry" in stderr
    assert "10 metric rows" in stderr
    assert "could not be delivered" in stderr


def test_a_backlog_of_large_rows_goes_out_in_batches_the_registry_accepts(
    client: Client, project: str, tmp_path: Path
) -> None:
    code = """
        import takeoff

        run = takeoff.init()
        print(run.id, flush=True)
        histogram = [i / 3 for i in range(2_000)]  # about 20 KB a row: 300 rows pass gRPC's 4 MiB limit
        for step in range(300):
            run.log({"histogram": histogram, "step": step})
        run.finish()
    """
    result = run_job(tmp_path, code, job_environment(client.registry, project))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = list(client.read_metrics(result.stdout.strip()))
    assert [row.values["step"] for row in rows] == list(range(300))
    assert rows[-1].data["histogram"][-1] == pytest.approx(1_999 / 3)


def test_summary_values_and_rows_the_registry_cannot_store_do_not_stop_delivery(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    code = """
        import math
        import takeoff

        run = takeoff.init()
        print(run.id, flush=True)
        run.log({"nan": math.nan, "big": 10**400})  # cannot be a double: dropped with a warning
        run.log({"ok": 1.5, "tags": ("a", "b"), "none": None})
        run.summary.update({"best": {"loss": 0.5, "epoch": 3}})
        run.finish()
    """
    result = run_job(tmp_path, code, job_environment(registry.address, project))
    assert result.returncode == 0, result.stderr
    assert "dropped a metric row" in result.stderr
    run = client.get_run(result.stdout.strip())
    [row] = client.read_metrics(run.id)
    assert row.values == {"ok": 1.5}
    assert row.data == {"tags": ["a", "b"], "none": None}
    assert row.step == 1
    assert run.summary["best"] == {"loss": 0.5, "epoch": 3}
