"""Collect every problem with a request before answering, as the API promises (common.proto, Errors)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from takeoff_server.errors import FieldViolation, InvalidArgument


def field_error(field: str, problem: str, *, reason: str = "ARGUMENT_INVALID") -> InvalidArgument:
    """An ``InvalidArgument`` about one request field, its message naming the field."""
    return InvalidArgument(reason, f"{field}: {problem}", violations=[FieldViolation(field, problem)])


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
