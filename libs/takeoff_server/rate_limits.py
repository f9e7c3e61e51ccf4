"""Per-key rate limits: token buckets that refuse with RESOURCE_EXHAUSTED ``RATE_LIMITED``.

Limits are per server process (each replica counts for itself): one runaway client is held to its rate
on every replica it reaches, which is what keeps it from starving the others.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from takeoff_server import errors


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_second`` sustained, with bursts of up to ``burst``."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if self.per_second <= 0 or self.burst < 1:
            raise ValueError("a rate needs per_second > 0 and burst >= 1")


class RateLimiter:
    """One token bucket per key (an API key, a run), created on first use and forgotten when full."""

    def __init__(self, rate: Rate, what: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._what = what
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        """key -> (tokens left, when counted)."""

    def take(self, key: str, amount: float = 1.0) -> None:
        """Spend ``amount`` from ``key``'s bucket, or raise ``ResourceExhausted`` (nothing spent) saying
        when to retry. A request larger than the burst is allowed once the bucket is full."""
        now = self._clock()
        tokens, then = self._buckets.get(key, (self.rate.burst, now))
        tokens = min(self.rate.burst, tokens + (now - then) * self.rate.per_second)
        if tokens < min(amount, self.rate.burst):
            wait = (min(amount, self.rate.burst) - tokens) / self.rate.per_second
            raise errors.ResourceExhausted(
                "RATE_LIMITED",
                f"too many {self._what}: at most {self.rate.per_second:g} per second "
                f"(bursts of {self.rate.burst:g}); retry in {wait:.2f}s",
                metadata={"retry_after_seconds": f"{math.ceil(wait * 100) / 100:g}", "limit": self._what},
            )
        self._buckets[key] = (tokens - amount, now)
        if len(self._buckets) > 100_000:
            self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        refill = self.rate.burst / self.rate.per_second
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill}
