"""The queue's registry client keeps versions named by their number and asks the registry about every other
reference (services/takeoff_queue/registry_client.py): an alias moved is seen by the next Enqueue, and a
numbered version still resolves while the registry is away."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from takeoff.v1 import jobs_pb2, jobs_pb2_grpc
from takeoff_queue.registry_client import Registry
from takeoff_queue.settings import QueueSettings
from takeoff_server.errors import TakeoffError
from tests.keys import ADMIN_KEY
from tests.processes import service_process
from tests.queue.harness import keyed_channel, make_code_job


async def test_numbered_versions_are_kept_and_aliases_asked_for_every_time(tmp_path: Path) -> None:
    with service_process("registry", tmp_path / "home") as registry:
        first = make_code_job(registry.address, "cache", "train", tmp_path)
        second = make_code_job(registry.address, "cache", "train", tmp_path, schema={"type": "object"})
        async with keyed_channel(registry.address) as channel:
            jobs = jobs_pb2_grpc.JobServiceStub(channel)
            await jobs.SetJobAlias(
                jobs_pb2.SetJobAliasRequest(job="projects/cache/jobs/train", alias="prod", version=0)
            )
            client = Registry(registry.address, QueueSettings(api_key=SecretStr(ADMIN_KEY)))
            try:
                assert (await client.resolve("projects/cache", "train:prod")).version_name == first
                assert (await client.resolve("projects/cache", "train:v1")).version_name == second
                full = await client.resolve("projects/other", second)
                assert full.version_name == second
                await jobs.SetJobAlias(
                    jobs_pb2.SetJobAliasRequest(job="projects/cache/jobs/train", alias="prod", version=1)
                )
                assert (await client.resolve("projects/cache", "train:prod")).version_name == second

                registry.terminate()
                assert (await client.resolve("projects/cache", "train:v1")).version_name == second
                assert (await client.resolve("projects/other", second)).version_name == second
                with pytest.raises(TakeoffError):  # an alias is never answered from memory
                    await client.resolve("projects/cache", "train:prod")
            finally:
                await client.close()
