"""The slurm runner's own rules: its options, what it refuses, the sbatch options a resource config
becomes, its job names, and how Slurm's end states become the attempt's end (a time limit or a preemption
cannot be had on the test cluster within a test's time), all without a cluster; and its sweep, on one."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest

from takeoff_agent.domain import Assignment, FailureReason, JobExit, JobVersion, ResourceKind, SourceKind
from takeoff_agent.runners.base import RunnerContext, RunnerRefused
from takeoff_agent.runners.slurm import (
    SlurmState,
    create,
    ended_by_slurm,
    job_name,
    lease_of,
    parse_squeue,
    sbatch_arguments,
)
from tests.slurm.conftest import SlurmCluster

AGENT = "0123456789abcdef0123456789abcdef"
SLURM_COMMANDS = {name: f"/usr/bin/{name}" for name in ("sbatch", "squeue", "scancel", "srun")}


def assignment(
    resource_config: dict[str, object] | None = None, source: SourceKind = SourceKind.CODE
) -> Assignment:
    return Assignment(
        lease_id="feedface" * 4,
        epoch=3,
        item="projects/p/queues/q/items/abc123",
        queue="projects/p/queues/q",
        run="projects/p/runs/abc123-1",
        attempt=1,
        job_version=JobVersion("projects/p/jobs/j/versions/1", source),
        resource=ResourceKind.SLURM,
        entrypoint=("python", "main.py"),
        resource_config=resource_config or {},
    )


def context(tmp_path: Path) -> RunnerContext:
    return RunnerContext(agent_id=AGENT, state_dir=tmp_path / "agent")


def options(tmp_path: Path, **more: object) -> dict[str, object]:
    repository = Path(__file__).parents[2]
    return {"shared_roots": [str(tmp_path), str(repository)], **SLURM_COMMANDS, **more}


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"shared_root": ["/x"]}, "unknown option shared_root"),
        ({"shared_roots": "/x"}, "shared_roots must be a list of absolute directories"),
        ({"shared_roots": ["relative/dir"]}, "shared_roots must be a list of absolute directories"),
        ({"poll_seconds": 0}, "poll_seconds"),
        ({"partition": "two words"}, "partition"),
        ({"sbatch": ""}, "sbatch must be the path"),
    ],
)
def test_create_refuses_a_bad_option_naming_it(tmp_path: Path, bad: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        create({**options(tmp_path), **bad}, context(tmp_path))


def test_create_refuses_a_state_dir_the_compute_nodes_cannot_see(tmp_path: Path) -> None:
    elsewhere = {**options(tmp_path), "shared_roots": [str(tmp_path / "shared")]}

    with pytest.raises(ValueError, match=r"state_dir .* is not under shared_roots"):
        create(elsewhere, context(tmp_path))


def test_check_refuses_image_jobs_and_options_slurm_does_not_take(tmp_path: Path) -> None:
    runner = create(options(tmp_path), context(tmp_path))

    with pytest.raises(RunnerRefused, match="image job cannot run on slurm"):
        runner.check(assignment(source=SourceKind.IMAGE))
    with pytest.raises(RunnerRefused, match=r"resource option gpus, sbatch\.output"):
        runner.check(assignment({"gpus": 1, "sbatch": {"output": "/x", "exclusive": True}}))
    runner.check(assignment({"nodes": 2, "ntasks_per_node": 4, "sbatch": {"exclusive": True}}))


def test_a_resource_config_becomes_sbatch_options() -> None:
    config = {
        "nodes": 2,
        "ntasks_per_node": 4,
        "gpus_per_node": 0,
        "cpus_per_task": 8,
        "mem": "16G",
        "time": "1-00:00:00",
        "account": "ml",
        "qos": "high",
        "constraint": "a100|h100",
        "env": {"A": "1"},
        "sbatch": {"mail_type": "END", "exclusive": True, "nice": 5},
    }

    assert sbatch_arguments(config, "gpu") == [
        "--partition=gpu",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--cpus-per-task=8",
        "--mem=16G",
        "--time=1-00:00:00",
        "--account=ml",
        "--qos=high",
        "--constraint=a100|h100",
        "--exclusive",
        "--mail-type=END",
        "--nice=5",
    ]
    assert sbatch_arguments({"partition": "cpu"}, "gpu") == ["--partition=cpu"]
    assert sbatch_arguments({"sbatch": {"exclusive": False}}, "") == []


def test_the_job_name_says_item_and_epoch_and_finds_the_lease_of_this_agent_only() -> None:
    name = job_name(assignment(), AGENT)

    assert name == f"takeoff.abc123.3.{AGENT}.{'feedface' * 4}"
    assert lease_of(name, AGENT) == "feedface" * 4
    assert lease_of(name, "another-agent") is None
    assert lease_of("train.sh", AGENT) is None


def test_squeue_json_is_read_as_slurm_22_05_writes_it() -> None:
    document = json.dumps(
        {
            "meta": {"Slurm": {"release": "22.05.8"}},
            "errors": [],
            "jobs": [
                {
                    "job_id": 7,
                    "name": "a",
                    "job_state": "PENDING",
                    "state_reason": "Resources",
                    "exit_code": 0,
                },
                {
                    "job_id": 8,
                    "name": "b",
                    "job_state": "FAILED",
                    "state_reason": "NonZeroExitCode",
                    "exit_code": 768,
                },
            ],
        }
    )

    jobs = parse_squeue(document)

    assert jobs[7] == SlurmState(7, "a", "PENDING", "Resources", 0)
    assert (jobs[7].waiting, jobs[7].ended) == (True, False)
    assert (jobs[8].ended, jobs[8].wait_status >> 8) == (True, 3)


RECORDED = JobExit(exit_code=143, signal=signal.SIGTERM)


@pytest.mark.parametrize(
    ("state", "reason", "message"),
    [
        ("PREEMPTED", FailureReason.PREEMPTED, "Slurm preempted the job (PREEMPTED)"),
        ("NODE_FAIL", FailureReason.PREEMPTED, "a node of the job failed (NODE_FAIL)"),
        ("TIMEOUT", FailureReason.JOB_FAILED, "TIMEOUT: Slurm stopped the job at its time limit"),
        ("DEADLINE", FailureReason.JOB_FAILED, "DEADLINE: Slurm stopped the job at its deadline"),
    ],
)
def test_ends_slurm_decided_are_reported_as_such(state: str, reason: FailureReason, message: str) -> None:
    ended = ended_by_slurm(SlurmState(1, "n", state, "None", 15), RECORDED)

    assert ended is not None
    assert ended.failure is not None
    assert (ended.failure.reason, ended.failure.message, ended.exit_code) == (reason, message, 143)


def test_out_of_memory_is_an_oom_kill_and_a_recorded_end_otherwise_stands() -> None:
    oom = ended_by_slurm(SlurmState(1, "n", "OUT_OF_MEMORY", "OutOfMemory", 9), None)

    assert oom == JobExit(exit_code=137, oom_killed=True)
    assert ended_by_slurm(SlurmState(1, "n", "COMPLETED", "None", 0), RECORDED) is None
    assert ended_by_slurm(SlurmState(1, "n", "FAILED", "NonZeroExitCode", 256), RECORDED) is None


def test_a_batch_job_that_ended_without_the_shims_record_is_an_infrastructure_failure() -> None:
    cancelled = ended_by_slurm(SlurmState(1, "n", "CANCELLED", "None", 9), None)
    failed = ended_by_slurm(SlurmState(1, "n", "FAILED", "NonZeroExitCode", 127 << 8), None)

    assert cancelled is not None
    assert cancelled.failure is not None
    assert cancelled.failure.reason is FailureReason.RUNNER_INFRA
    assert "cancelled the job" in cancelled.failure.message
    assert failed is not None
    assert failed.failure is not None
    assert failed.failure.reason is FailureReason.RUNNER_INFRA
    assert "(FAILED, exit code 127) without the shim recording" in failed.failure.message


def test_sweep_cancels_this_agents_jobs_of_leases_it_does_not_hold_and_no_other(
    tmp_path: Path, slurm_cluster: SlurmCluster
) -> None:
    runner = create(slurm_cluster.runner_options(), context(tmp_path))
    orphan, held, foreign = (
        submit(f"takeoff.i{n}.1.{agent}.{lease}")
        for n, (agent, lease) in enumerate([(AGENT, "orphan"), (AGENT, "held"), ("another-agent", "orphan")])
    )

    asyncio.run(runner.sweep({"held"}))

    states = {job: slurm_cluster.show_job(job)["JobState"] for job in (orphan, held, foreign)}
    subprocess.run(["scancel", str(held), str(foreign)], check=True)
    assert states == {orphan: "CANCELLED", held: "PENDING", foreign: "PENDING"}


def submit(name: str) -> int:
    """A job Slurm holds (``--hold``) under ``name``."""
    answer = subprocess.run(
        ["sbatch", "--parsable", "--hold", f"--job-name={name}", "--output=/dev/null", "--wrap=true"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(answer.stdout.strip())
