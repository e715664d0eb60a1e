"""`tests.redis_cluster.RedisCluster` with real processes: three primaries come up covering
every slot, keys spread over all of them, sharded pub/sub through redis-py's asyncio cluster
client delivers every message in order, and a primary replaced by an empty one loses its keys
while the cluster, its clients and an existing subscriber carry on.
"""

import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterPubSub
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from tests.redis_cluster import SLOTS, RedisCluster

KEYS = [f"user:{i}" for i in range(1, 51)]
RECEIVE_TIMEOUT_S = 5.0


def connect(cluster: RedisCluster) -> AsyncRedisCluster:
    """An asyncio cluster client that knows one node and discovers the rest."""
    host, port = cluster.startup_nodes[0]
    return AsyncRedisCluster(host=host, port=port, decode_responses=True)


@pytest.fixture
async def shared_client(cluster: RedisCluster) -> AsyncIterator[AsyncRedisCluster]:
    client = connect(cluster)
    yield client
    await client.aclose()


def channel_on(cluster: RedisCluster, port: int) -> str:
    """A shard channel name whose slot the node on `port` owns."""
    return next(f"news:{i}" for i in itertools.count() if cluster.shard_of(f"news:{i}") == port)


async def subscribe(client: AsyncRedisCluster, channels: list[str]) -> ClusterPubSub:
    """A sharded subscriber to `channels`, returned once every SSUBSCRIBE is confirmed."""
    pubsub = client.pubsub()
    await pubsub.ssubscribe(*channels)
    confirmed: set[str] = set()
    deadline = time.monotonic() + RECEIVE_TIMEOUT_S
    while confirmed != set(channels) and time.monotonic() < deadline:
        message = await pubsub.get_sharded_message(timeout=0.1)
        if message is not None and message["type"] == "ssubscribe":
            confirmed.add(message["channel"])
    assert confirmed == set(channels)
    return pubsub


async def receive(pubsub: ClusterPubSub, count: int) -> list[tuple[str, str]]:
    """The next `count` sharded messages as (channel, data), subscribe confirmations skipped;
    fewer if they do not all arrive within 5 s."""
    received: list[tuple[str, str]] = []
    deadline = time.monotonic() + RECEIVE_TIMEOUT_S
    while len(received) < count and time.monotonic() < deadline:
        message: dict[str, Any] | None = await pubsub.get_sharded_message(
            ignore_subscribe_messages=True, timeout=0.1
        )
        if message is not None:
            received.append((message["channel"], message["data"]))
    return received


def by_channel(received: list[tuple[str, str]], channel: str) -> list[str]:
    return [data for name, data in received if name == channel]


def test_three_primaries_cover_every_slot(cluster: RedisCluster) -> None:
    assert len(set(cluster.ports)) == 3
    assert cluster.ranges[0][0] == 0
    assert cluster.ranges[-1][1] == SLOTS - 1
    for (_, last), (first, _) in itertools.pairwise(cluster.ranges):
        assert first == last + 1
    for index, port in enumerate(cluster.ports):
        with cluster.client(index) as node:
            info = node.cluster("INFO")
            slots = node.cluster("SLOTS")
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_known_nodes"]) == 3
        assert int(info["cluster_slots_assigned"]) == SLOTS
        assert sorted((s[0], s[1], s[2][1]) for s in slots) == [
            (first, last, owner)
            for (first, last), owner in zip(cluster.ranges, cluster.ports, strict=True)
        ]
        assert cluster.node_for_slot(cluster.ranges[index][0]) == port
    with pytest.raises(ValueError):
        cluster.node_for_slot(SLOTS)


async def test_keys_spread_over_every_shard(
    cluster: RedisCluster, shared_client: AsyncRedisCluster
) -> None:
    assert {cluster.shard_of(key) for key in KEYS} == set(cluster.ports)
    assert cluster.shard_of("{user:1}:profile") == cluster.shard_of("user:1")
    try:
        for key in KEYS:
            await shared_client.set(key, key.upper())
        for index, port in enumerate(cluster.ports):
            with cluster.client(index) as node:
                held = set(node.keys("user:*"))
            assert held == {key for key in KEYS if cluster.shard_of(key) == port}
    finally:
        await shared_client.delete(*KEYS)


async def test_sharded_pubsub_delivers_every_message_in_order(
    cluster: RedisCluster, shared_client: AsyncRedisCluster
) -> None:
    channels = [channel_on(cluster, port) for port in cluster.ports]
    publisher = connect(cluster)
    pubsub = await subscribe(shared_client, channels)
    try:
        for n in range(10):
            for channel in channels:
                assert await publisher.spublish(channel, f"{channel}#{n}") == 1
        received = await receive(pubsub, 30)
    finally:
        await pubsub.aclose()
        await publisher.aclose()

    assert len(received) == 30
    for channel in channels:
        assert by_channel(received, channel) == [f"{channel}#{n}" for n in range(10)]


async def test_a_primary_restarted_empty_loses_its_keys_and_the_cluster_carries_on(
    own_cluster: RedisCluster,
) -> None:
    cluster = own_cluster
    lost_port = cluster.ports[1]
    lost = [key for key in KEYS if cluster.shard_of(key) == lost_port]
    kept = [key for key in KEYS if cluster.shard_of(key) != lost_port]
    steady, restarted = channel_on(cluster, cluster.ports[0]), channel_on(cluster, lost_port)
    client, publisher = connect(cluster), connect(cluster)
    pubsub = await subscribe(client, [steady, restarted])
    try:
        for key in KEYS:
            await client.set(key, "before")

        cluster.restart_empty(1)

        with cluster.client(1) as node:
            assert node.dbsize() == 0
            assert node.cluster("INFO")["cluster_state"] == "ok"
        assert [await client.get(key) for key in lost] == [None] * len(lost)
        assert [await client.get(key) for key in kept] == ["before"] * len(kept)
        for key in lost:  # the same client writes to the new node
            await client.set(key, "after")
        assert [await client.get(key) for key in lost] == ["after"] * len(lost)

        # The subscriber re-sends SSUBSCRIBE to the new node once a poll finds the connection
        # lost; a message published before that reaches nobody (SPUBLISH returns 0).
        deadline = time.monotonic() + 10
        while await publisher.spublish(restarted, "probe") == 0:
            assert time.monotonic() < deadline, "the subscriber never resubscribed"
            await pubsub.get_sharded_message(timeout=0.1)
        assert await receive(pubsub, 1) == [(restarted, "probe")]  # the one that reached it
        for n in range(5):
            assert await publisher.spublish(restarted, f"{restarted}#{n}") == 1
            assert await publisher.spublish(steady, f"{steady}#{n}") == 1
        received = await receive(pubsub, 10)
    finally:
        await pubsub.aclose()
        await client.aclose()
        await publisher.aclose()

    assert by_channel(received, restarted) == [f"{restarted}#{n}" for n in range(5)]
    assert by_channel(received, steady) == [f"{steady}#{n}" for n in range(5)]
