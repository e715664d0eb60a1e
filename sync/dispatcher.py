"""The dispatcher: one per gateway process, it turns the bus's batches into frames for subscribers.

`run` reads the bus from the dispatcher's position; a batch whose `prev` is past that position
reveals events the bus lost (Redis restarted or trimmed), which are read from Postgres first
(the source of truth). `dispatch` then takes each transaction's events together (same `xid`):
it applies their access changes first, so every event is judged against the state after its
own transaction committed (PROTOCOL.md §2), then for each event looks up the subscribers of
its one channel (`core.channels.channel_for`), keeps those `can_receive` allows, encodes the
frame once, and queues the same bytes to each, flushing each subscriber once per bus read
(`Subscriber.queue`, `Subscriber.flush`). The fan-out loop never awaits; a subscriber
whose buffer is full is unregistered and closed as a slow consumer (PROTOCOL.md §4), as
centrifuge's `Hub.broadcastPublication` does.

The last `window_events` events stay in a `RecentEvents` window for connects and catch-up.

Degraded mode. While the bus cannot be read (`Bus.readable`: Redis down or unreachable), the
relay and Postgres may be fine: every `degraded_poll_s` the dispatcher reads the outbox after
its position instead (`watch_bus`), through the same `process`, so clients keep receiving,
about one poll interval late. It stays degraded until a batch arrives from the bus again (a
reader that reconnected before the relay publishes again would otherwise leave a stall);
that batch's events up to the position are skipped and its `prev` reveals anything the bus
lost, as after any gap: no event is missed or doubled across either switch. Readiness is not
affected (turning every replica unready would move every client's reconnect onto nothing);
`userstream_bus_degraded` and `/admin/status` report it.

Topics. On the channel bus (`sync.bus_channels`) the bus carries only the topics the dispatcher
`subscribe`s: a connect subscribes its user's topics (`sync.catchup`), and a connected user who
turns active in a workspace has that workspace's topic subscribed in the middle of a batch,
its events up to the batch's end read from Postgres and merged in (`_with_topics`).
`sweep_topics` drops the topics no stream, connected user or held workspace needs.
"""

import asyncio
import bisect
import logging
import random
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence

import asyncpg

from core.access import can_receive
from core.channels import channel_for, user_channel, workspace_channel
from core.cursors import current_position
from core.events import Event
from core.frames import PING, encode_change
from core.types import ChannelKey, Frame
from sync import metrics
from sync.access_cache import AccessCache
from sync.barrier import RelayBarrier
from sync.bus import Batch, Bus
from sync.faults import SERVICE_FAULTS
from sync.outbox import read_page, read_topics
from sync.retention import pruned_through
from sync.subscribers import StreamSubscriberManager, Subscriber
from sync.waits import wait_any

DEGRADED_POLL_S = 0.5
"""Default interval of the outbox reads of degraded mode, seconds (USERSTREAM_DEGRADED_POLL_S)."""

PRESSURE_PAUSE_S = 0.005
"""How long the dispatcher lets sockets drain, after a transaction that filled half of some
stream's buffer, before the next one, seconds."""

RESYNC = "resync"
"""The `close` reason sent when events this gateway should have delivered are gone from both
the bus and the outbox (pruned by retention): each client resumes by cursor and, its cursor
being older than the retained history, is told to `must-refetch` (PROTOCOL.md §3)."""

logger = logging.getLogger(__name__)


class RecentEvents:
    """The last `size` events the dispatcher processed, by position.

    `floor` is the position after which every processed event is held: a reader that has seen
    everything up to `p >= floor` can continue from here alone. Raises ValueError for size < 1.
    """

    def __init__(self, size: int, floor: int = 0) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self._events: deque[Event] = deque()
        self._positions: deque[int] = deque()
        self._size = size
        self.floor = floor

    def __len__(self) -> int:
        return len(self._events)

    def append(self, event: Event) -> None:
        """Hold one more event (positions must increase); the oldest leaves when full."""
        if len(self._events) == self._size:
            self._events.popleft()
            self.floor = self._positions.popleft()
        self._events.append(event)
        self._positions.append(event.seq)

    def after(self, position: int) -> list[Event]:
        """Held events with a position greater than `position`, oldest first."""
        start = bisect.bisect_right(self._positions, position)
        return [self._events[i] for i in range(start, len(self._events))]

    def reset(self, floor: int) -> None:
        """Forget everything; nothing before `floor` can be served from here."""
        self._events.clear()
        self._positions.clear()
        self.floor = floor


class Dispatcher:
    """Routes events from the bus to subscribers (see the module docstring).

    `retry_frame` makes the (jittered) `retry:` frame sent before a slow consumer's `close`;
    `degraded_poll_s` (> 0) is the interval of the outbox reads while the bus is unreadable,
    seconds (module docstring).
    """

    def __init__(
        self,
        bus: Bus,
        pool: asyncpg.Pool,
        manager: StreamSubscriberManager,
        cache: AccessCache,
        *,
        window_events: int = 10_000,
        page_size: int = 500,
        retry_frame: Callable[[], Frame] = lambda: b"",
        degraded_poll_s: float = DEGRADED_POLL_S,
    ) -> None:
        self.bus = bus
        self.pool = pool
        self.barrier = RelayBarrier(pool)
        self.manager = manager
        self.cache = cache
        self.window = RecentEvents(window_events)
        self.position = 0
        self.page_size = page_size
        self.retry_frame = retry_frame
        self.degraded_poll_s = degraded_poll_s
        self.degraded = False
        """True while the bus is unreadable and the outbox is read instead (`watch_bus`)."""
        self._lock = asyncio.Lock()
        """Held while events are taken from the bus or from the outbox: one at a time."""
        self._subscribed: set[ChannelKey] = set()
        """Topics this dispatcher asked the bus to carry (`subscribe`)."""
        self._holds: dict[ChannelKey, int] = {}
        """Topics of streams being opened, with how many open each (`hold`)."""
        self.delivered = 0
        self.slow_consumers = 0
        self._advanced = asyncio.Event()
        self._unflushed: dict[Subscriber, None] = {}
        """Subscribers given frames since the last flush, each once (an ordered set)."""
        self._pressed = False
        """Set when a delivery left some stream's buffer more than half full (`process`)."""

    async def start(self) -> None:
        """Begin at the outbox's current position: nothing earlier is anyone's live event."""
        async with self.pool.acquire() as conn:
            self.position = await current_position(conn)
        self.window.reset(self.position)

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch every batch from the bus until `stop` is set; restart after failures
        (Postgres down while filling a gap) with jittered backoff, resuming from `position`.
        Meanwhile `watch_bus` reads the outbox whenever the bus cannot be read."""
        watch = asyncio.ensure_future(self.watch_bus(stop))
        try:
            await self._read_bus(stop)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _read_bus(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            reader = asyncio.ensure_future(self._consume())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, stopper):
                task.cancel()
            await asyncio.gather(reader, stopper, return_exceptions=True)
            if reader in done and reader.exception() is not None:
                logger.warning(
                    "dispatcher failed at position %d: %r", self.position, reader.exception()
                )
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 5.0)
            else:
                delay = 0.1

    async def _consume(self) -> None:
        async for batch in self.bus.read(self.position):
            await self.handle(batch)

    async def handle(self, batch: Batch) -> None:
        """Take one batch from the bus (which ends degraded mode): fill a gap before it from
        Postgres, then dispatch what is new."""
        async with self._lock:
            if self.degraded:
                self._set_degraded(False)
            metrics.BUS_EVENTS.inc(len(batch.events))
            if batch.prev > self.position:
                await self.fill(batch.prev)
            await self.process([e for e in batch.events if e.seq > self.position])
            if batch.last > self.position:  # a topic reader's batch reaches past its events
                self.position = batch.last
                self._signal_advance()

    async def fill(self, upto: int) -> None:
        """Read and dispatch outbox events after `position` up to at least `upto`
        (`_read_outbox`)."""
        logger.info("filling events %d..%d from Postgres", self.position + 1, upto)
        metrics.GAP_FILLS.inc()
        await self._read_outbox(upto)

    async def watch_bus(self, stop: asyncio.Event) -> None:
        """Degraded mode (module docstring): every `degraded_poll_s` until `stop`, while the
        bus is unreadable and until a batch arrives from it again, dispatch every event the
        outbox holds after `position`. A failure of Postgres is logged and retried at the
        next turn."""
        while not stop.is_set():
            await wait_any((stop,), self.degraded_poll_s)
            if not self.degraded and not self.bus.readable():
                self._set_degraded(True)
            if not self.degraded or stop.is_set():
                continue
            try:
                async with self._lock:
                    if self.degraded:
                        metrics.DEGRADED_EVENTS.inc(await self._read_outbox(None))
            except SERVICE_FAULTS as exc:
                logger.warning("degraded mode: reading the outbox failed: %r", exc)

    def _set_degraded(self, degraded: bool) -> None:
        self.degraded = degraded
        metrics.BUS_DEGRADED.set(int(degraded))
        if degraded:
            logger.warning(
                "bus unreadable: reading the outbox every %s s from position %d instead",
                self.degraded_poll_s,
                self.position,
            )
        else:
            logger.info("bus readable again at position %d: degraded mode ends", self.position)

    async def _read_outbox(self, upto: int | None) -> int:
        """Read and dispatch outbox events after `position`, page by page, up to at least
        `upto` (None: all there are); returns how many were dispatched.

        If retention has pruned some of them (`sync.retention.pruned_through`, read after each
        page), they are lost to every connected stream: `resync`.
        """
        dispatched = 0
        while upto is None or self.position < upto:
            async with self.pool.acquire() as conn:
                page = await read_page(conn, self.position, self.page_size)
                pruned = await pruned_through(conn)
            if pruned > self.position:
                self.resync(pruned)
                continue
            if page.last == self.position:
                break
            await self.process(page.events)
            dispatched += len(page.events)
            self.position = max(self.position, page.last)
        return dispatched

    def resync(self, position: int) -> None:
        """Events after `position`'s predecessor up to `position` are lost: close every stream
        with `RESYNC` and start afresh at `position`, with an empty window and a new access
        cache (access changes among the lost events are unknown; streams opened from here
        load their access again)."""
        logger.error(
            "events %d..%d were pruned before this gateway dispatched them: closing %d streams",
            self.position + 1,
            position,
            len(self.manager),
        )
        for subscriber in list(self.manager.all()):
            self.disconnect(subscriber, RESYNC)
        self.cache = AccessCache()
        self.position = position
        self.window.reset(position)

    async def process(self, events: Sequence[Event]) -> None:
        """Load the workspaces a membership change needs (rare, awaited), then `dispatch`."""
        if not events:
            return
        missing = self.cache.missing_workspaces(events)
        if missing:
            events = await self._with_topics([workspace_channel(ws) for ws in missing], events)
            await self.cache.load_workspaces(
                self.pool, missing, at=self.position, barrier=self.barrier
            )
        for transaction in _transactions(events):
            self._dispatch_transaction(transaction)
            if self._pressed:
                # A burst filled half of some buffer: give the sockets that take data a moment
                # to take it before the next transaction, rather than cut off a client that
                # reads. It cannot last: a client that reads slower than the stream fills its
                # buffer and is cut off (PROTOCOL.md §4 Isolation), and then nothing presses.
                self._pressed = False
                self.flush()
                await asyncio.sleep(PRESSURE_PAUSE_S)
        self.cache.evict_idle()
        self._signal_advance()

    def _signal_advance(self) -> None:
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def _with_topics(
        self, topics: list[ChannelKey], events: Sequence[Event]
    ) -> Sequence[Event]:
        """`events` with those of `topics` that a topic reader has not carried: a connected
        user turned active in a workspace, whose topic the bus reads from `since` on
        (`Bus.subscribe`); its events in `(position, since]` come from Postgres, merged in
        position order (`since` is at most the end of the batch being dispatched)."""
        since = self.subscribe(topics)
        if since <= self.position:
            return events
        async with self.pool.acquire() as conn:
            extra = await read_topics(conn, topics, self.position, since)
        merged = {e.seq: e for e in (*events, *extra)}
        return [merged[p] for p in sorted(merged)]

    def subscribe(self, topics: Collection[ChannelKey]) -> int:
        """Have the bus carry `topics` (`Bus.subscribe`) from the dispatcher's position on;
        returns `since`: events of them past it are dispatched. Topics stay subscribed while
        some stream, connected user or held workspace needs them, or a `hold` names them
        (`sweep_topics`)."""
        self._subscribed.update(topics)
        return self.bus.subscribe(topics, self.position)

    def hold(self, topics: Collection[ChannelKey], held: bool) -> None:
        """Keep `topics` subscribed while a stream opens (`held`), or let them go."""
        for topic in topics:
            count = self._holds.get(topic, 0) + (1 if held else -1)
            if count > 0:
                self._holds[topic] = count
            else:
                self._holds.pop(topic, None)

    async def sweep_topics(self) -> None:
        """Unsubscribe the topics nothing needs any more: no stream listens on them, no
        connected user or held workspace is theirs, no `hold` names them. Runs between two
        batches, so that no workspace is loaded meanwhile."""
        async with self._lock:
            needed = set(self.manager.channel_counts())
            needed.update(user_channel(user) for user in self.cache.state.users)
            needed.update(workspace_channel(ws) for ws in self.cache.state.streams)
            idle = self._subscribed - needed - self._holds.keys()
            if idle:
                self.bus.unsubscribe(idle)
                self._subscribed -= idle

    async def reached(self, position: int, timeout_s: float) -> bool:
        """Wait until every event up to `position` is dispatched; False after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.position < position:
                    await self._advanced.wait()
        except TimeoutError:
            return False
        return True

    def dispatch(self, events: Sequence[Event]) -> None:
        """Apply and fan out events in position order, one transaction at a time. Never awaits.

        Frames are queued; the subscribers given any are flushed once the current task step
        ends (`loop.call_soon`), so all the batches of one bus read reach each socket in one
        write (`sync.subscribers`)."""
        for transaction in _transactions(events):
            self._dispatch_transaction(transaction)

    def flush(self) -> None:
        """Hand every subscriber given frames since the last flush its chunk."""
        unflushed, self._unflushed = self._unflushed, {}
        for subscriber in unflushed:
            subscriber.flush()

    def _dispatch_transaction(self, events: Sequence[Event]) -> None:
        for event in events:
            if event.changes_access:
                for change in self.cache.apply(event):
                    channel = [workspace_channel(change.workspace_id)]
                    for subscriber in list(self.manager.get_by_user(change.user_id)):
                        if change.active:
                            self.manager.add_channels(subscriber.id, channel)
                        else:
                            self.manager.remove_channels(subscriber.id, channel)
        for event in events:
            if not event.internal:
                self._fan_out(event)
            self.window.append(event)
            self.position = event.seq

    def _fan_out(self, event: Event) -> None:
        subscribers = self.manager.get_by_channel(channel_for(event))
        if not subscribers:
            return
        state = self.cache.state
        unflushed = self._unflushed
        flushing = bool(unflushed)  # a flush is already scheduled
        frame: Frame | None = None
        slow: list[Subscriber] = []
        delivered = denied = 0
        for subscriber in subscribers:
            if event.seq <= subscriber.after:
                continue
            if not can_receive(state, subscriber.user_id, event, admin=subscriber.admin):
                denied += 1
                continue
            if frame is None:
                frame = encode_change(event)
            own = frame if subscriber.snapshot is None else subscriber.frame_for(event, frame)
            if own is None:
                continue
            if subscriber.queue(own, event.committed_at):
                unflushed[subscriber] = None
                delivered += 1
                if subscriber.half_full:
                    self._pressed = True
            else:
                slow.append(subscriber)
        if delivered and not flushing:
            asyncio.get_running_loop().call_soon(self.flush)
        self._settle(delivered, denied, slow)

    def _settle(self, delivered: int, denied: int, slow: list[Subscriber]) -> None:
        """Count one event's fan-out and cut off the subscribers it found full."""
        self.delivered += delivered
        metrics.DELIVERIES.inc(delivered)
        if denied:
            metrics.DENIED.inc(denied)
        for subscriber in slow:
            self.cut_off(subscriber)

    def ping_idle(self) -> None:
        """Queue the keep-alive comment (`: ping`, PROTOCOL.md §3) to every live stream that
        was sent nothing since the last call; call it every half keep-alive interval, so that
        no stream stays silent for a whole interval (`Subscriber.ping`). One pass over the
        subscribers replaces a timer per connection."""
        slow = [s for s in self.manager.all() if not s.ping(PING)]
        for subscriber in slow:
            self.cut_off(subscriber)

    def cut_off(self, subscriber: Subscriber) -> None:
        """Close a subscriber whose send buffer is full as a slow consumer (PROTOCOL.md §4)."""
        self.slow_consumers += 1
        metrics.SLOW_CONSUMERS.inc()
        logger.info(
            "slow consumer cut off at %d buffered bytes",
            subscriber.max_buffer_bytes,
            extra={"conn": subscriber.id, "user": subscriber.user_id},
        )
        self.disconnect(subscriber, "slow_consumer")

    def disconnect(self, subscriber: Subscriber, reason: str) -> None:
        """End a subscriber's stream on purpose: stop routing to it, then queue a jittered
        `retry:` and `event: close` with `reason` (PROTOCOL.md §3); it resumes by cursor."""
        self.manager.unregister(subscriber.id)
        subscriber.close(reason, farewell=self.retry_frame())


def _transactions(events: Sequence[Event]) -> Iterator[Sequence[Event]]:
    """`events` (in position order) cut into runs of one transaction (one xid) each."""
    start = 0
    for end in range(1, len(events) + 1):
        if end == len(events) or events[end].xid != events[start].xid:
            yield events[start:end]
            start = end
