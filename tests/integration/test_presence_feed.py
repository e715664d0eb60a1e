"""`PresenceFeed` (PROTOCOL.md §5) on real buses, dispatchers and subscriber buffers: what it
queues to whom, slow consumers, and two replicas through a Redis that dies and comes back.

A replica here is a bus, a `Dispatcher` (its subscriber index and access cache; the pool is
only held) and a feed; a user "connects" by having their access installed in the replica's
cache and their subscriber registered on their workspace channels, as `sync.catchup` does.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from core.access import UserAccess
from core.channels import user_channel, workspace_channel
from sync.access_cache import AccessCache, Snapshot
from sync.bus import Bus
from sync.bus_memory import InProcessBus
from sync.bus_redis import RedisBus
from sync.dispatcher import Dispatcher
from sync.presence import PresenceUpdate
from sync.presence_feed import PresenceFeed
from sync.subscribers import StreamSubscriberManager, Subscriber
from tests.services import RedisProcess
from tests.sse import parse

WAIT_S = 10.0
"""How long a wait for a state may take before the test fails (not a timing check)."""


@dataclass
class Replica:
    """One gateway's presence parts; `connect` / `disconnect` act as a stream would."""

    feed: PresenceFeed
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    written: dict[str, list[bytes]] = field(default_factory=dict)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def dispatcher(self) -> Dispatcher:
        return self.feed.dispatcher

    def connect(
        self, user: str, *workspaces: str, buffer_bytes: int = 65_536, read: bool = True
    ) -> Subscriber:
        """Connect `user`, active in `workspaces`; with `read`, a task writes what the
        subscriber is sent to `written[subscriber.id]`, else nothing takes it (a stalled
        client)."""
        cache = self.dispatcher.cache
        access = UserAccess(user, {ws: "active" for ws in workspaces})
        assert cache.install(Snapshot(0, access, {ws: {} for ws in workspaces}), [])
        subscriber = Subscriber(
            f"{user}-{len(self.dispatcher.manager)}", user, max_buffer_bytes=buffer_bytes
        )
        channels = [user_channel(user), *(workspace_channel(ws) for ws in workspaces)]
        self.dispatcher.manager.register(subscriber, channels)
        self.feed.opened(subscriber)
        if read:
            self.readers.append(asyncio.create_task(self._read(subscriber)))
        return subscriber

    async def _read(self, subscriber: Subscriber) -> None:
        chunks = self.written.setdefault(subscriber.id, [])
        async for chunk in subscriber.frames():
            chunks.append(chunk)

    def presence(self, subscriber: Subscriber) -> list[dict[str, Any]]:
        """The data of the presence frames written to `subscriber`, in order."""
        written = parse(self.written.get(subscriber.id, []))
        return [f["data"] for f in written if f.get("event") == "presence"]

    def disconnect(self, subscriber: Subscriber) -> None:
        self.dispatcher.manager.unregister(subscriber.id)
        self.dispatcher.cache.release(subscriber.user_id)
        self.feed.closed(subscriber)

    async def start(self) -> None:
        await self.feed.start()
        self.task = asyncio.create_task(self.feed.run(self.stop))

    async def close(self) -> None:
        for reader in self.readers:
            reader.cancel()
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, WAIT_S)
        await self.feed.bus.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as created:
        yield created


@pytest.fixture
async def replicas(pool: asyncpg.Pool) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    """Builds started replicas: `replicas(bus, name, ttl_s=...)` (a grace of 0.2 s, ticks every
    0.05 s); closed at teardown."""
    made: list[Replica] = []

    async def make(bus: Bus, name: str, ttl_s: float = 3.0) -> Replica:
        dispatcher = Dispatcher(bus, pool, StreamSubscriberManager(), AccessCache())
        feed = PresenceFeed(bus, dispatcher, name, grace_s=0.2, interval_s=0.05, ttl_s=ttl_s)
        replica = Replica(feed)
        await replica.start()
        made.append(replica)
        return replica

    yield make
    for replica in made:
        with contextlib.suppress(Exception):
            await replica.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_each_subscriber_gets_its_first_set_then_diffs_and_only_while_active(
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    bus = InProcessBus()
    here = await replicas(bus, "here")
    alice = here.connect("alice", "w1", "w2")
    await until(lambda: len(here.presence(alice)) == 2, "alice's first sets")
    assert sorted(here.presence(alice), key=str) == [
        {"workspaceId": "w1", "online": ["alice"], "offline": []},
        {"workspaceId": "w2", "online": ["alice"], "offline": []},
    ]

    await bus.publish_presence(PresenceUpdate("there", 1, frozenset({("w1", "dan")})))
    await until(lambda: len(here.presence(alice)) == 3, "dan's arrival")
    assert here.presence(alice)[2] == {"workspaceId": "w1", "online": ["dan"], "offline": []}
    assert here.feed.online("w1") == ["alice", "dan"]

    # alice loses w1 in the access state; her channel is still there for a moment.
    here.dispatcher.cache.state.users["alice"].workspaces["w1"] = "invited"
    await bus.publish_presence(PresenceUpdate("there", 2, frozenset({("w1", "erin")})))
    await bus.publish_presence(PresenceUpdate("there", 3, frozenset({("w2", "erin")})))
    await until(lambda: len(here.presence(alice)) == 4, "erin's arrival in w2")
    assert here.presence(alice)[3] == {"workspaceId": "w2", "online": ["erin"], "offline": []}
    await until(lambda: here.feed.online("w1") == ["dan", "erin"], "alice offline in w1")
    assert len(here.presence(alice)) == 4  # nothing of w1 since


async def test_a_subscriber_whose_buffer_is_full_is_cut_off_as_a_slow_consumer(
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    bus = InProcessBus()
    here = await replicas(bus, "here")
    roomy = here.connect("alice", "w1")
    tight = here.connect("bob", "w1", buffer_bytes=120, read=False)
    await until(lambda: tight.buffered_bytes > 0, "bob's first set")

    crowd = frozenset(("w1", f"user-{n:03}") for n in range(20))
    await bus.publish_presence(PresenceUpdate("there", 1, crowd))

    await until(lambda: tight.closed, "bob cut off")
    assert tight.close_reason == "slow_consumer"
    assert here.dispatcher.manager.get(tight.id) is None

    def crowded() -> bool:
        return any(len(f["online"]) == 20 for f in here.presence(roomy))

    await until(crowded, "alice's diff")
    assert not roomy.closed


@pytest.fixture
def server() -> Iterator[RedisProcess]:
    with RedisProcess() as process:
        yield process


async def test_presence_survives_a_redis_outage_and_catches_up_after_it(
    server: RedisProcess,
    replicas: Callable[..., Awaitable[Replica]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Heartbeats are written every 10 s when all is well: the catch-up after the outage
    comes from the retried heartbeats and the full set announced once they succeed."""
    caplog.set_level(logging.INFO, logger="sync.presence_feed")
    one = await replicas(RedisBus(server.url, "ustest:presence:", block_ms=200), "one", ttl_s=30)
    two = await replicas(RedisBus(server.url, "ustest:presence:", block_ms=200), "two", ttl_s=30)
    bob = two.connect("bob", "w1")
    await until(lambda: one.feed.online("w1") == ["bob"], "bob online at one")

    server.stop()
    await until(lambda: "failed (1 in a row)" in caplog.text, "the outage noticed")
    carol = two.connect("carol", "w1")
    two.disconnect(bob)
    await asyncio.sleep(0.5)  # bob's grace passes while nothing can be announced
    assert two.feed.online("w1") == ["carol"]
    assert one.feed.online("w1") == ["bob"]  # what one knew stays
    server.start()

    await until(lambda: one.feed.online("w1") == ["carol"], "one caught up")
    assert "presence heartbeats written again" in caplog.text
    for replica in (one, two):
        assert replica.task is not None and not replica.task.done()
    two.disconnect(carol)
    await until(lambda: one.feed.online("w1") == [], "carol offline at one")
