"""The builder's registry client keeps versions named by their number, as an agent's build always names
them, and asks the registry about any other reference (services/takeoff_builder/registry_client.py,
takeoff_server.versions): a cached build costs the registry no call, and an alias moved is seen at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from takeoff.v1 import jobs_pb2, jobs_pb2_grpc
from takeoff_builder.registry_client import RegistryClient
from takeoff_rpc.channels import open_aio_channel
from takeoff_server.errors import TakeoffError
from tests.keys import ADMIN_KEY
from tests.processes import service_process
from tests.queue.harness import keyed_channel, make_code_job


async def test_numbered_versions_are_kept_and_aliases_asked_for_every_time(tmp_path: Path) -> None:
    with service_process("registry", tmp_path / "home") as registry:
        first = make_code_job(registry.address, "builds", "train", tmp_path)
        second = make_code_job(registry.address, "builds", "train", tmp_path, schema={"type": "object"})
        async with (
            keyed_channel(registry.address) as channel,
            open_aio_channel(registry.address, api_key=ADMIN_KEY) as builder_channel,
        ):
            jobs = jobs_pb2_grpc.JobServiceStub(channel)
            await jobs.SetJobAlias(
                jobs_pb2.SetJobAliasRequest(job="projects/builds/jobs/train", alias="prod", version=0)
            )
            client = RegistryClient(registry.address, builder_channel)
            assert (await client.job_version("projects/builds/jobs/train:prod")).version_name == first
            assert (await client.job_version(second)).version_name == second
            await jobs.SetJobAlias(
                jobs_pb2.SetJobAliasRequest(job="projects/builds/jobs/train", alias="prod", version=1)
            )
            assert (await client.job_version("projects/builds/jobs/train:prod")).version_name == second

            registry.terminate()
            assert (await client.job_version(second)).version_name == second  # from memory
            with pytest.raises(TakeoffError):  # an alias is never answered from memory
                await client.job_version("projects/builds/jobs/train:prod")
