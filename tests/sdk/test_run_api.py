"""The run API a wandb user expects (issue 13), each in a real job process reporting to a real registry:
module-level names, describing a run, recorded config changes, metric summaries, ``finish(exit_code=)``,
SIGTERM, an unreachable registry outside a launch, and ``mode="disabled"``."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from takeoff import Client, RunState
from takeoff.models import dict_to_struct
from takeoff.v1 import runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, wait_for
from tests.sdk.conftest import free_port, job_stderr, run_job, start_job
from tests.sdk.conftest import job_environment as any_job_environment


def job_environment(registry_address: str, project: str, **extra: str) -> dict[str, str]:
    """A job's environment without system metrics, whose rows would mix with the rows these tests read."""
    return any_job_environment(registry_address, project, TAKEOFF_SYSTEM_METRICS="0", **extra)


def test_a_job_written_as_for_wandb_records_its_description_config_changes_summaries_and_exit_code(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    code = """
        import signal
        import takeoff

        def own_handler(signum, frame):
            pass

        signal.signal(signal.SIGTERM, own_handler)
        assert takeoff.run is None
        try:
            takeoff.config["lr"]
        except RuntimeError as error:
            print(error)
        run = takeoff.init(
            config={"lr": 0.1}, tags=["baseline", "small"], notes="first", group="g", job_type="train"
        )
        assert (takeoff.run, takeoff.config, takeoff.summary) == (run, run.config, run.summary)
        assert signal.getsignal(signal.SIGTERM) is own_handler  # the code's own handler stays in charge
        takeoff.define_metric("loss", summary="min")
        takeoff.define_metric("val/*", "epoch", summary="max")
        takeoff.config.update({"layers": 3, "dropout": 0.5})
        takeoff.config.lr = 0.2
        del takeoff.config["dropout"]
        for epoch, loss in enumerate([3.0, 1.0, 2.0]):
            takeoff.log({"loss": loss, "epoch": epoch})
        takeoff.log({"val/acc": 0.5})
        takeoff.summary["note"] = "set by the code"
        print(run.id, flush=True)
        takeoff.finish(exit_code=3)
        assert takeoff.run is None
    """
    result = run_job(tmp_path, code, job_environment(registry.address, project))
    assert result.returncode == 0, result.stderr
    refusal, run_id = result.stdout.strip().splitlines()
    assert refusal == "call takeoff.init() before using takeoff.config"

    run = client.get_run(run_id)
    assert (run.state, run.exit_code) == (RunState.FAILED, 3)  # a nonzero exit code without a state
    assert (run.tags, run.notes, run.group, run.job_type) == (["baseline", "small"], "first", "g", "train")
    assert run.config == {"lr": 0.2, "layers": 3}
    assert run.summary == {
        "loss": {"min": 1.0},
        "epoch": 2,
        "val/acc": {"max": 0.5},
        "note": "set by the code",  # the code's own key, beside the metrics' summaries
    }
    last_row = list(client.read_metrics(run_id))[-1]
    assert (last_row.step, last_row.values) == (3, {"val/acc": 0.5, "epoch": 2})  # synced to its step metric


def test_a_launch_set_key_is_refused_in_the_job_and_a_refusal_by_the_registry_is_only_warned_about(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        runs_pb2_grpc.RunServiceStub(channel).CreateRun(
            runs_pb2.CreateRunRequest(
                parent=f"projects/{project}",
                run_id="launched",
                run=runs_pb2.Run(config=dict_to_struct({"lr": 0.5, "seed": 1})),  # the launch's: read-only
            ),
            timeout=10,
        )
    code = """
        import takeoff

        run = takeoff.init()
        try:
            run.config["lr"] = 1.0
        except takeoff.ReadOnlyConfigError as error:
            print(error)
        # The job's environment says nothing of seed, but the registry knows the launch set it.
        run.config.update({"seed": 2, "batch": 64})
        run.config["seed"] = 3
        run.finish()
        print("finished")
    """
    env = job_environment(registry.address, project, TAKEOFF_RUN_ID="launched", TAKEOFF_CONFIG='{"lr": 0.5}')
    result = run_job(tmp_path, code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "config key 'lr' was set by the launch (TAKEOFF_CONFIG) and is read-only in this run; its value is "
        "0.5. Launch with another value to change it.",
        "finished",
    ]
    assert result.stderr.count("CONFIG_KEY_READ_ONLY") == 1
    # The config the job attached with; each change was refused whole, batch with seed.
    assert client.get_run("launched").config == {"lr": 0.5}


def test_sigterm_finishes_the_run_killed_with_every_row_delivered_then_ends_the_job_as_sigterm_does(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    code = """
        import time
        import takeoff

        run = takeoff.init()
        for i in range(5_000):
            run.log({"i": i})
        run.log({"pending": 1}, commit=False)  # a row still being built
        print(run.id, flush=True)
        time.sleep(60)  # the test's SIGTERM comes first
    """
    job = start_job(tmp_path, code, job_environment(registry.address, project))
    assert job.stdout is not None
    run_id = job.stdout.readline().strip()
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=30)

    assert job.returncode == -signal.SIGTERM, job_stderr(tmp_path)
    run = client.get_run(run_id)
    assert (run.state, run.message) == (RunState.KILLED, "terminated by SIGTERM")
    rows = list(client.read_metrics(run_id))
    assert [row.values for row in rows] == [*({"i": i} for i in range(5_000)), {"pending": 1}]


def test_system_metrics_rows_take_the_last_logged_step_and_leave_the_runs_steps_alone(
    registry: ServiceProcess, client: Client, project: str, tmp_path: Path
) -> None:
    code = """
        import pathlib, time
        import takeoff

        run = takeoff.init()
        for step in range(3):
            run.log({"loss": 1 / (step + 1)})
        print(run.id, flush=True)
        while not pathlib.Path("release").exists():  # until the test has seen system metrics arrive
            time.sleep(0.01)
        run.log({"loss": 0.1})
    """
    env = any_job_environment(
        registry.address, project, TAKEOFF_SYSTEM_METRICS="1", TAKEOFF_SYSTEM_METRICS_INTERVAL="0.2"
    )
    job = start_job(tmp_path, code, env)
    assert job.stdout is not None
    run_id = job.stdout.readline().strip()
    wait_for(lambda: "system/cpu_percent" in client.get_run(run_id).metric_keys, what="system metrics")
    (tmp_path / "release").touch()
    job.communicate(timeout=30)
    assert job.returncode == 0, job_stderr(tmp_path)

    rows = list(client.read_metrics(run_id))
    system_steps = {row.step for row in rows if "system/cpu_percent" in row.values}
    assert system_steps <= {2, 3}  # the step last logged when each sample came, before or after the last
    assert 2 in system_steps
    assert [row.step for row in rows if "loss" in row.values] == [0, 1, 2, 3]
    run = client.get_run(run_id)
    assert run.last_step == 3
    assert not any(key.startswith("system/") for key in run.summary)


def test_init_outside_a_launch_gives_up_on_an_unreachable_registry_naming_it_and_offline_mode(
    project: str, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    code = """
        import takeoff

        try:
            takeoff.init()
        except takeoff.UnavailableError as error:
            print(error)
    """
    # The hang guard is half a launched job's patience (60 s): only the shorter one outside a launch passes.
    result = run_job(tmp_path, code, job_environment(address, project), timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"UNAVAILABLE: cannot reach the registry at {address} within 5s")
    assert 'use takeoff.init(mode="offline") or TAKEOFF_MODE=offline' in result.stdout


def test_a_disabled_run_does_nothing_but_keep_its_config(project: str, tmp_path: Path) -> None:
    code = """
        import json, sys, threading
        import takeoff

        run = takeoff.init(config={"lr": 0.1}, tags=["t"])
        run.config["layers"] = 3
        takeoff.define_metric("loss", summary="min")
        for i in range(10):
            takeoff.log({"loss": 1 / (i + 1)})
        takeoff.summary["best"] = 0.1
        takeoff.finish()
        grpc_loaded = any(module.split(".")[0] == "grpc" for module in sys.modules)
        print(json.dumps([run.mode, dict(run.config), threading.active_count(), grpc_loaded]))
    """
    unreachable = f"127.0.0.1:{free_port()}"  # where a run would be reported, if one were
    result = run_job(tmp_path, code, job_environment(unreachable, project, TAKEOFF_MODE="disabled"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == ["disabled", {"lr": 0.1, "layers": 3}, 1, False]


def test_an_unknown_mode_is_refused_naming_the_choices(project: str, tmp_path: Path) -> None:
    code = "import takeoff\ntakeoff.init()\n"
    result = run_job(tmp_path, code, job_environment("127.0.0.1:1", project, TAKEOFF_MODE="offlin"))
    assert result.returncode == 1
    assert "ValueError: TAKEOFF_MODE must be one of online, offline, disabled, not 'offlin'" in result.stderr
