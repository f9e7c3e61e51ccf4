"""Collect every problem with a request before answering, as the API promises (common.proto, Errors)."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from google.protobuf import duration_pb2
from google.protobuf.descriptor import EnumDescriptor

from takeoff_server.errors import FieldViolation, InvalidArgument
from takeoff_server.protovalues import dict_to_struct

E = TypeVar("E", bound=enum.Enum)


class ProtoEnum(Protocol):
    """A generated proto enum, such as ``common_pb2.ItemState``."""

    @property
    def DESCRIPTOR(self) -> EnumDescriptor: ...


def field_error(field: str, problem: str, *, reason: str = "ARGUMENT_INVALID") -> InvalidArgument:
    """An ``InvalidArgument`` about one request field, its message naming the field."""
    return InvalidArgument(reason, f"{field}: {problem}", violations=[FieldViolation(field, problem)])


NUL = "\x00"


def text_problem(value: str, *, max_chars: int | None = None, max_bytes: int | None = None) -> str | None:
    """Why every store cannot keep ``value`` as text, or None: a NUL character (U+0000), which PostgreSQL's
    text types cannot hold (SQLite can; refusing it on both keeps one behaviour), or more than
    ``max_chars`` characters / ``max_bytes`` bytes of UTF-8."""
    if (first_nul := value.find(NUL)) >= 0:
        return f"must not contain NUL characters (U+0000; the first is at {first_nul})"
    if max_chars is not None and len(value) > max_chars:
        return f"must be at most {max_chars} characters (got {len(value)})"
    # Four bytes per character at most: only text that could be too long is encoded.
    if max_bytes is not None and len(value) * 4 > max_bytes and len(value.encode()) > max_bytes:
        return f"must be at most {max_bytes} bytes of UTF-8 (got {len(value.encode())})"
    return None


def clip_utf8(text: str, max_bytes: int, *, marker: str = "", keep_end: bool = False) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8 on a character boundary, its start kept (or its end),
    with ``marker`` where it was cut."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    room = max(max_bytes - len(marker.encode()), 0)
    # A cut inside a character leaves a partial one at the edge: decoding drops it.
    if keep_end:
        return marker + encoded[len(encoded) - room :].decode(errors="ignore")
    return encoded[:room].decode(errors="ignore") + marker


def check_text(value: str, *, field: str, max_chars: int | None = None, max_bytes: int | None = None) -> str:
    """Return ``value`` if every store can keep it as text (see :func:`text_problem`), else raise
    INVALID_ARGUMENT ``ARGUMENT_INVALID`` on ``field``."""
    if problem := text_problem(value, max_chars=max_chars, max_bytes=max_bytes):
        raise field_error(field, problem)
    return value


class Problems:
    """Gathers problems, then raises one ``InvalidArgument``: the first problem's reason and message,
    every problem as a field violation."""

    def __init__(self) -> None:
        self._reasons: list[str] = []
        self._messages: list[str] = []
        self._violations: list[FieldViolation] = []

    def add(self, reason: str, field: str, description: str) -> None:
        self._reasons.append(reason)
        self._messages.append(f"{field}: {description}")
        self._violations.append(FieldViolation(field, description))

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Record an ``InvalidArgument`` raised in the block instead of letting it through."""
        try:
            yield
        except InvalidArgument as error:
            self._reasons.append(error.reason)
            self._messages.append(error.message)
            self._violations.extend(error.violations)

    def __bool__(self) -> bool:
        return bool(self._reasons)

    def raise_if_any(self) -> None:
        if not self._reasons:
            return
        message = self._messages[0]
        if len(self._violations) > 1:
            message += f" (and {len(self._violations) - 1} more; see the field violations)"
        raise InvalidArgument(self._reasons[0], message, violations=self._violations)


MAX_CONFIG_BYTES = 256 * 1024
"""Default limit for a client's Struct (run config, resource config, summary), as encoded protobuf: a
handful fit in one message far under gRPC's default 4 MiB receive size."""
MAX_CONFIG_DEPTH = 30
"""Default limit on nested objects and lists in a Struct. Each object level costs protobuf three levels of
its recursion limit (100): 30 leaves ten for the messages that carry the Struct (an item's run config in a
LeaseResponse needs three), so what is accepted can always be delivered and decoded."""


def nesting_depth(value: Any, *, give_up_beyond: int) -> int:
    """How deeply JSON objects and lists nest in ``value`` (a scalar is 0, ``{}`` is 1), counted without
    recursion so that hostile input cannot exhaust the stack; counting stops beyond ``give_up_beyond``."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        current, level = pending.pop()
        if isinstance(current, Mapping):
            children: Any = current.values()
        elif isinstance(current, list | tuple):
            children = current
        else:
            continue
        deepest = max(deepest, level)
        if deepest > give_up_beyond:
            break
        pending.extend((child, level + 1) for child in children)
    return deepest


def check_struct(value: Mapping[str, Any], *, field: str, max_bytes: int, max_depth: int) -> None:
    """Refuse (INVALID_ARGUMENT ``ARGUMENT_INVALID`` on ``field``) a Struct's value that nests deeper than
    ``max_depth`` objects and lists or is larger than ``max_bytes`` as an encoded ``google.protobuf.Struct``.
    NaN and infinities pass, as in metrics: the stores keep them (``JsonText``)."""
    if not value:  # most of an Enqueue's configs: one level deep, nothing encoded
        return
    depth = nesting_depth(value, give_up_beyond=max_depth)
    if depth > max_depth:
        raise field_error(field, f"nests deeper than {max_depth} levels of objects and lists")
    size = dict_to_struct(value).ByteSize()
    if size > max_bytes:
        raise field_error(field, f"is {size} bytes encoded; at most {max_bytes} are allowed")


def enum_member(enum_type: type[E], number: int, *, field: str, proto: ProtoEnum) -> E | None:
    """The member of the domain enum ``enum_type`` for a number of the proto enum ``proto``.

    Members are matched by name: the proto value's name without the enum's prefix (``ITEM_STATE_PENDING``
    is ``ItemState.PENDING``). The ``*_UNSPECIFIED`` value (0) is None; a number the proto does not define
    (a newer client's, or a made-up one) or one without a domain member is INVALID_ARGUMENT
    ``ARGUMENT_INVALID`` on ``field``.
    """
    if number == 0:
        return None
    described = proto.DESCRIPTOR.values_by_number.get(number)
    prefix = proto.DESCRIPTOR.values_by_number[0].name.removesuffix("UNSPECIFIED")
    member = enum_type.__members__.get(described.name.removeprefix(prefix)) if described else None
    if member is None:
        allowed = ", ".join(
            f"{described_value.name} ({described_value.number})"
            for described_value in proto.DESCRIPTOR.values
            if described_value.number != 0
            and described_value.name.removeprefix(prefix) in enum_type.__members__
        )
        raise field_error(field, f"{number} is not one of {allowed}")
    return member


_MAX_DURATION_SECONDS = 315_576_000_000
"""The range google.protobuf.Duration may hold (duration.proto): about 10,000 years either way."""


def duration_value(duration: duration_pb2.Duration, *, field: str) -> timedelta:
    """A request's Duration as a timedelta, refused (INVALID_ARGUMENT ``ARGUMENT_INVALID`` on ``field``)
    when it is not a valid Duration or is negative. Each caller bounds it further as its field says."""
    seconds, nanos = duration.seconds, duration.nanos
    if (
        abs(seconds) > _MAX_DURATION_SECONDS
        or abs(nanos) > 999_999_999
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        raise field_error(field, "is not a valid google.protobuf.Duration (see duration.proto)")
    if seconds < 0 or nanos < 0:
        raise field_error(field, "must not be negative")
    return duration.ToTimedelta()
