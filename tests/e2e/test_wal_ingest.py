"""Wal ingest end to end (core/schema/ingest.py, sync/wal.py): real relay, gateways, Postgres
with logical decoding and Redis.

- Many concurrent writers, some transactions of several rows, read by clients on two gateways
  and by clients that prefetch in a snapshot while the writers run and stream from its cursor:
  every event exactly once, in position order, each transaction's rows together and in
  insert order; the union of a prefetch and its stream is every event once.
- A transaction that took its ids first and commits last is delivered, after the others.
- Access changes that no service announced take effect at their position.

World: workspace `w1` with alice, bob, carol and dave active; `general` public, `secret`
private with alice its only member.
"""

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from core.cursors import current_cursor
from core.publish import publish, publish_many
from tests.e2e.harness import Processes, StreamClient, bearer
from tests.factories import PUBLISHED, stream_message

pytestmark = pytest.mark.wal_only

WRITERS = 64
LOAD_S = 4.0
PREFETCHES = 6
WAIT_S = 60.0


async def seed(db: asyncpg.Connection) -> None:
    await db.execute(
        """
        INSERT INTO workspaces (id, name) VALUES ('w1', 'one');
        INSERT INTO workspace_members (workspace_id, user_id, status) VALUES
            ('w1', 'alice', 'active'), ('w1', 'bob', 'active'),
            ('w1', 'carol', 'active'), ('w1', 'dave', 'active');
        INSERT INTO streams (id, workspace_id, name, visibility) VALUES
            ('general', 'w1', 'general', 'public'), ('secret', 'w1', 'secret', 'private');
        INSERT INTO stream_members (stream_id, user_id) VALUES ('secret', 'alice');
        """
    )


@dataclass
class Load:
    """What the writers committed: each transaction's entity ids in insert order."""

    transactions: list[list[str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def writer(dsn: str, number: int, load: Load) -> None:
    """Commit transactions of 1 to 4 rows until stopped; every fifth goes to `secret`."""
    rng = random.Random(number)
    conn = await asyncpg.connect(dsn)
    try:
        count = 0
        while not load.stop.is_set():
            stream = "secret" if rng.random() < 0.2 else "general"
            ids = [f"w{number}-{count}-{i}" for i in range(rng.choice((1, 1, 1, 2, 4)))]
            count += 1
            async with conn.transaction():
                await publish_many(conn, [stream_message(e, stream_id=stream) for e in ids])
            load.transactions.append(ids)
    finally:
        await conn.close()


@dataclass
class Prefetch:
    """A client that read the outbox in one snapshot and streams from its cursor."""

    seen: list[str]
    client: StreamClient


async def prefetch(db_dsn: str, url: str) -> Prefetch:
    """What an app does (README, "Prefetch, then stream"): read in REPEATABLE READ with
    `current_cursor`, then stream from that cursor."""
    conn = await asyncpg.connect(db_dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            cursor = await current_cursor(conn)
            rows = await conn.fetch(
                f"SELECT entity_id FROM outbox WHERE {PUBLISHED} AND stream_id = 'general'"
            )
    finally:
        await conn.close()
    client = await StreamClient(url, bearer("bob"), params={"offset": cursor}).connect()
    return Prefetch([r["entity_id"] for r in rows], client)


async def published(db: asyncpg.Connection, stream: str) -> list[tuple[str, int]]:
    rows = await db.fetch(
        f"SELECT entity_id, seq FROM outbox WHERE {PUBLISHED} AND stream_id = $1 ORDER BY seq",
        stream,
    )
    return [(r["entity_id"], r["seq"]) for r in rows]


async def image_position(db: asyncpg.Connection, resource_type: str, user_id: str) -> int:
    """Position of the relay's access image of the change to `user_id`'s `resource_type` row."""
    seq = await db.fetchval(
        "SELECT seq FROM outbox WHERE type = 'userstream.access' AND resource_type = $1"
        " AND user_id = $2",
        resource_type,
        user_id,
    )
    assert seq is not None, f"no access image for {resource_type} of {user_id}"
    return int(seq)


@contextlib.asynccontextmanager
async def clients(*made: StreamClient) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for client in made:
            await client.close()


def entities(client: StreamClient) -> list[str]:
    return [c["entityId"] for c in client.changes()]


async def until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_concurrent_writers_reach_clients_on_two_gateways_exactly_once_in_commit_order(
    processes: Processes, db: asyncpg.Connection, database_url: str
) -> None:
    await seed(db)
    first = processes.gateway("--with-relay")
    second = processes.gateway()
    alice = await StreamClient(first.url, bearer("alice")).connect()
    bob = await StreamClient(second.url, bearer("bob")).connect()
    carol = await StreamClient(second.url, bearer("carol")).connect()
    dave = await StreamClient(first.url, bearer("dave")).connect()
    before = await prefetch(database_url, second.url)  # a cursor taken before the load
    load = Load()
    writers = [asyncio.create_task(writer(database_url, n, load)) for n in range(WRITERS)]
    prefetches = [before]
    async with clients(alice, bob, carol, dave, before.client):
        for step in range(PREFETCHES):
            await asyncio.sleep(LOAD_S / (PREFETCHES + 2))
            url = (first, second)[step % 2].url
            prefetches.append(await prefetch(database_url, url))
            if step == 1:  # neither change is announced by any outbox row
                await db.execute("DELETE FROM workspace_members WHERE user_id = 'carol'")
                await db.execute(
                    "INSERT INTO stream_members (stream_id, user_id) VALUES ('secret', 'dave')"
                )
        await asyncio.sleep(LOAD_S / (PREFETCHES + 2))
        load.stop.set()
        await asyncio.gather(*writers)
        await publish(db, stream_message("last", stream_id="general"))
        for client in (alice, bob, dave, *(p.client for p in prefetches)):
            await until(lambda c=client: "last" in entities(c), "every client to get `last`")
        general, secret = await published(db, "general"), await published(db, "secret")
        carol_gone = await image_position(db, "membership", "carol")
        dave_joined = await image_position(db, "stream_member", "dave")

        everything = sorted(general + secret, key=lambda e: e[1])
        assert entities(alice) == [e for e, _ in everything]
        assert entities(bob) == [e for e, _ in general]
        assert entities(carol) == [e for e, seq in general if seq < carol_gone]
        assert entities(dave) == [
            e for e, seq in everything if e in dict(general) or seq > dave_joined
        ]
        for client in (alice, bob, carol, dave):
            cursors = [c["cursor"] for c in client.changes()]
            assert cursors == sorted(set(cursors)), "cursors strictly increasing"
        # Each transaction's rows arrive together, in insert order.
        order = {e: i for i, e in enumerate(entities(alice))}
        for ids in load.transactions:
            at = [order[e] for e in ids]
            assert at == list(range(at[0], at[0] + len(ids))), ids
        # A prefetch and the stream from its cursor hold every event of `general` once.
        for number, p in enumerate(prefetches):
            streamed = entities(p.client)
            assert not set(streamed) & set(p.seen), f"prefetch {number}: doubled"
            assert sorted(p.seen + streamed) == sorted(e for e, _ in general), number
    assert len(load.transactions) > WRITERS


async def test_a_transaction_that_commits_after_a_higher_id_is_delivered_after_it(
    processes: Processes, db: asyncpg.Connection, database_url: str
) -> None:
    await seed(db)
    gateway = processes.gateway("--with-relay")
    alice = await StreamClient(gateway.url, bearer("alice")).connect()
    late = await asyncpg.connect(database_url)
    async with clients(alice):
        try:
            async with late.transaction():
                await publish(late, stream_message("early-id", stream_id="general"))
                await publish(db, stream_message("later-id", stream_id="general"))
                await until(lambda: "later-id" in entities(alice), "the later id")
        finally:
            await late.close()
        await until(lambda: "early-id" in entities(alice), "the early id")
    assert entities(alice) == ["later-id", "early-id"]
    ids = await db.fetch(f"SELECT entity_id, id, seq FROM outbox WHERE {PUBLISHED} ORDER BY seq")
    assert [r["entity_id"] for r in ids] == ["later-id", "early-id"]
    assert ids[0]["id"] > ids[1]["id"]
