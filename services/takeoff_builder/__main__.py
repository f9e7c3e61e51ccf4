"""``python -m takeoff_builder``: serve BuildService."""

import asyncio
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from takeoff._sdk_wheel import sdk_wheel
from takeoff.v1 import build_pb2, build_pb2_grpc
from takeoff_builder.access import RULES
from takeoff_builder.api import BuildApi
from takeoff_builder.builds import Builder, Redactor
from takeoff_builder.flights import Flights, SharedLocks
from takeoff_builder.git_mirrors import GitMirrors
from takeoff_builder.images import Images
from takeoff_builder.metrics import BuilderMetrics
from takeoff_builder.pip import PackageIndex
from takeoff_builder.registry_client import RegistryClient
from takeoff_builder.retention import BuilderRetention
from takeoff_builder.settings import BuilderSettings
from takeoff_builder.sources import CodeCache
from takeoff_builder.store import BuildStore
from takeoff_builder.venvs import Venvs
from takeoff_server.access import KeyVerifier
from takeoff_server.config import ConfigError
from takeoff_server.database import open_service_database
from takeoff_server.docker_registry import RegistryLogin
from takeoff_server.errors import ServiceFailed
from takeoff_server.main import ServiceProgram
from takeoff_server.peers import peer_channel, registry_verifier
from takeoff_server.retention import Pruner, pruning
from takeoff_server.server import ServiceBinding, Wiring


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


@dataclass(frozen=True, slots=True)
class BuilderParts:
    """What ``wire`` puts together, for tests that reach past the API (retention, metrics)."""

    builder: Builder
    store: BuildStore
    images: Images
    metrics: BuilderMetrics
    pruner: Pruner
    verifier: KeyVerifier

    def wiring(self) -> Wiring:
        return Wiring(
            services=[
                ServiceBinding.of(
                    build_pb2.DESCRIPTOR.services_by_name["BuildService"],
                    build_pb2_grpc.add_BuildServiceServicer_to_server,
                    BuildApi(self.builder),
                    access=RULES,
                    on_shutdown=self.builder.stop,
                )
            ],
            verifier=self.verifier,
            metrics=self.metrics.collectors,
        )


async def wire(settings: BuilderSettings, resources: AsyncExitStack) -> Wiring:
    return (await assemble(settings, resources)).wiring()


async def assemble(settings: BuilderSettings, resources: AsyncExitStack) -> BuilderParts:
    try:
        # The builder presents its own key to the registry (resolving versions, downloading code) and
        # verifies its callers' keys there.
        verifier = registry_verifier(settings, settings.registry_address, resources)
        registry_channel = peer_channel(settings.registry_address, settings)
    except ConfigError as error:
        raise ServiceFailed(str(error)) from None
    database = await open_service_database(
        "builder", settings, resources, migrations=Path(__file__).with_name("migrations")
    )
    registry = RegistryClient(settings.registry_address, registry_channel)
    resources.push_async_callback(registry.close)
    builds = settings.builds_path
    index = PackageIndex(settings.pip_index_url, tuple(settings.pip_extra_index_urls), settings.ca_bundle)
    push_password = _secret(settings.push_password)
    git_mirrors = GitMirrors(
        builds / "git",
        settings.git_credentials,
        timeout=settings.git_timeout_seconds,
    )
    logins = {
        host: RegistryLogin(auth.username, auth.password.get_secret_value())
        for host, auth in settings.registry_auth.items()
    }
    if settings.push_registry and (settings.push_username or push_password):
        logins[settings.push_registry] = RegistryLogin(settings.push_username or "", push_password or "")
    images = Images(
        docker_host=settings.docker_host,
        image_prefix=settings.image_prefix,
        default_base_image=settings.default_base_image,
        index=index,
        sdk_wheel=await asyncio.to_thread(sdk_wheel),
        scratch=builds / "contexts",
        logins=logins,
    )
    metrics = BuilderMetrics()
    store = BuildStore(database)
    shared = Flights(database.url) if store.shared else None
    if shared is not None:
        await shared.open()
        resources.push_async_callback(shared.close)
    builder = Builder(
        store,
        registry,
        CodeCache(
            builds,
            registry,
            git_mirrors,
            locks=SharedLocks(shared, "code") if shared else None,
            mirror_locks=SharedLocks(shared, "git mirror") if shared else None,
        ),
        Venvs(
            builds / "venvs",
            index,
            pip_cache=builds / "pip-cache",
            locks=SharedLocks(shared, "venv") if shared else None,
        ),
        images,
        max_concurrent_builds=settings.max_concurrent_builds,
        push_registry=settings.push_registry,
        redact=Redactor(
            [
                secret
                for secret in (
                    settings.git_credentials.https_token,
                    *(login.password for login in logins.values()),
                    *index.secrets(),
                )
                if secret
            ]
        ),
        metrics=metrics,
        shared=shared,
    )
    await builder.recover()
    retention = BuilderRetention(
        settings.retention, store=store, builder=builder, builds_dir=builds, images=images, metrics=metrics
    )
    pruner = await resources.enter_async_context(pruning("builder", retention.prune, settings.retention))
    return BuilderParts(builder, store, images, metrics, pruner, verifier)


program = ServiceProgram("builder", BuilderSettings, wire)

if __name__ == "__main__":
    program.main()
