"""The bus: how the relay's batches reach every gateway replica (DESIGN.md "Packages").

A `Bus` carries `Batch`es in position order. Each batch names `prev`, the position of the
last event published before it, so a reader that has seen everything up to position `p` knows
it missed events when a batch arrives with `prev > p` and fills the gap from Postgres (the
source of truth; the bus may lose everything at any time). Publishing is idempotent by
position: a batch whose last position is not past the last one published is refused
(`publish` returns False), which keeps a relay that takes over from doubling events.

Implementations: `sync.bus_memory.InProcessBus` (one process) and `sync.bus_redis.RedisBus`
(Redis Streams, for several replicas). `tests/contract/test_bus.py` runs one suite on both.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import orjson

from core.events import Event


@dataclass(frozen=True, slots=True)
class Batch:
    """Consecutive events in position order, and `prev`: the position published before them.

    Raises ValueError when `events` is empty or not in increasing position order, or when
    `prev` is not below the first position.
    """

    prev: int
    events: tuple[Event, ...]

    def __post_init__(self) -> None:
        if not self.events:
            raise ValueError("a batch needs at least one event")
        positions = [e.seq for e in self.events]
        if positions != sorted(set(positions)) or self.prev >= positions[0]:
            raise ValueError(f"batch positions {positions} (prev {self.prev}) are not increasing")

    @property
    def last(self) -> int:
        """Position of the batch's last event."""
        return self.events[-1].seq

    def encode(self) -> bytes:
        """JSON bytes: `{"prev": int, "events": [Event.to_wire(), ...]}`."""
        return orjson.dumps({"prev": self.prev, "events": [e.to_wire() for e in self.events]})

    @classmethod
    def decode(cls, payload: bytes | str) -> "Batch":
        """Inverse of `encode`. Raises ValueError (or MalformedEvent) for a foreign payload."""
        body = orjson.loads(payload)
        try:
            return cls(int(body["prev"]), tuple(Event.from_row(e) for e in body["events"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not an encoded batch: {type(exc).__name__}: {exc}") from None


class Bus(Protocol):
    """Transport of batches from the one active relay to every gateway replica."""

    async def publish(self, batch: Batch) -> bool:
        """Append a batch; False (nothing appended) if its last position was already published.

        Raises ConnectionError (or the transport's own error) when the transport is down.
        """
        ...

    def read(self, after: int) -> AsyncIterator[Batch]:
        """Every batch whose last position is greater than `after`, in order, forever.

        The first batch may start before `after` (the reader skips what it has) or after a
        gap (`prev > after`: events the bus no longer holds). Outages of the transport are
        retried inside; a reader never sees a batch twice from one iterator.
        """
        ...

    async def last_position(self) -> int:
        """Position of the last event the bus holds (0 when it holds none)."""
        ...

    async def ping(self) -> bool:
        """True when the transport answers (readiness)."""
        ...

    async def put_status(self, replica: str, report: bytes, ttl_s: float) -> None:
        """Publish one gateway replica's status report (JSON bytes), kept `ttl_s` seconds
        unless replaced. Raises like `publish` when the transport is down."""
        ...

    async def statuses(self) -> dict[str, bytes]:
        """The unexpired report of every replica, by replica id (`/admin/status`)."""
        ...

    async def close(self) -> None:
        """Release connections; iterators from `read` end."""
        ...
