"""The relay's count of dead letters (issue 4): each malformed row counted once, when the
relay moves past it, however often its page is read."""

from collections.abc import AsyncIterator

import asyncpg
import pytest

from core.publish import publish
from sync.bus_memory import InProcessBus
from sync.relay import OutboxRelay
from tests.factories import stream_message

pytestmark = pytest.mark.trigger_only  # rows get positions at commit, from the trigger


@pytest.fixture
async def relay(database_url: str) -> AsyncIterator[OutboxRelay]:
    created = OutboxRelay(database_url, InProcessBus(), listen=False)
    yield created
    await created.close()


async def test_each_malformed_row_is_counted_once_even_when_its_page_is_read_again(
    db: asyncpg.Connection, relay: OutboxRelay
) -> None:
    async with db.transaction():
        # A `membership` row without `user_id`: the database accepts it, the relay cannot
        # route it (core.events.scope_error).
        await db.execute(
            "INSERT INTO outbox (type, resource_type, action, entity_id, workspace_id)"
            " VALUES ('membership.created', 'membership', 'create', 'bad', 'w1')"
        )
        await publish(db, stream_message("good"))
    assert await relay.lead()
    await relay.bus.close()

    with pytest.raises(ConnectionError):
        await relay.relay_once()  # dead letter recorded, page not published: read again
    assert relay.dead_letters == 0 and relay.position == 0

    relay.bus = InProcessBus()
    assert await relay.relay_once() == 2
    assert await relay.relay_once() == 0
    assert relay.dead_letters == 1 and relay.position == 2
    assert await db.fetchval("SELECT count(*) FROM outbox_dead_letters") == 1
