"""The outbox relay against a real Postgres: order, wake-up, dead letters, progress, leadership.

Each test has a migrated database of its own (`database_url`, `db`). Relays run as tasks of
the test's event loop through the `relays` factory, which stops every relay it started; the
bus is an `InProcessBus` read by a `tests.bus_readers.Reader` (the `collector` fixture), or a
`RedisBus` where the bus must fail.
"""

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from core.publish import publish
from sync.bus import Bus
from sync.bus_memory import InProcessBus
from sync.bus_redis import RedisBus
from sync.leader import holder_pid
from sync.relay import APPLICATION_NAME_PREFIX, OutboxRelay, relay_lag
from tests.bus_readers import Reader
from tests.factories import stream_message
from tests.services import RedisProcess

pytestmark = pytest.mark.trigger_only  # rows get positions at commit, from the trigger

# Helpers


async def commit(conn: asyncpg.Connection, *entity_ids: str) -> list[int]:
    """Publish one event per id in one transaction; return the positions they got."""
    async with conn.transaction():
        ids = [await publish(conn, stream_message(e)) for e in entity_ids]
    rows = await conn.fetch("SELECT seq FROM outbox WHERE id = any($1) ORDER BY seq", ids)
    return [int(r["seq"]) for r in rows]


async def insert_malformed(conn: asyncpg.Connection, entity_id: str) -> tuple[int, int]:
    """A `membership` row without `user_id`: the database accepts it, `Event.from_row` refuses
    it (`core.events.scope_error`). Returns its outbox id and position."""
    row = await conn.fetchrow(
        "INSERT INTO outbox (type, resource_type, action, entity_id, workspace_id)"
        " VALUES ('membership.created', 'membership', 'create', $1, 'w1') RETURNING id",
        entity_id,
    )
    seq = await conn.fetchval("SELECT seq FROM outbox WHERE id = $1", row["id"])
    return int(row["id"]), int(seq)


async def outbox_order(conn: asyncpg.Connection) -> list[str]:
    """Entity ids of every committed valid event, in position order."""
    rows = await conn.fetch(
        "SELECT entity_id FROM outbox WHERE seq IS NOT NULL AND resource_type = 'stream_event'"
        " ORDER BY seq"
    )
    return [r["entity_id"] for r in rows]


async def recorded_position(conn: asyncpg.Connection, name: str = "default") -> int | None:
    """The position in `outbox_relay` for `name`, None when there is no row."""
    value = await conn.fetchval("SELECT position FROM outbox_relay WHERE name = $1", name)
    return None if value is None else int(value)


async def relay_backends(conn: asyncpg.Connection) -> list[int]:
    """Backend pids of the relay connections to this database."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE $1 ORDER BY pid",
        f"{APPLICATION_NAME_PREFIX}%",
    )
    return [int(r["pid"]) for r in rows]


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = 15
) -> None:
    """Poll `check` every 20 ms until it is true; fail naming `what` after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Running:
    """A relay running as a task until `stop` is set."""

    def __init__(self, relay: OutboxRelay) -> None:
        self.relay = relay
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(relay.run(self.stop))

    async def shutdown(self) -> None:
        """Set `stop` and wait (10 s at most) for `run` to return."""
        self.stop.set()
        await asyncio.wait_for(asyncio.shield(self.task), timeout=10)


class Relays:
    """Starts relays on the test's database (fast polling by default) and stops them all."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.running: list[Running] = []

    def start(self, bus: Bus, **options: Any) -> Running:
        settings: dict[str, Any] = {"poll_interval_s": 0.1, "standby_retry_s": 0.1, **options}
        running = Running(OutboxRelay(self.dsn, bus, **settings))
        self.running.append(running)
        return running

    async def close(self) -> None:
        for running in self.running:
            running.stop.set()
        tasks = [r.task for r in self.running]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def relays(database_url: str) -> AsyncIterator[Relays]:
    factory = Relays(database_url)
    yield factory
    await factory.close()


@pytest.fixture
async def bus() -> AsyncIterator[InProcessBus]:
    memory = InProcessBus(max_batches=10_000)
    yield memory
    await memory.close()


@pytest.fixture
async def collector(bus: InProcessBus, readers: Callable[..., Reader]) -> Reader:
    """A `Reader` of `bus` from position 0, stopped at teardown."""
    return readers(bus)


# Order


async def test_events_reach_the_bus_in_commit_order_with_prev_chaining(
    db: asyncpg.Connection, relays: Relays, bus: InProcessBus, collector: Reader
) -> None:
    running = relays.start(bus)
    await commit(db, "a", "b")
    await commit(db, "c")
    await commit(db, "d", "e")

    await eventually(lambda: len(collector.events()) == 5, "five events on the bus")

    assert collector.entity_ids() == ["a", "b", "c", "d", "e"]
    raw = [e.seq for batch in collector.batches for e in batch.events]
    assert raw == sorted(set(raw)), "every event once, positions increasing"
    assert collector.batches[0].prev == 0
    for before, after in zip(collector.batches, collector.batches[1:], strict=False):
        assert after.prev == before.last
    await eventually(lambda: running.relay.position == raw[-1], "the relay's position")
    assert await recorded_position(db) == raw[-1]


async def test_a_backlog_is_relayed_in_pages_that_chain(
    db: asyncpg.Connection, relays: Relays, bus: InProcessBus, collector: Reader
) -> None:
    for i in range(7):
        await commit(db, f"e{i}")

    relays.start(bus, batch_size=2, poll_interval_s=3600)

    await eventually(lambda: len(collector.events()) == 7, "seven events on the bus")
    assert collector.entity_ids() == [f"e{i}" for i in range(7)]
    assert [len(b.events) for b in collector.batches] == [2, 2, 2, 1]
    assert collector.batches[0].prev == 0
    for before, after in zip(collector.batches, collector.batches[1:], strict=False):
        assert after.prev == before.last


async def test_a_page_keeps_a_transaction_whole_beyond_batch_size(
    db: asyncpg.Connection, relays: Relays, bus: InProcessBus, collector: Reader
) -> None:
    await commit(db, "t1", "t2", "t3")

    relays.start(bus, batch_size=2)

    await eventually(lambda: len(collector.events()) == 3, "three events on the bus")
    assert [[e.entity_id for e in b.events] for b in collector.batches] == [["t1", "t2", "t3"]]


async def test_a_transaction_that_commits_after_a_higher_id_is_delivered_after_it(
    database_url: str,
    db: asyncpg.Connection,
    relays: Relays,
    bus: InProcessBus,
    collector: Reader,
) -> None:
    running = relays.start(bus)
    late = await asyncpg.connect(database_url)
    try:
        transaction = late.transaction()
        await transaction.start()
        id_a = await publish(late, stream_message("A"))
        async with db.transaction():
            id_b = await publish(db, stream_message("B"))
        assert id_a < id_b

        await eventually(lambda: collector.entity_ids() == ["B"], "B on the bus")
        seq_b = collector.events()[0].seq
        await eventually(lambda: running.relay.position == seq_b, "the relay past B")
        await transaction.commit()
    finally:
        await late.close()

    await eventually(lambda: collector.entity_ids() == ["B", "A"], "A after B")
    seq_a = collector.events()[1].seq
    assert seq_a > seq_b
    assert collector.batches[-1].prev == seq_b


# Wake-up


async def test_without_notifications_the_poll_delivers_events(
    db: asyncpg.Connection, relays: Relays, bus: InProcessBus, collector: Reader
) -> None:
    running = relays.start(bus, listen=False, poll_interval_s=0.05)
    await eventually(lambda: running.relay.is_leader, "leadership")

    await commit(db, "polled")

    await eventually(lambda: collector.entity_ids() == ["polled"], "the event on the bus")


async def test_a_notification_wakes_the_relay_long_before_the_poll(
    db: asyncpg.Connection, relays: Relays, bus: InProcessBus, collector: Reader
) -> None:
    # With an hour between polls, only the NOTIFY of the commit can bring the event.
    running = relays.start(bus, poll_interval_s=3600)
    await commit(db, "first")
    await eventually(lambda: collector.entity_ids() == ["first"], "the first event")
    await eventually(lambda: running.relay.position > 0, "the first step")

    await commit(db, "notified")

    await eventually(lambda: collector.entity_ids() == ["first", "notified"], "the wake-up")


# Malformed rows


async def test_a_malformed_row_goes_to_dead_letters_and_the_relay_goes_on(
    db: asyncpg.Connection,
    relays: Relays,
    bus: InProcessBus,
    collector: Reader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sync.relay")
    running = relays.start(bus)
    await commit(db, "before")
    bad_id, bad_seq = await insert_malformed(db, "m1")
    [after_seq] = await commit(db, "after")

    await eventually(lambda: running.relay.position == after_seq, "the relay past the row")

    await eventually(lambda: collector.entity_ids() == ["before", "after"], "the valid events")
    letters = await db.fetch("SELECT outbox_id, seq, error, row_data FROM outbox_dead_letters")
    assert [(r["outbox_id"], r["seq"]) for r in letters] == [(bad_id, bad_seq)]
    assert "user_id" in letters[0]["error"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"outbox row {bad_id} " in m and "user_id" in m for m in warnings), warnings


async def test_a_page_of_malformed_rows_only_is_not_published(
    db: asyncpg.Connection, relays: Relays, bus: InProcessBus, collector: Reader
) -> None:
    running = relays.start(bus)
    [first] = await commit(db, "first")
    await eventually(lambda: running.relay.position == first, "the first event recorded")
    await eventually(lambda: collector.entity_ids() == ["first"], "the first event read")
    batches = len(collector.batches)

    _, bad_seq = await insert_malformed(db, "m1")
    await eventually(lambda: running.relay.position == bad_seq, "the relay past the row")
    assert len(collector.batches) == batches
    assert await recorded_position(db) == bad_seq

    await commit(db, "next")
    await eventually(lambda: collector.entity_ids() == ["first", "next"], "the next event")
    assert collector.batches[-1].prev == bad_seq


# Progress


async def test_a_new_relay_continues_from_the_recorded_position_without_rereading(
    db: asyncpg.Connection, relays: Relays, bus: InProcessBus, collector: Reader
) -> None:
    first = relays.start(bus)
    [_, seq_b] = await commit(db, "a", "b")
    await eventually(lambda: first.relay.position == seq_b, "a and b relayed")
    await first.shutdown()
    assert await recorded_position(db) == seq_b
    await commit(db, "c")

    fresh = InProcessBus(max_batches=100)
    reader = Reader(fresh)
    try:
        relays.start(fresh)
        await eventually(lambda: reader.entity_ids() == ["c"], "c on the new bus")
        assert reader.batches[0].prev == seq_b
        assert [e.entity_id for b in reader.batches for e in b.events] == ["c"]
    finally:
        await reader.stop()
        await fresh.close()


async def test_lead_creates_the_progress_row_and_loads_its_position(
    database_url: str, db: asyncpg.Connection, bus: InProcessBus
) -> None:
    await db.execute("INSERT INTO outbox_relay (name, position) VALUES ('kept', 42)")
    kept = OutboxRelay(database_url, bus, name="kept")
    new = OutboxRelay(database_url, bus, name="new")
    try:
        assert await kept.lead()
        assert kept.position == 42
        await kept.close()
        assert await new.lead()
        assert new.position == 0
        assert await recorded_position(db, "new") == 0
    finally:
        await kept.close()
        await new.close()


# Leadership


async def test_one_relay_leads_and_relay_once_needs_leadership(
    database_url: str, db: asyncpg.Connection, bus: InProcessBus, collector: Reader
) -> None:
    one = OutboxRelay(database_url, bus)
    two = OutboxRelay(database_url, bus)
    try:
        assert await one.lead()
        assert not await two.lead()
        assert (one.is_leader, two.is_leader) == (True, False)
        with pytest.raises(RuntimeError, match="is not the active relay"):
            await two.relay_once()
        assert await holder_pid(db) in await relay_backends(db)

        await commit(db, "x")
        assert await one.relay_once() == 1
        assert await one.relay_once() == 0

        await one.close()
        assert not one.is_leader
        assert await holder_pid(db) is None
        assert await two.lead()
        assert two.position == one.position
    finally:
        await one.close()
        await two.close()
    assert await holder_pid(db) is None
    await eventually(lambda: collector.entity_ids() == ["x"], "x on the bus")


async def test_the_standby_takes_over_when_the_leader_dies_and_nothing_is_lost(
    db: asyncpg.Connection,
    relays: Relays,
    bus: InProcessBus,
    collector: Reader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sync.relay")
    pair = [relays.start(bus), relays.start(bus)]
    await eventually(lambda: sum(r.relay.is_leader for r in pair) == 1, "one leader", timeout_s=15)
    await eventually(
        lambda: any("relay standby" in r.getMessage() for r in caplog.records), "a standby"
    )
    assert len(await relay_backends(db)) == 2
    assert sum(r.relay.is_leader for r in pair) == 1
    await commit(db, "a")
    await commit(db, "b")
    await eventually(lambda: collector.entity_ids() == ["a", "b"], "a and b")

    [dying] = [r for r in pair if r.relay.is_leader]
    [standby] = [r for r in pair if r is not dying]
    pid = await holder_pid(db)
    assert pid is not None
    # A crash: the session ends without an unlock, then the task is gone.
    assert await db.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
    dying.task.cancel()
    await commit(db, "c")

    await eventually(lambda: standby.relay.is_leader, "the standby taking over")
    await commit(db, "d")

    await eventually(lambda: len(collector.events()) == 4, "c and d")
    assert collector.entity_ids() == ["a", "b", "c", "d"] == await outbox_order(db)
    new_holder = await holder_pid(db)
    assert new_holder is not None
    assert new_holder != pid
    assert await relay_backends(db) == [new_holder]
    assert any("relay active" in r.getMessage() for r in caplog.records)


async def test_a_relay_whose_connection_is_killed_reconnects_relistens_and_resumes(
    db: asyncpg.Connection, relays: Relays, bus: InProcessBus, collector: Reader
) -> None:
    # An hour between polls: after the reconnect, only a renewed LISTEN can bring "after".
    running = relays.start(bus, poll_interval_s=3600)
    [first] = await commit(db, "before")
    await eventually(lambda: running.relay.position == first, "the first event")
    pid = await holder_pid(db)

    assert await db.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
    await commit(db, "during")

    async def leads_again() -> bool:
        holder = await holder_pid(db)
        return holder is not None and holder != pid and running.relay.is_leader

    await eventually(leads_again, "leadership on a new connection")
    await eventually(lambda: len(collector.events()) == 2, "the event committed meanwhile")
    await commit(db, "after")

    await eventually(lambda: len(collector.events()) == 3, "the event after the reconnect")
    assert collector.entity_ids() == ["before", "during", "after"]


# Bus failures


async def test_while_the_bus_is_down_the_relay_keeps_its_position_and_loses_nothing(
    db: asyncpg.Connection,
    relays: Relays,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sync.relay")
    with RedisProcess() as redis:
        writer = RedisBus(redis.url, redis_prefix)
        reader_bus = RedisBus(redis.url, redis_prefix)
        reader = Reader(reader_bus)
        try:
            running = relays.start(writer)
            [first] = await commit(db, "before")
            await eventually(lambda: reader.entity_ids() == ["before"], "the first event")

            redis.stop()
            [during] = await commit(db, "during")
            await eventually(
                lambda: any("relay step failed" in r.getMessage() for r in caplog.records),
                "a failed publish",
                timeout_s=30,
            )
            assert running.relay.position == first
            assert await recorded_position(db) == first
            assert running.relay.is_leader

            redis.start()
            await eventually(lambda: running.relay.position == during, "the retry", 30)
            await eventually(lambda: "during" in reader.entity_ids(), "the event after", 30)
            assert reader.entity_ids()[-1] == "during"
            assert reader.batches[-1].prev == first
        finally:
            await reader.stop()
            await reader_bus.close()
            await relays.close()
            await writer.close()


# Lag


async def test_relay_lag_counts_rows_not_yet_relayed_and_the_age_of_the_oldest(
    db: asyncpg.Connection, relays: Relays, bus: InProcessBus
) -> None:
    assert await relay_lag(db) == (0, 0.0)
    await commit(db, "a", "b")
    [last] = await commit(db, "c")
    await db.execute(
        "UPDATE outbox SET committed_at = committed_at - interval '60 seconds'"
        " WHERE seq = (SELECT min(seq) FROM outbox)"
    )

    rows, seconds = await relay_lag(db)
    assert rows == 3
    assert seconds >= 60

    running = relays.start(bus)
    await eventually(lambda: running.relay.position == last, "everything relayed")
    assert await relay_lag(db) == (0, 0.0)
    await running.shutdown()

    await commit(db, "d")
    rows, seconds = await relay_lag(db)
    assert rows == 1
    assert seconds >= 0
    rows, seconds = await relay_lag(db, "other")
    assert rows == 4
    assert seconds >= 60
