"""The `sync.bus.Bus` contract, one suite run on every implementation (centrifuge's shared
broker tests take a broker factory the same way): `InProcessBus` and `RedisBus`.

`RedisBus` runs against the session's Redis with a key prefix of the test's own; both buses
trim to `max_batches`, Redis approximately (whole stream nodes), so the trimming tests check
the gap a reader sees, not an exact count. Batches come from `tests.factories.batch`; the
`readers` fixture (tests/conftest.py) starts `tests.bus_readers.Reader`s.

Ephemeral signals (PROTOCOL.md §5) are checked on both too: every subscribed reader gets each
one once, in order, nothing published before it subscribed, and nothing of the batches'.
`tests.signal_readers` waits until readers are subscribed, with probe signals.

Presence (PROTOCOL.md §5) too: updates reach every subscribed `presence()` reader, the
publisher's own included, apart from signals; heartbeats are kept per replica until replaced
or expired, apart from status reports.
"""

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import cast

import pytest

from sync.bus import Batch, Bus
from sync.bus_memory import InProcessBus
from sync.bus_redis import RedisBus
from sync.presence import PresenceUpdate
from tests.bus_readers import WAIT_S, Reader
from tests.factories import batch
from tests.signal_readers import SignalReader, make_signal, subscribed

BusFactory = Callable[..., Bus]


@pytest.fixture(params=["memory", "redis"])
async def make_bus(request: pytest.FixtureRequest) -> AsyncIterator[BusFactory]:
    """Builds buses of one implementation: `make_bus(max_batches=...)`; closed at teardown."""
    made: list[Bus] = []

    def make(max_batches: int = 10_000) -> Bus:
        bus: Bus
        if request.param == "memory":
            bus = InProcessBus(max_batches=max_batches)
        else:
            url = request.getfixturevalue("redis_url")
            prefix = request.getfixturevalue("redis_prefix")
            bus = RedisBus(url, prefix, max_batches=max_batches, block_ms=200)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.close()


@pytest.fixture
async def signal_readers() -> AsyncIterator[Callable[[Bus], SignalReader]]:
    """Starts `SignalReader`s: `signal_readers(bus)`; every one is stopped at teardown."""
    started: list[SignalReader] = []

    def start(bus: Bus) -> SignalReader:
        started.append(SignalReader(bus))
        return started[-1]

    yield start
    for reader in started:
        await reader.stop()


class PresenceReader:
    """Iterates `bus.presence()` in a task of its own, recording every update it gets."""

    def __init__(self, bus: Bus) -> None:
        self.received: list[PresenceUpdate] = []
        self.task = asyncio.create_task(self._consume(bus))

    async def _consume(self, bus: Bus) -> None:
        async for update in bus.presence():
            self.received.append(update)

    def updates(self) -> list[PresenceUpdate]:
        """What was received, probes left out, in order."""
        return [u for u in self.received if u.replica != PROBE_REPLICA]

    async def wait_for(self, count: int) -> None:
        """Wait until `count` updates other than probes came (fails after WAIT_S)."""
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while len(self.updates()) < count:
            if self.task.done():
                self.task.result()
                raise AssertionError(f"reader ended with {self.updates()}")
            assert asyncio.get_running_loop().time() < deadline, f"got only {self.updates()}"
            await asyncio.sleep(0.01)


PROBE_REPLICA = "probe"


@pytest.fixture
async def presence_readers() -> AsyncIterator[Callable[[Bus], PresenceReader]]:
    """Starts `PresenceReader`s: `presence_readers(bus)`; every one is stopped at teardown."""
    started: list[PresenceReader] = []

    def start(bus: Bus) -> PresenceReader:
        started.append(PresenceReader(bus))
        return started[-1]

    yield start
    for reader in started:
        reader.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader.task


async def presence_subscribed(bus: Bus, *readers: PresenceReader) -> None:
    """Publish probe updates until every reader got one: from then on, each reader receives
    whatever is published (pub/sub keeps nothing for a reader not yet subscribed)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    for seq in itertools.count(1):
        if all(any(u.replica == PROBE_REPLICA for u in r.received) for r in readers):
            return
        assert asyncio.get_running_loop().time() < deadline, "presence readers never subscribed"
        await bus.publish_presence(PresenceUpdate(PROBE_REPLICA, seq, frozenset()))
        await asyncio.sleep(0.02)


def presence_update(replica: str, seq: int, *users: str, full: bool = False) -> PresenceUpdate:
    """`replica`'s `seq`-th update: `users` online in w1 (offline in w2 unless `full`)."""
    online = frozenset(("w1", u) for u in users)
    offline = frozenset() if full else frozenset(("w2", u) for u in users)
    return PresenceUpdate(replica, seq, online, offline, full)


async def publish_all(bus: Bus, batches: list[Batch]) -> None:
    for item in batches:
        assert await bus.publish(item)


async def next_batch(batches: AsyncGenerator[Batch, None]) -> Batch:
    """The iterator's next batch; fails the test rather than hang if none comes."""
    return await asyncio.wait_for(anext(batches), timeout=WAIT_S)


def consecutive(batches: list[Batch]) -> bool:
    """True when each batch's `prev` is the previous batch's last position."""
    return all(b.prev == a.last for a, b in itertools.pairwise(batches))


async def test_reader_gets_published_batches_in_order(
    make_bus: BusFactory, readers: Callable[..., Reader]
) -> None:
    bus = make_bus()
    published = [batch(0, 1, 2), batch(2, 3), batch(3, 5, 8, 9), batch(9, 12)]
    await publish_all(bus, published)

    reader = readers(bus)
    await reader.reach(12)

    assert reader.batches == published


@pytest.mark.parametrize(("after", "first_last"), [(0, 2), (1, 2), (2, 3), (3, 9), (5, 9)])
async def test_read_after_skips_batches_ending_at_or_before_after(
    make_bus: BusFactory, readers: Callable[..., Reader], after: int, first_last: int
) -> None:
    bus = make_bus()
    published = [batch(0, 1, 2), batch(2, 3), batch(3, 5, 8, 9), batch(9, 12)]
    await publish_all(bus, published)

    reader = readers(bus, after)
    await reader.reach(12)

    assert reader.batches == [b for b in published if b.last >= first_last]


async def test_reader_started_before_publishing_gets_later_batches(
    make_bus: BusFactory, readers: Callable[..., Reader]
) -> None:
    bus = make_bus()
    reader = readers(bus)
    await publish_all(bus, [batch(0, 1)])
    await reader.reach(1)  # the reader is live: what follows is published while it waits

    await publish_all(bus, [batch(1, 2, 3), batch(3, 4)])
    await reader.reach(4)

    assert reader.batches == [batch(0, 1), batch(1, 2, 3), batch(3, 4)]


async def test_two_readers_each_get_every_batch_exactly_once(
    make_bus: BusFactory, readers: Callable[..., Reader]
) -> None:
    bus = make_bus()
    first, second = readers(bus), readers(bus)
    published = [batch(n - 1, n) for n in range(1, 31)]

    for item in published:
        assert await bus.publish(item)
        if item.last % 10 == 0:
            await first.reach(item.last)
    await second.reach(30)
    await first.reach(30)
    assert await bus.publish(batch(30, 31))  # a marker: nothing may come between 30 and it
    await first.reach(31)
    await second.reach(31)

    assert first.batches == [*published, batch(30, 31)]
    assert second.batches == [*published, batch(30, 31)]


async def test_publish_refuses_a_batch_not_past_the_last_published(
    make_bus: BusFactory, readers: Callable[..., Reader]
) -> None:
    bus = make_bus()
    assert await bus.publish(batch(0, 1, 2)) is True

    assert await bus.publish(batch(0, 1, 2)) is False  # the same batch again
    assert await bus.publish(batch(1, 2)) is False  # ends at the last position
    assert await bus.publish(batch(0, 1)) is False  # ends before it
    assert await bus.last_position() == 2

    assert await bus.publish(batch(2, 3)) is True
    reader = readers(bus)
    await reader.reach(3)
    assert reader.batches == [batch(0, 1, 2), batch(2, 3)]


async def test_reader_from_zero_starts_at_the_oldest_kept_batch_after_trimming(
    make_bus: BusFactory, readers: Callable[..., Reader]
) -> None:
    bus = make_bus(max_batches=5)
    await publish_all(bus, [batch(n - 1, n) for n in range(1, 251)])

    reader = readers(bus)
    await reader.reach(250)

    assert reader.batches[0].prev > 0  # the gap before the oldest kept batch shows
    assert len(reader.batches) < 250
    assert consecutive(reader.batches)
    assert await bus.last_position() == 250


async def test_reader_behind_the_trimmed_window_goes_on_from_the_oldest_kept_batch(
    make_bus: BusFactory,
) -> None:
    bus = make_bus(max_batches=5)
    await publish_all(bus, [batch(0, 1)])
    async with contextlib.aclosing(cast(AsyncGenerator[Batch, None], bus.read(0))) as batches:
        assert await next_batch(batches) == batch(0, 1)
        # The reader does not ask for more while these are published: it falls behind.
        await publish_all(bus, [batch(n - 1, n) for n in range(2, 251)])

        later = [await next_batch(batches)]
        while later[-1].last < 250:
            later.append(await next_batch(batches))

    assert later[0].prev > 1  # events 2..prev were trimmed before the reader got to them
    assert consecutive(later)


async def test_last_position_is_the_last_published_position(make_bus: BusFactory) -> None:
    bus = make_bus()
    assert await bus.last_position() == 0

    await publish_all(bus, [batch(0, 3, 4), batch(4, 10)])

    assert await bus.last_position() == 10


async def test_close_ends_an_active_reader(
    make_bus: BusFactory, readers: Callable[..., Reader]
) -> None:
    bus = make_bus()
    reader = readers(bus)
    await publish_all(bus, [batch(0, 1)])
    await reader.reach(1)

    await bus.close()

    await reader.ended()
    assert reader.batches == [batch(0, 1)]


async def test_closed_bus_is_down_and_reads_nothing(
    make_bus: BusFactory, readers: Callable[..., Reader]
) -> None:
    bus = make_bus()
    await publish_all(bus, [batch(0, 1)])
    assert await bus.ping() is True

    await bus.close()

    assert await bus.ping() is False
    with pytest.raises(ConnectionError, match="closed"):
        await bus.publish(batch(1, 2))
    reader = readers(bus)
    await reader.ended()
    assert reader.batches == []
    await bus.close()  # idempotent


async def test_replica_status_reports_are_kept_until_replaced_or_expired(
    make_bus: BusFactory,
) -> None:
    bus = make_bus()
    assert await bus.statuses() == {}

    await bus.put_status("gw-1", b'{"connections": 1}', ttl_s=30)
    await bus.put_status("gw-2", b'{"connections": 2}', ttl_s=0.2)
    await bus.put_status("gw-1", b'{"connections": 3}', ttl_s=30)
    both = await bus.statuses()
    await asyncio.sleep(0.4)  # gw-2's report expires

    assert both == {"gw-1": b'{"connections": 3}', "gw-2": b'{"connections": 2}'}
    assert await bus.statuses() == {"gw-1": b'{"connections": 3}'}
    await bus.close()
    with pytest.raises(ConnectionError, match="closed"):
        await bus.put_status("gw-1", b"{}", ttl_s=30)


async def test_every_subscribed_reader_gets_each_signal_once_in_order(
    make_bus: BusFactory, signal_readers: Callable[[Bus], SignalReader]
) -> None:
    bus = make_bus()
    # Another replica's bus on the same Redis; in one process there is only the one bus.
    other_replica = bus if isinstance(bus, InProcessBus) else make_bus()
    first, second = signal_readers(bus), signal_readers(other_replica)
    await subscribed(bus, first, second)
    sent = [
        make_signal(data='{"n":1}'),
        make_signal(type="presence.ping", stream_id=None, actor_id=None, data=None),
        make_signal(user_id="u2", workspace_id=None, stream_id=None, data='{"n":3}'),
    ]

    for signal in sent:
        await bus.publish_signal(signal)
    await first.wait_for(3)
    await second.wait_for(3)

    assert first.signals() == sent
    assert second.signals() == sent


async def test_a_reader_never_gets_signals_published_before_it_subscribed(
    make_bus: BusFactory, signal_readers: Callable[[Bus], SignalReader]
) -> None:
    bus = make_bus()
    await bus.publish_signal(make_signal(data='"before"'))  # nobody listens: gone

    reader = signal_readers(bus)
    await subscribed(bus, reader)
    await bus.publish_signal(make_signal(data='"after"'))
    await reader.wait_for(1)

    assert [s.data for s in reader.signals()] == ['"after"']


async def test_signals_are_not_batches_and_batches_are_not_signals(
    make_bus: BusFactory,
    readers: Callable[..., Reader],
    signal_readers: Callable[[Bus], SignalReader],
) -> None:
    bus = make_bus()
    signals = signal_readers(bus)
    await subscribed(bus, signals)
    batches = readers(bus)

    await publish_all(bus, [batch(0, 1)])
    await bus.publish_signal(make_signal())
    await publish_all(bus, [batch(1, 2)])
    await batches.reach(2)
    await signals.wait_for(1)

    assert batches.batches == [batch(0, 1), batch(1, 2)]
    assert signals.signals() == [make_signal()]
    assert await bus.last_position() == 2


async def test_close_ends_signal_readers_and_refuses_signals(
    make_bus: BusFactory, signal_readers: Callable[[Bus], SignalReader]
) -> None:
    bus = make_bus()
    reader = signal_readers(bus)
    await subscribed(bus, reader)

    await bus.close()

    await reader.ended()
    with pytest.raises(ConnectionError, match="closed"):
        await bus.publish_signal(make_signal())
    late = signal_readers(bus)
    await late.ended()
    assert late.received == []


async def test_every_subscribed_reader_gets_each_presence_update_once_in_order(
    make_bus: BusFactory, presence_readers: Callable[[Bus], PresenceReader]
) -> None:
    bus = make_bus()
    other_replica = bus if isinstance(bus, InProcessBus) else make_bus()
    own, other = presence_readers(bus), presence_readers(other_replica)
    await presence_subscribed(bus, own, other)
    sent = [
        presence_update("gw-1", 1, "alice", "bob"),
        presence_update("gw-1", 2, "carol"),
        presence_update("gw-1", 2, "alice", full=True),
    ]

    for update in sent:
        await bus.publish_presence(update)
    await own.wait_for(3)
    await other.wait_for(3)

    assert own.updates() == sent  # the publisher's own replica gets them too
    assert other.updates() == sent


async def test_presence_updates_and_signals_travel_apart(
    make_bus: BusFactory,
    presence_readers: Callable[[Bus], PresenceReader],
    signal_readers: Callable[[Bus], SignalReader],
) -> None:
    bus = make_bus()
    presence, signals = presence_readers(bus), signal_readers(bus)
    await presence_subscribed(bus, presence)
    await subscribed(bus, signals)

    await bus.publish_signal(make_signal())
    await bus.publish_presence(presence_update("gw-1", 1, "alice"))
    await bus.publish_signal(make_signal(data='"second"'))
    await signals.wait_for(2)
    await presence.wait_for(1)

    assert presence.updates() == [presence_update("gw-1", 1, "alice")]
    assert [s.data for s in signals.signals()] == ['{"on":true}', '"second"']


async def test_presence_heartbeats_are_kept_per_replica_until_replaced_or_expired(
    make_bus: BusFactory,
) -> None:
    bus = make_bus()
    assert await bus.presences() == {}
    await bus.put_status("gw-1", b'{"connections": 1}', ttl_s=30)

    await bus.put_presence(presence_update("gw-1", 1, "alice", full=True), ttl_s=30)
    await bus.put_presence(presence_update("gw-2", 4, "bob", full=True), ttl_s=0.2)
    await bus.put_presence(presence_update("gw-1", 2, "alice", "carol", full=True), ttl_s=30)
    both = await bus.presences()
    await asyncio.sleep(0.4)  # gw-2's heartbeat expires

    assert both == {
        "gw-1": presence_update("gw-1", 2, "alice", "carol", full=True),
        "gw-2": presence_update("gw-2", 4, "bob", full=True),
    }
    assert await bus.presences() == {
        "gw-1": presence_update("gw-1", 2, "alice", "carol", full=True)
    }
    assert await bus.statuses() == {"gw-1": b'{"connections": 1}'}  # apart from heartbeats


async def test_close_ends_presence_readers_and_refuses_presence(
    make_bus: BusFactory, presence_readers: Callable[[Bus], PresenceReader]
) -> None:
    bus = make_bus()
    reader = presence_readers(bus)
    await presence_subscribed(bus, reader)

    await bus.close()

    done, _ = await asyncio.wait({reader.task}, timeout=WAIT_S)
    assert reader.task in done and reader.task.exception() is None
    with pytest.raises(ConnectionError, match="closed"):
        await bus.publish_presence(presence_update("gw-1", 1, "alice"))
    with pytest.raises(ConnectionError, match="closed"):
        await bus.put_presence(presence_update("gw-1", 1, "alice", full=True), ttl_s=30)
    with pytest.raises(ConnectionError, match="closed"):
        await bus.presences()
    late = presence_readers(bus)
    done, _ = await asyncio.wait({late.task}, timeout=WAIT_S)
    assert late.task in done and late.received == []
