"""Server interceptors: domain errors -> rich gRPC status, access control (API keys and each method's rule),
undecodable requests -> INVALID_ARGUMENT.

Each wraps every method handler once, at registration time, so the per-call cost is one async context
manager around the servicer method.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from typing import Any, TypeAlias, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from takeoff_server import access, errors
from takeoff_server.call_context import method_var, request_id_var
from takeoff_server.db_errors import DATABASE_OUTAGES
from takeoff_server.validation import clip_utf8

T = TypeVar("T")

logger = logging.getLogger(__name__)

REQUEST_ID_METADATA_KEY = "x-request-id"
_REQUEST_ID_PREFIX = uuid.uuid4().hex[:16]
_REQUEST_NUMBERS = itertools.count()

_STATUS_BY_ERROR: tuple[tuple[type[errors.TakeoffError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
)

# grpc's classes are generic only in their type stubs, hence the quoted aliases.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
CallGuard = Callable[[str, Context], AbstractAsyncContextManager[None]]


def status_code_for(error: errors.TakeoffError) -> grpc.StatusCode:
    for error_type, code in _STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.UNKNOWN


# A status travels in trailers, which gRPC clients cap at 8 KiB by default (beyond that the client sees
# RESOURCE_EXHAUSTED "Stream removed" instead of the error); the details go base64-encoded and repeat the
# message. These bounds keep the worst case (every text at its bound, percent-encoded) near half of that.
MAX_STATUS_MESSAGE_BYTES = 400
MAX_VIOLATIONS = 5
MAX_FIELD_BYTES = 80
MAX_DESCRIPTION_BYTES = 160
MAX_METADATA_ENTRIES = 4
MAX_METADATA_VALUE_BYTES = 256  # a resource name fits whole: metadata is read by programs


def _clip(text: str, limit: int) -> str:
    # A request's own values, such as a 5,000-character name, are quoted back in statuses.
    return clip_utf8(text, limit, marker="…")


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    *,
    metadata: Mapping[str, str] | None = None,
    violations: tuple[errors.FieldViolation, ...] = (),
) -> grpc.Status:
    """A gRPC status whose details carry ``ErrorInfo`` and, when there are violations, ``BadRequest``;
    texts are clipped so that the status always fits in a client's default trailer size."""
    message = _clip(message, MAX_STATUS_MESSAGE_BYTES)
    status = status_pb2.Status(code=code.value[0], message=message)
    kept_metadata = dict(list((metadata or {}).items())[:MAX_METADATA_ENTRIES])
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(
            reason=reason,
            domain=errors.ERROR_DOMAIN,
            metadata={
                _clip(key, MAX_METADATA_VALUE_BYTES): _clip(value, MAX_METADATA_VALUE_BYTES)
                for key, value in kept_metadata.items()
            },
        )
    )
    if violations:
        status.details.add().Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=_clip(v.field, MAX_FIELD_BYTES),
                        description=_clip(v.description, MAX_DESCRIPTION_BYTES),
                    )
                    for v in violations[:MAX_VIOLATIONS]
                ]
            )
        )
    return rpc_status.to_status(status)


async def _abort(context: Context, status: grpc.Status) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)


def _metadata(context: Context) -> dict[str, str]:
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


async def call_unary(behavior: Callable[..., Any], request: Any, context: Context) -> Any:
    """A wrapped handler's call of the behavior it wraps, whether that is a coroutine function or not."""
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result


def responses(behavior: Callable[..., Any], request: Any, context: Context) -> AsyncIterable[Any]:
    """The responses of a response-streaming behavior, for a wrapped handler to pass on. The async
    iterable it returns (a servicer's async generator, or the next wrapper's) is passed as it is: each
    wrapper then adds one hop to every message, not two."""
    result = behavior(request, context)
    if hasattr(result, "__aiter__"):
        return cast(AsyncIterable[Any], result)
    return _adapted_responses(result)


async def _adapted_responses(result: Any) -> AsyncIterator[Any]:
    if inspect.isawaitable(result):
        await result  # a handler that writes with context.write() and returns nothing
    elif result is not None:
        for response in result:
            yield response


def handler_parts(handler: Handler, method: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """A handler's behavior (whichever of the four call kinds it has) and its (de)serializers, for wrapping
    it in a handler of the same kind."""
    behavior: Callable[..., Any] | None = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None, f"{method} has a handler with no behavior"
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    return behavior, serializers


def guard_handler(handler: Handler, method: str, guard: CallGuard) -> Handler:
    """Return ``handler`` with every call of it run inside ``guard(method, context)``."""
    behavior, serializers = handler_parts(handler, method)
    if handler.response_streaming:

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            async with guard(method, context):
                async for response in responses(behavior, request, context):
                    yield response

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming, **serializers)
        return grpc.unary_stream_rpc_method_handler(streaming, **serializers)

    async def unary(request: Any, context: Context) -> Any:
        async with guard(method, context):
            return await call_unary(behavior, request, context)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **serializers)
    return grpc.unary_unary_rpc_method_handler(unary, **serializers)


class UndecodableRequest:
    """Stands in for request bytes that do not decode as the method's request message, so that the call
    is refused with INVALID_ARGUMENT: grpc itself answers a deserializer's exception with UNKNOWN."""

    __slots__ = ()


_UNDECODABLE = UndecodableRequest()


def _undecodable(method: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        "REQUEST_INVALID",
        f"the request does not decode as the request message of {method}: it is malformed, or nests "
        "deeper than protobuf's recursion limit (100 levels)",
        metadata={"method": method},
    )


async def _decoded_stream(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if request is _UNDECODABLE:
            raise _undecodable(method)
        yield request


def decoding_handler(handler: Handler, method: str) -> Handler:
    """Return ``handler`` with undecodable requests refused as ``InvalidArgument`` (reason
    ``REQUEST_INVALID``) where the servicer would receive them: before a unary call, or while it reads a
    request stream. Run it inside ``error_guard``, which turns the error into a status."""
    decode = handler.request_deserializer
    if decode is None:  # the method takes raw bytes
        return handler

    def tolerant_decode(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError:
            return _UNDECODABLE

    behavior: Callable[..., Any] | None = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None, f"{method} has a handler with no behavior"

    def checked(request: Any, context: Context) -> Any:
        if handler.request_streaming:
            return behavior(_decoded_stream(request, method), context)
        if request is _UNDECODABLE:
            raise _undecodable(method)
        return behavior(request, context)

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        checked, request_deserializer=tolerant_decode, response_serializer=handler.response_serializer
    )


class FinishedCalls:
    """Runs each unary call's servicer to its end though its caller cancels the call (gives up, or its
    deadline passes), and answers the caller's cancellation at once. A cancellation that reached a
    database transaction part-way could keep its connection (SQLAlchemy counts the connection lost, and a
    second cancellation interrupts its close) and with it, on SQLite, the write lock: every later write
    then failed. So a call is done whole, as a retry of it expects, and the server's stop waits for those
    still going. Streaming calls stay cancellable: a stream lasts as long as its caller wants it, and
    finishing one whose requests were cut off would write half of them (docs/design.md §9 "Databases")."""

    def __init__(self) -> None:
        self._going: set[asyncio.Task[Any]] = set()
        """Servicers of calls their callers cancelled, still running."""

    def handler(self, handler: Handler, method: str) -> Handler:
        """Innermost: only the servicer itself runs on."""
        if handler.request_streaming or handler.response_streaming:
            return handler
        behavior, serializers = handler_parts(handler, method)

        def settled(call: asyncio.Task[Any]) -> None:
            self._going.discard(call)
            error = None if call.cancelled() else call.exception()
            # Logged as the error guard would have, had the caller still been waiting.
            if isinstance(error, DATABASE_OUTAGES):
                # The driver's own error only: SQLAlchemy's message would quote the statement's parameters.
                cause = getattr(error, "orig", None) or error
                logger.warning("%s: the database failed after its caller cancelled it: %r", method, cause)
            elif error is not None and not isinstance(error, errors.TakeoffError | grpc.aio.AbortError):
                logger.error("%s failed after its caller cancelled it", method, exc_info=error)

        async def finished(request: Any, context: Context) -> Any:
            call = asyncio.ensure_future(call_unary(behavior, request, context))
            try:
                return await asyncio.shield(call)
            except asyncio.CancelledError:
                self._going.add(call)
                call.add_done_callback(settled)
                raise

        return grpc.unary_unary_rpc_method_handler(finished, **serializers)

    async def settle(self, patience: float) -> None:
        """Wait up to ``patience`` seconds for the calls cancelled while their servicer ran."""
        if self._going:
            _, going = await asyncio.wait(set(self._going), timeout=patience)
            if going:
                logger.warning("%d cancelled calls still running at shutdown", len(going))


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handler of every method with ``wrap(handler, method)``."""

    def __init__(self, wrap: Callable[[Handler, str], Handler]) -> None:
        self._wrap = wrap
        # grpc asks interceptors for a handler on every call; wrapping once per method keeps that cheap.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler, method))
            self._wrapped[method] = cached
        return cached[1]


@contextmanager
def _set(variable: contextvars.ContextVar[T], value: T) -> Iterator[None]:
    """``variable`` holds ``value`` inside the block. A server stream that its client cancelled is closed
    from another context, where the value cannot be reset; the call's own context ends with it anyway."""
    token = variable.set(value)
    try:
        yield
    finally:
        with suppress(ValueError):
            variable.reset(token)


def _new_request_id() -> str:
    """32 hex digits, unique across processes (a random prefix per process, then a count): what an operator
    finds a call by, not a secret, so it need not cost a draw from the OS's random source per call."""
    return f"{_REQUEST_ID_PREFIX}{next(_REQUEST_NUMBERS) & (2**64 - 1):016x}"


@asynccontextmanager
async def error_guard(method: str, context: Context) -> AsyncIterator[None]:
    """Maps domain errors to rich statuses; unexpected exceptions become INTERNAL with no traceback.

    Each call gets a request id (the caller's ``x-request-id`` or a new one); INTERNAL errors quote it
    and the server log carries it with the traceback, so an operator can find one from the other.
    """
    request_id = _metadata(context).get(REQUEST_ID_METADATA_KEY) or _new_request_id()
    try:
        with _set(request_id_var, request_id), _set(method_var, method):
            yield
    except grpc.aio.AbortError:
        raise
    except errors.TakeoffError as error:
        await _abort(
            context,
            rich_status(
                status_code_for(error),
                error.message,
                error.reason,
                metadata=error.metadata,
                violations=error.violations,
            ),
        )
    except DATABASE_OUTAGES as error:
        # The database is a dependency like any other: briefly away (restarted, full, locked past the
        # busy timeout), the call is worth trying again, and clients do so on UNAVAILABLE.
        # The driver's own error only: SQLAlchemy's message would quote the statement's parameters.
        cause = getattr(error, "orig", None) or error
        logger.warning("%s: the database failed (request id %s): %r", method, request_id, cause)
        await _abort(
            context,
            rich_status(
                grpc.StatusCode.UNAVAILABLE,
                "the service's database is unavailable; try again",
                "DEPENDENCY_UNAVAILABLE",
                metadata={"dependency": "database", "request_id": request_id},
            ),
        )
    except NotImplementedError:
        await _abort(
            context,
            rich_status(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{method} is not implemented by this server yet",
                "NOT_IMPLEMENTED",
                metadata={"method": method},
            ),
        )
    except Exception:
        logger.exception("unexpected error in %s (request id %s)", method, request_id)
        await _abort(
            context,
            rich_status(
                grpc.StatusCode.INTERNAL,
                f"internal error; the server log has the details under request id {request_id}",
                "INTERNAL",
                metadata={"request_id": request_id},
            ),
        )


PUBLIC_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)
"""Methods any caller may use without a key: load balancers and grpcurl must reach them."""

AUTHORIZATION_METADATA_KEY = "authorization"

STREAM_RECHECK_SECONDS = 2.0
"""How often an open stream's key is verified again. With the verifier's cache (2 s) a revoked key's
streams end within 4 s (docs/design.md §13 promises 5)."""


def _presented_secret(metadata: Mapping[str, str], method: str) -> str:
    header = metadata.get(AUTHORIZATION_METADATA_KEY)
    if not header:
        raise errors.Unauthenticated(
            "KEY_MISSING",
            f"{method} needs an API key: send the metadata `authorization: Bearer <key>` (the CLI and SDK "
            "take --key, TAKEOFF_API_KEY, TAKEOFF_TOKEN, or the admin key `takeoff up` made)",
            metadata={"method": method},
        )
    scheme, _, secret = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise errors.Unauthenticated(
            "KEY_MALFORMED",
            "the authorization metadata must be `Bearer <key>`",
            metadata={"method": method},
        )
    return secret.strip()


class AccessControl:
    """Authenticates every call but the public ones and checks the method's rule on each request message.

    Keys are verified by ``verifier`` (cached); the rules come from each service's ``access.py``, keyed by
    full method name. A method without a rule is refused: access fails closed.
    """

    def __init__(
        self,
        verifier: access.KeyVerifier,
        rules: Mapping[str, access.Rule],
        *,
        recheck_seconds: float = STREAM_RECHECK_SECONDS,
    ) -> None:
        self.verifier = verifier
        self.rules = dict(rules)
        self.recheck_seconds = recheck_seconds

    async def authenticate(self, method: str, context: Context) -> tuple[access.Principal, str]:
        secret = _presented_secret(_metadata(context), method)
        caller = await self.verifier.verify(secret)
        if caller is None:
            raise errors.Unauthenticated(
                "KEY_INVALID",
                "the API key is not valid: it is unknown or was revoked",
                metadata={"method": method},
            )
        return caller, secret

    def rule(self, method: str) -> access.Rule:
        rule = self.rules.get(method)
        if rule is None:
            raise errors.PermissionDenied(
                "NO_ACCESS_RULE",
                f"{method} states no access rule, so nobody may call it",
                metadata={"method": method},
            )
        return rule

    @asynccontextmanager
    async def watching(self, secret: str) -> AsyncIterator[None]:
        """Ends the current call with UNAUTHENTICATED ``KEY_REVOKED`` once its key stops verifying; a
        verifier that cannot tell (registry unreachable) leaves the call alone."""
        task = asyncio.current_task()
        assert task is not None
        revoked = asyncio.Event()

        async def recheck() -> None:
            while True:
                await asyncio.sleep(self.recheck_seconds)
                try:
                    live = await self.verifier.verify(secret)
                except errors.Unavailable:
                    continue
                if live is None:
                    revoked.set()
                    task.cancel()
                    return

        watcher = asyncio.create_task(recheck())
        try:
            yield
        except asyncio.CancelledError:
            if not revoked.is_set():
                raise
            task.uncancel()
            raise errors.Unauthenticated(
                "KEY_REVOKED", "the API key was revoked; this stream is closed"
            ) from None
        finally:
            watcher.cancel()


async def _authorized_stream(
    requests: AsyncIterator[Any], rule: access.Rule, caller: access.Principal
) -> AsyncIterator[Any]:
    async for request in requests:
        if request is not _UNDECODABLE:  # the decoding layer inside refuses it
            rule.enforce(caller, request)
        yield request


def access_handler(handler: Handler, method: str, control: AccessControl) -> Handler:
    """Return ``handler`` with its calls authenticated, authorized message by message, and (for streams)
    ended when their key is revoked. Run it inside ``error_guard`` and outside ``decoding_handler``."""
    if method.startswith(PUBLIC_METHOD_PREFIXES):
        return handler
    behavior, serializers = handler_parts(handler, method)

    async def admitted(request: Any, context: Context) -> tuple[Any, access.Principal, str]:
        rule = control.rule(method)
        caller, secret = await control.authenticate(method, context)
        if handler.request_streaming:
            return _authorized_stream(request, rule, caller), caller, secret
        if request is not _UNDECODABLE:
            rule.enforce(caller, request)
        return request, caller, secret

    if handler.response_streaming:

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            request, caller, secret = await admitted(request, context)
            with _set(access.caller_var, caller):
                async with control.watching(secret):
                    async for response in responses(behavior, request, context):
                        yield response

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming, **serializers)
        return grpc.unary_stream_rpc_method_handler(streaming, **serializers)

    async def unary(request: Any, context: Context) -> Any:
        request, caller, secret = await admitted(request, context)
        with _set(access.caller_var, caller):
            if not handler.request_streaming:
                return await call_unary(behavior, request, context)
            async with control.watching(secret):
                return await call_unary(behavior, request, context)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **serializers)
    return grpc.unary_unary_rpc_method_handler(unary, **serializers)
