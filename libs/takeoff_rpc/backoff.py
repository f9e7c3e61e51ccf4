"""When and how often a failed call is sent again: one set of transient codes, one backoff, one loop.

Retry at one layer only, the outermost caller that knows how long it may wait (the SDK, the agent): a
service answering its own caller does not retry a dependency but answers ``DEPENDENCY_UNAVAILABLE`` at
once, or every layer's retries would multiply.

Free of gRPC (codes are named by their strings), so that a launched job reaching the registry through its
agent's relay (docs/design.md §8 "The run relay") retries the same way without importing it;
:mod:`takeoff_rpc.retries` applies it to gRPC calls.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
E = TypeVar("E", bound=Exception)

TRANSIENT_CODE_NAMES: frozenset[str] = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
"""The codes after which the same call may succeed later, unchanged. Only these are retried.

- ``UNAVAILABLE``: the service is down, restarting, draining or unreachable; gRPC documents it as the
  transient condition to retry with backoff.
- ``DEADLINE_EXCEEDED``: the peer was too slow or away for this attempt's timeout.

Either can happen after the server acted (the reply was lost), so a call is retried only if it is safe to
repeat: a read, or a change carrying a ``request_id`` that makes a repeat return the first result.

Not retried:

- ``RESOURCE_EXHAUSTED``: Takeoff uses it for size and quota limits (and gRPC for a message over its
  limit); the same request fails the same way.
- ``ABORTED``: a lost race (a newer session of the same agent); the caller must start over from a fresh
  read, not repeat the call.
- ``INTERNAL``, ``UNKNOWN``: a server bug. Repeating it hammers the bug and, for a change that is not
  idempotent, may repeat a side effect that did happen; the error is shown instead.
"""


class RetryPolicy:
    """Exponential backoff with full jitter, until ``max_attempts`` calls or ``deadline`` seconds.

    The delay before retry ``n`` (1 for the first) is drawn uniformly between 0 and
    ``min(max_delay, initial_delay * multiplier ** (n - 1))``: full jitter spreads the retries of many
    clients that failed together (a service restart) instead of synchronising them. ``deadline`` counts
    from the first attempt and bounds when a retry may start (a wait never crosses it, so the last attempt
    starts at the deadline); each attempt's own timeout is the caller's. Give at least one of the two.

    A plain class, not a dataclass: a launched job retries with it, and importing dataclasses (with the
    inspect module it loads) would cost every job about 20 ms of CPU at start-up.
    """

    __slots__ = ("deadline", "initial_delay", "max_attempts", "max_delay", "multiplier")

    def __init__(
        self,
        *,
        initial_delay: float = 0.1,
        multiplier: float = 2.0,
        max_delay: float = 5.0,
        max_attempts: int | None = None,
        deadline: float | None = None,
    ) -> None:
        if max_attempts is None and deadline is None:
            raise ValueError("a retry policy needs max_attempts or a deadline, or it never gives up")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        if not 0 < initial_delay <= max_delay or multiplier < 1:
            raise ValueError("need 0 < initial_delay <= max_delay and multiplier >= 1")
        self.initial_delay = initial_delay
        self.multiplier = multiplier
        self.max_delay = max_delay
        self.max_attempts = max_attempts
        self.deadline = deadline

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"RetryPolicy({settings})"

    def backoff_ceiling(self, retry: int) -> float:
        """The longest wait before retry number ``retry`` (1 for the first)."""
        try:
            growth = self.multiplier ** (retry - 1)
        except OverflowError:
            return self.max_delay
        return min(self.max_delay, self.initial_delay * growth)

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """A wait before retry number ``retry``: full jitter below :meth:`backoff_ceiling`."""
        return (rng or jitter_rng).uniform(0, self.backoff_ceiling(retry))

    def next_delay(self, code: str, failed_attempts: int, elapsed: float) -> float | None:
        """How long to wait before trying again after a failure with status ``code`` (its name,
        ``UNAVAILABLE``); None to give up and raise it."""
        if code not in TRANSIENT_CODE_NAMES:
            return None
        if self.max_attempts is not None and failed_attempts >= self.max_attempts:
            return None
        if self.deadline is None:
            return self.delay(failed_attempts)
        left = self.deadline - elapsed
        return None if left <= 0 else min(self.delay(failed_attempts), left)


jitter_rng = random.Random()
"""The SDK's and the services' jitter, drawn apart from ``random``'s generator, so that a job's
``random.seed`` does not make it the same in every job; reseeded in a fork (a warm interpreter's job, §7),
as ``random``'s is, so that no two jobs draw alike."""
os.register_at_fork(after_in_child=jitter_rng.seed)


def retry_transient(
    attempt: Callable[[], T],
    policy: RetryPolicy,
    failure: type[E],
    code_of: Callable[[E], str],
    on_retry: Callable[[E, int, float], None] | None = None,
) -> T:
    """``attempt()``, again after each ``failure`` whose code (``code_of``) is transient, as ``policy``
    allows; raises the last one. ``on_retry`` is told of each retry: the error, how many attempts failed so
    far, and the wait before the next."""
    started, failed = time.monotonic(), 0
    while True:
        try:
            return attempt()
        except failure as error:
            failed += 1
            delay = policy.next_delay(code_of(error), failed, time.monotonic() - started)
            if delay is None:
                raise
            if on_retry is not None:
                on_retry(error, failed, delay)
        time.sleep(delay)
