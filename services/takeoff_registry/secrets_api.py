"""gRPC servicer of SecretService: requests become domain calls, results become protos.

Only AccessSecret's response carries a value; the access rules (``takeoff_registry.access``) decide who may
call it before this servicer sees the request.
"""

from __future__ import annotations

import grpc

from takeoff.v1 import secrets_pb2, secrets_pb2_grpc
from takeoff_registry.refs import parse_project
from takeoff_registry.secrets import Secret, SecretKey, Secrets, check_secret_id
from takeoff_server.pagination import page_request, page_response
from takeoff_server.protovalues import timestamp


def _secret_to_proto(secret: Secret) -> secrets_pb2.Secret:
    return secrets_pb2.Secret(
        name=secret.key.name,
        create_time=timestamp(secret.create_time),
        update_time=timestamp(secret.update_time),
    )


class SecretApi(secrets_pb2_grpc.SecretServiceServicer):
    """A project's secrets: set, list, delete, and access by the attempt given one."""

    def __init__(self, secrets: Secrets) -> None:
        self._secrets = secrets

    async def SetSecret(
        self,
        request: secrets_pb2.SetSecretRequest,
        context: grpc.aio.ServicerContext[secrets_pb2.SetSecretRequest, secrets_pb2.SetSecretResponse],
    ) -> secrets_pb2.SetSecretResponse:
        project = parse_project(request.parent, field="parent")
        key = SecretKey(project, check_secret_id(request.secret_id, field="secret_id"))
        secret = await self._secrets.set(key, request.value)
        return secrets_pb2.SetSecretResponse(secret=_secret_to_proto(secret))

    async def ListSecrets(
        self,
        request: secrets_pb2.ListSecretsRequest,
        context: grpc.aio.ServicerContext[secrets_pb2.ListSecretsRequest, secrets_pb2.ListSecretsResponse],
    ) -> secrets_pb2.ListSecretsResponse:
        project = parse_project(request.parent, field="parent")
        query = {"parent": request.parent}
        page = page_request(
            page_size_requested=request.page_size,
            page_token=request.page_token,
            query=query,
            cursor_types=[str],
        )
        secrets, last_id = await self._secrets.list(project, page=page)
        shown, token = page_response(
            [(_secret_to_proto(secret), (secret.key.secret,)) for secret in secrets],
            more=last_id is not None,
            query=query,
        )
        return secrets_pb2.ListSecretsResponse(secrets=shown, next_page_token=token)

    async def DeleteSecret(
        self,
        request: secrets_pb2.DeleteSecretRequest,
        context: grpc.aio.ServicerContext[secrets_pb2.DeleteSecretRequest, secrets_pb2.DeleteSecretResponse],
    ) -> secrets_pb2.DeleteSecretResponse:
        await self._secrets.delete(SecretKey.parse(request.name, field="name"))
        return secrets_pb2.DeleteSecretResponse()

    async def AccessSecret(
        self,
        request: secrets_pb2.AccessSecretRequest,
        context: grpc.aio.ServicerContext[secrets_pb2.AccessSecretRequest, secrets_pb2.AccessSecretResponse],
    ) -> secrets_pb2.AccessSecretResponse:
        value = await self._secrets.access(SecretKey.parse(request.name, field="name"))
        return secrets_pb2.AccessSecretResponse(value=value)
