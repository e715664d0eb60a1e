"""Opening a stream: load access, catch up, and hand over to live with no gap and no duplicate.

The handoff, for a subscriber starting after position `a` (its cursor, or the snapshot's
position for `offset=now`):

1. Have the bus carry the user's topics (`Dispatcher.subscribe`: on the channel bus a replica
   hears only its users' topics, `sync.bus_channels`), load the user's access in one snapshot
   at position `c`, wait until the dispatcher has dispatched everything up to `c`
   (`DISPATCH_WAIT_S`), and install it at the dispatcher's position (`AccessCache.install`,
   replaying the part of the recent window after `c`).
2. While `a` is older than what the dispatcher's recent window holds (`RecentEvents.floor`),
   or than `since`, the position after which the bus carries every event of the user's topics
   (a topic subscribed by this connect has none of its earlier events in the window), read
   pages of events after `a` from Postgres and send those the user may read. A page may
   run past the dispatcher: that is fine, `a` moves with it. Pages hold at most `page_size`
   events (a large transaction is split across pages: replay judges every event against the
   access state of the reconnect anyway), so a catch-up of any length holds one page at a
   time. If retention has pruned events after `a` (`sync.retention.pruned_through`, read
   after each page), send `must-refetch` instead and go on live from the dispatcher's
   position (PROTOCOL.md §3). A cursor the window covers needs no page and is served in full
   even when the outbox no longer holds its events.
3. Then, without awaiting anything (so the dispatcher cannot move in between): take the window's
   events after `a`, register the subscriber with `after = max(a, dispatcher position)`, and
   queue the `offset` frame. From here the dispatcher offers it only events past `after`.

Each event is therefore sent once: by Postgres paging, by the window, or live. The replayed part
is judged against the access state as it stands at the reconnect; live events against the
state at their own position (centrifuge `internal/recovery`, which merges history and live
publications by offset the same way).
"""

import logging
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from core.access import can_receive
from core.channels import user_channel, workspace_channel
from core.cursors import PrefetchSnapshot, format_cursor
from core.events import Event
from core.frames import encode_change, encode_must_refetch, encode_offset
from core.types import Connection, Frame
from sync import metrics
from sync.access_cache import AccessCache, Snapshot
from sync.dispatcher import RESYNC, Dispatcher
from sync.faults import SERVICE_FAULTS
from sync.outbox import COLUMNS, valid_events
from sync.retention import pruned_through
from sync.subscribers import Subscriber

logger = logging.getLogger(__name__)

INSTALL_ATTEMPTS = 4

UNAVAILABLE = "unavailable"
"""The `close` reason of a stream that could not be opened because Postgres failed during its
access load or catch-up: the client reconnects after the `retry:` delay and resumes by cursor."""

DISPATCH_WAIT_S = 1.0
"""How long a connect waits for the dispatcher to reach its snapshot's position, in seconds.
Installed at that position (or behind it, replaying the window) the new access state is exact
from the first event on. If the dispatcher is slower (bus down; or the newest rows are
malformed and never dispatched) the state is installed ahead of it: the dispatcher re-applies
the after-images it has not reached, which converges to the same state."""


_HISTORY_PAGE = f"SELECT {COLUMNS} FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2"


class AccessLoadFailed(RuntimeError):
    """The access state could not be installed consistently after `INSTALL_ATTEMPTS` loads."""


_UNAVAILABLE: tuple[type[BaseException], ...] = (*SERVICE_FAULTS, AccessLoadFailed)


class StreamWatcher(Protocol):
    """Told when streams go live and end (presence counts open streams, `sync.presence_feed`)."""

    def opened(self, subscriber: Subscriber) -> None:
        """`subscriber` is live: registered, its `offset` frame queued."""
        ...

    def closed(self, subscriber: Subscriber) -> None:
        """A stream `opened` was called for has ended (called once, however it ended)."""
        ...


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """Who connects and from where: `after` None means `now`; `prefetch` is the snapshot a
    wal-mode prefetch cursor carries (its events are skipped); `refetch_reason` set means the
    client's cursor is unusable and it gets `must-refetch` before going live (PROTOCOL.md §3)."""

    user_id: str
    admin: bool = False
    after: int | None = None
    refetch_reason: str | None = None
    prefetch: PrefetchSnapshot | None = None


async def open_stream(
    dispatcher: Dispatcher,
    request: StreamRequest,
    subscriber: Subscriber,
    *,
    first: Frame = b"",
    page_size: int = 500,
    on_open: Callable[[int], None] | None = None,
    watcher: StreamWatcher | None = None,
) -> AsyncGenerator[Frame, None]:
    """The frames of one `/me/stream` response: `first` (the `retry:` frame, sent at once),
    catch-up, `offset`, then live frames from `subscriber` until it is closed.

    `on_open(position)` and `watcher.opened(subscriber)` are called once the subscriber is
    live. The subscriber is unregistered and its user's access released when the iterator
    ends, however it ends (a slow-consumer cut-off, shutdown, the client gone), and then
    `watcher.closed(subscriber)` is called if `watcher.opened` was. When Postgres
    fails (`sync.faults.SERVICE_FAULTS`) or the access state cannot be installed
    (AccessLoadFailed) before the stream is live, the frames end with a `retry:` and
    `event: close` `{"reason": "unavailable"}` instead of raising.
    """
    cache = dispatcher.cache
    installed = False
    watching: StreamWatcher | None = None
    after = replayed = 0
    try:
        yield first
        try:
            cache, snapshot, since = await install_access(dispatcher, request.user_id)
            installed = True
            after, head = _start_position(dispatcher, request, snapshot)
            if head:
                yield head
            elif request.after is not None:
                subscriber.snapshot = request.prefetch
            while after < (floor := max(dispatcher.window.floor, since)):
                chunk, after, count = await _page(
                    dispatcher, request, subscriber, after, page_size, floor
                )
                replayed += count
                if chunk:
                    yield chunk
        except _UNAVAILABLE as exc:
            logger.warning(
                "stream not opened: %r", exc, extra={"conn": subscriber.id, "user": request.user_id}
            )
            subscriber.close(UNAVAILABLE, farewell=dispatcher.retry_frame())
        # From here to the registration nothing may await: the dispatcher must not move.
        opening = _go_live(dispatcher, cache, request, subscriber, after, replayed)
        if opening:
            watching = _went_live(subscriber, on_open, watcher)
            yield opening
        async for chunk in subscriber.frames():
            yield chunk
    finally:
        dispatcher.manager.unregister(subscriber.id)
        if installed:
            cache.release(request.user_id)
        if watching is not None:
            watching.closed(subscriber)


def _went_live(
    subscriber: Subscriber,
    on_open: Callable[[int], None] | None,
    watcher: StreamWatcher | None,
) -> StreamWatcher | None:
    """Tell `on_open` and `watcher` that `subscriber` is live; returns the watcher told."""
    if on_open is not None:
        on_open(subscriber.after)
    if watcher is not None:
        watcher.opened(subscriber)
    return watcher


def _go_live(
    dispatcher: Dispatcher,
    cache: AccessCache,
    request: StreamRequest,
    subscriber: Subscriber,
    after: int,
    replayed: int,
) -> Frame:
    """Register the subscriber live after `after` and return the window's replay and the
    `offset` frame, in stream order; b"" (nothing registered) when the subscriber was closed
    meanwhile (token expired, Postgres failed) or the dispatcher resynced. Never awaits."""
    if dispatcher.cache is not cache:  # the dispatcher resynced during catch-up
        subscriber.close(RESYNC, farewell=dispatcher.retry_frame())
    if subscriber.closed:
        return b""
    replay = _frames(dispatcher.window.after(after), cache, request, subscriber)
    subscriber.after = max(after, dispatcher.position)
    channels = [user_channel(request.user_id)]
    channels += [workspace_channel(ws) for ws in cache.channels_of(request.user_id)]
    dispatcher.manager.register(subscriber, channels)
    if request.after is None:
        return b"".join([encode_offset(format_cursor(after)), *replay])
    metrics.CATCHUP_EVENTS.observe(replayed + len(replay))
    return b"".join([*replay, encode_offset(subscriber.cursor)])


def _frames(
    events: Iterable[Event], cache: AccessCache, request: StreamRequest, subscriber: Subscriber
) -> list[Frame]:
    """The change frames of `events` the user may receive and has not yet got: internal
    events (never delivered) and events its prefetch saw are left out (`Subscriber.frame_for`)."""
    frames = []
    for event in events:
        if not event.internal and can_receive(
            cache.state, request.user_id, event, admin=request.admin
        ):
            frame = subscriber.frame_for(event, encode_change(event))
            if frame is not None:
                frames.append(frame)
    return frames


async def install_access(dispatcher: Dispatcher, user_id: str) -> tuple[AccessCache, Snapshot, int]:
    """Have the bus carry the user's topics, load `user_id`'s access in one snapshot, let the
    dispatcher reach its position, and install it in the dispatcher's cache as one more holder
    (steps 1-2 of the module docstring). Returns the cache it went into (the dispatcher's; a
    resync replaces it), the snapshot, and `since`: the dispatcher dispatches the events of
    the user's topics past it (`Dispatcher.subscribe`; 0 on a bus that carries every event),
    so the catch-up reads Postgres up to it. A topic subscribed only after the snapshot (a
    workspace the snapshot showed) may have `since` past it: the load is made again, since
    the window cannot replay that topic's access changes. Raises AccessLoadFailed after
    INSTALL_ATTEMPTS tries, and what Postgres raises (`sync.faults.SERVICE_FAULTS`)."""
    topics = [user_channel(user_id)]
    dispatcher.hold(topics, True)
    try:
        for _ in range(INSTALL_ATTEMPTS):
            since = dispatcher.subscribe(topics)
            cache = dispatcher.cache
            snapshot = await cache.load(dispatcher.pool, user_id, dispatcher.barrier)
            new = [
                topic
                for ws in sorted(snapshot.user.active_workspaces())
                if (topic := workspace_channel(ws)) not in topics
            ]
            if new:
                dispatcher.hold(new, True)
                topics += new
                since = dispatcher.subscribe(topics)
            if not await dispatcher.reached(snapshot.settled, DISPATCH_WAIT_S):
                logger.debug("dispatcher behind position %d: installing ahead", snapshot.position)
            if cache is not dispatcher.cache or snapshot.position < max(
                dispatcher.window.floor, since
            ):
                continue  # resynced, or moved past what the window can replay: load again
            if cache.install(snapshot, dispatcher.window.after(snapshot.position)):
                return cache, snapshot, since
        raise AccessLoadFailed(f"could not install access of user {user_id!r}")
    finally:
        dispatcher.hold(topics, False)


def _start_position(
    dispatcher: Dispatcher, request: StreamRequest, snapshot: Snapshot
) -> tuple[int, Frame]:
    """Where catch-up starts, and a `must-refetch` frame when the cursor is unusable."""
    head = max(snapshot.position, dispatcher.position)
    if request.refetch_reason is not None:
        return snapshot.position, encode_must_refetch(request.refetch_reason)
    if request.after is None:
        return snapshot.position, b""
    if request.after > head:
        reason = f"cursor {format_cursor(request.after)} is ahead of this stream"
        return snapshot.position, encode_must_refetch(reason)
    return request.after, b""


async def _page(
    dispatcher: Dispatcher,
    request: StreamRequest,
    subscriber: Subscriber,
    after: int,
    page_size: int,
    floor: int,
) -> tuple[Frame, int, int]:
    """The frames of the next page of history after `after`, where the next page starts, and
    how many events the frames carry; past `floor` the dispatcher holds the rest.

    When retention has pruned events after `after`, the frame is `must-refetch` and the
    position jumps to the dispatcher's: live from now (PROTOCOL.md §3).
    """
    async with dispatcher.pool.acquire() as conn:
        events, last = await _read_history(conn, after, page_size)
        # Read after the page: a prune deletes rows and raises the watermark in one statement,
        # so a watermark at or below `after`, read now, proves that the page missed no row.
        pruned = await pruned_through(conn)
    if pruned > after:
        reason = (
            f"cursor {format_cursor(after)} is older than the retained history"
            f" (events up to {format_cursor(pruned)} were pruned)"
        )
        logger.info("stream of user %s: %s", request.user_id, reason)
        return encode_must_refetch(reason), max(dispatcher.position, pruned), 0
    frames = _frames(events, dispatcher.cache, request, subscriber)
    if last == after:  # nothing more in Postgres: the window must already cover it
        return b"".join(frames), max(after, floor), len(frames)
    return b"".join(frames), last, len(frames)


async def _read_history(conn: Connection, after: int, limit: int) -> tuple[list[Event], int]:
    """At most `limit` committed events after `after`, in position order, and the position
    of the last row read (`after` when none). Rows that are not valid events are skipped: the
    relay keeps them in `outbox_dead_letters`. Unlike `sync.outbox.fetch_after`, a page never
    grows to complete a transaction, so its size stays bounded however large they are.
    """
    rows = await conn.fetch(_HISTORY_PAGE, after, limit)
    return valid_events(rows), int(rows[-1]["seq"]) if rows else after
