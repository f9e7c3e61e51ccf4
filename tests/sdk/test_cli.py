"""``takeoff job|runs|logs`` as users run them: a subprocess against a real registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from takeoff import Client
from takeoff.v1 import runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess
from tests.sdk.conftest import job_environment, run_job
from tests.sdk.test_pack import write


def takeoff(address: str, project: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**job_environment(address, project), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "takeoff.cli", *args],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )


def test_job_create_list_and_describe(registry: ServiceProcess, project: str, tmp_path: Path) -> None:
    code = tmp_path / "code"
    write(code, {"train.py": "print('hi')\n", "notes.log": "", ".takeoffignore": "*.log\n"})
    write(
        tmp_path,
        {
            "requirements.txt": "numpy==2.1\n",
            "schema.json": json.dumps({"type": "object", "properties": {"lr": {"type": "number"}}}),
            "defaults.yaml": "lr: 0.1\n",
        },
    )
    create = [
        "job", "create", str(code), "--name", "train", "--entrypoint", "python train.py --note 'a b'",
        "--requirements", str(tmp_path / "requirements.txt"), "--python", "3.11",
        "--config-schema", str(tmp_path / "schema.json"),
        "--config-defaults", str(tmp_path / "defaults.yaml"),
        "--alias", "prod",
    ]  # fmt: skip

    created = takeoff(registry.address, project, *create)
    assert created.returncode == 0, created.stderr
    assert "created train:v0" in created.stdout
    assert "2 files, uploaded" in created.stdout

    again = takeoff(registry.address, project, *create, "--json")
    assert again.returncode == 0, again.stderr
    reported = json.loads(again.stdout)
    assert reported["reused_existing"] is True
    assert reported["artifact"]["uploaded"] is False

    listed = takeoff(registry.address, project, "job", "list", "--json")
    assert [job["name"] for job in json.loads(listed.stdout)] == [f"projects/{project}/jobs/train"]
    table = takeoff(registry.address, project, "job", "list")
    assert "prod→v0" in table.stdout

    described = json.loads(
        takeoff(registry.address, project, "job", "describe", "train:prod", "--json").stdout
    )
    version = described["version"]
    assert version["entrypoint"] == ["python", "train.py", "--note", "a b"]
    assert version["environment"]["requirements"] == "numpy==2.1\n"
    assert version["environment"]["python_version"] == "3.11"
    assert version["inputs"]["defaults"] == {"lr": 0.1}
    assert described["job"]["aliases"] == {"latest": 0, "prod": 0}

    shown = takeoff(registry.address, project, "job", "describe", "train")
    assert shown.returncode == 0, shown.stderr
    for text in ("train:v0", "python train.py --note 'a b'", "3.11", "numpy==2.1", '"lr": 0.1'):
        assert text in shown.stdout


def test_runs_list_show_and_logs(registry: ServiceProcess, project: str, tmp_path: Path) -> None:
    code = """
        import takeoff

        run = takeoff.init(config={"lr": 0.25}, name="sparkly")
        for step in range(200):
            run.log({"loss": 1 / (step + 1), "accuracy": step / 200})
        run.summary["best_accuracy"] = 0.995
        run.finish()
        print(run.id)
    """
    job = run_job(tmp_path, code, job_environment(registry.address, project))
    assert job.returncode == 0, job.stderr
    run_id = job.stdout.strip()
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        lines = [
            runs_pb2.LogLine(text="epoch 1 [=====]"),
            runs_pb2.LogLine(text="pip install numpy", stream=runs_pb2.LOG_STREAM_BUILD),
        ]
        runs_pb2_grpc.RunServiceStub(channel).AppendLogs(
            runs_pb2.AppendLogsRequest(name=f"projects/{project}/runs/{run_id}", lines=lines), timeout=10
        )

    listed = takeoff(registry.address, project, "runs", "list", "--state", "finished")
    assert listed.returncode == 0, listed.stderr
    assert run_id[:8] in listed.stdout
    assert "sparkly" in listed.stdout
    assert run_id in takeoff(registry.address, project, "runs", "list", "--wide").stdout

    shown = takeoff(registry.address, project, "runs", "show", run_id[:8])
    assert shown.returncode == 0, shown.stderr
    for text in ("FINISHED", "lr", "0.25", "best_accuracy", "0.995", "loss", "accuracy", "200 rows"):
        assert text in shown.stdout
    assert "▁" in shown.stdout
    assert "█" in shown.stdout

    overview = json.loads(takeoff(registry.address, project, "runs", "show", run_id, "--json").stdout)
    assert overview["metrics"]["loss"] == {"count": 200, "last": 1 / 200, "min": 1 / 200, "max": 1.0}
    assert overview["run"]["state"] == "FINISHED"

    logs = takeoff(registry.address, project, "logs", run_id)
    assert logs.stdout.splitlines() == ["epoch 1 [=====]", "[build] pip install numpy"]
    logs_json = json.loads(takeoff(registry.address, project, "logs", run_id, "--json", "--tail", "1").stdout)
    assert logs_json.pop("time") is not None
    assert logs_json == {"index": 1, "stream": "BUILD", "text": "pip install numpy"}


@pytest.mark.parametrize(
    ("args", "message", "exit_code"),
    [
        (["job", "describe", "missing"], "error: JOB_NOT_FOUND: ", 1),
        (
            ["job", "create", "{code}", "--name", "Bad Name", "--entrypoint", "python x.py"],
            "error: NAME_INVALID: ",
            1,
        ),
        (["job", "create", "{code}", "--name", "a", "--image", "x:1"], "error: give exactly one source", 1),
        (["job", "create", "{code}", "--name", "a"], "error: --entrypoint is required", 1),
        (["job", "create", "{code}", "--name", "a", "--entrypoint", "python 'x.py"], "cannot be split", 2),
        (
            ["job", "create", "{leaky}", "--name", "a", "--entrypoint", "x"],
            "error: symlink secret points outside",
            1,
        ),
        (["runs", "show", "no-such-run"], "error: RUN_NOT_FOUND: ", 1),
        (["runs", "list", "--state", "sleeping"], "error: unknown run state 'sleeping'", 2),
    ],
)
def test_bad_input_is_one_readable_line_and_no_traceback(
    *, client: Client, project: str, tmp_path: Path, args: list[str], message: str, exit_code: int
) -> None:
    client.create_job("exists")  # so the project exists and lookups fail on what they name
    write(tmp_path / "code", {"x.py": ""})
    write(tmp_path / "leaky", {"x.py": ""})
    (tmp_path / "leaky" / "secret").symlink_to("/etc/hostname")
    args = [arg.format(code=tmp_path / "code", leaky=tmp_path / "leaky") for arg in args]

    result = takeoff(client.registry, project, *args)

    assert result.returncode == exit_code
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_an_unreachable_registry_is_one_readable_line(project: str) -> None:
    result = takeoff("127.0.0.1:1", project, "job", "list")
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: cannot reach 127.0.0.1:1")
    assert "`takeoff up` starts one" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_default_project_is_takeoff_project(
    registry: ServiceProcess, client: Client, project: str
) -> None:
    client.create_job("in-env-project")
    result = takeoff(registry.address, project, "job", "list", "--json")
    assert [job["name"] for job in json.loads(result.stdout)] == [f"projects/{project}/jobs/in-env-project"]
    other = takeoff(registry.address, project, "job", "list", "--json", "--project", f"{project}-other")
    assert "PROJECT_NOT_FOUND" in other.stderr
