"""The prefetch handoff as a property (PROTOCOL.md §3, core/cursors.py), in wal ingest mode.

Hypothesis draws a load: how many writers commit concurrently, how many rows each of their
transactions holds, how long they pause between commits, and when clients prefetch. Each
client reads the outbox in one REPEATABLE READ snapshot with `current_cursor`, exactly as an
app does, and streams from that cursor; some also drop their stream at a random moment and
resume with the last `id:` they got, as EventSource does. Property: for every client, the
prefetch and the stream together hold every committed event exactly once, and the stream is
in cursor order.

Wal ingest is where this is hard: the relay gives positions after commit, in the order of the
commit records, which is not always the order in which transactions become visible, so a
snapshot may see transactions that are positioned after others it cannot see.
"""

import asyncio
import itertools

import asyncpg
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from core.cursors import current_cursor
from core.publish import publish_many
from tests.e2e.harness import Processes, StreamClient, bearer
from tests.factories import PUBLISHED, stream_message

pytestmark = pytest.mark.wal_only

EXAMPLES = 25
WAIT_S = 30.0
_runs = itertools.count()


async def seed(db: asyncpg.Connection) -> None:
    await db.execute(
        """
        INSERT INTO workspaces (id, name) VALUES ('w1', 'one');
        INSERT INTO workspace_members (workspace_id, user_id, status)
            VALUES ('w1', 'bob', 'active');
        INSERT INTO streams (id, workspace_id, name, visibility)
            VALUES ('general', 'w1', 'general', 'public');
        """
    )


async def write(dsn: str, prefix: str, rows: list[int], pause_s: float) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for n, count in enumerate(rows):
            async with conn.transaction():
                await publish_many(
                    conn,
                    [
                        stream_message(f"{prefix}-{n}-{i}", stream_id="general")
                        for i in range(count)
                    ],
                )
            await asyncio.sleep(pause_s)
    finally:
        await conn.close()


async def prefetch_and_stream(
    dsn: str, url: str, run: str, resume_after: int | None, prefetched: asyncio.Event
) -> tuple[list[str], list[str], list[str]]:
    """Prefetch (then set `prefetched`), stream from the cursor (resuming once after
    `resume_after` changes, if set) until the run's `end` event; returns the prefetched ids,
    the streamed ids and the streamed cursors."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            cursor = await current_cursor(conn)
            rows = await conn.fetch(f"SELECT entity_id FROM outbox WHERE {PUBLISHED}")
    finally:
        await conn.close()
    prefetched.set()
    seen = [r["entity_id"] for r in rows if r["entity_id"].startswith(run)]
    streamed: list[str] = []
    cursors: list[str] = []
    params = {"offset": cursor}
    headers = bearer("bob")
    while True:
        client = await StreamClient(url, headers, params=params).connect()
        try:
            limit = resume_after if resume_after is not None else None
            await client.wait_for(
                lambda c=client, lim=limit: (
                    f"{run}-end" in _ids(c) or (lim is not None and len(c.changes()) >= lim)
                ),
                WAIT_S,
            )
        finally:
            await client.close()
        changes = client.changes()[:resume_after] if resume_after is not None else client.changes()
        streamed += [c["entityId"] for c in changes]
        cursors += [c["cursor"] for c in changes]
        if resume_after is None or f"{run}-end" in streamed:
            break
        # Resume as EventSource does: Last-Event-ID is the last `id:` received.
        headers = {**bearer("bob"), "Last-Event-ID": changes[-1]["cursor"]} if changes else headers
        params = {} if changes else params
        resume_after = None
    return seen, [e for e in streamed if e.startswith(run)], cursors


def _ids(client: StreamClient) -> list[str]:
    return [c["entityId"] for c in client.changes()]


@pytest.fixture
async def gateway(processes: Processes, db: asyncpg.Connection) -> str:
    await seed(db)
    return processes.gateway("--with-relay").url


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    writers=st.lists(
        st.tuples(
            st.lists(st.integers(1, 4), min_size=1, max_size=25), st.sampled_from((0, 0.001, 0.005))
        ),
        min_size=2,
        max_size=12,
    ),
    prefetch_delays=st.lists(st.floats(0, 0.15), min_size=1, max_size=4),
    resume_after=st.none() | st.integers(1, 20),
)
async def test_a_prefetch_and_the_stream_from_its_cursor_hold_every_event_once(
    gateway: str,
    database_url: str,
    writers: list[tuple[list[int], float]],
    prefetch_delays: list[float],
    resume_after: int | None,
) -> None:
    run = f"r{next(_runs)}"
    note(f"run {run}")
    loads = [
        asyncio.create_task(write(database_url, f"{run}-w{n}", rows, pause))
        for n, (rows, pause) in enumerate(writers)
    ]

    prefetched = [asyncio.Event() for _ in prefetch_delays]

    async def client(delay: float, number: int) -> tuple[list[str], list[str], list[str]]:
        await asyncio.sleep(delay)
        after = resume_after if number % 2 else None
        return await prefetch_and_stream(database_url, gateway, run, after, prefetched[number])

    clients = [asyncio.create_task(client(d, i)) for i, d in enumerate(prefetch_delays)]
    await asyncio.gather(*loads)
    for event in prefetched:  # `end` comes after every prefetch
        await event.wait()
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await publish_many(conn, [stream_message(f"{run}-end", stream_id="general")])
        committed = {
            r["entity_id"]
            for r in await conn.fetch(f"SELECT entity_id FROM outbox WHERE {PUBLISHED}")
            if r["entity_id"].startswith(run)
        }
    finally:
        await conn.close()
    for number, (seen, streamed, cursors) in enumerate(await asyncio.gather(*clients)):
        both = seen + streamed
        doubled = sorted({e for e in both if both.count(e) > 1})
        assert not doubled, f"client {number}: doubled {doubled[:10]}"
        assert set(both) == committed, (
            f"client {number}: missing {sorted(committed - set(both))[:10]}"
        )
        assert cursors == sorted(cursors), f"client {number}: cursor order"
