"""A run's ``RunService`` calls through the relay of the agent that launched the job (docs/design.md §8
"The run relay", protos/takeoff/v1/relay.proto): frames on a Unix socket, no gRPC.

The agent makes each call to the registry with the job's own token and answers with the registry's status
and details, which become the same :class:`takeoff.errors.TakeoffError` a gRPC call raises. A connection
that breaks mid-call (the agent restarting) is ``UNAVAILABLE``: the caller retries (every call a run makes
is safe to repeat) on a new connection. An attempt the relay cannot take goes to the registry over gRPC
(``fallback``): the agent being away costs the job an import, never its data.

Only a relay held by a process of the job's own user is used (``SO_PEERCRED``): an abstract socket has no
permissions, and whoever holds the name is sent the run token.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import Message
from google.rpc import code_pb2

from takeoff import _trace
from takeoff._delivery import warn
from takeoff._run_calls import RUN_SERVICE
from takeoff.errors import TakeoffError, error_for
from takeoff.v1 import relay_pb2
from takeoff_rpc.relay_wire import FRAME_LENGTH, MAX_FRAME_BYTES, frame, peer_uid, socket_path
from takeoff_rpc.status import parse_status_details

if TYPE_CHECKING:
    from takeoff._run_calls import RunCalls

R = TypeVar("R", bound=Message)

ANSWER_GRACE_SECONDS = 5.0
"""How much longer than the call's own timeout the agent may take to answer before the job gives up on
the relay for the attempt (the agent caps the call's timeout, then answers)."""
CONNECT_SECONDS = 1.0
"""A relay that does not take a connection within this (a stuck agent's backlog is full) is not used."""
RELAY_RETRY_SECONDS = 5.0
"""After the relay could not take an attempt, how long the run's calls go straight to the registry before
the relay is tried again."""


class _ConnectionLost(Exception):
    """The relay's connection ended; whether the call was made is not known."""


class _RelayDown(Exception):
    """The relay cannot be used for this attempt: it cannot be connected to, is held by another user, or
    did not answer in time."""


class RelayRunCalls:
    """:class:`takeoff._run_calls.RunCalls` through the agent's relay at ``address`` (``@name``: an
    abstract socket), one call at a time (the training thread and the sender share it).

    An attempt the relay cannot take (it is gone, stalled, or its name is held by another user) goes to
    the registry over gRPC (``fallback``, made once), and the relay is tried again after
    :data:`RELAY_RETRY_SECONDS`: an agent restarting costs its jobs a few direct calls, and a job that
    cannot dial the registry itself (a mutual-TLS registry) returns to the relay once it is back."""

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
        self._relay_after = 0.0
        self._lock = threading.Lock()

    @classmethod
    def connect(
        cls, address: str, api_key: str | None, fallback: Callable[[], RunCalls]
    ) -> RelayRunCalls | None:
        """Calls through the relay at ``address``; None when it does not answer or is not the agent's."""
        connection = _connect(address)
        return None if connection is None else cls(address, connection, api_key, fallback)

    def call(self, method: str, request: Message, response: type[R], timeout: float) -> R:
        with self._lock:
            if time.monotonic() >= self._relay_after:
                try:
                    return self._relayed(method, request, response, timeout)
                except _RelayDown as down:
                    if self._relay_after == 0.0:
                        warn(f"the agent's relay {self._address} {down}; reaching the registry directly")
                    self._relay_after = time.monotonic() + RELAY_RETRY_SECONDS
            if self._direct is None:
                self._direct = self._fallback()
            direct = self._direct
        return direct.call(method, request, response, timeout)

    def close(self) -> None:
        with self._lock:
            self._disconnect()
            if self._direct is not None:
                self._direct.close()

    def _relayed(self, method: str, request: Message, response: type[R], timeout: float) -> R:
        if self._pid != os.getpid():
            # A forked child shares the parent's socket: frames of both would interleave on it.
            self._disconnect()
            self._pid = os.getpid()
        if self._connection is None:
            self._connection = _connect(self._address)
            if self._connection is None:
                raise _RelayDown("does not answer, or is not the agent's")
        connection = self._connection
        call = relay_pb2.RelayCall(
            method=f"/{RUN_SERVICE}/{method}",
            request=request.SerializeToString(),
            metadata={**self._authorization, **dict(_trace.trace_context())},
        )
        call.timeout.FromNanoseconds(int(timeout * 1e9))
        try:
            # The agent answers within the call's timeout (it caps it); longer is an agent that is stuck.
            connection.settimeout(timeout + ANSWER_GRACE_SECONDS)
            connection.sendall(frame(call.SerializeToString()))
            reply = relay_pb2.RelayReply.FromString(_read_frame(connection))
        except TimeoutError:
            self._disconnect()
            raise _RelayDown("did not answer in time") from None  # every run call is safe to repeat
        except (OSError, _ConnectionLost) as lost:
            self._disconnect()
            raise error_for(
                "UNAVAILABLE", "UNAVAILABLE", f"lost the connection to {self.target} ({lost or 'closed'})"
            ) from None
        if reply.code != 0:
            code = code_pb2.Code.Name(reply.code) if reply.code in code_pb2.Code.values() else "UNKNOWN"
            raise TakeoffError.from_status(
                code, parse_status_details(reply.status_details or None, code, reply.message)
            )
        self._relay_after = 0.0
        return response.FromString(reply.response)

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _connect(address: str) -> socket.socket | None:
    """A connection to the relay at ``address``, if it answers within :data:`CONNECT_SECONDS` and is held
    by a process of this user (an abstract socket has no permissions: another user could bind the name
    while the agent restarts, and would be sent the run token)."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(CONNECT_SECONDS)
        connection.connect(socket_path(address))
    except OSError:
        connection.close()
        return None
    if peer_uid(connection) != os.getuid():
        connection.close()
        return None
    return connection


def _read_frame(connection: socket.socket) -> bytes:
    (length,) = FRAME_LENGTH.unpack(_read_exactly(connection, FRAME_LENGTH.size))
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
