"""The bus: how the relay's batches reach every gateway replica (DESIGN.md "Packages").

A `Bus` carries `Batch`es in position order. Each batch names `prev`, the position of the
last event published before it, so a reader that has seen everything up to position `p` knows
it missed events when a batch arrives with `prev > p` and fills the gap from Postgres (the
source of truth; the bus may lose everything at any time). Publishing is idempotent by
position: a batch whose last position is not past the last one published is refused
(`publish` returns False), which keeps a relay that takes over from doubling events.

Beside the batches, the bus carries ephemeral signals (PROTOCOL.md §5, `core.signals.Signal`):
`publish_signal` sends one to every `signals()` iterator open on any replica at that moment,
at most once, with no position and no history. A signal published while the transport is
down, or while a replica's subscription is reconnecting, is lost to it: signals are not part
of the guarantees of PROTOCOL.md §4.

Presence (PROTOCOL.md §5, `sync.presence`) takes two paths: `publish_presence` sends a
replica's `PresenceUpdate` to every `presence()` iterator open at that moment, like a signal
(at most once, nothing kept), and `put_presence` keeps each replica's full set for `ttl_s`
seconds, read back with `presences()`, like the replica status reports of `put_status`; an
expired heartbeat is how a dead replica's users go offline.

Implementations: `sync.bus_memory.InProcessBus` (one process) and `sync.bus_redis.RedisBus`
(Redis Streams and pub/sub, for several replicas) carry every event to every reader;
`tests/contract/test_bus.py` runs one suite on both. `sync.bus_channels.ChannelBus` carries to
each replica only the topics it `subscribe`s (interest-based fan-out over sharded pub/sub,
keeping nothing: history is Postgres's).
"""

from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Protocol

import orjson

from core.events import Event
from core.signals import Signal
from core.types import ChannelKey
from sync.presence import PresenceUpdate


@dataclass(frozen=True, slots=True)
class Batch:
    """Consecutive events in position order, and `prev`: the position published before them.

    `upto`, when set, is the position the batch reaches, at or past its last event: a reader
    of some topics only (`sync.bus_channels`) gets the events of those topics in
    `(prev, upto]`, maybe none. Raises ValueError when `events` is empty without `upto`, or
    not in increasing position order, or when `prev` is not below the first position, or
    `upto` below the last or below `prev`.
    """

    prev: int
    events: tuple[Event, ...]
    upto: int | None = None

    def __post_init__(self) -> None:
        positions = [e.seq for e in self.events]
        if not positions:
            if self.upto is None or self.upto < self.prev:
                raise ValueError("a batch needs at least one event or an upto past prev")
            return
        if positions != sorted(set(positions)) or self.prev >= positions[0]:
            raise ValueError(f"batch positions {positions} (prev {self.prev}) are not increasing")
        if self.upto is not None and self.upto < positions[-1]:
            raise ValueError(f"batch upto {self.upto} is below its last position {positions[-1]}")

    @property
    def last(self) -> int:
        """The position the batch reaches: `upto`, else its last event's."""
        return self.upto if self.upto is not None else self.events[-1].seq

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

    def subscribe(self, topics: Collection[ChannelKey], after: int) -> int:
        """Make `read` carry the events of `topics` (`sync.topics`); returns `since`: every
        event of them past it is read. A bus that carries every event returns 0; the channel
        bus returns at least `after` for a topic new to it (`sync.bus_channels`)."""
        ...

    def unsubscribe(self, topics: Collection[ChannelKey]) -> None:
        """Let `read` leave out `topics` again (a bus that carries every event ignores it)."""
        ...

    def readable(self) -> bool:
        """False from a `read` iterator's failure to reach the transport until its next
        successful read: while it is False, batches published meanwhile are not arriving,
        and readers fall back to Postgres (`sync.dispatcher`, degraded mode)."""
        ...

    async def publish_signal(self, signal: Signal) -> None:
        """Send an ephemeral signal to every open `signals()` iterator, on every replica, at
        most once; nothing is kept. Raises ConnectionError when the transport is down (the
        signal is lost) or after close()."""
        ...

    def signals(self) -> AsyncIterator[Signal]:
        """Every signal published, by any replica, while this iterator is subscribed, in the
        order each publisher sent them, until close(). The subscription starts with the first
        step of the iterator (and, over a network, a moment later): nothing published before
        it is ever seen. Outages are retried inside; what is published meanwhile is lost."""
        ...

    async def publish_presence(self, update: PresenceUpdate) -> None:
        """Send a replica's presence update to every open `presence()` iterator, on every
        replica (its own included), at most once; nothing is kept. Raises ConnectionError
        when the transport is down or slow (the update is lost) or after close()."""
        ...

    def presence(self) -> AsyncIterator[PresenceUpdate]:
        """Every presence update published while this iterator is subscribed, in the order
        each publisher sent them, until close(); subscribed as `signals()` is. Outages are
        retried inside; what is published meanwhile is lost."""
        ...

    async def put_presence(self, update: PresenceUpdate, ttl_s: float) -> None:
        """Keep `update` (a full set) as `update.replica`'s heartbeat for `ttl_s` seconds,
        unless replaced. Raises ConnectionError when the transport is down or slow or after
        close()."""
        ...

    async def presences(self) -> dict[str, PresenceUpdate]:
        """The unexpired heartbeat of every replica, by replica id. Raises ConnectionError
        when the transport is down or slow or after close()."""
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
