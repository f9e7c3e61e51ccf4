"""A run's ``RunService`` calls through the relay of the agent that launched the job (docs/design.md §8
"The run relay", protos/takeoff/v1/relay.proto): frames on a Unix socket, no gRPC.

The agent makes each call to the registry with the job's own token and answers with the registry's status
and details, which become the same :class:`takeoff.errors.TakeoffError` a gRPC call raises. A connection
that breaks mid-call (the agent restarting) is ``UNAVAILABLE``: the caller retries (every call a run makes
is safe to repeat) on a new connection. When the relay cannot be reached again, the run goes on over gRPC
to the registry (``fallback``): the agent being away costs the job an import, never its data.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import Message

from takeoff import _trace
from takeoff._delivery import warn
from takeoff._run_calls import RUN_SERVICE
from takeoff.errors import TakeoffError, error_for
from takeoff.v1 import relay_pb2
from takeoff_rpc.status import parse_status_details

if TYPE_CHECKING:
    from takeoff._run_calls import RunCalls

R = TypeVar("R", bound=Message)

MAX_FRAME_BYTES = 16 * 1024 * 1024
"""The largest frame either side sends; a RunService message is at most 4 MiB."""
ANSWER_GRACE_SECONDS = 5.0
"""How much longer than the call's own timeout the agent may take to answer before the job gives up on
the connection (the agent caps the call's timeout, then answers)."""
_LENGTH = struct.Struct(">I")
# google.rpc.Code numbers -> names (what TakeoffError.code holds), without gRPC's enum.
_CODE_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)


class _ConnectionLost(Exception):
    """The relay's connection ended or stalled; whether the call was made is not known."""


class RelayRunCalls:
    """:class:`takeoff._run_calls.RunCalls` through the agent's relay at ``address`` (``@name``: an
    abstract socket), one call at a time (the training thread and the sender share it)."""

    def __init__(
        self, address: str, connection: socket.socket, api_key: str | None, fallback: Callable[[], RunCalls]
    ) -> None:
        self.target = f"the registry through the agent's relay {address}"
        self._address = address
        self._connection: socket.socket | None = connection
        self._pid = os.getpid()
        self._authorization = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._fallback = fallback
        self._direct: RunCalls | None = None
        self._lock = threading.Lock()

    @classmethod
    def connect(
        cls, address: str, api_key: str | None, fallback: Callable[[], RunCalls]
    ) -> RelayRunCalls | None:
        """Calls through the relay at ``address``; None when it does not answer."""
        connection = _connect(address)
        return None if connection is None else cls(address, connection, api_key, fallback)

    def call(self, method: str, request: Message, response: type[R], timeout: float) -> R:
        with self._lock:
            if self._direct is None:
                return self._relayed(method, request, response, timeout)
            direct = self._direct
        return direct.call(method, request, response, timeout)

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
            if self._direct is not None:
                self._direct.close()

    def _relayed(self, method: str, request: Message, response: type[R], timeout: float) -> R:
        if self._pid != os.getpid() and self._connection is not None:
            # A forked child shares the parent's socket: frames of both would interleave on it.
            self._connection.close()
            self._connection, self._pid = None, os.getpid()
        connection = self._connection or self._reconnect()
        if connection is None:
            self._direct = self._fallback()
            return self._direct.call(method, request, response, timeout)
        call = relay_pb2.RelayCall(
            method=f"/{RUN_SERVICE}/{method}",
            request=request.SerializeToString(),
            metadata={**self._authorization, **dict(_trace.trace_context())},
        )
        call.timeout.FromNanoseconds(int(timeout * 1e9))
        try:
            connection.settimeout(timeout + ANSWER_GRACE_SECONDS)
            _write_frame(connection, call.SerializeToString())
            reply = relay_pb2.RelayReply.FromString(_read_frame(connection))
        except (OSError, _ConnectionLost) as lost:
            connection.close()
            self._connection = None
            raise error_for(
                "UNAVAILABLE", "UNAVAILABLE", f"lost the connection to {self.target} ({lost or 'closed'})"
            ) from None
        if reply.code != 0:
            code = _CODE_NAMES[reply.code] if 0 < reply.code < len(_CODE_NAMES) else "UNKNOWN"
            raise TakeoffError.from_status(
                code, parse_status_details(reply.status_details or None, code, reply.message)
            )
        return response.FromString(reply.response)

    def _reconnect(self) -> socket.socket | None:
        self._connection = _connect(self._address)
        if self._connection is None:
            warn(f"the agent's relay {self._address} is gone; reaching the registry directly from now on")
        return self._connection


def _connect(address: str) -> socket.socket | None:
    name = "\0" + address[1:] if address.startswith("@") else address
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(name)
    except OSError:
        connection.close()
        return None
    return connection


def _write_frame(connection: socket.socket, payload: bytes) -> None:
    connection.sendall(_LENGTH.pack(len(payload)) + payload)


def _read_frame(connection: socket.socket) -> bytes:
    (length,) = _LENGTH.unpack(_read_exactly(connection, _LENGTH.size))
    if length > MAX_FRAME_BYTES:
        raise _ConnectionLost(f"a frame of {length} bytes is over the limit")
    return _read_exactly(connection, length)


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = connection.recv(min(left, 1 << 20))
        if not chunk:
            raise _ConnectionLost("the agent closed it")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
