"""Per-client limits: token buckets keyed by client host, and per-address slot counts."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBuckets:
    """``rate`` tokens per second, at most ``burst`` saved up, one bucket per key.

    :meth:`take` returns 0.0 when the request may go ahead, else the seconds
    until a token is there (for ``Retry-After``). At most ``max_keys`` buckets
    are remembered; when full, the ones that have refilled are dropped first
    (a full bucket is the same as no bucket).
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            if key not in self._buckets and len(self._buckets) >= self.max_keys:
                self._evict(now)
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _evict(self, now: float) -> None:
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) >= self.max_keys:
            self._buckets.pop(next(iter(self._buckets)))

    @staticmethod
    def retry_after(wait: float) -> str:
        return str(max(1, math.ceil(wait)))


class AddressCounts:
    """How many of something (sockets, event streams) each client address holds, capped.

    :meth:`acquire` takes a slot for ``key`` unless it already holds ``cap``;
    :meth:`release` gives one back. Only addresses holding a slot are kept.
    """

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError("a per-address cap is at least 1")
        self.cap = cap
        self._counts: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        n = self._counts.get(key, 0)
        if n >= self.cap:
            return False
        self._counts[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self._counts.get(key, 0) - 1
        if n > 0:
            self._counts[key] = n
        else:
            self._counts.pop(key, None)

    def held(self, key: str) -> int:
        return self._counts.get(key, 0)
