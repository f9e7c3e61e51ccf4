"""The run relay's wire (docs/design.md §8 "The run relay"), one definition for both ends: the SDK
(``takeoff._relay``) and the agent (``takeoff_agent.relay``). Free of gRPC.

Each frame is a 4-byte big-endian length, then one message (protos/takeoff/v1/relay.proto). The socket is
a Linux abstract one: its name starts with a NUL, which jobs are told as ``@`` (as ``ss -x`` prints it).
"""

from __future__ import annotations

import socket
import struct

MAX_FRAME_BYTES = 16 * 1024 * 1024
"""The largest frame either way; a registry message is at most 4 MiB, its frame a few bytes more."""
FRAME_LENGTH = struct.Struct(">I")
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def frame(payload: bytes) -> bytes:
    return FRAME_LENGTH.pack(len(payload)) + payload


def socket_path(address: str) -> str:
    """The name to bind or connect to for ``address`` as jobs are given it (``@name``: abstract)."""
    return "\0" + address[1:] if address.startswith("@") else address


def job_address(name: str) -> str:
    """``name`` as jobs are given it: an abstract name's leading NUL written ``@``."""
    return "@" + name[1:] if name.startswith("\0") else name


def peer_uid(connection: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (``SO_PEERCRED``); None when it cannot
    be read. An abstract socket has no permissions: each end checks who holds the other."""
    try:
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    except OSError:
        return None
    _, uid, _ = _PEER_CREDENTIALS.unpack(credentials)
    return int(uid)
