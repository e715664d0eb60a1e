"""Retention of the outbox on real Postgres (issue 4): pruning, its watermark, the relay that
prunes, and catch-up from a cursor older than the retained history.

Rows are made old by moving their `committed_at` back (the commit trigger fires on INSERT
only), so nothing waits for a clock.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from core.cursors import current_position, format_cursor
from core.publish import publish, publish_many
from core.types import Frame
from sync.access_cache import AccessCache
from sync.bus import Batch
from sync.bus_memory import InProcessBus
from sync.catchup import StreamRequest, open_stream
from sync.dispatcher import Dispatcher
from sync.outbox import read_page
from sync.relay import OutboxRelay
from sync.retention import Pruner, PruneResult, prune_batch, pruned_through
from sync.subscribers import StreamSubscriberManager, Subscriber
from tests.factories import stream_message
from tests.sse import parse

pytestmark = pytest.mark.trigger_only  # rows get positions at commit, from the trigger

DAY_S = 86_400.0

# Helpers


async def commit(db: asyncpg.Connection, *entity_ids: str) -> None:
    """One message per id in the public stream `general`, in one transaction."""
    async with db.transaction():
        await publish_many(db, [stream_message(e, stream_id="general") for e in entity_ids])


async def age(db: asyncpg.Connection, seconds: float, upto: int | None = None) -> None:
    """Move `committed_at` of every row (at positions up to `upto`) `seconds` back."""
    await db.execute(
        "UPDATE outbox SET committed_at = committed_at - make_interval(secs => $1)"
        " WHERE $2::bigint IS NULL OR seq <= $2",
        seconds,
        upto,
    )


async def positions(db: asyncpg.Connection) -> list[int]:
    """Positions of the committed rows still in the outbox, in order."""
    rows = await db.fetch("SELECT seq FROM outbox WHERE seq IS NOT NULL ORDER BY seq")
    return [int(r["seq"]) for r in rows]


async def positions_are(db: asyncpg.Connection, expected: list[int]) -> bool:
    return await positions(db) == expected


async def eventually(check: Any, what: str, timeout_s: float = 10) -> None:
    """Poll the coroutine function `check` every 20 ms until it returns true."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# Pruning


async def test_pruning_deletes_old_rows_oldest_first_in_batches_and_keeps_the_newest(
    db: asyncpg.Connection,
) -> None:
    await commit(db, *[f"m{i}" for i in range(1, 26)])
    await age(db, 2 * DAY_S)

    results = [await prune_batch(db, retention_s=DAY_S, batch_size=10, upto=25) for _ in range(4)]

    assert results == [
        PruneResult(10, 10),
        PruneResult(10, 20),
        PruneResult(4, 24),
        PruneResult(0, 24),
    ]
    assert await positions(db) == [25]
    assert await current_position(db) == 25
    assert await pruned_through(db) == 24


async def test_rows_younger_than_the_retention_are_kept(db: asyncpg.Connection) -> None:
    await commit(db, "old1", "old2", "old3")
    await commit(db, "new1", "new2")
    await age(db, 2 * 3600, upto=3)

    result = await prune_batch(db, retention_s=3600, batch_size=100, upto=5)

    assert result == PruneResult(3, 3)
    assert await positions(db) == [4, 5]


async def test_rows_past_the_relay_position_are_kept_and_the_watermark_never_moves_back(
    db: asyncpg.Connection, database_url: str
) -> None:
    await commit(db, *[f"m{i}" for i in range(1, 9)])
    await age(db, 2 * DAY_S)

    assert await prune_batch(db, retention_s=DAY_S, batch_size=100, upto=5) == PruneResult(5, 5)
    assert await prune_batch(db, retention_s=DAY_S, batch_size=100, upto=3) == PruneResult(0, 5)

    assert await positions(db) == [6, 7, 8]
    other = await asyncpg.connect(database_url)
    try:
        assert await pruned_through(other) == 5
    finally:
        await other.close()


async def test_publishers_commit_while_a_prune_holds_its_locks(
    db: asyncpg.Connection, database_url: str
) -> None:
    """A prune, kept open in its transaction, blocks neither a publisher that began before it
    nor one that begins after it; nor does an open publisher transaction block the prune."""
    await commit(db, "m1", "m2", "m3")
    await age(db, 2 * DAY_S)
    early, late = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    early_tx, late_tx = early.transaction(), late.transaction()
    try:
        await early_tx.start()
        await publish(early, stream_message("early", stream_id="general"))
        async with db.transaction():
            async with asyncio.timeout(10):  # bounds a lock wait, should there be one
                result = await prune_batch(db, retention_s=DAY_S, batch_size=100, upto=3)
                await late_tx.start()
                await publish(late, stream_message("late", stream_id="general"))
                await late_tx.commit()
                await early_tx.commit()
            assert result == PruneResult(2, 2)
    finally:
        for conn in (early, late):
            await conn.close()

    rows = await db.fetch("SELECT entity_id, seq FROM outbox ORDER BY seq")
    assert [(r["entity_id"], r["seq"]) for r in rows] == [("m3", 3), ("late", 4), ("early", 5)]


async def test_pruner_steps_again_at_once_after_a_full_batch_and_waits_once_caught_up(
    db: asyncpg.Connection,
) -> None:
    now = [100.0]
    pruner = Pruner(retention_s=DAY_S, batch_size=2, interval_s=60, clock=lambda: now[0])
    await commit(db, "m1", "m2", "m3", "m4")
    await age(db, 2 * DAY_S)

    assert pruner.due()
    assert await pruner.step(db, upto=4) is True
    assert pruner.due()
    assert await pruner.step(db, upto=4) is False  # only m3 was left to delete
    assert not pruner.due()
    now[0] += 60
    assert pruner.due()
    assert (pruner.deleted, pruner.pruned_through) == (3, 3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"retention_s": 0}, "retention_s must be > 0 seconds, got 0"),
        ({"interval_s": -1}, "interval_s must be > 0 seconds, got -1"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ],
)
def test_pruner_refuses_settings_out_of_range(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pruner(**settings)


# The relay prunes


@pytest.fixture
async def relay(database_url: str) -> AsyncIterator[OutboxRelay]:
    """A relay on an in-process bus that prunes past one day, two rows per step."""
    pruner = Pruner(retention_s=DAY_S, batch_size=2, interval_s=3600)
    created = OutboxRelay(database_url, InProcessBus(), poll_interval_s=0.05, pruner=pruner)
    yield created
    await created.close()


async def test_the_active_relay_prunes_what_it_relayed_in_batches_keeping_the_newest(
    db: asyncpg.Connection, relay: OutboxRelay
) -> None:
    await commit(db, "m1", "m2", "m3", "m4", "m5")
    await age(db, 2 * DAY_S)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await eventually(lambda: positions_are(db, [5]), "pruning down to the newest row")
    finally:
        stop.set()
        await task

    assert relay.position == 5
    assert relay.pruner is not None and relay.pruner.deleted == 4
    assert await pruned_through(db) == 4


async def test_a_relay_prunes_only_while_it_leads(
    db: asyncpg.Connection, relay: OutboxRelay
) -> None:
    await commit(db, "m1", "m2", "m3")
    await age(db, 2 * DAY_S)

    assert await relay.prune_once() is False  # not leading: nothing happens
    assert await positions(db) == [1, 2, 3]
    assert await relay.lead()
    await relay.relay_once()
    assert await relay.prune_once() is True
    assert await positions(db) == [3]


async def test_a_failing_prune_is_logged_and_relaying_goes_on(
    db: asyncpg.Connection, relay: OutboxRelay, caplog: pytest.LogCaptureFixture
) -> None:
    await db.execute("DROP TABLE outbox_retention")
    await commit(db, "m1", "m2")
    await age(db, 2 * DAY_S)
    assert await relay.lead()

    with caplog.at_level(logging.WARNING, logger="sync.relay"):
        assert await relay.relay_once() == 2
        assert await relay.prune_once() is False
        await commit(db, "m3")
        assert await relay.relay_once() == 1

    assert "outbox pruning failed" in caplog.text
    assert await positions(db) == [1, 2, 3]
    assert relay.pruner is not None and not relay.pruner.due()


# Catch-up beyond retention


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as created:
        yield created


@pytest.fixture
async def world(db: asyncpg.Connection) -> None:
    """Workspace `w1`, alice active, public stream `general`."""
    await db.execute(
        """
        INSERT INTO workspaces (id) VALUES ('w1');
        INSERT INTO workspace_members (workspace_id, user_id, status)
            VALUES ('w1', 'alice', 'active');
        INSERT INTO streams (id, workspace_id, visibility) VALUES ('general', 'w1', 'public');
        """
    )


async def started_dispatcher(pool: asyncpg.Pool) -> Dispatcher:
    """A dispatcher started now: its recent window holds nothing before the current position."""
    dispatcher = Dispatcher(InProcessBus(), pool, StreamSubscriberManager(), AccessCache())
    await dispatcher.start()
    return dispatcher


async def pump(dispatcher: Dispatcher, db: asyncpg.Connection) -> None:
    """Dispatch everything committed so far."""
    await dispatcher.process((await read_page(db, dispatcher.position, 1000)).events)


async def frames_until_offset(frames: AsyncIterator[Frame]) -> list[dict[str, Any]]:
    """Read a stream up to and including its `offset` frame."""
    chunks: list[Frame] = []
    async with asyncio.timeout(10):
        async for chunk in frames:
            chunks.append(chunk)
            if b"event: offset" in chunk:
                return parse(chunks)
    raise AssertionError(f"stream ended before its offset frame: {parse(chunks)}")


async def test_a_cursor_older_than_the_retained_history_gets_must_refetch_then_live(
    world: None, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await commit(db, "m1", "m2", "m3", "m4", "m5")
    await age(db, 2 * DAY_S)
    await prune_batch(db, retention_s=DAY_S, batch_size=100, upto=5)
    dispatcher = await started_dispatcher(pool)
    subscriber = Subscriber("old", "alice", max_buffer_bytes=1 << 20)
    frames = open_stream(dispatcher, StreamRequest("alice", after=1), subscriber)
    try:
        opening = await frames_until_offset(frames)
        await commit(db, "m6")
        await pump(dispatcher, db)
        live = parse([await anext(frames)])
    finally:
        await frames.aclose()

    assert [f.get("event") for f in opening] == ["must-refetch", "offset"]
    assert opening[0]["data"] == {
        "reason": f"cursor {format_cursor(1)} is older than the retained history"
        f" (events up to {format_cursor(4)} were pruned)"
    }
    assert opening[1]["data"] == {"cursor": format_cursor(5)}
    assert [(f["event"], f["data"]["entityId"]) for f in live] == [("change", "m6")]


async def test_a_cursor_at_the_watermark_catches_up_from_what_is_retained(
    world: None, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await commit(db, "m1", "m2", "m3", "m4", "m5")
    await age(db, 2 * DAY_S)
    await prune_batch(db, retention_s=DAY_S, batch_size=100, upto=5)
    dispatcher = await started_dispatcher(pool)
    subscriber = Subscriber("edge", "alice", max_buffer_bytes=1 << 20)
    frames = open_stream(dispatcher, StreamRequest("alice", after=4), subscriber)
    try:
        opening = await frames_until_offset(frames)
    finally:
        await frames.aclose()

    assert [(f["event"], f["data"].get("entityId")) for f in opening] == [
        ("change", "m5"),
        ("offset", None),
    ]


async def test_events_pruned_while_a_catch_up_pages_turn_into_must_refetch_then_live(
    world: None, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """The watermark is read after every page, so a prune that overtakes a slow catch-up is
    noticed at its next page instead of leaving a silent gap."""
    await commit(db, *[f"m{i}" for i in range(1, 11)])
    dispatcher = await started_dispatcher(pool)
    subscriber = Subscriber("slow", "alice", max_buffer_bytes=1 << 20)
    frames = open_stream(dispatcher, StreamRequest("alice", after=0), subscriber, page_size=2)
    try:
        assert await anext(frames) == b""  # the `first` frame
        first_page = parse([await anext(frames)])
        await age(db, 2 * DAY_S)
        await prune_batch(db, retention_s=DAY_S, batch_size=100, upto=10)
        rest = await frames_until_offset(frames)
    finally:
        await frames.aclose()

    assert [f["data"]["entityId"] for f in first_page] == ["m1", "m2"]
    assert [f.get("event") for f in rest] == ["must-refetch", "offset"]
    assert rest[0]["data"]["reason"].startswith(f"cursor {format_cursor(2)} is older")
    assert rest[1]["data"] == {"cursor": format_cursor(10)}
    assert len(dispatcher.manager) == 0


async def test_a_bus_gap_already_pruned_closes_every_stream_with_resync(
    world: None, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """The bus lost batches (Redis flushed) and retention pruned the same events before the
    gateway could fill the gap from Postgres: no stream can get them any more, so each is
    closed with `resync`; resuming from its cursor then gets `must-refetch`."""
    dispatcher = await started_dispatcher(pool)
    subscriber = Subscriber("live", "alice", max_buffer_bytes=1 << 20)
    frames = open_stream(dispatcher, StreamRequest("alice"), subscriber)
    try:
        opening = await frames_until_offset(frames)
        await commit(db, "m1", "m2", "m3")
        await age(db, 2 * DAY_S)
        await prune_batch(db, retention_s=DAY_S, batch_size=100, upto=3)
        await commit(db, "m4")
        (m4,) = (await read_page(db, 3, 10)).events
        await dispatcher.handle(Batch(3, (m4,)))  # events 1..3 never came through the bus
        ending = parse([chunk async for chunk in frames])
    finally:
        await frames.aclose()
    cursor = opening[-1]["data"]["cursor"]

    assert [f.get("event") for f in ending] == ["close"]
    assert ending[0]["data"] == {"reason": "resync"}
    assert dispatcher.position == 4 and len(dispatcher.manager) == 0

    resumed = open_stream(
        dispatcher,
        StreamRequest("alice", after=int(cursor, 16)),
        Subscriber("again", "alice", max_buffer_bytes=1 << 20),
    )
    try:
        again = await frames_until_offset(resumed)
    finally:
        await resumed.aclose()
    assert [f.get("event") for f in again] == ["must-refetch", "offset"]
