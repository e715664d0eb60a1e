"""`ChannelBus` on one Redis, publishing and reading: a reader subscribed to one workspace's
topic gets exactly that workspace's events, once and in order, and a reader that hears only
the ticks still moves its position to the last one published, in fewer releases than the
relay's batches (a release that carries no event of a reader's topics waits
`QUIET_RELEASE_S` for the next)."""

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
import redis.asyncio as aioredis

from sync.bus import Batch
from sync.bus_channels import ChannelBus
from tests.bus_readers import WAIT_S, Reader
from tests.factories import event_at

BATCHES = 30


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def wait_subscribed(url: str, channel: str, count: int) -> None:
    """Wait until `channel` has `count` shard subscribers (`PUBSUB SHARDNUMSUB`)."""
    client = aioredis.Redis.from_url(url)
    try:
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while True:
            reply = await client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            if int(reply[1]) >= count:
                return
            assert asyncio.get_running_loop().time() < deadline, f"{channel}: {reply}"
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def test_a_reader_gets_its_topic_once_in_order_and_a_quiet_one_still_moves(
    redis_url: str,
    redis_prefix: str,
    pool: asyncpg.Pool,
    readers: Callable[..., Reader],
) -> None:
    relay = ChannelBus(redis_url, redis_prefix)
    interested = ChannelBus(redis_url, redis_prefix, pool=pool)
    quiet = ChannelBus(redis_url, redis_prefix, pool=pool)
    try:
        interested.subscribe(["workspace:w1"], 0)
        got, ticks_only = readers(interested), readers(quiet)
        await wait_subscribed(redis_url, interested.channel("workspace:w1"), 1)
        await wait_subscribed(redis_url, f"{redis_prefix}tick:{{n0}}", 2)

        for k in range(BATCHES):  # positions 2k+1 (w1) and 2k+2 (w2) in batch k
            first, second = 2 * k + 1, 2 * k + 2
            events = (event_at(first), event_at(second, workspace_id="w2", stream_id="s2"))
            assert await relay.publish(Batch(2 * k, events))
        await got.reach(2 * BATCHES)
        await ticks_only.reach(2 * BATCHES)

        assert [e.seq for e in got.events()] == list(range(1, 2 * BATCHES, 2))
        assert all(e.workspace_id == "w1" for e in got.events())
        assert ticks_only.events() == []
        assert 1 <= len(ticks_only.batches) < BATCHES
        for reader in (got, ticks_only):
            assert all(a.last == b.prev for a, b in itertools.pairwise(reader.batches))
    finally:
        for bus in (relay, interested, quiet):
            await bus.close()
