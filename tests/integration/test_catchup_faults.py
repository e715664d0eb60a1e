"""A stream whose opening meets a Postgres outage (issue 4): it ends with a `retry:` and
`event: close` `{"reason": "unavailable"}`, so its client comes back later, instead of an
error surfacing from the ASGI application; nothing is left registered.

The outage is real and limited to this test's database: new connections refused
(`ALLOW_CONNECTIONS false`) and every existing session terminated.
"""

from collections.abc import AsyncIterator

import asyncpg
import pytest

from core.frames import encode_retry
from sync.access_cache import AccessCache
from sync.bus_memory import InProcessBus
from sync.catchup import StreamRequest, open_stream
from sync.dispatcher import Dispatcher
from sync.subscribers import StreamSubscriberManager, Subscriber
from tests.services import PgServer
from tests.sse import parse


@pytest.fixture
async def outage(db: asyncpg.Connection, pg_server: PgServer) -> AsyncIterator[str]:
    """Yields the name of this test's database; after the test it accepts connections again."""
    database = await db.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(pg_server.dsn("postgres"))
    try:
        yield database
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()


async def start_outage(pg_server: PgServer, database: str) -> None:
    admin = await asyncpg.connect(pg_server.dsn("postgres"))
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database
        )
    finally:
        await admin.close()


@pytest.mark.parametrize("after", [None, 0], ids=["from-now", "from-a-cursor"])
async def test_a_postgres_outage_while_opening_ends_the_stream_with_unavailable(
    database_url: str, pg_server: PgServer, outage: str, after: int | None
) -> None:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as pool:
        dispatcher = Dispatcher(
            InProcessBus(),
            pool,
            StreamSubscriberManager(),
            AccessCache(),
            retry_frame=lambda: encode_retry(2500),
        )
        await dispatcher.start()
        await start_outage(pg_server, outage)
        subscriber = Subscriber("c1", "alice", max_buffer_bytes=1 << 20)
        frames = [
            chunk
            async for chunk in open_stream(
                dispatcher, StreamRequest("alice", after=after), subscriber, first=b""
            )
        ]

    assert parse(frames) == [
        {"retry": "2500"},
        {"event": "close", "data": {"reason": "unavailable"}},
    ]
    assert subscriber.close_reason == "unavailable"
    assert len(dispatcher.manager) == 0 and dispatcher.cache.user_count == 0
