"""The `sync.bus.Bus` contract, one suite run on every implementation (centrifuge's shared
broker tests take a broker factory the same way): `InProcessBus` and `RedisBus`.

`RedisBus` runs against the session's Redis with a key prefix of the test's own; both buses
trim to `max_batches`, Redis approximately (whole stream nodes), so the trimming tests check
the gap a reader sees, not an exact count. Batches come from `tests.factories.batch`; the
`readers` fixture (tests/conftest.py) starts `tests.bus_readers.Reader`s.
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
from tests.bus_readers import WAIT_S, Reader
from tests.factories import batch

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
