"""Ingest modes against real Postgres: the choice `userstream migrate` makes, the relay's slot
bootstrap (rows committed while no slot existed), and switching back to trigger mode."""

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from core.publish import publish, publish_many
from core.schema.ingest import IngestUnavailable, ingest_mode, set_ingest_mode, slot_name
from core.schema.migrations import migrate
from sync.bus_memory import InProcessBus
from sync.relay import OutboxRelay
from tests.conftest import short_id
from tests.factories import PUBLISHED, stream_message
from tests.services import PgServer, postgres_server


@pytest.fixture(scope="module")
def replica_server() -> Iterator[PgServer]:
    """A server without logical decoding: the local one (`wal_level = replica` on this kind of
    machine, never changed by the tests) or a throwaway one with pgserver's defaults."""
    with postgres_server() as server:
        yield server


@pytest.fixture
async def replica_database(replica_server: PgServer) -> AsyncIterator[str]:
    name = f"usrepl_{short_id()}"
    dsn = await replica_server.create_database(name)
    try:
        conn = await asyncpg.connect(dsn)
        level = await conn.fetchval("SHOW wal_level")
        await conn.close()
        if level == "logical":
            pytest.skip("the local Postgres has logical decoding: no replica-level server here")
        yield dsn
    finally:
        await replica_server.drop_database(name)


def migrate_cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "migrate", *args],
        env={**os.environ, "DATABASE_URL": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_migrate_chooses_trigger_where_logical_decoding_is_off_and_says_why(
    replica_database: str,
) -> None:
    done = migrate_cli(replica_database)
    assert done.returncode == 0, done.stderr
    assert "ingest mode: trigger" in done.stdout
    assert "wal not possible: wal_level is 'replica'" in done.stdout

    refused = migrate_cli(replica_database, "--ingest", "wal")
    assert refused.returncode != 0
    assert "wal ingest is not possible here: wal_level is 'replica'" in refused.stderr
    assert "wal_level = logical" in refused.stderr


@pytest.mark.wal_only
async def test_migrate_chooses_wal_where_it_can_and_keeps_the_choice(
    pg_server: PgServer,
) -> None:
    name = f"usfresh_{short_id()}"
    dsn = await pg_server.create_database(name)
    try:
        done = await asyncio.to_thread(migrate_cli, dsn)
        assert done.returncode == 0, done.stderr
        assert "ingest mode: wal" in done.stdout
        again = await asyncio.to_thread(migrate_cli, dsn)
        assert "ingest mode: wal" in again.stdout
        conn = await asyncpg.connect(dsn)
        try:
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM pg_trigger WHERE tgname = 'outbox_commit'"
                )
                == 0
            )
        finally:
            await conn.close()
    finally:
        await pg_server.drop_database(name)


async def test_wal_on_a_replica_level_server_is_refused_by_the_function_too(
    replica_database: str,
) -> None:
    conn = await asyncpg.connect(replica_database)
    try:
        await migrate(conn)
        with pytest.raises(IngestUnavailable, match="wal_level"):
            await set_ingest_mode(conn, "wal")
        assert await ingest_mode(conn) == "trigger"
    finally:
        await conn.close()


async def relay_until(dsn: str, expected: int) -> list[str]:
    """Run a relay into a bus of its own until `expected` events (internal ones not counted)
    reached it; returns their entity ids in bus order."""
    bus = InProcessBus()
    relay = OutboxRelay(dsn, bus, standby_retry_s=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    seen: list[str] = []
    try:
        async with asyncio.timeout(30):
            async for batch in bus.read(0):
                seen += [e.entity_id for e in batch.events if not e.internal]
                if len(seen) >= expected:
                    break
    finally:
        stop.set()
        await task
    return seen


@pytest.mark.wal_only
async def test_rows_committed_while_no_slot_existed_are_positioned_and_published_once(
    db: asyncpg.Connection, database_url: str
) -> None:
    await publish(db, stream_message("before-slot-1"))
    async with db.transaction():
        await publish_many(db, [stream_message(f"before-slot-tx-{i}") for i in range(3)])
    assert await relay_until(database_url, 4) == [
        "before-slot-1",
        "before-slot-tx-0",
        "before-slot-tx-1",
        "before-slot-tx-2",
    ]
    slot = slot_name(await db.fetchval("SELECT current_database()"))
    assert (
        await db.fetchval("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", slot)
        == 1
    )

    # The slot goes away (as when the server invalidates it) while rows are committed.
    await db.execute("SELECT pg_drop_replication_slot($1)", slot)
    await publish(db, stream_message("while-no-slot"))
    assert await relay_until(database_url, 1) == ["while-no-slot"]
    rows = await db.fetch(f"SELECT entity_id, seq FROM outbox WHERE {PUBLISHED} ORDER BY seq")
    assert [r["entity_id"] for r in rows] == [
        "before-slot-1",
        "before-slot-tx-0",
        "before-slot-tx-1",
        "before-slot-tx-2",
        "while-no-slot",
    ]
    assert all(r["seq"] is not None for r in rows)


@pytest.mark.wal_only
async def test_switching_to_trigger_positions_what_the_relay_had_not_reached_and_drops_the_slot(
    db: asyncpg.Connection, database_url: str
) -> None:
    await publish(db, stream_message("relayed"))
    assert await relay_until(database_url, 1) == ["relayed"]
    await publish(db, stream_message("not-yet-relayed"))

    choice = await set_ingest_mode(db, "trigger")
    assert choice.mode == "trigger"
    await publish(db, stream_message("after-switch"))
    rows = await db.fetch(f"SELECT entity_id, seq FROM outbox WHERE {PUBLISHED} ORDER BY seq")
    assert [r["entity_id"] for r in rows] == ["relayed", "not-yet-relayed", "after-switch"]
    assert [r["seq"] for r in rows] == sorted({r["seq"] for r in rows})
    assert (
        await db.fetchval(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        )
        == 0
    )
    assert await ingest_mode(db) == "trigger"
