"""The channel bus on a three-node Redis Cluster, with real processes: interest-based fan-out
and per-topic gaps (sync/bus_channels.py, sync/topic_merge.py).

- Two gateways, one serving alice and bob (workspace `w1`), the other carol (workspace `w2`
  only): carol's gateway hears none of `w1`'s events (its own `userstream_bus_received_*`
  metrics), and every client gets every event it may see exactly once, in order.
- Gaps of one topic, each found and filled from Postgres (the gateway's log shows it), with
  nothing missed or doubled: the node holding `w1`'s topic restarted empty while events flow;
  the active relay killed with SIGKILL and the standby taking over (which sends `prev: null`
  and publishes some events again); topic messages left out on purpose by the relay
  (`USERSTREAM_BUS_DROP_EVERY`, a fault for tests), whose ticks still go out.
"""

import asyncio
import signal
from pathlib import Path

import asyncpg

from core.channels import workspace_channel
from core.publish import publish
from tests.e2e.harness import Processes, StreamClient, bearer, scrape
from tests.e2e.sequence import Connect, Publisher, finish, seed
from tests.e2e.test_faults import active_relay_pid, eventually, readiness
from tests.factories import stream_message
from tests.redis_cluster import RedisCluster

LOBBY_EVENTS = 10
"""Events carol's workspace gets in the interest test."""


def on_cluster(cluster: RedisCluster, **extra: str) -> dict[str, str]:
    """The environment of a process on the channel bus of `cluster`."""
    return {"REDIS_URL": cluster.url, "USERSTREAM_BUS": "channels", **extra}


async def received(url: str) -> dict[str, float]:
    """A gateway's channel-bus input: events decoded, topic and tick bytes."""
    samples = await scrape(f"{url}/metrics")
    return {
        "events": samples.get(("userstream_bus_received_events_total", ()), 0.0),
        "topic_bytes": samples.get(
            ("userstream_bus_received_bytes_total", (("kind", "topic"),)), 0.0
        ),
        "tick_bytes": samples.get(
            ("userstream_bus_received_bytes_total", (("kind", "tick"),)), 0.0
        ),
    }


async def test_a_gateway_hears_only_the_topics_of_its_users(
    cluster: RedisCluster,
    processes: Processes,
    db: asyncpg.Connection,
    publisher: Publisher,
    clients: Connect,
) -> None:
    await seed(db)
    await db.execute(
        """
        INSERT INTO workspaces (id, name) VALUES ('w2', 'Two');
        INSERT INTO users (id, name) VALUES ('carol', 'Carol');
        INSERT INTO workspace_members (workspace_id, user_id, status)
            VALUES ('w2', 'carol', 'active');
        INSERT INTO streams (id, workspace_id, name, visibility)
            VALUES ('lobby', 'w2', 'lobby', 'public');
        """
    )
    env = on_cluster(cluster)
    processes.start("relay", env=env)
    first, second = processes.gateway(env=env), processes.gateway(env=env)
    everyone = [
        await clients("alice", [first.url], name="alice@first"),
        await clients("bob", [first.url], name="bob@first"),
    ]
    carol = await StreamClient(second.url, bearer("carol")).connect()
    try:
        publisher.start()
        await publisher.wait_count(50)
        for i in range(LOBBY_EVENTS):
            message = stream_message(f"lobby{i}", workspace_id="w2", stream_id="lobby")
            async with db.transaction():
                await publish(db, message)
        await finish(db, publisher, everyone, outbox=False)
        await carol.wait_for(lambda: len(carol.changes()) >= LOBBY_EVENTS)
        await asyncio.sleep(0.5)  # anything doubled or foreign would arrive meanwhile
        lobby = [change["entityId"] for change in carol.changes()]
    finally:
        await carol.close()

    assert lobby == [f"lobby{i}" for i in range(LOBBY_EVENTS)]
    heard_first, heard_second = await received(first.url), await received(second.url)
    assert heard_first["events"] >= publisher.count
    # Carol's gateway decoded her workspace's events only: none of w1's sequence.
    assert heard_second["events"] == LOBBY_EVENTS, heard_second
    assert heard_second["tick_bytes"] > 0  # every node's ticks reach every gateway


def gateway_log_count(path: Path, text: str) -> int:
    """How many lines of the gateway log at `path` hold `text`."""
    return path.read_text().count(text) if path.exists() else 0


async def test_a_node_restarted_empty_loses_messages_and_the_topic_is_filled_from_postgres(
    own_cluster: RedisCluster,
    processes: Processes,
    db: asyncpg.Connection,
    publisher: Publisher,
    clients: Connect,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    cluster = own_cluster
    await seed(db)
    env = on_cluster(cluster, USERSTREAM_LOG_LEVEL="info")
    processes.start("relay", env=env)
    log_file = tmp_path / "gateway.log"
    gateway = processes.gateway(env=env, log_file=log_file)
    everyone = [
        await clients("alice", [gateway.url], name="alice"),
        await clients("bob", [gateway.url], name="bob", churn_s=0.6),
    ]
    publisher.start()
    await publisher.wait_count(40)
    # The sequence goes to w1's topic; restart the node its channel lives on.
    channel = f"{redis_prefix}ch:{{{workspace_channel('w1')}}}"
    node = cluster.ports.index(cluster.shard_of(channel))
    await asyncio.to_thread(cluster.restart_empty, node)
    await publisher.wait_count(publisher.count + 60)

    async def on_the_bus() -> bool:  # subscribed again to all its channels, in one go
        return (await readiness(gateway.url))[1]["degraded"] is False

    await eventually(on_the_bus, "the gateway reading the bus again")
    await finish(db, publisher, everyone)
    assert gateway_log_count(log_file, "listening to node") >= 1  # it reconnected
    assert gateway_log_count(log_file, "refused a command") == 0


async def test_a_standby_relay_takes_over_from_a_killed_one_and_nothing_is_doubled(
    cluster: RedisCluster,
    processes: Processes,
    db: asyncpg.Connection,
    publisher: Publisher,
    clients: Connect,
) -> None:
    await seed(db)
    env = on_cluster(cluster)
    relays = [processes.start("relay", env=env), processes.start("relay", env=env)]
    gateway = processes.gateway(env=env)
    everyone = [
        await clients("alice", [gateway.url], name="alice"),
        await clients("bob", [gateway.url], name="bob"),
    ]
    publisher.start()
    await publisher.wait_count(40)
    active = await active_relay_pid(db)
    [victim] = [p for p in relays if p.pid == active]
    [standby] = [p for p in relays if p is not victim]
    victim.send_signal(signal.SIGKILL)

    async def standby_leads() -> bool:
        return await active_relay_pid(db) == standby.pid

    await eventually(standby_leads, "the standby relay to lead")
    await publisher.wait_count(publisher.count + 60)
    await finish(db, publisher, everyone)


async def test_topic_messages_left_out_by_the_relay_are_filled_from_postgres(
    cluster: RedisCluster,
    processes: Processes,
    db: asyncpg.Connection,
    publisher: Publisher,
    clients: Connect,
    tmp_path: Path,
) -> None:
    await seed(db)
    processes.start("relay", env=on_cluster(cluster, USERSTREAM_BUS_DROP_EVERY="2"))
    log_file = tmp_path / "gateway.log"
    gateway = processes.gateway(
        env=on_cluster(cluster, USERSTREAM_LOG_LEVEL="info"), log_file=log_file
    )
    everyone = [
        await clients("alice", [gateway.url], name="alice"),
        await clients("bob", [gateway.url], name="bob"),
    ]
    publisher.start()
    await publisher.wait_count(80)
    await finish(db, publisher, everyone)
    fills = gateway_log_count(log_file, "filling")
    assert fills >= 3, f"the gateway filled {fills} gaps, expected one per dropped message"
