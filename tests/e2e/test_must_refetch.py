"""Cursors older than the retained history, end to end (issue 4): a gateway process with its
relay prunes the outbox, and a client resuming from before the pruned range gets
`must-refetch`, then a live stream, over real HTTP.

World: workspace `w1` with alice active and the public stream `general`. Five messages are
committed and then made two days old (their `committed_at` moved back) before the gateway
starts, so its recent window holds none of them and its relay, with a one-hour retention,
prunes all but the newest once it has relayed them.
"""

import asyncio
import time
from collections.abc import Callable

import asyncpg

from core.cursors import format_cursor
from core.publish import publish_many
from tests.e2e.harness import Processes, StreamClient, bearer
from tests.factories import PUBLISHED, stream_message

RETENTION = {"USERSTREAM_RETENTION_S": "3600", "USERSTREAM_PRUNE_INTERVAL_S": "0.2"}


async def seed(db: asyncpg.Connection) -> None:
    await db.execute(
        """
        INSERT INTO workspaces (id, name) VALUES ('w1', 'One');
        INSERT INTO users (id, name) VALUES ('alice', 'Alice');
        INSERT INTO workspace_members (workspace_id, user_id, status)
            VALUES ('w1', 'alice', 'active');
        INSERT INTO streams (id, workspace_id, name, visibility)
            VALUES ('general', 'w1', 'general', 'public');
        """
    )


async def commit(db: asyncpg.Connection, *entity_ids: str) -> None:
    async with db.transaction():
        await publish_many(db, [stream_message(e, stream_id="general") for e in entity_ids])


def received(client: StreamClient, entity_id: str) -> Callable[[], bool]:
    """A condition: `client` has received the change of `entity_id`."""
    return lambda: entity_id in [e["entityId"] for e in client.changes()]


async def wait_for_watermark(db: asyncpg.Connection, expected: int, timeout_s: float = 20) -> None:
    """Poll `outbox_retention` until the relay has pruned through `expected`."""
    deadline = time.monotonic() + timeout_s
    while await db.fetchval("SELECT pruned_through FROM outbox_retention") != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"the relay did not prune through {expected}")
        await asyncio.sleep(0.05)


async def wait_for_positions(db: asyncpg.Connection, timeout_s: float = 20) -> None:
    """Poll until every outbox row has its position (in wal ingest mode the relay gives them
    after commit, and `committed_at` with them)."""
    deadline = time.monotonic() + timeout_s
    while await db.fetchval("SELECT count(*) FROM outbox WHERE seq IS NULL"):
        if time.monotonic() > deadline:
            raise AssertionError("the relay did not position every row")
        await asyncio.sleep(0.05)


async def test_a_client_resuming_before_the_retained_history_gets_must_refetch_then_live(
    processes: Processes, db: asyncpg.Connection
) -> None:
    await seed(db)
    processes.gateway("--with-relay", env=RETENTION)
    await commit(db, "m1", "m2", "m3", "m4", "m5")
    await wait_for_positions(db)
    await db.execute(
        "UPDATE outbox SET committed_at = committed_at - interval '2 days' WHERE entity_id < 'm5'"
    )
    await wait_for_watermark(db, 4)
    assert await db.fetchval(f"SELECT array_agg(entity_id) FROM outbox WHERE {PUBLISHED}") == ["m5"]
    gateway = processes.gateway()  # its window starts after the pruned events

    by_offset = StreamClient(gateway.url, bearer("alice"), params={"offset": format_cursor(1)})
    by_header = StreamClient(gateway.url, {**bearer("alice"), "Last-Event-ID": format_cursor(2)})
    retained = StreamClient(gateway.url, bearer("alice"), params={"offset": format_cursor(4)})
    clients = [by_offset, by_header, retained]
    try:
        for client in clients:
            await client.connect()
        await commit(db, "m6")
        for client in clients:
            await client.wait_for(received(client, "m6"))
    finally:
        for client in clients:
            await client.close()

    for client, cursor in ((by_offset, 1), (by_header, 2)):
        assert client.kinds() == ["must-refetch", "offset", "change"]
        reason = client.events[0].data
        assert f"cursor {format_cursor(cursor)} is older than the retained history" in reason
        # From m5's position, or a later barrier's (wal ingest: sync/barrier.py).
        assert format_cursor(5) <= client.events[1].id < client.changes()[0]["cursor"]
        assert [e["entityId"] for e in client.changes()] == ["m6"]
    assert retained.kinds() == ["change", "offset", "change"]
    assert [e["entityId"] for e in retained.changes()] == ["m5", "m6"]
