"""A run's ``RunService`` calls straight to the registry over gRPC (:mod:`takeoff._run_calls`)."""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf.message import Message

from takeoff._auth import channel_credentials
from takeoff._run_calls import RUN_SERVICE
from takeoff.errors import TakeoffError
from takeoff_rpc.channels import open_channel

R = TypeVar("R", bound=Message)


class GrpcRunCalls:
    """:class:`takeoff._run_calls.RunCalls` on a channel of its own to the registry at ``address``."""

    def __init__(self, address: str, api_key: str | None) -> None:
        self.target = address
        self._channel = open_channel(address, api_key=api_key, credentials=channel_credentials(address))

    def call(self, method: str, request: Message, response: type[R], timeout: float) -> R:
        send = self._channel.unary_unary(
            f"/{RUN_SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        try:
            reply: R = send(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as error:
            raise TakeoffError.from_rpc_error(error, target=self.target) from None
        return reply

    def close(self) -> None:
        self._channel.close()
