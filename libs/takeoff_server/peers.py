"""How a service reaches the others: channels with its own key and TLS, and keys verified by the registry.

Every service but the registry verifies the keys presented to it through the registry's KeyService
(``VerifyKey``), cached briefly (:class:`takeoff_server.access.CachedVerifier`).
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import grpc
import grpc.aio

from takeoff.v1 import keys_pb2, keys_pb2_grpc
from takeoff_rpc.channels import open_aio_channel, tls_credentials
from takeoff_rpc.status import status_code
from takeoff_server import errors
from takeoff_server.access import (
    CachedVerifier,
    KeyKind,
    KeyScope,
    KeyVerifier,
    Principal,
    ProjectRole,
    ServiceRole,
    grants_for,
)
from takeoff_server.config import ServerSettings, TlsSettings

VERIFY_TIMEOUT_SECONDS = 5.0


def channel_credentials(tls: TlsSettings | None, target: str) -> grpc.ChannelCredentials | None:
    """TLS for a call to ``target`` under this process's settings; None (plaintext) for a Unix socket."""
    if tls is None or target.startswith("unix:"):
        return None
    mutual = tls.require_client_cert
    return tls_credentials(tls.ca_file, tls.cert_file if mutual else None, tls.key_file if mutual else None)


def peer_channel(target: str, settings: ServerSettings) -> grpc.aio.Channel:
    """A channel to another service that presents this process's own key, over TLS when configured."""
    return open_aio_channel(
        target, api_key=settings.own_api_key(), credentials=channel_credentials(settings.tls, target)
    )


def key_scope(key: keys_pb2.Key) -> KeyScope:
    """What a KeyService ``Key`` was made for."""
    return KeyScope(
        kind=KeyKind(key.kind),
        projects=tuple(key.projects),
        role=ProjectRole(key.role) if key.role else None,
        queues=tuple(key.queues),
        service=ServiceRole(key.service) if key.service else None,
        run=key.run,
        job_version=key.job_version,
        secrets=tuple(key.secrets),
    )


def principal(key: keys_pb2.Key) -> Principal:
    return Principal(key.name, key.display_name, KeyKind(key.kind), grants_for(key_scope(key)))


class RemoteKeyVerifier:
    """Verifies presented keys by asking the registry."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._keys = keys_pb2_grpc.KeyServiceStub(channel)

    async def verify(self, secret: str) -> Principal | None:
        try:
            answer = await self._keys.VerifyKey(
                keys_pb2.VerifyKeyRequest(secret=secret), timeout=VERIFY_TIMEOUT_SECONDS
            )
        except grpc.RpcError as error:
            code = status_code(error)
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                # This service's own key is wrong: a configuration error every caller would see.
                raise errors.Unavailable(
                    "SERVICE_KEY_REFUSED",
                    "this service cannot verify keys: the registry refused its own key "
                    f"({code.name if code else 'unknown'}); check its api_key setting",
                ) from None
            raise errors.Unavailable(
                "DEPENDENCY_UNAVAILABLE",
                "cannot verify the API key: the registry is unreachable; retry shortly",
            ) from None
        return principal(answer.key) if answer.valid else None


def registry_verifier(
    settings: ServerSettings, registry_address: str, resources: AsyncExitStack
) -> KeyVerifier:
    """A cached verifier asking the registry at ``registry_address``; its channel closes with
    ``resources``."""
    channel = peer_channel(registry_address, settings)
    resources.push_async_callback(channel.close)
    return CachedVerifier(RemoteKeyVerifier(channel))
