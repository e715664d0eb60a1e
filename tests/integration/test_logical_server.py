"""The Postgres servers with logical decoding: the tests' throwaway one
(`tests.services.logical_postgres_server`) and the embedded one (`gateway.embedded`).

A database there holds a pgoutput slot made over the replication protocol (psycopg2's
`LogicalReplicationConnection`), and `PgServer.drop_database` drops it with its slots, idle
or streaming.
"""

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest

from gateway.embedded import start_embedded_postgres
from tests.conftest import short_id
from tests.services import PgServer, logical_postgres_server


@pytest.fixture(scope="module")
def wal_server() -> Iterator[PgServer]:
    with logical_postgres_server() as server:
        yield server


@pytest.fixture
def wal_database(wal_server: PgServer) -> Iterator[str]:
    """The name of a fresh database on the logical server (dropped afterwards)."""
    name = f"uswal_{short_id()}"
    asyncio.run(wal_server.create_database(name))
    yield name
    asyncio.run(wal_server.drop_database(name))


def replication_connection(server: PgServer, database: str) -> psycopg2.extras.ReplicationCursor:
    conn = psycopg2.connect(
        server.dsn(database), connection_factory=psycopg2.extras.LogicalReplicationConnection
    )
    cursor = conn.cursor()
    assert isinstance(cursor, psycopg2.extras.ReplicationCursor)
    return cursor


async def slots(server: PgServer, database: str) -> list[tuple[str, str, bool]]:
    conn = await asyncpg.connect(server.dsn("postgres"))
    try:
        rows = await conn.fetch(
            "SELECT slot_name, plugin, active FROM pg_replication_slots WHERE database = $1",
            database,
        )
    finally:
        await conn.close()
    return [(row["slot_name"], row["plugin"], row["active"]) for row in rows]


async def test_server_runs_with_logical_decoding(wal_server: PgServer) -> None:
    conn = await asyncpg.connect(wal_server.dsn("postgres"))
    try:
        assert await conn.fetchval("SHOW wal_level") == "logical"
        assert int(await conn.fetchval("SHOW max_wal_senders")) >= 10
        assert int(await conn.fetchval("SHOW max_replication_slots")) >= 10
    finally:
        await conn.close()


async def test_database_holds_a_pgoutput_slot_and_drops_with_it(
    wal_server: PgServer, wal_database: str
) -> None:
    cursor = replication_connection(wal_server, wal_database)
    try:
        cursor.create_replication_slot("idle_slot", output_plugin="pgoutput")
        assert await slots(wal_server, wal_database) == [("idle_slot", "pgoutput", False)]

        await wal_server.drop_database(wal_database)
    finally:
        cursor.connection.close()

    assert await slots(wal_server, wal_database) == []
    conn = await asyncpg.connect(wal_server.dsn("postgres"))
    try:
        assert not await conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", wal_database
        )
    finally:
        await conn.close()


async def test_drop_database_ends_the_walsender_streaming_from_a_slot(
    wal_server: PgServer, wal_database: str
) -> None:
    cursor = replication_connection(wal_server, wal_database)
    try:
        cursor.create_replication_slot("busy_slot", output_plugin="pgoutput")
        cursor.start_replication(
            slot_name="busy_slot",
            decode=False,
            options={"proto_version": "1", "publication_names": "none_yet"},
        )
        for _ in range(100):
            if await slots(wal_server, wal_database) == [("busy_slot", "pgoutput", True)]:
                break
            await asyncio.sleep(0.02)
        assert await slots(wal_server, wal_database) == [("busy_slot", "pgoutput", True)]

        await wal_server.drop_database(wal_database)

        assert await slots(wal_server, wal_database) == []
        with pytest.raises(psycopg2.Error):
            cursor.consume_stream(lambda message: None)
    finally:
        with contextlib.suppress(psycopg2.Error):
            cursor.connection.close()


async def test_replication_over_the_unix_socket_is_trusted(wal_server: PgServer) -> None:
    if not wal_server.host.startswith("/"):
        pytest.skip("USERSTREAM_TEST_PG_WAL names a TCP server")
    conn = await asyncpg.connect(wal_server.dsn("postgres"))
    try:
        rules = await conn.fetch(
            "SELECT auth_method FROM pg_hba_file_rules"
            " WHERE type = 'local' AND 'replication' = ANY(database)"
        )
    finally:
        await conn.close()
    assert [row["auth_method"] for row in rules] == ["trust"]


def test_embedded_postgres_runs_with_logical_decoding(tmp_path: Path) -> None:
    server = start_embedded_postgres(str(tmp_path / "data"))
    try:
        assert server.logical
        assert "wal_level = 'logical'" in (server.data_dir / "userstream.conf").read_text()
        conn = psycopg2.connect(server.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW wal_level")
                assert cur.fetchone() == ("logical",)
        finally:
            conn.close()
    finally:
        server.stop()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(server.dsn, connect_timeout=5)
