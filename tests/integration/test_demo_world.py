"""The demo world, the activity simulator and the embedded Postgres, against real Postgres.

The simulator must write outbox rows the relay accepts: every committed row becomes an
`Event` (no dead letter) and carries the scope columns PROTOCOL.md §1 asks of its type.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from core.events import Event, MalformedEvent, scope_error
from gateway.demo_world import LEADERSHIP_MEMBERS, DemoWorld, demo_world, seed
from gateway.embedded import start_embedded_postgres
from gateway.simulator import ActivitySimulator

pytestmark = pytest.mark.trigger_only  # rows get positions at commit, from the trigger


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on the test's database, closed afterwards."""
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as created:
        yield created


async def table_counts(conn: asyncpg.Connection) -> dict[str, int]:
    tables = ("workspaces", "users", "workspace_members", "streams", "stream_members", "outbox")
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}


async def test_seed_twice_changes_nothing_the_second_time(db: asyncpg.Connection) -> None:
    first = await seed(db)
    after_first = await table_counts(db)
    second = await seed(db)

    assert second == first
    assert await table_counts(db) == after_first
    assert after_first["users"] == 6
    assert after_first["outbox"] > 0, "the first seed announces what it creates"


async def test_seed_announcements_are_valid_committed_events(db: asyncpg.Connection) -> None:
    world = await seed(db)
    rows = await db.fetch("SELECT * FROM outbox ORDER BY seq")

    events = [Event.from_row(dict(row)) for row in rows]
    stream_created = {e.stream_id for e in events if e.type == "stream.created"}
    assert stream_created == set(world.stream_ids.values())
    assert all(e.workspace_id == world.workspace_id for e in events)


async def stream_row(conn: asyncpg.Connection, stream_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM streams WHERE id = $1", stream_id)
    assert row is not None, f"stream {stream_id} was not seeded"
    return row


async def test_seeded_access_facts_hold_in_the_tables(db: asyncpg.Connection) -> None:
    world = await seed(db)
    leadership = await db.fetch(
        "SELECT user_id FROM stream_members WHERE stream_id = $1 AND left_at IS NULL",
        world.stream("leadership"),
    )
    statuses: dict[str, str] = {
        r["user_id"]: r["status"]
        for r in await db.fetch(
            "SELECT user_id, status FROM workspace_members WHERE workspace_id = $1",
            world.workspace_id,
        )
    }
    thread = await stream_row(db, world.stream("launch"))
    dm = await stream_row(db, world.stream("dm"))
    dm_members = await db.fetch(
        "SELECT user_id FROM stream_members WHERE stream_id = $1", world.stream("dm")
    )

    assert {r["user_id"] for r in leadership} == {world.user(h) for h in LEADERSHIP_MEMBERS}
    assert world.user("bob") not in {r["user_id"] for r in leadership}
    assert statuses[world.user("frank")] == "invited"
    assert {s for u, s in statuses.items() if u != world.user("frank")} == {"active"}
    assert thread["stream_type"] == "thread"
    assert thread["visibility"] == "inherit"
    assert thread["parent_stream_id"] == world.stream("general")
    assert (dm["stream_type"], dm["visibility"]) == ("dm", "private")
    assert {r["user_id"] for r in dm_members} == {world.user("alice"), world.user("bob")}
    alice, bob = world.access_examples
    assert (alice.user_id, bob.user_id) == (world.user("alice"), world.user("bob"))


async def test_reseeding_restores_the_access_facts(db: asyncpg.Connection) -> None:
    world = await seed(db)
    await db.execute(
        "UPDATE stream_members SET left_at = now() WHERE stream_id = $1 AND user_id = $2",
        world.stream("leadership"),
        world.user("carol"),
    )
    await db.execute(
        "UPDATE workspace_members SET status = 'active' WHERE user_id = $1", world.user("frank")
    )

    await seed(db)

    carol_left = await db.fetchval(
        "SELECT left_at FROM stream_members WHERE stream_id = $1 AND user_id = $2",
        world.stream("leadership"),
        world.user("carol"),
    )
    frank = await db.fetchval(
        "SELECT status FROM workspace_members WHERE user_id = $1", world.user("frank")
    )
    assert carol_left is None
    assert frank == "invited"


async def access_snapshot(conn: asyncpg.Connection, world: DemoWorld) -> tuple[object, ...]:
    """The facts the simulator must never change."""
    members = await conn.fetch(
        "SELECT user_id, left_at IS NULL AS current FROM stream_members WHERE stream_id = $1"
        " ORDER BY user_id",
        world.stream("leadership"),
    )
    statuses = await conn.fetch("SELECT user_id, status FROM workspace_members ORDER BY user_id")
    return tuple(tuple(r) for r in members), tuple(tuple(r) for r in statuses)


async def test_fifty_steps_write_valid_scoped_outbox_rows(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    world = await seed(db)
    before = await db.fetchval("SELECT count(*) FROM outbox")
    facts = await access_snapshot(db, world)
    simulator = ActivitySimulator(pool, world, seed=7)

    descriptions = [await simulator.step() for _ in range(50)]

    rows = [
        dict(r) for r in await db.fetch("SELECT * FROM outbox WHERE id > $1 ORDER BY seq", before)
    ]
    assert len(rows) >= 50, "every step publishes at least one event"
    assert all(d for d in descriptions)
    problems = [(r["type"], scope_error(r["resource_type"], r)) for r in rows]
    assert [p for p in problems if p[1] is not None] == []
    events = []
    for row in rows:
        try:
            events.append(Event.from_row(row))
        except MalformedEvent as exc:
            pytest.fail(f"would be dead-lettered: {exc}")
    assert await access_snapshot(db, world) == facts
    assert {e.workspace_id for e in events} == {world.workspace_id}
    assert world.user("frank") not in {e.actor_id for e in events}


async def test_steps_cover_every_kind_of_change(db: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    world = await seed(db)
    before = await db.fetchval("SELECT max(id) FROM outbox")
    simulator = ActivitySimulator(pool, world, seed=11)

    for _ in range(200):
        await simulator.step()

    types = {
        r["type"] for r in await db.fetch("SELECT DISTINCT type FROM outbox WHERE id > $1", before)
    }
    assert types >= {
        "stream_event.created",
        "reaction.created",
        "read_cursor.updated",
        "notification.created",
        "stream_member.created",
        "stream_member.deleted",
    }
    streams = {
        r["stream_id"]
        for r in await db.fetch(
            "SELECT DISTINCT stream_id FROM outbox WHERE id > $1 AND type = $2",
            before,
            "stream_event.created",
        )
    }
    assert streams == set(world.stream_ids.values())
    user_scoped = await db.fetch(
        "SELECT type FROM outbox WHERE id > $1 AND type IN"
        " ('read_cursor.updated', 'notification.created') AND user_id IS NULL",
        before,
    )
    assert user_scoped == []


async def test_read_cursor_moves_the_members_last_read_event(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    world = await seed(db)
    simulator = ActivitySimulator(pool, world, seed=3)
    for _ in range(100):
        await simulator.step()

    cursors = await db.fetch(
        "SELECT stream_id, user_id, data->>'lastReadEventId' AS last FROM outbox"
        " WHERE type = 'read_cursor.updated' ORDER BY seq"
    )
    assert cursors, "100 steps include read cursor updates"
    latest = {(r["stream_id"], r["user_id"]): r["last"] for r in cursors}
    for (stream_id, user_id), last in latest.items():
        stored = await db.fetchval(
            "SELECT last_read_event_id FROM stream_members WHERE stream_id = $1 AND user_id = $2",
            stream_id,
            user_id,
        )
        assert stored == last


async def test_run_stops_when_the_stop_event_is_set(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    world = await seed(db)
    before = await db.fetchval("SELECT count(*) FROM outbox")
    stop = asyncio.Event()
    task = asyncio.create_task(ActivitySimulator(pool, world, rate_per_s=50).run(stop))
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while await db.fetchval("SELECT count(*) FROM outbox") < before + 5:
            assert asyncio.get_running_loop().time() < deadline, "simulator wrote nothing"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, timeout=10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_rate_must_be_positive(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="rate_per_s must be > 0, got 0"):
        ActivitySimulator(pool, demo_world(), rate_per_s=0)


async def test_embedded_postgres_starts_accepts_a_connection_and_stops(tmp_path: Path) -> None:
    server = await asyncio.to_thread(start_embedded_postgres, str(tmp_path / "data"))
    try:
        assert (tmp_path / "data" / "pgdata" / "PG_VERSION").exists()
        conn = await asyncpg.connect(server.dsn)
        try:
            assert await conn.fetchval("SELECT current_database()") == "postgres"
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(server.stop)
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(server.dsn, timeout=5)
