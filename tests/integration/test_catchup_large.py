"""A catch-up of 100,000 events from cursor 0 (issue 4): paged from Postgres, never held whole.

`open_stream` is driven directly, on real Postgres, with a dispatcher whose recent window is far
smaller than the catch-up, so nearly everything comes from Postgres pages. The stream is read
chunk by chunk and nothing is kept but counters, so that `tracemalloc` measures what the
catch-up itself holds.

Most rows are written by one bulk `INSERT ... SELECT generate_series` with the commit trigger
disabled, giving each row its position and commit time the way the trigger does for a plain
`stream_event` (whose `access` is null): through the trigger, 100,000 rows take about 20 s
on PostgreSQL 15, and the trigger is not under test here. The rows form one transaction of
98,000 events, the case where a page that completed its last transaction
(`sync.outbox.fetch_after`) would load everything at once. The last events go through the SDK
(`publish_many`) in one transaction larger than a page, then through the window.
"""

import tracemalloc
from collections.abc import AsyncIterator

import asyncpg
import pytest

from core.cursors import format_cursor
from core.publish import publish_many
from sync.access_cache import AccessCache
from sync.bus_memory import InProcessBus
from sync.catchup import StreamRequest, open_stream
from sync.dispatcher import Dispatcher
from sync.outbox import read_page
from sync.subscribers import StreamSubscriberManager, Subscriber
from tests.factories import stream_message

pytestmark = pytest.mark.trigger_only  # rows get positions at commit, from the trigger

BULK_EVENTS = 98_000
SDK_EVENTS = 2_000
WINDOW_EVENTS = 10
"""Events published after the dispatcher started: the catch-up ends in its recent window."""

WINDOW_SIZE = 100
"""The dispatcher's recent window, in events: a thousandth of the catch-up."""

PAGE_SIZE = 500
MAX_BUFFER_BYTES = 1 << 20

PEAK_BYTES = 8 << 20
"""Bound on the Python memory (`tracemalloc` peak) the catch-up may hold at once: the
stream's frames total about 45 MB, one page of them about 230 KB."""

_BULK_INSERT = """
ALTER TABLE outbox DISABLE TRIGGER outbox_commit;
INSERT INTO outbox (seq, committed_at, type, resource_type, action, entity_id, workspace_id,
                    stream_id, actor_id, data, tx)
SELECT nextval('outbox_seq'), clock_timestamp(), 'stream_event.created', 'stream_event',
       'create', 'bulk-' || n, 'w1', 'general', 'bob',
       jsonb_build_object('n', n, 'text', repeat('x', 200)),
       jsonb_build_object('id', 'tx-bulk', 'sourceId', 'tab-1')
  FROM generate_series(1, {count}) AS n;
ALTER TABLE outbox ENABLE TRIGGER outbox_commit;
"""


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as created:
        yield created


async def seed(db: asyncpg.Connection) -> None:
    """Workspace `w1` with alice active and the public stream `general`."""
    await db.execute(
        """
        INSERT INTO workspaces (id) VALUES ('w1');
        INSERT INTO workspace_members (workspace_id, user_id, status)
            VALUES ('w1', 'alice', 'active'), ('w1', 'bob', 'active');
        INSERT INTO streams (id, workspace_id, visibility) VALUES ('general', 'w1', 'public');
        """
    )


async def publish_sdk(db: asyncpg.Connection, prefix: str, count: int) -> None:
    """`count` messages in `general`, published by the SDK in one transaction."""
    async with db.transaction():
        await publish_many(
            db,
            [
                stream_message(f"{prefix}-{i}", stream_id="general", data={"text": "y" * 200})
                for i in range(count)
            ],
        )


async def test_a_catch_up_of_100k_events_arrives_in_order_once_holding_one_page_at_a_time(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await seed(db)
    async with db.transaction():
        await db.execute(_BULK_INSERT.format(count=BULK_EVENTS))
    await publish_sdk(db, "sdk", SDK_EVENTS)
    dispatcher = Dispatcher(
        InProcessBus(),
        pool,
        StreamSubscriberManager(),
        AccessCache(),
        window_events=WINDOW_SIZE,
        page_size=PAGE_SIZE,
    )
    await dispatcher.start()
    await publish_sdk(db, "window", WINDOW_EVENTS)
    await dispatcher.process((await read_page(db, dispatcher.position, 1_000)).events)
    total = BULK_EVENTS + SDK_EVENTS + WINDOW_EVENTS
    assert await db.fetchval("SELECT count(*) FROM outbox") == total
    assert dispatcher.position == total and dispatcher.window.floor == total - WINDOW_EVENTS

    subscriber = Subscriber("catch-up", "alice", max_buffer_bytes=MAX_BUFFER_BYTES)
    frames = open_stream(
        dispatcher, StreamRequest("alice", after=0), subscriber, page_size=PAGE_SIZE
    )
    received = last = largest_chunk = streamed_bytes = 0
    offset: bytes | None = None
    out_of_order: list[tuple[int, int]] = []
    tracemalloc.start()
    try:
        async for chunk in frames:
            assert subscriber.buffered_bytes <= MAX_BUFFER_BYTES
            changes = 0
            for block in chunk.split(b"\n\n"):
                if block.startswith(b"event: change\nid: "):
                    position = int(block[18:34], 16)
                    if position != last + 1:
                        out_of_order.append((last, position))
                    last, changes = position, changes + 1
                elif block.startswith(b"event: offset\nid: "):
                    offset = block[18:34]
            received += changes
            streamed_bytes += len(chunk)
            largest_chunk = max(largest_chunk, changes)
            if offset is not None:
                break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await frames.aclose()

    assert out_of_order == []
    assert received == total and last == total
    assert offset == format_cursor(total).encode()
    assert largest_chunk <= PAGE_SIZE
    assert streamed_bytes > 5 * PEAK_BYTES
    assert peak < PEAK_BYTES, f"catch-up of {streamed_bytes} bytes held {peak} bytes at its peak"
    assert len(dispatcher.manager) == 0 and dispatcher.cache.user_count == 0
