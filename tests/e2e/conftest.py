"""End-to-end fixtures: real `userstream` processes against this test's database and Redis."""

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest

from tests.e2e.harness import JWT_SECRET, Processes
from tests.e2e.sequence import Connect, Publisher, ResumingClient
from tests.services import BUS


@pytest.fixture
def processes(database_url: str, redis_url: str, redis_prefix: str) -> Iterator[Processes]:
    """Starts gateways and relays sharing this test's Postgres database and Redis prefix."""
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "USERSTREAM_REDIS_PREFIX": redis_prefix,
        "USERSTREAM_JWT_SECRET": JWT_SECRET,
        "USERSTREAM_RELAY_POLL_INTERVAL_S": "0.5",
        "USERSTREAM_RELAY_STANDBY_RETRY_S": "0.5",
        "USERSTREAM_LOG_LEVEL": "warning",
        # Presence frames would come between the frames other tests expect; tests of
        # presence turn it on (tests/e2e/test_presence.py).
        "USERSTREAM_PRESENCE": "false",
        "USERSTREAM_BUS": "stream" if BUS == "stream" else "channels",
    }
    running = Processes(env)
    yield running
    running.stop_all()


@pytest.fixture
async def publisher(database_url: str) -> AsyncIterator[Publisher]:
    """The sequence publisher of this test (started by the test), closed at teardown."""
    running = Publisher(database_url)
    yield running
    await running.close()


@pytest.fixture
async def clients() -> AsyncIterator[Connect]:
    """`await clients(user_id, urls, **options)`: a live `ResumingClient`; all are closed at
    teardown, before the processes they talk to are stopped."""
    started: list[ResumingClient] = []

    async def connect(user_id: str, urls: Sequence[str], **options: Any) -> ResumingClient:
        client = ResumingClient(user_id, urls, **options)
        started.append(client)
        return await client.connect()

    yield connect
    for client in started:
        await client.close()
