"""`RedisBus` through Redis failures: a reader outlives a killed and restarted server and a
FLUSHALL, and goes on with the batches published afterwards (their `prev` shows the loss,
which the dispatcher fills from Postgres). Each test owns a throwaway server
(`tests.services.RedisProcess`), so killing or flushing it touches nothing else.
"""

import logging
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from sync.bus_redis import RedisBus
from tests.bus_readers import Reader, wait_for_record
from tests.factories import batch
from tests.services import RedisProcess

PREFIX = "ustest:faults:"


@pytest.fixture
def server() -> Iterator[RedisProcess]:
    """A Redis server of this test's own, stopped at teardown."""
    with RedisProcess() as process:
        yield process


@pytest.fixture
async def bus(server: RedisProcess) -> AsyncIterator[RedisBus]:
    bus = RedisBus(server.url, PREFIX, max_batches=100, block_ms=200)
    yield bus
    await bus.close()


async def test_reader_survives_a_redis_restart_and_gets_later_batches(
    server: RedisProcess,
    bus: RedisBus,
    readers: Callable[..., Reader],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sync.bus_redis")
    reader = readers(bus)
    assert await bus.publish(batch(0, 1, 2))
    await reader.reach(2)
    assert bus.readable() is True

    server.stop()
    await wait_for_record(caplog, "failed (1 in a row)")  # the reader saw the outage
    assert bus.readable() is False  # the dispatcher reads the outbox meanwhile
    assert await bus.ping() is False
    with pytest.raises(ConnectionError, match="publishing batch up to 3"):
        await bus.publish(batch(2, 3))
    server.start()  # same port, empty: the stream is gone

    assert await bus.publish(batch(3, 4)) is True
    assert await bus.publish(batch(4, 5)) is True
    await reader.reach(5)

    assert reader.batches == [batch(0, 1, 2), batch(3, 4), batch(4, 5)]
    assert reader.batches[1].prev > reader.batches[0].last  # the lost event 3 shows as a gap
    assert await bus.ping() is True
    assert bus.readable() is True
    await wait_for_record(caplog, "again after")


async def test_reader_survives_flushall_and_gets_later_batches(
    server: RedisProcess, bus: RedisBus, readers: Callable[..., Reader]
) -> None:
    reader = readers(bus)
    assert await bus.publish(batch(0, 1))
    await reader.reach(1)

    admin = aioredis.Redis.from_url(server.url)
    try:
        await admin.flushall()
    finally:
        await admin.aclose()
    assert await bus.last_position() == 0

    assert await bus.publish(batch(1, 2)) is True
    await reader.reach(2)
    assert await bus.publish(batch(5, 6)) is True  # 3..5 never reached the bus
    await reader.reach(6)

    assert reader.batches == [batch(0, 1), batch(1, 2), batch(5, 6)]


async def test_reader_from_before_a_flushall_reads_the_new_stream_from_its_position(
    server: RedisProcess, bus: RedisBus, readers: Callable[..., Reader]
) -> None:
    assert await bus.publish(batch(0, 1, 2, 3))
    admin = aioredis.Redis.from_url(server.url)
    try:
        await admin.flushall()
    finally:
        await admin.aclose()
    # A relay that took over publishes again from its committed position.
    assert await bus.publish(batch(1, 2)) is True
    assert await bus.publish(batch(2, 3, 4)) is True

    reader = readers(bus, 2)
    await reader.reach(4)

    assert reader.batches == [batch(2, 3, 4)]


async def test_reader_skips_and_logs_an_entry_that_is_not_a_batch(
    server: RedisProcess,
    bus: RedisBus,
    readers: Callable[..., Reader],
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = aioredis.Redis.from_url(server.url)
    try:
        await admin.xadd(bus.key, {b"b": b'{"prev": 0, "events": []}'}, id="1-0")
        await admin.xadd(bus.key, {b"other": b"x"}, id="2-0")
    finally:
        await admin.aclose()
    assert await bus.publish(batch(2, 3))

    reader = readers(bus)
    await reader.reach(3)

    assert reader.batches == [batch(2, 3)]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("entry b'1-0'" in e and "not a batch" in e for e in errors), errors
    assert any("entry b'2-0'" in e and "no b'b' field" in e for e in errors), errors
