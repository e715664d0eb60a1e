"""The in-process bus: batches held in memory, for one-process mode (DESIGN.md "Decisions").

The last `max_batches` batches stay in a deque. Every publish sets, then replaces, one
`asyncio.Event`, so each waiting reader wakes once per publish and nobody polls. Each reader
keeps the global index of its next batch (batches ever published minus those trimmed sit at
`_trimmed + i`), so it sees every batch once, in order, however many readers run.

Modelled on centrifuge's `broker_memory.go` (history kept in memory, trimmed to a size).
Departure: centrifuge pushes each publication into the node's handler; here each reader pulls
from its own position, so a reader that falls behind the window continues from the oldest held
batch, whose `prev` then shows what it missed (sync/bus.py).

Signals and presence updates (PROTOCOL.md §5) each have a `_Topic`: a message goes straight
into a bounded queue per open iterator; a reader whose queue is full loses it (as Redis drops a
pub/sub client that falls too far behind), so a stalled reader never holds memory. Replica
status reports and presence heartbeats are each an `_Expiring` map, kept by monotonic clock.
"""

import asyncio
import bisect
import time
from collections import deque
from collections.abc import AsyncIterator, Collection
from typing import Generic, TypeVar

from core.signals import Signal
from core.types import ChannelKey
from sync.bus import Batch
from sync.presence import PresenceUpdate

SIGNAL_QUEUE_SIZE = 10_000
"""Messages one `signals()` or `presence()` iterator may have waiting before later ones are
dropped for it."""

T = TypeVar("T")


class _Topic(Generic[T]):
    """Publish-subscribe inside one process: each open `subscribe()` iterator gets every
    message published while it is open, in order, until `close()`."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[T | None]] = set()
        self._closed = False

    def publish(self, message: T) -> None:
        """Queue `message` for every open iterator (dropped for one whose queue holds
        SIGNAL_QUEUE_SIZE already)."""
        for queue in self._queues:
            if queue.qsize() < SIGNAL_QUEUE_SIZE:
                queue.put_nowait(message)

    async def subscribe(self) -> AsyncIterator[T]:
        """Every message published from this iterator's first step on, until `close()`."""
        if self._closed:
            return
        queue: asyncio.Queue[T | None] = asyncio.Queue()
        self._queues.add(queue)
        try:
            while (message := await queue.get()) is not None:
                yield message
        finally:
            self._queues.discard(queue)

    def close(self) -> None:
        """End every open iterator; later ones end at once."""
        self._closed = True
        for queue in self._queues:
            queue.put_nowait(None)  # unbounded queue: the end mark always fits


class _Expiring(Generic[T]):
    """Values by key, each kept `ttl_s` seconds (monotonic clock) unless replaced."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[T, float]] = {}

    def put(self, key: str, value: T, ttl_s: float) -> None:
        """Keep `value` under `key` for `ttl_s` seconds."""
        self._values[key] = (value, time.monotonic() + ttl_s)

    def live(self) -> dict[str, T]:
        """The values not yet expired, by key (expired ones are dropped)."""
        now = time.monotonic()
        self._values = {k: (v, until) for k, (v, until) in self._values.items() if until > now}
        return {k: v for k, (v, _) in self._values.items()}


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
        self._statuses: _Expiring[bytes] = _Expiring()
        self._heartbeats: _Expiring[PresenceUpdate] = _Expiring()
        self._signals: _Topic[Signal] = _Topic()
        self._presence: _Topic[PresenceUpdate] = _Topic()

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

    async def publish_signal(self, signal: Signal) -> None:
        """Queue `signal` for every open `signals()` iterator (dropped for one whose queue
        holds SIGNAL_QUEUE_SIZE already). Raises ConnectionError after close()."""
        self._check_open()
        self._signals.publish(signal)

    def signals(self) -> AsyncIterator[Signal]:
        """Every signal published from this iterator's first step on, in order, until
        close()."""
        return self._signals.subscribe()

    async def publish_presence(self, update: PresenceUpdate) -> None:
        """Queue `update` for every open `presence()` iterator, this process's own included
        (its `PresenceBook` ignores its own). Raises ConnectionError after close()."""
        self._check_open()
        self._presence.publish(update)

    def presence(self) -> AsyncIterator[PresenceUpdate]:
        """Every presence update published from this iterator's first step on, in order,
        until close()."""
        return self._presence.subscribe()

    async def put_presence(self, update: PresenceUpdate, ttl_s: float) -> None:
        """Keep `update` as its replica's heartbeat for `ttl_s` seconds (monotonic clock).
        Raises ConnectionError after close()."""
        self._check_open()
        self._heartbeats.put(update.replica, update, ttl_s)

    async def presences(self) -> dict[str, PresenceUpdate]:
        """The heartbeats not yet expired. Raises ConnectionError after close()."""
        self._check_open()
        return self._heartbeats.live()

    def subscribe(self, topics: Collection[ChannelKey], after: int) -> int:
        """0: every event is read anyway."""
        return 0

    def unsubscribe(self, topics: Collection[ChannelKey]) -> None:
        """Nothing to do: every event is read anyway."""

    def readable(self) -> bool:
        """True: batches are handed over in memory (False only after close())."""
        return not self._closed

    async def ping(self) -> bool:
        """True until close()."""
        return not self._closed

    async def put_status(self, replica: str, report: bytes, ttl_s: float) -> None:
        """Keep `report` for `ttl_s` seconds (monotonic clock). Raises ConnectionError after
        close()."""
        self._check_open()
        self._statuses.put(replica, report, ttl_s)

    async def statuses(self) -> dict[str, bytes]:
        """The reports not yet expired."""
        return self._statuses.live()

    async def close(self) -> None:
        """End every reader (each returns at its next step); publish then raises. Idempotent."""
        self._closed = True
        self._wake_readers()
        self._signals.close()
        self._presence.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionError("the in-process bus is closed")

    def _wake_readers(self) -> None:
        woken, self._published = self._published, asyncio.Event()
        woken.set()
