"""The channel bus: interest-based fan-out over sharded pub/sub, on a Redis Cluster or one Redis.

With the stream bus (`sync.bus_redis`) every replica reads every event. Here a replica hears
only the topics its open streams need (`sync.topics`: `user:{id}`, `workspace:{id}`), so its
input grows with its own users' traffic, as centrifuge subscribes a node only to the channels
its clients use. Topics are spread over the nodes of a Redis Cluster by hash slot (`SPUBLISH`
and `SSUBSCRIBE`, redis.io "Sharded Pub/Sub"; `sync.shards`); a single Redis takes the same
commands.

Publishing (the relay, `publish`). A batch becomes one message per topic on the channel
`{prefix}ch:{<topic>}` (the braces make the topic its hash tag), `{"prev": <the topic's
previous position, or null>, "events": [...]}`, then one tick per node on `{prefix}tick:{<tag>}`
(a tag of that node): `{"from": batch.prev, "upto": batch.last, "last": {<topic>: <its last
position>}}` for the node's topics in the batch. One pipeline per node keeps a node's messages
before its tick. `prev` comes from the relay's memory of each topic's last position (the most
recent `PREV_TOPICS`): a relay that took over, or forgot a quiet topic, sends null.

Reading (the dispatcher, `read`). One connection per node (`sync.shards.NodeListener`)
subscribes the node's tick channel and the channels of the topics `subscribe`d; a
`sync.topic_merge.TopicMerge` puts what they hear back in position order and finds what was
lost, and this bus fills it from Postgres with an indexed per-topic query
(`sync.outbox.read_topics`) before it releases a batch, so `read` yields every event of the
subscribed topics once, in position order, each batch carrying `upto`, the position it
reaches. `subscribe(topics, after)` returns `since`: the events of those topics past it are
read (see `sync.topic_merge` for why subscribing races no event); the dispatcher reads the
ones before it from Postgres. Pub/sub keeps nothing: a replica that falls behind by more than
what it holds reads Postgres, the source of truth, as it does in degraded mode.

Signals, presence and status reports go through a `sync.bus_redis.RedisBus` on one node (on a
cluster, the node of the control keys' hash tag `{prefix}{ctl}:`), unchanged.
"""

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection

import asyncpg
import orjson

from core.cursors import current_position
from core.events import Event, MalformedEvent
from core.signals import Signal
from core.types import ChannelKey
from sync import metrics
from sync.bus import Batch
from sync.bus_redis import RedisBus
from sync.outbox import read_topics
from sync.presence import PresenceUpdate
from sync.retention import pruned_through
from sync.shards import Item, Listening, Lost, NodeListener, Shards
from sync.topic_merge import Release, TopicMerge
from sync.topics import topics_of

logger = logging.getLogger(__name__)

PREV_TOPICS = 1_000_000
"""Topics whose last position the publishing relay remembers, the most recent first."""

QUIET_RELEASE_S = 0.1
"""Seconds a reader may hold a release that carries no event of its topics and only moves its
position (`read`): a replica whose users are quiet wakes its dispatcher ten times a second,
not at every batch of the relay."""

EAGER_S = 1.0
"""Seconds after a `subscribe` during which every release goes out at once: a stream being
opened waits for the dispatcher to reach its snapshot's position (`sync.catchup`,
`DISPATCH_WAIT_S`)."""

_TICK_BYTES = metrics.BUS_RECEIVED_BYTES.labels("tick")
_TOPIC_BYTES = metrics.BUS_RECEIVED_BYTES.labels("topic")

TOPIC_CHANNEL = "ch:"
TICK_CHANNEL = "tick:"
CONTROL_TAG = "{ctl}:"


class ChannelBus:
    """A `sync.bus.Bus` over sharded pub/sub (see the module docstring).

    `url` is a redis-py URL of one node (a cluster's other nodes are discovered); `prefix`
    starts every channel and key and must not hold `{` or `}` (ValueError); `pool` is needed
    to `read` (gap fills), not to publish. Connects lazily, on first use. One `read` at a time.
    `drop_every` > 0 is a fault for tests: every n-th topic message is not sent (its node's
    tick still is), so readers must find the loss and fill it from Postgres.
    """

    def __init__(
        self, url: str, prefix: str, *, pool: asyncpg.Pool | None = None, drop_every: int = 0
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"a channel bus prefix holds no braces, got {prefix!r}")
        self.url = url
        self.prefix = prefix
        self._pool = pool
        self._shards: Shards | None = None
        self._ticks: list[str] = []
        self._tick_keys: list[bytes] = []
        """`_ticks` as sent, to match what a listener hears."""
        self._topics: dict[bytes, ChannelKey] = {}
        """The subscribed topics by their channel as sent."""
        self._control: RedisBus | None = None
        self._discovering = asyncio.Lock()
        self._prev: OrderedDict[ChannelKey, int] = OrderedDict()
        self._published = 0
        self._drop_every = drop_every
        self._messages = 0
        self._merge: TopicMerge | None = None
        self._listeners: list[NodeListener] = []
        self._inbox: list[tuple[int, list[Item]]] = []
        """What the listeners delivered while a step was under way, by node."""
        self._tick_bytes = self._topic_bytes = self._received = 0
        """Bytes of ticks and of topic messages, and events, received since the last step
        (counted into the metrics once per step, not once per read)."""
        self._stepping = False
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._released_at = 0.0
        """Event-loop time of the last release."""
        self._eager_until = 0.0
        """Event-loop time until which releases that only move the position go out at once."""
        self._closed = asyncio.Event()

    # -- naming ---------------------------------------------------------------------------

    def channel(self, topic: ChannelKey) -> str:
        """The pub/sub channel of `topic`: `{prefix}ch:{<topic>}`."""
        return f"{self.prefix}{TOPIC_CHANNEL}{{{topic}}}"

    def topic_of(self, channel: str) -> ChannelKey | None:
        """The topic of a topic channel, None for another channel."""
        head = f"{self.prefix}{TOPIC_CHANNEL}{{"
        if channel.startswith(head) and channel.endswith("}"):
            return channel[len(head) : -1]
        return None

    def tick_channel(self, shards: Shards, node: int) -> str:
        """The tick channel of `node`: `{prefix}tick:{<a tag of the node>}`."""
        return f"{self.prefix}{TICK_CHANNEL}{{{shards.tag_on(node)}}}"

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, batch: Batch) -> bool:
        """Publish the batch's topic messages, then a tick on every node. False (nothing
        sent) when this bus already published up to its last position. Raises
        ConnectionError when a node is unreachable (publish the batch again)."""
        self._check_open()
        if batch.last <= self._published:
            return False
        shards = await self._discover()
        by_topic: dict[ChannelKey, list[Event]] = {}
        for event in batch.events:
            for topic in topics_of(event):
                by_topic.setdefault(topic, []).append(event)
        messages: list[list[tuple[str, bytes]]] = [[] for _ in range(shards.size)]
        lasts: list[dict[ChannelKey, int]] = [{} for _ in range(shards.size)]
        for topic, events in by_topic.items():
            channel = self.channel(topic)
            node = shards.node_of(channel)
            body = {"prev": self._prev.get(topic), "events": [e.to_wire() for e in events]}
            lasts[node][topic] = events[-1].seq
            self._messages += 1
            if self._drop_every and self._messages % self._drop_every == 0:
                logger.warning(
                    "dropping the message of %s up to %d (fault)", topic, lasts[node][topic]
                )
                continue
            messages[node].append((channel, orjson.dumps(body)))
        for node in range(shards.size):
            tick = {"from": batch.prev, "upto": batch.last, "last": lasts[node]}
            messages[node].append((self._ticks[node], orjson.dumps(tick)))
        await shards.publish(messages)
        for topic, events in by_topic.items():
            self._prev[topic] = events[-1].seq
            self._prev.move_to_end(topic)
        while len(self._prev) > PREV_TOPICS:
            self._prev.popitem(last=False)
        self._published = batch.last
        return True

    async def last_position(self) -> int:
        """The last position this bus published (pub/sub keeps nothing to ask)."""
        return self._published

    # -- reading --------------------------------------------------------------------------

    def subscribe(self, topics: Collection[ChannelKey], after: int) -> int:
        """Read `topics` from now on; returns `since` (at least `after` for a new topic,
        the topic's own for one already read, `TopicMerge.subscribe`): every event of them
        past it is read. Before `read` starts, `after`: the read starts where it is asked."""
        since = 0
        shards, merge = self._shards, self._merge
        if merge is not None:
            self._eager_until = asyncio.get_running_loop().time() + EAGER_S
        for topic in topics:
            channel = self.channel(topic)
            key = channel.encode()
            known = after
            if merge is not None and shards is not None:
                node = shards.node_of(channel)
                known = merge.subscribe(topic, node, after)
                if key not in self._topics:
                    self._listeners[node].want((channel,))
            self._topics[key] = topic
            since = max(since, known)
        metrics.BUS_TOPICS.set(len(self._topics))
        return since

    def unsubscribe(self, topics: Collection[ChannelKey]) -> None:
        """Stop reading `topics`."""
        shards = self._shards
        for topic in topics:
            channel = self.channel(topic)
            if self._topics.pop(channel.encode(), None) is None:
                continue
            if self._merge is not None and shards is not None:
                self._merge.unsubscribe(topic)
                self._listeners[shards.node_of(channel)].drop((channel,))
        metrics.BUS_TOPICS.set(len(self._topics))

    def readable(self) -> bool:
        """False after close() and while a node's subscription connection fails."""
        return not self._closed.is_set() and not any(n.failing for n in self._listeners)

    async def read(self, after: int) -> AsyncIterator[Batch]:
        """Every event of the subscribed topics after position `after`, in position order,
        in batches that each carry `upto`, until close(). Node outages are retried inside;
        what they lost is read from Postgres. Raises RuntimeError without a pool.

        A batch with events is released as soon as the ticks allow; one that only moves the
        position (no event of this replica's topics) waits up to `QUIET_RELEASE_S` to be
        released with the next, unless a topic was subscribed within `EAGER_S`."""
        if self._pool is None:
            raise RuntimeError("reading the channel bus needs a Postgres pool")
        if self._closed.is_set():
            return
        shards = await self._discover()
        loop = asyncio.get_running_loop()
        merge = TopicMerge(after, shards.size)
        listeners = [
            NodeListener(node, url, self._deliver, self._closed, (self._ticks[node],))
            for node, url in enumerate(shards.urls)
        ]
        for topic in self._topics.values():
            channel = self.channel(topic)
            node = shards.node_of(channel)
            merge.subscribe(topic, node, after)
            listeners[node].want((channel,))
        self._inbox, self._wake, self._released_at = [], asyncio.Event(), loop.time()
        self._merge, self._listeners = merge, listeners
        tasks = [asyncio.create_task(n.run(), name=f"bus node {n.node}") for n in listeners]
        try:
            while True:
                await self._wake.wait()
                if self._closed.is_set():
                    return
                self._wake.clear()
                self._stepping = True
                try:
                    inbox, self._inbox = self._inbox, []
                    for node, items in inbox:
                        self._take_all(merge, node, items)
                    self._count()
                    batch = await self._step(merge)
                finally:
                    self._stepping = False
                if batch is not None:
                    self._released_at = loop.time()
                    yield batch
                self._check(merge)
        finally:
            self._count()
            self._merge, self._listeners = None, []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _deliver(self, node: int, items: list[Item]) -> None:
        """What node `node`'s listener heard in one read (`sync.shards.Deliver`): taken into
        the merge at once, unless a step is under way (then it waits in the inbox for the
        next); the reader is woken when there is something to do (`_check`)."""
        merge = self._merge
        if merge is None:
            return
        if self._stepping:
            self._inbox.append((node, items))
            self._wake.set()
            return
        self._take_all(merge, node, items)
        self._check(merge)

    def _check(self, merge: TopicMerge) -> None:
        """Wake the reader when the merge has work or events to release, or when only the
        position would move and that has waited `QUIET_RELEASE_S` (or a topic was subscribed
        within `EAGER_S`); else arm a timer for when it will have waited."""
        if self._wake.is_set():
            return
        if merge.ready():
            self._wake.set()
            return
        if merge.bound() <= merge.released:
            return
        loop = asyncio.get_running_loop()
        due = self._released_at + QUIET_RELEASE_S
        if loop.time() >= due or loop.time() < self._eager_until:
            self._wake.set()
        elif self._timer is None:
            self._timer = loop.call_at(due, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._merge is not None:
            self._wake.set()

    def _take_all(self, merge: TopicMerge, node: int, items: list[Item]) -> None:
        """Take what node `node` delivered into the merge, counting bytes and events."""
        tick, topics = self._tick_keys[node], self._topics
        for item in items:
            if type(item) is list:
                channel, data = item[1], item[2]
                if channel == tick:
                    self._tick_bytes += len(data)
                    self._take_tick(merge, node, data)
                elif (topic := topics.get(channel)) is not None:  # else unsubscribed meanwhile
                    self._topic_bytes += len(data)
                    self._received += self._take_message(merge, topic, data)
            elif isinstance(item, Listening):
                names = [t for c in item.channels if (t := self.topic_of(c)) is not None]
                merge.listening(item.node, names, item.whole)
            elif isinstance(item, Lost):
                merge.lost(item.node)

    def _count(self) -> None:
        """Add what was received since the last call to the metrics."""
        if self._tick_bytes:
            _TICK_BYTES.inc(self._tick_bytes)
        if self._topic_bytes:
            _TOPIC_BYTES.inc(self._topic_bytes)
            metrics.BUS_RECEIVED_EVENTS.inc(self._received)
        self._tick_bytes = self._topic_bytes = self._received = 0

    def _take_message(self, merge: TopicMerge, topic: ChannelKey, data: bytes) -> int:
        """One topic message into the merge; returns its events (0 for one skipped)."""
        try:
            body = orjson.loads(data)
            prev = body["prev"]
            events = [Event.from_row(e) for e in body["events"]]
        except (ValueError, KeyError, TypeError, MalformedEvent) as exc:
            logger.error("skipping a message of %s: %s", topic, exc)
            return 0  # the node's tick shows the topic's loss: filled from Postgres
        merge.on_message(topic, None if prev is None else int(prev), events)
        return len(events)

    def _take_tick(self, merge: TopicMerge, node: int, data: bytes) -> None:
        try:
            body = orjson.loads(data)
            start, upto, last = int(body["from"]), int(body["upto"]), body["last"]
            if not isinstance(last, dict):
                raise TypeError(f"last is a {type(last).__name__}")
        except (ValueError, KeyError, TypeError) as exc:
            logger.error("skipping a tick on %s: %s", self._ticks[node], exc)
            return  # the next tick's `from` shows the loss
        merge.on_tick(node, start, upto, last)

    async def _step(self, merge: TopicMerge) -> Batch | None:
        """Settle what was confirmed, fill the gaps below the bound, release up to it."""
        assert self._pool is not None
        topics, nodes = merge.to_settle()
        if topics or nodes:
            low = merge.settle_from(topics, nodes)
            async with self._pool.acquire() as conn:
                head = await current_position(conn)
                events = await read_topics(conn, topics, low, head) if topics else []
                pruned = await pruned_through(conn)
            if pruned > low:
                return self._lost(merge, low, pruned)
            merge.settle(topics, nodes, head, events)
        bound = merge.bound()
        while (due := merge.fills(bound)) is not None:
            gap_topics, low = due
            metrics.GAP_FILLS.inc()
            logger.info("filling %d topics after %d up to %d", len(gap_topics), low, bound)
            async with self._pool.acquire() as conn:
                events = await read_topics(conn, gap_topics, low, bound)
                pruned = await pruned_through(conn)
            if pruned > low:
                return self._lost(merge, low, pruned)
            merge.filled(gap_topics, bound, events)
            bound = min(bound, merge.bound())
        return _batch(merge.release(min(bound, merge.bound())))

    def _lost(self, merge: TopicMerge, low: int, pruned: int) -> Batch:
        """Events after `low` were pruned before this bus could read them: a batch whose
        `prev` is past the reader makes the dispatcher fill from Postgres, find the prune
        and resync (`sync.dispatcher.Dispatcher.resync`)."""
        logger.error("events after %d were pruned (through %d) before they were read", low, pruned)
        skip = max(merge.bound(), pruned)
        merge.release(skip)
        return Batch(skip, (), upto=skip)

    # -- signals, presence, status: one node ------------------------------------------------

    async def _discover(self) -> Shards:
        async with self._discovering:
            if self._shards is None:
                shards = await Shards.discover(self.url)
                prefix = f"{self.prefix}{CONTROL_TAG}" if shards.cluster else self.prefix
                node = shards.node_of(prefix) if shards.cluster else 0
                self._control = RedisBus(shards.urls[node], prefix)
                self._ticks = [self.tick_channel(shards, n) for n in range(shards.size)]
                self._tick_keys = [tick.encode() for tick in self._ticks]
                self._shards = shards
                logger.info(
                    "channel bus on %d Redis node%s%s",
                    shards.size,
                    "s" if shards.size > 1 else "",
                    " (cluster)" if shards.cluster else "",
                )
            return self._shards

    async def control_bus(self) -> RedisBus:
        """The `RedisBus` of signals, presence and status reports (on a cluster, on the node
        of the control hash tag). Raises ConnectionError after close() or when Redis does
        not answer."""
        self._check_open()
        await self._discover()
        assert self._control is not None
        return self._control

    async def publish_signal(self, signal: Signal) -> None:
        """`sync.bus_redis.RedisBus.publish_signal` on the control node."""
        await (await self.control_bus()).publish_signal(signal)

    async def signals(self) -> AsyncIterator[Signal]:
        """`sync.bus_redis.RedisBus.signals` on the control node."""
        async for signal in (await self.control_bus()).signals():
            yield signal

    async def publish_presence(self, update: PresenceUpdate) -> None:
        """`sync.bus_redis.RedisBus.publish_presence` on the control node."""
        await (await self.control_bus()).publish_presence(update)

    async def presence(self) -> AsyncIterator[PresenceUpdate]:
        """`sync.bus_redis.RedisBus.presence` on the control node."""
        async for update in (await self.control_bus()).presence():
            yield update

    async def put_presence(self, update: PresenceUpdate, ttl_s: float) -> None:
        """`sync.bus_redis.RedisBus.put_presence` on the control node."""
        await (await self.control_bus()).put_presence(update, ttl_s)

    async def presences(self) -> dict[str, PresenceUpdate]:
        """`sync.bus_redis.RedisBus.presences` on the control node."""
        return await (await self.control_bus()).presences()

    async def put_status(self, replica: str, report: bytes, ttl_s: float) -> None:
        """`sync.bus_redis.RedisBus.put_status` on the control node."""
        await (await self.control_bus()).put_status(replica, report, ttl_s)

    async def statuses(self) -> dict[str, bytes]:
        """`sync.bus_redis.RedisBus.statuses` on the control node."""
        return await (await self.control_bus()).statuses()

    async def ping(self) -> bool:
        """True when the control node answers PING within 1 s; never raises."""
        try:
            control = await self.control_bus()
        except (ConnectionError, OSError):
            return False
        return await control.ping()

    async def close(self) -> None:
        """Close every connection and end the reader. Idempotent."""
        self._closed.set()
        self._wake.set()
        if self._control is not None:
            await self._control.close()
        if self._shards is not None:
            await self._shards.close()

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ConnectionError(f"the channel bus {self.prefix} is closed")


def _batch(release: Release | None) -> Batch | None:
    if release is None:
        return None
    return Batch(release.prev, release.events, upto=release.upto)
