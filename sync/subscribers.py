"""Connected subscribers: each one's bounded send buffer, and the index of them by channel.

A `Subscriber` is one `/me/stream` connection. The dispatcher hands it complete SSE frames
with `queue`, which never waits: it queues bytes, or refuses them when the bytes queued and
not yet accepted by the socket would pass `max_buffer_bytes` (PROTOCOL.md §4 Isolation;
centrifuge's `ClientQueueMaxSize`, 1 MiB). The response writes everything queued in one chunk
per wake-up (`frames`), so a burst costs one socket write, not one per event.

The dispatcher `queue`s the frames of a whole bus read, then `flush`es each subscriber once:
when its writer is idle (parked in `frames` with nothing queued) and the response has set
`write_now`, the chunk goes to the socket at once from the dispatcher, with no task woken;
otherwise the writer is woken and writes it. Under load bus reads grow, and with them the
chunks: one socket write per subscriber per read, however many events it carries. Frames reach
the socket in the order queued either way.

`StreamSubscriberManager` indexes subscribers by id, by user and by channel, with O(1)
register, unregister, channel add/remove and lookup, and no empty entries left behind.
"""

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Iterable

from core.cursors import PrefetchSnapshot, StreamCursor
from core.events import Event
from core.frames import encode_change, encode_close
from core.types import ChannelKey, Frame


class SubscriberClosed(RuntimeError):
    """`queue` was called on a subscriber after `close`."""


class Subscriber:
    """One connection's send buffer: frames queued as bytes, written in batches.

    `after` is the position of the last event this subscriber has been given (or must not be
    given again); the dispatcher offers it only events past `after`. `snapshot` is set while
    the stream started from a prefetch cursor of wal ingest mode may still meet events the
    prefetch saw (`frame_for`). `admin` is the token's
    `system_role: "admin"` claim. `max_buffer_bytes` must be > 0 (ValueError otherwise).
    """

    __slots__ = (
        "_bytes",
        "_closed",
        "_inflight",
        "_oldest_commit",
        "_queue",
        "_waiter",
        "admin",
        "after",
        "chunk_committed_at",
        "close_reason",
        "half_full",
        "id",
        "max_buffer_bytes",
        "sent_since_ping",
        "snapshot",
        "user_id",
        "write_now",
    )

    def __init__(
        self, id: str, user_id: str, *, max_buffer_bytes: int, after: int = 0, admin: bool = False
    ) -> None:
        if max_buffer_bytes <= 0:
            raise ValueError(f"max_buffer_bytes must be > 0, got {max_buffer_bytes}")
        self.id = id
        self.user_id = user_id
        self.admin = admin
        self.after = after
        self.snapshot: PrefetchSnapshot | None = None
        self.max_buffer_bytes = max_buffer_bytes
        self.close_reason: str | None = None
        self._queue: list[Frame] = []
        self._bytes = 0
        self._inflight = 0
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._oldest_commit = 0.0
        self.chunk_committed_at = 0.0
        self.sent_since_ping = False
        self.half_full = False
        """True when the last `queue` left more than half of `max_buffer_bytes` buffered: the
        dispatcher then lets sockets drain before its next transaction."""
        self.write_now: Callable[[Frame, float], None] | None = None
        """Set by the response while its socket can take a write without waiting: writes
        `frame` (of an event committed at the epoch seconds given, 0 for none) synchronously;
        it unsets itself when the socket's buffer fills, until the writer drained it."""

    @property
    def buffered_bytes(self) -> int:
        """Bytes queued or handed to the socket and not yet accepted by it."""
        return self._bytes + self._inflight

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._closed

    def queue(self, frame: Frame, committed_at: float = 0.0) -> bool:
        """Queue one or more complete SSE frames (ending in a blank line) without waiting and
        without handing them to the writer yet: call `flush` once done queueing.

        `committed_at` (epoch seconds, 0 for none) is the commit time of the event the frame
        carries; the oldest one queued becomes the commit time of the write that carries it.
        Returns False and queues nothing when the buffered bytes would exceed
        `max_buffer_bytes` even after a `flush` (which empties the queue into an idle writer's
        socket); the caller then closes with reason "slow_consumer" (PROTOCOL.md §4
        Isolation). Raises SubscriberClosed after `close`.
        """
        if self._closed:
            raise SubscriberClosed(f"subscriber {self.id} is closed ({self.close_reason})")
        buffered = self._bytes + self._inflight + len(frame)
        if buffered > self.max_buffer_bytes:
            self.flush()  # an idle writer takes what is queued at once, making room
            buffered = self._bytes + self._inflight + len(frame)
            if buffered > self.max_buffer_bytes:
                return False
        if not self._queue:
            self._oldest_commit = committed_at
        self._queue.append(frame)
        self._bytes += len(frame)
        self.sent_since_ping = True
        self.half_full = buffered > self.max_buffer_bytes >> 1
        return True

    def flush(self) -> None:
        """Hand everything queued to the writer as one chunk: to the socket at once through
        `write_now` when the writer is idle and one is set, else by waking the writer (a busy
        writer takes it when its write in flight is done)."""
        if not self._queue:
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self.write_now and not self._closed:
            chunk = b"".join(self._queue) if len(self._queue) > 1 else self._queue[0]
            self._queue = []
            self._bytes = 0
            self.write_now(chunk, self._oldest_commit)
        else:
            self._wake()

    def ping(self, frame: Frame) -> bool:
        """Queue a keep-alive comment unless something (an event or a keep-alive) was queued
        since the last `ping` call, which only clears that mark; False when the buffer is full
        (a slow consumer). Called every half keep-alive interval, this keeps every silence
        under one interval and sends an idle stream one comment per interval. Does nothing
        after `close`."""
        if self._closed:
            return True
        if self.sent_since_ping:
            self.sent_since_ping = False
            return True
        if self._bytes + self._inflight + len(frame) > self.max_buffer_bytes:
            return False
        if not self._queue:
            self._oldest_commit = 0.0
        self._queue.append(frame)
        self._bytes += len(frame)
        self.sent_since_ping = True
        self.flush()
        return True

    def frame_for(self, event: Event, frame: Frame) -> Frame | None:
        """This stream's frame of `event`, whose shared frame is `frame`: None when the
        prefetch the stream started from already holds the event (its snapshot saw the
        event's transaction), else `frame`, or, while later events may still be ones the
        prefetch saw, the event with a cursor that carries the snapshot, so that a resume
        from it skips them too. The first event of a transaction the snapshot could not know
        (`xid >= xmax`) ends the watch: every later one is new (core/cursors.py)."""
        snapshot = self.snapshot
        if snapshot is None:
            return frame
        if event.xid >= snapshot.xmax:
            self.snapshot = None
            return frame
        if snapshot.saw(event.xid):
            return None
        return encode_change(event, str(StreamCursor(event.seq, snapshot)))

    @property
    def cursor(self) -> str:
        """The cursor to resume this stream from: `after`, with the snapshot while watched."""
        return str(StreamCursor(self.after, self.snapshot))

    def close(self, reason: str, *, farewell: Frame = b"") -> None:
        """End the stream: drop what is queued, send `farewell` (e.g. a `retry:` frame) and an
        `event: close` frame with `reason` (PROTOCOL.md §3), then `frames()` ends.

        Frames dropped here are not lost: the client resumes from the last `id` it received.
        Calling it again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        self._queue = [farewell + encode_close(reason)]
        self._bytes = len(self._queue[0])
        self._oldest_commit = 0.0
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def frames(self) -> AsyncIterator[Frame]:
        """Everything queued, joined into one chunk per wake-up; ends after `close`.

        While a chunk is being written (between this generator's yield and its resumption)
        its size counts towards `buffered_bytes`, and `chunk_committed_at` is the commit time
        of its oldest event (0 when it carries none). While nothing is queued it waits on a
        bare future, created per wait: an `asyncio.Event` per connection would hold a deque
        of its own (about 700 bytes, bench/RESULTS.md "Per-connection memory").
        """
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            chunk = b"".join(self._queue) if len(self._queue) > 1 else self._queue[0]
            self._queue = []
            self._bytes = 0
            self._inflight = len(chunk)
            self.chunk_committed_at = self._oldest_commit
            yield chunk
            self._inflight = 0
            if self._closed and not self._queue:
                return


class StreamSubscriberManager:
    """Subscribers indexed by id, user and channel; every operation is O(1) per channel."""

    def __init__(self) -> None:
        self._by_id: dict[str, Subscriber] = {}
        self._channels: dict[str, tuple[ChannelKey, ...]] = {}
        """Each subscriber's channels: a tuple (64 bytes for a few channels where a set takes
        216), rebuilt on the rare channel change."""
        self._by_channel: dict[ChannelKey, dict[str, Subscriber]] = {}
        self._by_user: dict[str, dict[str, Subscriber]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def register(self, subscriber: Subscriber, channels: Iterable[ChannelKey]) -> None:
        """Add a subscriber listening on `channels`. Raises ValueError if its id is taken."""
        if subscriber.id in self._by_id:
            raise ValueError(f"subscriber {subscriber.id} is already registered")
        self._by_id[subscriber.id] = subscriber
        self._channels[subscriber.id] = ()
        self._by_user.setdefault(subscriber.user_id, {})[subscriber.id] = subscriber
        self.add_channels(subscriber.id, channels)

    def unregister(self, subscriber_id: str) -> Subscriber | None:
        """Remove a subscriber from every index; returns it, or None if it was not registered."""
        subscriber = self._by_id.pop(subscriber_id, None)
        if subscriber is None:
            return None
        self.remove_channels(subscriber_id, list(self._channels[subscriber_id]))
        del self._channels[subscriber_id]
        _discard(self._by_user, subscriber.user_id, subscriber_id)
        return subscriber

    def add_channels(self, subscriber_id: str, channels: Iterable[ChannelKey]) -> None:
        """Start delivering `channels` to a registered subscriber. Raises KeyError if unknown."""
        subscriber = self._by_id[subscriber_id]
        joined = self._channels[subscriber_id]
        added = [c for c in dict.fromkeys(channels) if c not in joined]
        if not added:
            return
        self._channels[subscriber_id] = (*joined, *added)
        for channel in added:
            self._by_channel.setdefault(channel, {})[subscriber_id] = subscriber

    def remove_channels(self, subscriber_id: str, channels: Iterable[ChannelKey]) -> None:
        """Stop delivering `channels` to a subscriber; unknown ids and channels are ignored."""
        joined = self._channels.get(subscriber_id)
        if joined is None:
            return
        removed = {c for c in channels if c in joined}
        if not removed:
            return
        self._channels[subscriber_id] = tuple(c for c in joined if c not in removed)
        for channel in removed:
            _discard(self._by_channel, channel, subscriber_id)

    def all(self) -> Collection[Subscriber]:
        """Every registered subscriber (a live view: copy it before changing the index)."""
        return self._by_id.values()

    def get(self, subscriber_id: str) -> Subscriber | None:
        """The subscriber with this id, if registered."""
        return self._by_id.get(subscriber_id)

    def get_by_channel(self, channel: ChannelKey) -> Collection[Subscriber]:
        """Subscribers listening on `channel` (a live view: copy it before changing the index)."""
        entries = self._by_channel.get(channel)
        return entries.values() if entries is not None else ()

    def get_by_user(self, user_id: str) -> Collection[Subscriber]:
        """The user's registered subscribers (a live view)."""
        entries = self._by_user.get(user_id)
        return entries.values() if entries is not None else ()

    def channels_of(self, subscriber_id: str) -> frozenset[ChannelKey]:
        """The channels a subscriber listens on (empty if unknown)."""
        return frozenset(self._channels.get(subscriber_id, ()))

    def count(self, channel: ChannelKey) -> int:
        """Number of subscribers on one channel."""
        return len(self._by_channel.get(channel, ()))

    def channel_counts(self) -> dict[ChannelKey, int]:
        """Subscribers per channel, for every channel that has any."""
        return {channel: len(subs) for channel, subs in self._by_channel.items()}


def _discard(index: dict[str, dict[str, Subscriber]], key: str, subscriber_id: str) -> None:
    entries = index.get(key)
    if entries is not None:
        entries.pop(subscriber_id, None)
        if not entries:
            del index[key]
