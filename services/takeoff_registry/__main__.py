"""``python -m takeoff_registry``: serve JobService, RunService, ArtifactService, KeyService and
SecretService.

The registry owns the keys, so it verifies the keys presented to it itself (cached like everywhere else,
so a revocation takes effect here within the same bound as in the other services).
"""

import asyncio
import logging
from contextlib import AsyncExitStack
from pathlib import Path

from takeoff.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from takeoff_registry.access import RULES
from takeoff_registry.artifacts import Artifacts
from takeoff_registry.git_source import GitResolver
from takeoff_registry.jobs import Jobs
from takeoff_registry.jobs_api import JobApi
from takeoff_registry.keys import Keys
from takeoff_registry.keys_api import KeyApi
from takeoff_registry.keys_store import SqlKeyStore
from takeoff_registry.named_artifacts import NamedArtifacts
from takeoff_registry.named_artifacts_api import ArtifactApi
from takeoff_registry.retention import RegistryRetention
from takeoff_registry.runs import Runs
from takeoff_registry.runs_api import RunApi
from takeoff_registry.secrets import Secrets, load_secrets_key
from takeoff_registry.secrets_api import SecretApi
from takeoff_registry.settings import RegistrySettings
from takeoff_registry.store import RegistryStore
from takeoff_server.access import CachedVerifier
from takeoff_server.database import open_service_database
from takeoff_server.errors import ServiceFailed
from takeoff_server.main import ServiceProgram
from takeoff_server.rate_limits import Rate
from takeoff_server.retention import pruning
from takeoff_server.server import ServiceBinding, Wiring

logger = logging.getLogger(__name__)

STALE_STAGING_SECONDS = 3600.0
"""A named artifact's staging file not written for this long at start belongs to no live upload."""


def _secrets(settings: RegistrySettings, store: RegistryStore) -> Secrets:
    path = settings.secrets_key_path
    try:
        return Secrets(store, load_secrets_key(path))
    except OSError as error:
        raise ServiceFailed(f"secrets_key_file: cannot read {path}: {error.strerror}") from None
    except ValueError as error:  # the message never quotes the key
        raise ServiceFailed(f"secrets_key_file: {path}: {error}") from None


async def wire(settings: RegistrySettings, resources: AsyncExitStack) -> Wiring:
    database = await open_service_database(
        "registry", settings, resources, migrations=Path(__file__).with_name("migrations")
    )
    store = RegistryStore(database)
    retention = RegistryRetention(settings.retention, store, settings.artifacts_path)
    await resources.enter_async_context(pruning("registry", retention.prune, settings.retention))
    keys = Keys(SqlKeyStore(store))
    if settings.bootstrap_admin_key_file is not None:
        key, created = await keys.bootstrap_admin(settings.bootstrap_admin_key_file)
        if created:
            logger.info("imported the bootstrap admin key as %s", key.name)
    git = GitResolver(
        settings.git_credentials,
        timeout=settings.git_timeout_seconds,
        scratch_dir=settings.home / "git-scratch",
    )
    jobs = Jobs(store, git)
    artifacts = Artifacts(store, settings.artifacts_path, max_bytes=settings.max_artifact_bytes)
    named_artifacts = NamedArtifacts(
        store, settings.artifact_blobs_path, max_version_bytes=settings.max_artifact_version_bytes
    )
    stale = await asyncio.to_thread(named_artifacts.remove_stale_staging, older_than=STALE_STAGING_SECONDS)
    if stale:
        logger.info("removed %d staging files of uploads a stop cut short", len(stale))
    services = [
        ServiceBinding.of(
            jobs_pb2.DESCRIPTOR.services_by_name["JobService"],
            jobs_pb2_grpc.add_JobServiceServicer_to_server,
            JobApi(jobs, artifacts),
            access=RULES["takeoff.v1.JobService"],
        ),
        ServiceBinding.of(
            runs_pb2.DESCRIPTOR.services_by_name["RunService"],
            runs_pb2_grpc.add_RunServiceServicer_to_server,
            RunApi(
                Runs(
                    store,
                    jobs,
                    log_line_rate=Rate(
                        settings.log_lines_per_run_per_second, settings.log_lines_per_run_burst
                    ),
                    metric_row_rate=Rate(
                        settings.metric_rows_per_run_per_second, settings.metric_rows_per_run_burst
                    ),
                )
            ),
            access=RULES["takeoff.v1.RunService"],
        ),
        ServiceBinding.of(
            artifacts_pb2.DESCRIPTOR.services_by_name["ArtifactService"],
            artifacts_pb2_grpc.add_ArtifactServiceServicer_to_server,
            ArtifactApi(named_artifacts),
            access=RULES["takeoff.v1.ArtifactService"],
        ),
        ServiceBinding.of(
            keys_pb2.DESCRIPTOR.services_by_name["KeyService"],
            keys_pb2_grpc.add_KeyServiceServicer_to_server,
            KeyApi(keys),
            access=RULES["takeoff.v1.KeyService"],
        ),
        ServiceBinding.of(
            secrets_pb2.DESCRIPTOR.services_by_name["SecretService"],
            secrets_pb2_grpc.add_SecretServiceServicer_to_server,
            SecretApi(_secrets(settings, store)),
            access=RULES["takeoff.v1.SecretService"],
        ),
    ]
    return Wiring(services=services, verifier=CachedVerifier(keys))


program = ServiceProgram("registry", RegistrySettings, wire)

if __name__ == "__main__":
    program.main()
