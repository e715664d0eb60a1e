"""Presence across gateway replicas (PROTOCOL.md §5): this replica's `PresenceBook` kept in
step with the others over the bus, and its per-workspace diffs fed to local subscribers.

One `PresenceFeed` per gateway process counts the streams that go live and end here
(`sync.catchup.StreamWatcher`) and runs three loops (`run`):
- ticks: every `interval_s` it ticks the book (a pair that lost its last connection or its
  membership goes offline once the grace has passed), queues each changed workspace's diff
  (`deliver`), then publishes this replica's change to the others (`Bus.publish_presence`).
  Between ticks, a stream going live wakes it to announce that user's new pairs at once
  (`PresenceBook.announce_new`), so another replica shows them at its next tick; connects
  that come while an announcement is in flight share the next one.
- heartbeats: every `ttl_s / 3` it writes its full set with a TTL of `ttl_s`
  (`Bus.put_presence`) and reads every replica's (`Bus.presences`): that repairs any
  announcement lost on the way, and drops the pairs of a replica whose heartbeat expired (a
  gateway killed with SIGKILL: its users go offline at most `ttl_s` plus one heartbeat period
  after its last heartbeat, while its clients that reconnect elsewhere stay online).
- announcements: every update another replica publishes (`Bus.presence`), applied as it comes.

The first heartbeat is written by `start`, before this replica serves a stream, so its
announcements never reach a replica that has no heartbeat of it to keep them by.

A bus failure (Redis down or hung) never stops the loops: it is logged once (then at debug
level), announcements pause, and the heartbeat is retried sooner, from HEARTBEAT_RETRY_BASE_S
doubling up to `ttl_s / 3`, jittered. Once a heartbeat is written again, the full set is
announced (`PresenceBook.full_update`), so the others catch up with what was not published.
Diffs keep being delivered meanwhile, from what this replica knows.

Delivery: a workspace's diff goes, as one `event: presence` frame with no `id:` line
(`core.frames.encode_presence`), to every live subscriber on its workspace channel whose user
is an active member there as of now (`AccessCache`; a removed member's channel is dropped at
the access change by the dispatcher, and the check here covers the moment in between). A
stream's frames carry the changes from the tick after it went live; the set before comes from
`GET /me/presence` (gateway/presence.py), which a client asks for after the `offset` frame,
applying on top of its answer the frames received since it asked. (Sending each new stream
the whole set instead would cost, in a workspace of N online users, N ids per connect: in a
connect storm into one large workspace, most of the presence traffic.) A workspace with no
local subscriber is forgotten (`PresenceBook.forget`). A subscriber whose
buffer is full is cut off as a slow consumer, as for changes (PROTOCOL.md §4 Isolation).
A graceful shutdown announces nothing: its clients reconnect elsewhere within the grace, and
those that do not go offline when its heartbeat expires.
"""

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping

from core.access import ACTIVE, UserAccess
from core.channels import workspace_channel
from core.frames import encode_presence
from core.types import Frame
from sync import metrics
from sync.bus import Bus
from sync.dispatcher import Dispatcher
from sync.presence import Announcement, PresenceBook
from sync.signals import keep_reading
from sync.subscribers import Subscriber
from sync.waits import wait_any

logger = logging.getLogger(__name__)

_WORKSPACE_PREFIX = workspace_channel("")

HEARTBEAT_RETRY_BASE_S = 0.1
"""First pause before a heartbeat is tried again after a failure, seconds; it doubles per
failure in a row, up to the heartbeat period (`ttl_s / 3`), with up to half of it off at random."""


class PresenceFeed:
    """Presence for one gateway process (see the module docstring).

    `replica` names this process lifetime among the replicas (unique: a restarted process
    takes a new one). `grace_s` (>= 0): seconds a user stays online after their last stream
    here closed. `interval_s` (> 0): seconds between ticks, hence between two presence frames
    of one workspace on one connection. `ttl_s` (> 0): seconds a heartbeat lives; it is
    written every `ttl_s / 3`. `clock`: monotonic seconds. Raises ValueError for bounds out of
    range.
    """

    def __init__(
        self,
        bus: Bus,
        dispatcher: Dispatcher,
        replica: str,
        *,
        grace_s: float,
        interval_s: float,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if grace_s < 0 or interval_s <= 0 or ttl_s <= 0:
            raise ValueError(
                f"need grace_s >= 0, interval_s > 0, ttl_s > 0; got {grace_s}, {interval_s},"
                f" {ttl_s}"
            )
        self.bus = bus
        self.dispatcher = dispatcher
        self.book = PresenceBook(replica, grace_s)
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._clock = clock
        self._wake = asyncio.Event()
        self._failures = 0
        """Bus operations failed in a row; while > 0, announcements pause."""
        self._full_due = False
        """The next announcement must be the full set (the bus lost some of the changes)."""

    def opened(self, subscriber: Subscriber) -> None:
        """A stream of `subscriber.user_id` went live here: count it and announce at once."""
        self.book.connected(subscriber.user_id)
        self._wake.set()

    def closed(self, subscriber: Subscriber) -> None:
        """A stream that went live here ended; the next ticks take its user offline where
        no other stream of theirs, here or elsewhere, keeps them online, after the grace."""
        self.book.disconnected(subscriber.user_id)

    def online(self, workspace_id: str) -> list[str]:
        """Ids of the users online in `workspace_id` on any replica, sorted."""
        return sorted(self.book.online(workspace_id))

    async def start(self) -> None:
        """Write the first heartbeat and learn the other replicas' sets; a failure is logged
        and retried by `run`."""
        await self._heartbeat()

    async def run(self, stop: asyncio.Event) -> None:
        """The three loops of the module docstring, until `stop` is set."""
        await asyncio.gather(
            self._tick_loop(stop),
            self._heartbeat_loop(stop),
            keep_reading(self._consume, stop, "presence announcements"),
        )

    def deliver(self) -> int:
        """Queue each changed workspace's diff to its local subscribers that are active
        members now; flush each, cut off those whose buffer is full. Returns the frames
        queued. Never awaits."""
        manager = self.dispatcher.manager
        sending = _Sending(self.dispatcher.cache.state.users)
        for workspace_id in self.book.changed():
            subscribers = manager.get_by_channel(workspace_channel(workspace_id))
            if not subscribers:
                self.book.forget(workspace_id)
                continue
            diff = self.book.diff(workspace_id)
            if diff:
                frame = encode_presence(workspace_id, diff.online, diff.offline)
                for subscriber in subscribers:
                    sending.offer(subscriber, workspace_id, frame)
        return sending.finish(self.dispatcher)

    def _active_workspaces(self, user_id: str) -> Iterable[str]:
        return self.dispatcher.cache.channels_of(user_id)

    async def _tick_loop(self, stop: asyncio.Event) -> None:
        next_tick = self._clock() + self.interval_s
        while not stop.is_set():
            await wait_any((stop, self._wake), next_tick - self._clock())
            if stop.is_set():
                return
            self._wake.clear()
            now = self._clock()
            try:
                if now >= next_tick:
                    next_tick += self.interval_s
                    if next_tick <= now:  # fell behind: no burst of ticks to catch up
                        next_tick = now + self.interval_s
                    change = self.book.tick(now, self._active_workspaces)
                    self.deliver()
                else:
                    change = self.book.announce_new(self._active_workspaces)
                await self._announce(change)
            except Exception:
                logger.exception("presence tick failed")

    async def _announce(self, change: Announcement) -> None:
        """Publish `change` (numbered even when not sent), or the full set when one is due;
        nothing while the bus is failing (the heartbeat loop brings it back)."""
        update = self.book.outgoing(change) if change else None
        if self._failures:
            return
        if self._full_due:
            update = self.book.full_update()
        if update is None:
            return
        try:
            await self.bus.publish_presence(update)
        except ConnectionError as exc:
            self._failed("announcing", exc)
            return
        self._full_due = False
        metrics.PRESENCE_PUBLISHED.inc()

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        period_s = self.ttl_s / 3
        while not stop.is_set():
            pause_s = period_s
            if self._failures:
                backoff_s = HEARTBEAT_RETRY_BASE_S * 2 ** min(self._failures - 1, 16)
                pause_s = min(period_s, backoff_s) * (1 - random.random() / 2)
            await wait_any((stop,), pause_s)
            if stop.is_set():
                return
            try:
                await self._heartbeat()
            except Exception:
                logger.exception("presence heartbeat failed")

    async def _heartbeat(self) -> None:
        """Write this replica's full set, then read and apply every replica's."""
        since = self._clock()
        try:
            await self.bus.put_presence(self.book.full_update(), self.ttl_s)
            heartbeats = await self.bus.presences()
        except ConnectionError as exc:
            self._failed("writing or reading heartbeats", exc)
            return
        self.book.apply_heartbeats(heartbeats.values(), since)
        if self._failures:
            logger.info("presence heartbeats written again after %d failures", self._failures)
            self._failures = 0
            self._full_due = True
            self._wake.set()

    async def _consume(self) -> None:
        async for update in self.bus.presence():
            if self.book.receive(update, self._clock()):
                metrics.PRESENCE_RECEIVED.inc()

    def _failed(self, doing: str, exc: BaseException) -> None:
        self._failures += 1
        self._full_due = True
        log = logger.warning if self._failures == 1 else logger.debug
        log("presence: %s failed (%d in a row): %s", doing, self._failures, exc)


class _Sending:
    """The frames of one delivery: queued to subscribers that are active members of the
    frame's workspace now (`users`, the access state's), then flushed once per subscriber."""

    def __init__(self, users: Mapping[str, UserAccess]) -> None:
        self.users = users
        self.queued: dict[Subscriber, None] = {}
        self.slow: list[Subscriber] = []
        self.sent = 0

    def offer(self, subscriber: Subscriber, workspace_id: str, frame: Frame) -> None:
        """Queue `frame` unless the subscriber is closed or not an active member of
        `workspace_id`; remember it as slow when its buffer is full."""
        user = self.users.get(subscriber.user_id)
        if subscriber.closed or user is None or user.workspaces.get(workspace_id) != ACTIVE:
            return
        if subscriber.queue(frame):
            self.queued[subscriber] = None
            self.sent += 1
        else:
            self.slow.append(subscriber)

    def finish(self, dispatcher: Dispatcher) -> int:
        """Flush every subscriber given frames, cut off the slow ones as slow consumers
        (PROTOCOL.md §4), count the frames; returns how many were queued."""
        for subscriber in self.queued:
            subscriber.flush()
        for subscriber in self.slow:
            if not subscriber.closed:
                dispatcher.cut_off(subscriber)
        metrics.PRESENCE_FRAMES.inc(self.sent)
        return self.sent
