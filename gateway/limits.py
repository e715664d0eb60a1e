"""Per-user limits of one gateway process, answered with 429: the cap on open streams
(`ConnectionLimiter`) and the rate of ephemeral signals (`TokenBuckets`, PROTOCOL.md §5).

Both count in this process only: behind a load balancer spreading a user's requests over N
replicas, a user may reach N times the limit.
"""

import math
import time
from collections.abc import Callable


class ConnectionLimiter:
    """Counts open streams per user; `acquire` refuses past `limit` (> 0, else ValueError)."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"limit must be > 0, got {limit}")
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, user_id: str) -> bool:
        """Count one more stream of `user_id`; False (nothing counted) when at the limit."""
        count = self._open.get(user_id, 0)
        if count >= self.limit:
            return False
        self._open[user_id] = count + 1
        return True

    def release(self, user_id: str) -> None:
        """One stream of `user_id` ended."""
        count = self._open.get(user_id, 0) - 1
        if count > 0:
            self._open[user_id] = count
        else:
            self._open.pop(user_id, None)

    def open_streams(self, user_id: str) -> int:
        """Streams of `user_id` currently counted."""
        return self._open.get(user_id, 0)


class TokenBuckets:
    """One token bucket per key (a user id): each holds at most `burst` tokens (>= 1) and
    gains `rate_per_s` tokens a second (> 0); a request takes one. ValueError for bounds out of
    range. `clock` gives monotonic seconds. A key seen for the first time starts full.

    A bucket that has filled up again is the same as none: `prune` forgets those, so memory
    follows the users who sent recently, not every user ever seen.
    """

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        """Key -> (tokens at `stamp`, stamp)."""

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Take one token of `key`'s bucket: 0.0 when taken, else the seconds until one will
        be there (> 0; nothing taken)."""
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate_per_s

    def prune(self) -> None:
        """Forget the buckets that are full again."""
        now = self._clock()
        for key in [k for k in self._buckets if self._tokens(k, now) >= self.burst]:
            del self._buckets[key]

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.burst)
        tokens, stamp = entry
        return min(float(self.burst), tokens + (now - stamp) * self.rate_per_s)


def retry_after_s(wait_s: float) -> int:
    """`Retry-After` for a wait of `wait_s` seconds: whole seconds, at least 1
    (RFC 9110 §10.2.3 delay-seconds)."""
    return max(1, math.ceil(wait_s))
