"""Fixtures shared by every test: real Postgres and Redis, one database and key prefix per test,
and bus readers stopped at teardown.

The ingest mode of the test databases is `USERSTREAM_TEST_INGEST`: `wal` (the default) on a
throwaway Postgres with logical decoding (`tests.services.logical_postgres_server`), or
`trigger` on the local Postgres (`tests.services.postgres_server`). Tests that hold only in one
mode are marked `wal_only` or `trigger_only` and skipped in the other.
"""

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import asyncpg
import nanoid
import pytest
import redis.asyncio as aioredis

from core.schema.ingest import set_ingest_mode
from core.schema.migrations import migrate
from sync.bus import Bus
from tests.bus_readers import Reader
from tests.redis_cluster import RedisCluster
from tests.services import (
    INGEST,
    PgServer,
    logical_postgres_server,
    postgres_server,
    redis_server,
)

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def short_id() -> str:
    """A random lower-case id, usable in database names and Redis prefixes."""
    return str(nanoid.generate(_ALPHABET, 10))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    other = "trigger_only" if INGEST == "wal" else "wal_only"
    for item in items:
        if item.get_closest_marker(other):
            item.add_marker(pytest.mark.skip(reason=f"holds only in {other[:-5]} ingest mode"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with logical_postgres_server() if INGEST == "wal" else postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def template_database(pg_server: PgServer) -> Iterator[str]:
    """A migrated database that each test's database is copied from."""
    name = f"ustmpl_{short_id()}"

    async def create() -> None:
        conn = await asyncpg.connect(await pg_server.create_database(name))
        try:
            await migrate(conn)
            await set_ingest_mode(conn, INGEST)
        finally:
            await conn.close()

    asyncio.run(create())
    yield name
    asyncio.run(pg_server.drop_database(name))


@pytest.fixture
def database_url(pg_server: PgServer, template_database: str) -> Iterator[str]:
    """DSN of a fresh, migrated database of this test's own (dropped afterwards)."""
    name = f"ust_{short_id()}"
    yield asyncio.run(pg_server.create_database(name, template=template_database))
    asyncio.run(pg_server.drop_database(name))


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """A three-node Redis Cluster shared by a module's tests that leave its nodes alone."""
    with RedisCluster() as started:
        yield started


@pytest.fixture
def own_cluster() -> Iterator[RedisCluster]:
    """A three-node Redis Cluster of this test's own, for a test that restarts a node."""
    with RedisCluster() as started:
        yield started


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"ustest:{short_id()}:"
    yield prefix

    async def cleanup() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    asyncio.run(cleanup())


@pytest.fixture
async def readers() -> AsyncIterator[Callable[..., Reader]]:
    """Starts `Reader`s: `readers(bus, after=0)`; every one is stopped at teardown."""
    started: list[Reader] = []

    def start(bus: Bus, after: int = 0) -> Reader:
        started.append(Reader(bus, after))
        return started[-1]

    yield start
    for reader in started:
        await reader.stop()
