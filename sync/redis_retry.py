"""How a long-lived Redis reader outlives outages: the part every reader shares.

A batch reader (`sync.bus_redis`, XREAD) and a pub/sub listener (`sync.signals_redis`) each own
one connection and never let redis-py retry inside (its reconnection gives up silently after its
retries, redis-py #2417). On a failure they drop the connection, and `Outages.back_off` logs
it (a warning for the first of a run, then debug) and waits with jitter before they connect
again; `Outages.until_closed` runs one Redis call so that closing the bus ends it at once.
"""

import asyncio
import logging
from typing import Any

from redis.backoff import EqualJitterBackoff

RETRY_BASE_S = 0.05
RETRY_CAP_S = 2.0
"""A reader's pause after its n-th failure in a row, in s: a random value between half and all
of min(RETRY_CAP_S, RETRY_BASE_S * 2**n) (redis-py `EqualJitterBackoff`)."""

_MAX_BACKOFF_EXPONENT = 16  # past RETRY_CAP_S the exponent no longer matters


class Outages:
    """The failures in a row of one reader, its backoff, and the bus's `closed` event (watched
    from creation: create it inside a running event loop); `close` stops watching."""

    def __init__(self, closed: asyncio.Event, logger: logging.Logger) -> None:
        self.closed = closed
        self.failures = 0
        self._logger = logger
        self._closing = asyncio.ensure_future(closed.wait())
        self._backoff = EqualJitterBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S)

    async def until_closed(self, step: Any) -> Any:
        """The result of awaiting `step`, or None when the bus closes first (`step` is then
        cancelled). Raises what `step` raises."""
        call = asyncio.ensure_future(step)
        try:
            await asyncio.wait({call, self._closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not call.done():
                call.cancel()
                await asyncio.wait({call})
        return None if call.cancelled() else call.result()

    async def back_off(self, what: str, problem: str) -> None:
        """Count one more failure of `what` (e.g. "reading userstream:events"), log it with
        `problem`, and wait the jittered backoff, or until the bus closes."""
        self.failures += 1
        log = self._logger.warning if self.failures == 1 else self._logger.debug
        log("%s failed (%d in a row), retrying: %s", what, self.failures, problem)
        delay_s = self._backoff.compute(min(self.failures, _MAX_BACKOFF_EXPONENT))
        await asyncio.wait({self._closing}, timeout=delay_s)

    def recovered(self) -> int:
        """The failures before this success (0 when there were none), and reset them."""
        failures, self.failures = self.failures, 0
        return failures

    def close(self) -> None:
        """Stop watching the bus's `closed` event."""
        self._closing.cancel()
