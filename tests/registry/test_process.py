"""The registry as users start it, `python -m takeoff_registry`: settings from the environment, state that
survives a restart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import grpc
import pytest

from takeoff.v1 import jobs_pb2, jobs_pb2_grpc, runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from tests.keys import ADMIN_KEY
from tests.processes import service_process
from tests.registry.conftest import make_tarball, upload_messages


def test_limits_come_from_settings_and_state_survives_a_restart(takeoff_home: Path) -> None:
    big = make_tarball({"weights.bin": os.urandom(4000)})
    env = {"TAKEOFF_MAX_ARTIFACT_BYTES": "2000"}
    with service_process("registry", takeoff_home, env=env) as registry:
        with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
            jobs = jobs_pb2_grpc.JobServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                jobs.UploadArtifact(iter(upload_messages("demo", big)), timeout=10)
            refused = cast(grpc.Call, raised.value)
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2000" in (refused.details() or "")
            jobs.CreateJob(jobs_pb2.CreateJobRequest(parent="projects/demo", job_id="train"), timeout=10)
            runs = runs_pb2_grpc.RunServiceStub(channel)
            run = runs.CreateRun(
                runs_pb2.CreateRunRequest(parent="projects/demo", run_id="r1"), timeout=10
            ).run
            runs.AppendLogs(
                runs_pb2.AppendLogsRequest(name=run.name, lines=[runs_pb2.LogLine(text="hi")]), timeout=10
            )
        assert registry.terminate() == 0

    with service_process("registry", takeoff_home, env=env) as registry:
        with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
            job = jobs_pb2_grpc.JobServiceStub(channel).GetJob(
                jobs_pb2.GetJobRequest(name="projects/demo/jobs/train"), timeout=10
            )
            got = runs_pb2_grpc.RunServiceStub(channel).GetRun(
                runs_pb2.GetRunRequest(name="projects/demo/runs/r1"), timeout=10
            )
        assert registry.terminate() == 0
    assert job.job.name == "projects/demo/jobs/train"
    assert got.run.log_line_count == 1
    assert (takeoff_home / "registry.db").exists()
    assert not [path for path in (takeoff_home / "artifacts").rglob("*") if path.is_file()]
