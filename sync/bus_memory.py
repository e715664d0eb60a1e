"""The in-process bus: batches held in memory, for one-process mode (DESIGN.md "Decisions").

The last `max_batches` batches stay in a deque. Every publish sets, then replaces, one
`asyncio.Event`, so each waiting reader wakes once per publish and nobody polls. Each reader
keeps the global index of its next batch (batches ever published minus those trimmed sit at
`_trimmed + i`), so it sees every batch once, in order, however many readers run.

Modelled on centrifuge's `broker_memory.go` (history kept in memory, trimmed to a size).
Departure: centrifuge pushes each publication into the node's handler; here each reader pulls
from its own position, so a reader that falls behind the window continues from the oldest held
batch, whose `prev` then shows what it missed (sync/bus.py).
"""

import asyncio
import bisect
import time
from collections import deque
from collections.abc import AsyncIterator

from sync.bus import Batch


def _last(batch: Batch) -> int:
    return batch.last


class InProcessBus:
    """A `sync.bus.Bus` inside one process: keeps the last `max_batches` batches (>= 1).

    Raises ValueError for max_batches < 1.
    """

    def __init__(self, max_batches: int = 10_000) -> None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, got {max_batches}")
        self._batches: deque[Batch] = deque(maxlen=max_batches)
        self._trimmed = 0  # batches dropped from the left: the global index of _batches[0]
        self._last = 0
        self._published = asyncio.Event()
        self._closed = False
        self._statuses: dict[str, tuple[bytes, float]] = {}

    async def publish(self, batch: Batch) -> bool:
        """Append `batch` and wake every reader; False (nothing appended) when its last
        position is not past the last one published. Raises ConnectionError after close()."""
        if self._closed:
            raise ConnectionError("the in-process bus is closed")
        if batch.last <= self._last:
            return False
        if len(self._batches) == self._batches.maxlen:
            self._trimmed += 1
        self._batches.append(batch)
        self._last = batch.last
        self._wake_readers()
        return True

    async def read(self, after: int) -> AsyncIterator[Batch]:
        """Every held batch whose last position is greater than `after`, in order, then each
        batch as it is published, until close(). A reader whose next batch was trimmed away
        goes on from the oldest held one (its `prev` shows the gap)."""
        index = self._trimmed + bisect.bisect_right(self._batches, after, key=_last)
        while not self._closed:
            index = max(index, self._trimmed)
            if index < self._trimmed + len(self._batches):
                batch = self._batches[index - self._trimmed]
                index += 1
                yield batch
            else:
                await self._published.wait()

    async def last_position(self) -> int:
        """Position of the last event published (0 before the first publish)."""
        return self._last

    async def ping(self) -> bool:
        """True until close()."""
        return not self._closed

    async def put_status(self, replica: str, report: bytes, ttl_s: float) -> None:
        """Keep `report` for `ttl_s` seconds (monotonic clock). Raises ConnectionError after
        close()."""
        if self._closed:
            raise ConnectionError("the in-process bus is closed")
        self._statuses[replica] = (report, time.monotonic() + ttl_s)

    async def statuses(self) -> dict[str, bytes]:
        """The reports not yet expired."""
        now = time.monotonic()
        return {k: report for k, (report, until) in self._statuses.items() if until > now}

    async def close(self) -> None:
        """End every reader (each returns at its next step); publish then raises. Idempotent."""
        self._closed = True
        self._wake_readers()

    def _wake_readers(self) -> None:
        woken, self._published = self._published, asyncio.Event()
        woken.set()
