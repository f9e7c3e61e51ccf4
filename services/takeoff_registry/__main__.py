"""``python -m takeoff_registry``: serve JobService and RunService."""

from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

from takeoff.v1 import jobs_pb2, jobs_pb2_grpc, runs_pb2, runs_pb2_grpc
from takeoff_registry.artifacts import Artifacts
from takeoff_registry.git_source import GitResolver
from takeoff_registry.jobs import Jobs
from takeoff_registry.jobs_api import JobApi
from takeoff_registry.runs import Runs
from takeoff_registry.runs_api import RunApi
from takeoff_registry.settings import RegistrySettings
from takeoff_registry.store import RegistryStore
from takeoff_server.database import open_service_database
from takeoff_server.main import ServiceProgram
from takeoff_server.server import ServiceBinding


async def wire(settings: RegistrySettings, resources: AsyncExitStack) -> Sequence[ServiceBinding]:
    database = await open_service_database(
        "registry", settings, resources, migrations=Path(__file__).with_name("migrations")
    )
    store = RegistryStore(database)
    git = GitResolver(
        settings.git_credentials,
        timeout=settings.git_timeout_seconds,
        scratch_dir=settings.home / "git-scratch",
    )
    jobs = Jobs(store, git)
    artifacts = Artifacts(store, settings.artifacts_path, max_bytes=settings.max_artifact_bytes)
    return [
        ServiceBinding.of(
            jobs_pb2.DESCRIPTOR.services_by_name["JobService"],
            jobs_pb2_grpc.add_JobServiceServicer_to_server,
            JobApi(jobs, artifacts),
        ),
        ServiceBinding.of(
            runs_pb2.DESCRIPTOR.services_by_name["RunService"],
            runs_pb2_grpc.add_RunServiceServicer_to_server,
            RunApi(Runs(store, jobs)),
        ),
    ]


program = ServiceProgram("registry", RegistrySettings, wire)

if __name__ == "__main__":
    program.main()
