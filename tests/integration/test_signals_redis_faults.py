"""`RedisBus` signals through Redis failures (PROTOCOL.md §5, `sync.signals_redis`): a
subscription outlives a killed and restarted server and a server that stops answering, and
gets the signals published afterwards; what is published meanwhile is lost, never a crash.
Each test owns a throwaway server (`tests.services.RedisProcess`).
"""

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from sync import signals_redis
from sync.bus_redis import RedisBus
from tests.bus_readers import wait_for_record
from tests.services import RedisProcess
from tests.signal_readers import SignalReader, make_signal, subscribed

PREFIX = "ustest:signal-faults:"


@pytest.fixture
def server() -> Iterator[RedisProcess]:
    """A Redis server of this test's own, stopped at teardown."""
    with RedisProcess() as process:
        yield process


@pytest.fixture
async def bus(server: RedisProcess) -> AsyncIterator[RedisBus]:
    bus = RedisBus(server.url, PREFIX, block_ms=200)
    yield bus
    await bus.close()


@pytest.fixture
async def reader(bus: RedisBus) -> AsyncIterator[SignalReader]:
    reader = SignalReader(bus)
    yield reader
    await reader.stop()


async def test_subscription_survives_a_redis_restart_and_gets_later_signals(
    server: RedisProcess,
    bus: RedisBus,
    reader: SignalReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sync.signals_redis")
    await subscribed(bus, reader)
    await bus.publish_signal(make_signal(data='"one"'))
    await reader.wait_for(1)

    server.stop()
    await wait_for_record(caplog, "failed (1 in a row)")
    with pytest.raises(ConnectionError, match="publishing a signal"):
        await bus.publish_signal(make_signal(data='"lost"'))
    server.start()

    await subscribed(bus, reader)
    await bus.publish_signal(make_signal(data='"two"'))
    await reader.wait_for(2)

    assert [s.data for s in reader.signals()] == ['"one"', '"two"']
    await wait_for_record(caplog, "subscribed to ustest:signal-faults:signals again")


async def test_a_subscription_that_hears_nothing_after_its_ping_is_made_again(
    server: RedisProcess,
    bus: RedisBus,
    reader: SignalReader,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that stops answering (a half-open connection looks the same to the
    client): the watchdog's PING goes unanswered and the subscription is made again."""
    monkeypatch.setattr(signals_redis, "LISTEN_POLL_S", 0.05)
    monkeypatch.setattr(signals_redis, "WATCHDOG_IDLE_S", 0.2)
    monkeypatch.setattr(signals_redis, "PONG_TIMEOUT_S", 0.2)
    caplog.set_level(logging.INFO, logger="sync.signals_redis")
    await subscribed(bus, reader)
    process = server._proc
    assert process is not None

    os.kill(process.pid, signal.SIGSTOP)
    try:
        await wait_for_record(caplog, "no answer to PING")
    finally:
        os.kill(process.pid, signal.SIGCONT)

    await subscribed(bus, reader)
    await bus.publish_signal(make_signal())
    await reader.wait_for(1)
    assert reader.signals() == [make_signal()]


async def test_a_quiet_subscription_stays_subscribed(
    bus: RedisBus, reader: SignalReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quiet past several message waits and watchdog pings, the subscription is still the
    same one: nothing is lost for want of traffic."""
    monkeypatch.setattr(signals_redis, "LISTEN_POLL_S", 0.05)
    monkeypatch.setattr(signals_redis, "WATCHDOG_IDLE_S", 0.1)
    await subscribed(bus, reader)

    await asyncio.sleep(1.0)
    await bus.publish_signal(make_signal())

    await reader.wait_for(1)
    assert reader.signals() == [make_signal()]


async def test_a_message_that_is_not_a_signal_is_skipped(
    server: RedisProcess,
    bus: RedisBus,
    reader: SignalReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await subscribed(bus, reader)
    client = aioredis.Redis.from_url(server.url)
    try:
        await client.publish(bus.signals_channel, b"not json")
        await client.publish(bus.signals_channel, b'{"type": "typing"}')
    finally:
        await client.aclose()
    await bus.publish_signal(make_signal())

    await reader.wait_for(1)
    assert reader.signals() == [make_signal()]
    assert "not a signal" in caplog.text
