"""Offline mode and ``takeoff sync``: a run written to a directory with no registry, uploaded exactly once."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from typer.testing import CliRunner, Result

from takeoff import Client, RunState
from takeoff._offline import HEADER_FILE, ROWS_FILE, open_offline_run, read_offline_run
from takeoff._sync import SYNCED_FILE, _Uploader
from takeoff.cli import app
from takeoff.models import dict_to_struct
from takeoff.v1 import common_pb2, runs_pb2
from tests.processes import ServiceProcess
from tests.sdk.conftest import ReplyLosingProxy, free_port, job_environment, run_job, start_job
from tests.sdk.test_cli import takeoff

ROWS = 25


def sync(address: str, *args: str) -> Result:
    """``takeoff sync ARGS`` in this process (faster than a subprocess, which one test runs)."""
    return CliRunner().invoke(app, ["sync", *args], env={"TAKEOFF_REGISTRY_ADDRESS": address})


def write_offline_run(directory: Path, project: str) -> Path:
    """An offline run of ROWS rows, a summary and a config change, finished; returns its directory."""
    fields = runs_pb2.Run(
        display_name="offline-train",
        tags=["offline", "mnist"],
        notes="written without a registry",
        group="sweep-1",
        job_type="train",
        config=dict_to_struct({"lr": 0.1, "epochs": 3}),
    )
    run, delivery = open_offline_run(directory, project, fields)
    for step in range(ROWS):
        delivery.rows.append((step, 1_700_000_000_000_000_000 + step, {"loss": 1 / (step + 1), "phase": "a"}))
    delivery.update_summary({"best_loss": 1 / ROWS})
    delivery.update_config({"batch_size": 32, "epochs": None})
    finish = runs_pb2.FinishRunRequest(name=run.name, state=common_pb2.RUN_STATE_FINISHED, exit_code=0)
    delivery.close(finish, timeout=30)
    (run_directory,) = (directory / "takeoff").iterdir()
    assert run_directory.name.endswith(run.name.rsplit("/", 1)[-1])
    return run_directory


def test_an_offline_run_syncs_once_with_its_rows_summary_config_and_fields(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    run_directory = write_offline_run(tmp_path, project)

    synced = sync(registry.address, str(tmp_path / "takeoff"))
    assert synced.exit_code == 0, synced.stderr
    run_id = read_offline_run(run_directory).run_id
    assert f"as projects/{project}/runs/{run_id}: {ROWS} rows, FINISHED" in synced.stdout

    run = client.get_run(run_id)
    assert (run.state, run.exit_code, run.history_length) == (RunState.FINISHED, 0, ROWS)
    assert run.config == {"lr": 0.1, "batch_size": 32}
    assert run.summary == {"best_loss": 1 / ROWS, "loss": 1 / ROWS, "phase": "a"}
    assert (run.display_name, run.tags, run.notes) == (
        "offline-train",
        ["offline", "mnist"],
        "written without a registry",
    )
    assert (run.group, run.job_type) == ("sweep-1", "train")
    rows = list(client.read_metrics(run_id))
    assert [row.step for row in rows] == list(range(ROWS))
    assert [row.values["loss"] for row in rows] == [1 / (step + 1) for step in range(ROWS)]
    assert rows[0].data == {"phase": "a"}
    assert rows[0].time is not None
    assert rows[0].time.timestamp() == 1_700_000_000

    # The second sync makes no call: it succeeds with no registry to call.
    again = sync(f"127.0.0.1:{free_port()}", str(run_directory), "--json")
    assert again.exit_code == 0, again.stderr
    (reported,) = json.loads(again.stdout)
    assert reported["already_synced"] is True
    assert (reported["run"], reported["rows"]) == (f"projects/{project}/runs/{run_id}", ROWS)
    assert "already synced as" in sync(registry.address, str(run_directory)).stdout
    assert client.get_run(run_id).history_length == ROWS


def test_a_sync_run_again_without_its_marker_or_after_stopping_half_way_stores_nothing_twice(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    run_directory = write_offline_run(tmp_path, project)
    offline = read_offline_run(run_directory)
    # A sync that stopped half way: the run created and attached, ten rows sent, not finished.
    uploader = _Uploader(client, f"projects/{project}/runs/{offline.run_id}")
    uploader.create(offline)
    uploader.attach(offline)
    uploader.send_rows(row for row in offline.rows() if row[0] < 10)
    assert client.get_run(offline.run_id).state is RunState.RUNNING

    resumed = sync(registry.address, str(run_directory))
    assert resumed.exit_code == 0, resumed.stderr
    assert f"{ROWS} rows, FINISHED" in resumed.stdout

    (run_directory / SYNCED_FILE).unlink()
    repeated = sync(registry.address, str(run_directory))
    assert repeated.exit_code == 0, repeated.stderr
    assert f"{ROWS} rows, FINISHED" in repeated.stdout
    run = client.get_run(offline.run_id)
    assert (run.history_length, run.state) == (ROWS, RunState.FINISHED)
    assert [row.step for row in client.read_metrics(offline.run_id)] == list(range(ROWS))


def test_a_sync_whose_replies_are_lost_stores_each_row_once(
    lossy_registry: ReplyLosingProxy, client: Client, project: str, tmp_path: Path
) -> None:
    run_directory = write_offline_run(tmp_path, project)
    for method in ("CreateRun", "AttachRun", "BatchLogMetrics", "UpdateSummary", "FinishRun"):
        lossy_registry.lose_next_reply(f"RunService/{method}")

    synced = sync(lossy_registry.address, str(run_directory))
    assert synced.exit_code == 0, synced.stderr

    assert len(lossy_registry.requests["RunService/BatchLogMetrics"]) == 2  # one lost reply, one resend
    run = client.get_run(read_offline_run(run_directory).run_id)
    assert (run.history_length, run.state, run.summary["best_loss"]) == (ROWS, RunState.FINISHED, 1 / ROWS)


OFFLINE_JOB = """
    import threading
    from pathlib import Path

    import takeoff

    run = takeoff.init(
        config={"lr": 0.1, "epochs": 3}, name="offline-job", tags=["offline"], group="g", job_type="train"
    )
    print(run.id, flush=True)
    for step in range(30):
        takeoff.log({"loss": 1 / (step + 1), "phase": "train"})
    takeoff.config.update({"batch_size": 8})
    takeoff.summary["best_loss"] = 1 / 30
    ENDING
"""


def offline_job_environment(project: str) -> dict[str, str]:
    """An offline job whose registry address is a closed port: any call it made would fail. No system
    metrics, so that the rows are the job's alone."""
    address = f"127.0.0.1:{free_port()}"
    return job_environment(address, project, TAKEOFF_MODE="offline", TAKEOFF_SYSTEM_METRICS="0")


def test_an_offline_job_is_synced_by_the_cli_into_the_registry_once(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    job = run_job(
        tmp_path, OFFLINE_JOB.replace("ENDING", "takeoff.finish()"), offline_job_environment(project)
    )
    assert job.returncode == 0, job.stderr
    run_id = job.stdout.strip()
    (run_directory,) = (tmp_path / "takeoff").glob(f"offline-run-*-{run_id}")
    assert f"takeoff sync {run_directory}" in job.stderr

    synced = takeoff(registry.address, project, "sync", str(tmp_path))
    assert synced.returncode == 0, synced.stderr
    assert f"as projects/{project}/runs/{run_id}: 30 rows, FINISHED" in synced.stdout
    run = client.get_run(run_id)
    assert (run.state, run.history_length, run.display_name) == (RunState.FINISHED, 30, "offline-job")
    assert (run.tags, run.group, run.job_type) == (["offline"], "g", "train")
    assert run.config == {"lr": 0.1, "epochs": 3, "batch_size": 8}
    assert run.summary == {"best_loss": 1 / 30, "loss": 1 / 30, "phase": "train"}
    rows = list(client.read_metrics(run_id))
    assert [(row.step, row.values["loss"], row.data) for row in rows] == [
        (step, 1 / (step + 1), {"phase": "train"}) for step in range(30)
    ]

    again = sync(registry.address, str(tmp_path))
    assert again.exit_code == 0, again.stderr
    assert f"already synced as projects/{project}/runs/{run_id}" in again.stdout
    assert client.get_run(run_id).update_time == run.update_time


def test_a_killed_offline_job_syncs_as_crashed_with_the_rows_it_wrote(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    wait_for_rows = """
    rows = next(Path.cwd().glob("takeoff/offline-run-*")) / "rows.jsonl"
    while rows.read_text().count("\\n") < 30:  # written by the offline writer's thread
        threading.Event().wait(0.01)
    print("written", flush=True)
    threading.Event().wait()  # until killed"""
    code = OFFLINE_JOB.replace("ENDING", wait_for_rows.strip())
    job = start_job(tmp_path, code, offline_job_environment(project))
    assert job.stdout is not None
    run_id = job.stdout.readline().strip()
    assert job.stdout.readline() == "written\n"
    (run_directory,) = (tmp_path / "takeoff").glob(f"offline-run-*-{run_id}")
    busy = sync(registry.address, str(run_directory))
    assert busy.exit_code == 1
    assert "is still being written by a running job" in busy.stderr
    job.send_signal(signal.SIGKILL)
    job.wait()
    with (run_directory / ROWS_FILE).open("a") as rows:
        rows.write('{"step": 30, "time_ns": 0, "val')  # a line a kill cut short

    synced = sync(registry.address, str(run_directory))
    assert synced.exit_code == 0, synced.stderr
    assert "30 rows, CRASHED (the job ended without finishing the run)" in synced.stdout
    run = client.get_run(run_id)
    assert (run.state, run.history_length, run.last_step) == (RunState.CRASHED, 30, 29)
    assert run.message == "the job ended without finishing the run"


def test_sync_refuses_a_directory_without_an_offline_run_and_a_run_it_cannot_read(
    registry: ServiceProcess, project: str, tmp_path: Path
) -> None:
    refused = sync(registry.address, str(tmp_path))
    assert refused.exit_code == 2
    assert f"{tmp_path} is not an offline run" in refused.stderr

    run_directory = write_offline_run(tmp_path, project)
    header = json.loads((run_directory / HEADER_FILE).read_text())
    del header["id"]
    (run_directory / HEADER_FILE).write_text(json.dumps(header))
    unreadable = sync(registry.address, str(run_directory))
    assert unreadable.exit_code == 1
    assert f"cannot sync {run_directory}: {run_directory / HEADER_FILE} has no 'id'" in unreadable.stderr
    assert isinstance(unreadable.exception, SystemExit)  # a one-line error, not an exception
