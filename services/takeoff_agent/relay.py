"""The run relay: jobs on the agent's host make their RunService calls through the agent.

A local-process job would spend most of its CPU importing gRPC (which loads asyncio and ssl) for its few
unary calls to the registry; the agent has gRPC loaded and a registry address at hand, so it listens on a
Unix socket and makes those calls for its jobs (docs/design.md §8 "The run relay"). The socket carries
frames, each a 4-byte big-endian length and one message (``takeoff.v1.relay``): the job writes a
RelayCall, the agent answers its RelayReply, then the next call.

The socket is in Linux's abstract namespace, ``\\0takeoff-relay-{agent_id}``: no file to clean up or to
outlive the agent, no path-length limit, and the same name for a restarted agent (its id is kept), so a
job whose agent restarted finds the new one. Jobs are given it as ``@takeoff-relay-{agent_id}``, as
``ss -x`` prints it (``TAKEOFF_RELAY``, local-process jobs only: containers and other nodes cannot reach
the host's abstract sockets).

The relay also tells the agent what the registry answered its jobs about their runs (:class:`RunEnds`):
an attempt whose job attached and finished its run through the relay needs neither to ask the registry
whether the job attached (GetRun) nor to finish a run that has ended already (FinishRun).

The relay grants nothing: it forwards the job's own ``authorization`` (its run token) and trace context,
never the agent's key, on a channel of its own that carries no key; the registry decides as if the job
had called it. It never logs a call's metadata (tokens) nor its messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from takeoff.v1 import common_pb2, relay_pb2, runs_pb2
from takeoff_agent.clients import RUN_SERVICE
from takeoff_rpc.channels import open_aio_channel
from takeoff_rpc.relay_wire import FRAME_LENGTH, MAX_FRAME_BYTES, frame, job_address, peer_uid

logger = logging.getLogger(__name__)

RELAYED_METHODS = f"/{RUN_SERVICE}/"
FORWARDED_METADATA = frozenset({"authorization", "traceparent", "tracestate"})
"""The only call metadata passed on: the job's credentials and its trace context."""
DEFAULT_TIMEOUT_SECONDS = 30.0
MAX_TIMEOUT_SECONDS = 60.0
"""A call waits for a registry that is restarting (wait_for_ready), but never longer than this."""
FRAME_SECONDS = 5.0
"""How long the rest of a frame may take once its first byte has come, and a reply to be taken: the SDK
writes and reads whole frames at once, so only a stalled or hostile client takes longer. Between calls a
connection may stay idle as long as its run lasts."""
MAX_CONNECTIONS = 1024
"""Open connections at once; beyond, a new one is closed unanswered (each job holds one)."""
WARNING_INTERVAL_SECONDS = 60.0
"""At most one warning about refused frames or peers per interval, however many a client sends."""


RUN_REPLIES: dict[
    str, type[runs_pb2.GetRunResponse | runs_pb2.AttachRunResponse | runs_pb2.FinishRunResponse]
] = {
    f"/{RUN_SERVICE}/AttachRun": runs_pb2.AttachRunResponse,
    f"/{RUN_SERVICE}/GetRun": runs_pb2.GetRunResponse,
    f"/{RUN_SERVICE}/FinishRun": runs_pb2.FinishRunResponse,
}
"""The relayed calls whose reply is read for the run's state (:class:`RunEnds`): the SDK's attach and
finish (and a read). The others pass unread: a reply is parsed only where it may spare the agent a call."""
ENDED_STATES = frozenset(
    {
        common_pb2.RUN_STATE_FINISHED,
        common_pb2.RUN_STATE_FAILED,
        common_pb2.RUN_STATE_CRASHED,
        common_pb2.RUN_STATE_KILLED,
    }
)


@dataclass(frozen=True, slots=True)
class SeenRun:
    """A run as the registry last answered one of its job's relayed calls."""

    state: common_pb2.RunState.ValueType
    has_exit_code: bool
    has_message: bool

    @property
    def ended(self) -> bool:
        """Final: the registry keeps a run's first final state (FinishRun), so this one holds for good."""
        return self.state in ENDED_STATES


class RunEnds:
    """What the relay saw the registry answer about the runs of this agent's attempts, by run name.

    An attempt watches its run from its start to its end (:meth:`watch`, :meth:`forget`); only watched runs
    are recorded, so the record holds at most one entry per attempt the agent holds. The relay records a
    reply before the job reads it: once a job has exited, what it was answered is here. An agent that
    restarted while its job ran, a relay that is off or a job that called the registry directly leave
    nothing, and the attempt asks the registry as it would without the relay.
    """

    def __init__(self) -> None:
        self._runs: dict[str, SeenRun | None] = {}

    def watch(self, run: str) -> None:
        self._runs.setdefault(run, None)

    def forget(self, run: str) -> None:
        self._runs.pop(run, None)

    def saw(self, run: runs_pb2.Run) -> None:
        """The registry answered a relayed call with ``run``; kept when its run is watched and past
        STARTING (a STARTING reply may be stale: the job can attach later on a direct channel). An ended
        state is kept for good, as the registry keeps it: a reply that says otherwise was sent before it
        (delivered late, on another connection)."""
        if run.name not in self._runs or run.state in (
            common_pb2.RUN_STATE_UNSPECIFIED,
            common_pb2.RUN_STATE_STARTING,
        ):
            return
        if (seen := self._runs[run.name]) is not None and seen.ended:
            return
        self._runs[run.name] = SeenRun(run.state, run.HasField("exit_code"), bool(run.message))

    def seen(self, run: str) -> SeenRun | None:
        """The run as its job's relayed calls last saw it past STARTING (attached, or ended); None when they
        saw nothing of the kind."""
        return self._runs.get(run)


def socket_name(agent_id: str) -> str:
    """The abstract socket the relay of the agent ``agent_id`` listens on."""
    return f"\0takeoff-relay-{agent_id}"


def _reply_frame(message: relay_pb2.RelayReply) -> bytes:
    return frame(message.SerializeToString())


class FrameRefused(Exception):
    """A frame the relay cannot take (over the limit, not a RelayCall): answered, then the connection
    closes, since nothing after it can be trusted to start on a frame boundary."""


class RunRelay:
    """Relays RunService calls from the connections on its socket to the registry at ``address``."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None) -> None:
        """``credentials``: the agent's TLS for ``address`` (takeoff_server.peers.channel_credentials)."""
        self.ends = RunEnds()
        """The runs' states the registry answered, for the agent's attempts to read."""
        self._channel = open_aio_channel(address, credentials=credentials)  # no api_key: see the module
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[object]] = set()
        self._quiet_until = 0.0
        self.address: str | None = None
        """Where jobs find the relay once it listens (TAKEOFF_RELAY): :func:`job_address` of its socket."""

    async def listen(self, name: str) -> None:
        """Serve connections on the Unix socket ``name`` (abstract when it starts with NUL); OSError when
        it cannot be bound (EADDRINUSE: another process holds the name)."""
        self._server = await asyncio.start_unix_server(self._serve, path=name)
        self.address = job_address(name)

    async def close(self) -> None:
        """Stop listening, end the open connections (their jobs fall back to direct gRPC), close the
        channel."""
        if self._server is not None:
            self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        await self._channel.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One job's connection: its calls, one at a time, until it closes it. Only processes of the agent's
        own user are served (its local jobs run as it): an abstract socket has no permissions, and the
        relay's channel carries the agent's TLS client certificate, which no other user may borrow."""
        task = asyncio.current_task()
        assert task is not None
        uid = peer_uid(writer.get_extra_info("socket"))
        if uid != os.getuid() or len(self._connections) >= MAX_CONNECTIONS:
            self._warn(
                "run relay: closed a connection from uid %s (%s)",
                uid,
                "not the agent's user" if uid != os.getuid() else f"over {MAX_CONNECTIONS} connections",
            )
            writer.close()
            return
        self._connections.add(task)
        try:
            while (call := await _read_call(reader)) is not None:
                writer.write(_reply_frame(await self.relay(call)))
                async with asyncio.timeout(FRAME_SECONDS):
                    await writer.drain()
        except FrameRefused as refused:
            self._warn("run relay: a job sent %s; closing its connection", refused)
            writer.write(_reply_frame(_refusal(grpc.StatusCode.INVALID_ARGUMENT, str(refused))))
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(FRAME_SECONDS):
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the job went away or stalled mid-frame: its SDK retries on a new connection
        except asyncio.CancelledError:
            # The relay is closing (close() awaits this task). Ended here rather than cancelled: Python
            # 3.11's streams report a cancelled connection task as an error.
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + WARNING_INTERVAL_SECONDS
            logger.warning(message, *args)

    async def relay(self, call: relay_pb2.RelayCall) -> relay_pb2.RelayReply:
        """Make ``call`` to the registry; how it ended."""
        if not call.method.startswith(RELAYED_METHODS):
            return _refusal(grpc.StatusCode.UNIMPLEMENTED, "the run relay carries RunService calls only")
        metadata = tuple(
            (key.lower(), value) for key, value in call.metadata.items() if key.lower() in FORWARDED_METADATA
        )
        if unsendable := sorted(key for key, value in metadata if not _header_value(value)):
            # gRPC would raise rather than send it; the value itself is never repeated (a token).
            return _refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the call's {', '.join(unsendable)} metadata holds characters a header cannot carry",
            )
        given = call.timeout.seconds + call.timeout.nanos / 1e9
        timeout = min(given if given > 0 else DEFAULT_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS)
        # No serializers: the messages pass as bytes.
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(call.method)
        try:
            response = await method(call.request, timeout=timeout, metadata=metadata, wait_for_ready=True)
        except grpc.aio.AioRpcError as error:
            return relay_pb2.RelayReply(
                code=_code(error.code()), message=error.details() or "", status_details=_status_details(error)
            )
        if (reply_type := RUN_REPLIES.get(call.method)) is not None:
            # Before the job has the reply: once it has exited, its attempt finds what it was answered.
            with contextlib.suppress(DecodeError):  # the registry's reply: unreadable only if it is not one
                self.ends.saw(reply_type.FromString(response).run)
        return relay_pb2.RelayReply(code=_code(grpc.StatusCode.OK), response=response)


async def start_relay(
    agent_id: str, registry_address: str, credentials: grpc.ChannelCredentials | None
) -> RunRelay | None:
    """The agent's relay, listening on :func:`socket_name`; None (with a warning) when that cannot be bound
    (EADDRINUSE: another process of this agent id holds it): the agent runs without it, and its jobs call
    the registry directly."""
    relay, name = RunRelay(registry_address, credentials), socket_name(agent_id)
    try:
        await relay.listen(name)
    except OSError as error:
        await relay.close()
        logger.warning(
            "the run relay cannot listen on %s (%s): jobs will call the registry directly",
            job_address(name),
            os.strerror(error.errno) if error.errno else error,
        )
        return None
    return relay


async def _read_call(reader: asyncio.StreamReader) -> relay_pb2.RelayCall | None:
    """The next call on a connection; None once the job has closed it between calls. TimeoutError when the
    rest of a frame takes over :data:`FRAME_SECONDS` once it has begun."""
    first = await reader.read(1)
    if not first:
        return None
    async with asyncio.timeout(FRAME_SECONDS):
        (length,) = FRAME_LENGTH.unpack(first + await reader.readexactly(FRAME_LENGTH.size - 1))
        if length > MAX_FRAME_BYTES:
            raise FrameRefused(f"a frame of {length} bytes, over the relay's limit of {MAX_FRAME_BYTES}")
        body = await reader.readexactly(length)
    try:
        return relay_pb2.RelayCall.FromString(body)
    except DecodeError:
        raise FrameRefused(f"a frame of {length} bytes that is not a RelayCall") from None


def _refusal(code: grpc.StatusCode, message: str) -> relay_pb2.RelayReply:
    return relay_pb2.RelayReply(code=_code(code), message=message)


def _header_value(value: str) -> bool:
    """Whether gRPC can send ``value`` as an ASCII metadata value (printable, no line breaks)."""
    return value.isascii() and value.isprintable()


def _code(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


def _status_details(error: grpc.aio.AioRpcError) -> bytes:
    """The registry's google.rpc.Status (ErrorInfo, field violations), as it sent it; empty without one."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return value
    return b""
