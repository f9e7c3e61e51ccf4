"""gRPC servicer of KeyService: requests become domain calls, results become protos.

Secrets leave only in CreateKeyResponse and MintRunTokenResponse; every other answer carries the key
without it. A signer's private key never reaches the registry at all.
"""

from __future__ import annotations

import grpc

from takeoff.v1 import keys_pb2, keys_pb2_grpc
from takeoff_registry.keys import Key, Keys, KeySpec, Signer
from takeoff_server.pagination import page_request, page_response
from takeoff_server.protovalues import optional_timestamp, timestamp


def key_to_proto(key: Key) -> keys_pb2.Key:
    scope = key.scope
    return keys_pb2.Key(
        name=key.name,
        display_name=key.display_name,
        kind=keys_pb2.KeyKind.ValueType(scope.kind.value),
        projects=scope.projects,
        role=keys_pb2.ProjectRole.ValueType(scope.role.value if scope.role is not None else 0),
        queues=scope.queues,
        service=keys_pb2.ServiceRole.ValueType(scope.service.value if scope.service is not None else 0),
        run=scope.run,
        item=key.item,
        job_version=scope.job_version,
        secrets=scope.secrets,
        secret_hint=key.secret_hint,
        creator=key.creator,
        create_time=timestamp(key.create_time),
        revoke_time=optional_timestamp(key.revoke_time),
        permissions=key.permissions,
    )


def signer_to_proto(signer: Signer) -> keys_pb2.RunTokenSigner:
    return keys_pb2.RunTokenSigner(
        name=signer.name,
        public_key=signer.public_key,
        creator=signer.creator,
        create_time=timestamp(signer.create_time),
    )


class KeyApi(keys_pb2_grpc.KeyServiceServicer):
    """API keys and run tokens."""

    def __init__(self, keys: Keys) -> None:
        self._keys = keys

    async def CreateKey(
        self,
        request: keys_pb2.CreateKeyRequest,
        context: grpc.aio.ServicerContext[keys_pb2.CreateKeyRequest, keys_pb2.CreateKeyResponse],
    ) -> keys_pb2.CreateKeyResponse:
        wanted = request.key
        spec = KeySpec(
            kind=wanted.kind,
            display_name=wanted.display_name,
            projects=list(wanted.projects),
            role=wanted.role,
            queues=list(wanted.queues),
            service=wanted.service,
        )
        key, secret = await self._keys.create(spec, key_id=request.key_id)
        return keys_pb2.CreateKeyResponse(key=key_to_proto(key), secret=secret)

    async def GetKey(
        self,
        request: keys_pb2.GetKeyRequest,
        context: grpc.aio.ServicerContext[keys_pb2.GetKeyRequest, keys_pb2.GetKeyResponse],
    ) -> keys_pb2.GetKeyResponse:
        return keys_pb2.GetKeyResponse(key=key_to_proto(await self._keys.get(request.name)))

    async def ListKeys(
        self,
        request: keys_pb2.ListKeysRequest,
        context: grpc.aio.ServicerContext[keys_pb2.ListKeysRequest, keys_pb2.ListKeysResponse],
    ) -> keys_pb2.ListKeysResponse:
        query = {"show_revoked": request.show_revoked, "show_run_tokens": request.show_run_tokens}
        page = page_request(
            page_size_requested=request.page_size,
            page_token=request.page_token,
            query=query,
            cursor_types=[str, str],
        )
        keys, more = await self._keys.list(
            page, show_revoked=request.show_revoked, show_run_tokens=request.show_run_tokens
        )
        shown, token = page_response(
            [(key_to_proto(key), (key.create_time.isoformat(), key.key_id)) for key in keys],
            more=more,
            query=query,
        )
        return keys_pb2.ListKeysResponse(keys=shown, next_page_token=token)

    async def RevokeKey(
        self,
        request: keys_pb2.RevokeKeyRequest,
        context: grpc.aio.ServicerContext[keys_pb2.RevokeKeyRequest, keys_pb2.RevokeKeyResponse],
    ) -> keys_pb2.RevokeKeyResponse:
        return keys_pb2.RevokeKeyResponse(key=key_to_proto(await self._keys.revoke(request.name)))

    async def VerifyKey(
        self,
        request: keys_pb2.VerifyKeyRequest,
        context: grpc.aio.ServicerContext[keys_pb2.VerifyKeyRequest, keys_pb2.VerifyKeyResponse],
    ) -> keys_pb2.VerifyKeyResponse:
        key = await self._keys.lookup(request.secret)
        if key is None:
            return keys_pb2.VerifyKeyResponse(valid=False)
        return keys_pb2.VerifyKeyResponse(valid=True, key=key_to_proto(key))

    async def MintRunToken(
        self,
        request: keys_pb2.MintRunTokenRequest,
        context: grpc.aio.ServicerContext[keys_pb2.MintRunTokenRequest, keys_pb2.MintRunTokenResponse],
    ) -> keys_pb2.MintRunTokenResponse:
        key, secret = await self._keys.mint_run_token(
            request.run, request.item, request.job_version, list(request.secrets)
        )
        return keys_pb2.MintRunTokenResponse(key=key_to_proto(key), secret=secret)

    async def RevokeRunTokens(
        self,
        request: keys_pb2.RevokeRunTokensRequest,
        context: grpc.aio.ServicerContext[keys_pb2.RevokeRunTokensRequest, keys_pb2.RevokeRunTokensResponse],
    ) -> keys_pb2.RevokeRunTokensResponse:
        return keys_pb2.RevokeRunTokensResponse(revoked=await self._keys.revoke_run_tokens(request.run))

    async def CreateRunTokenSigner(
        self,
        request: keys_pb2.CreateRunTokenSignerRequest,
        context: grpc.aio.ServicerContext[
            keys_pb2.CreateRunTokenSignerRequest, keys_pb2.CreateRunTokenSignerResponse
        ],
    ) -> keys_pb2.CreateRunTokenSignerResponse:
        signer = await self._keys.create_run_token_signer(request.public_key)
        return keys_pb2.CreateRunTokenSignerResponse(signer=signer_to_proto(signer))

    async def BatchRevokeRunTokens(
        self,
        request: keys_pb2.BatchRevokeRunTokensRequest,
        context: grpc.aio.ServicerContext[
            keys_pb2.BatchRevokeRunTokensRequest, keys_pb2.BatchRevokeRunTokensResponse
        ],
    ) -> keys_pb2.BatchRevokeRunTokensResponse:
        revoked = await self._keys.batch_revoke_run_tokens(list(request.runs))
        return keys_pb2.BatchRevokeRunTokensResponse(revoked=revoked)
