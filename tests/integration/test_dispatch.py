"""Dispatcher, access cache and catch-up handoff on real Postgres, driven step by step.

The dispatcher is fed straight from the outbox (`read_page`), so each test controls exactly
when events are dispatched relative to connects; no bus and no HTTP are involved.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from core.cursors import format_cursor
from core.publish import OutboxEvent, publish, publish_many
from core.types import Frame
from sync.access_cache import AccessCache
from sync.bus_memory import InProcessBus
from sync.catchup import StreamRequest, open_stream
from sync.dispatcher import Dispatcher
from sync.outbox import read_page
from sync.subscribers import StreamSubscriberManager, Subscriber
from tests.factories import access_change, stream_message
from tests.sse import parse

pytestmark = pytest.mark.trigger_only  # rows get positions at commit, from the trigger


class Connection:
    """One open stream: its frames are collected by a task."""

    def __init__(self, frames: AsyncIterator[Frame]) -> None:
        self.chunks: list[Frame] = []
        self._frames = frames
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for chunk in self._frames:
            self.chunks.append(chunk)

    def frames(self) -> list[dict[str, Any]]:
        return parse(self.chunks)

    def entities(self) -> list[str]:
        return [f["data"]["entityId"] for f in self.frames() if f.get("event") == "change"]

    async def until(self, condition: Any, timeout_s: float = 5) -> None:
        async with asyncio.timeout(timeout_s):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.005)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as created:
        yield created


@pytest.fixture
async def dispatcher(pool: asyncpg.Pool, db: asyncpg.Connection) -> Dispatcher:
    await db.execute(
        """
        INSERT INTO workspaces (id) VALUES ('w1'), ('w2');
        INSERT INTO workspace_members (workspace_id, user_id, status) VALUES
            ('w1', 'alice', 'active'), ('w1', 'bob', 'active'), ('w1', 'frank', 'invited');
        INSERT INTO streams (id, workspace_id, visibility) VALUES
            ('general', 'w1', 'public'), ('secret', 'w1', 'private'),
            ('w2-general', 'w2', 'public');
        INSERT INTO stream_members (stream_id, user_id) VALUES ('secret', 'alice');
        """
    )
    created = Dispatcher(InProcessBus(), pool, StreamSubscriberManager(), AccessCache())
    await created.start()
    return created


async def pump(dispatcher: Dispatcher, db: asyncpg.Connection) -> None:
    """Dispatch everything committed so far."""
    page = await read_page(db, dispatcher.position, 10_000)
    await dispatcher.process(page.events)


def connect(dispatcher: Dispatcher, user: str, after: int | None = None) -> Connection:
    subscriber = Subscriber(f"sub-{user}-{after}", user, max_buffer_bytes=1 << 20)
    return Connection(open_stream(dispatcher, StreamRequest(user, after=after), subscriber))


async def opened(conn: Connection) -> None:
    await conn.until(lambda: any(f.get("event") == "offset" for f in conn.frames()))


async def commit(db: asyncpg.Connection, *events: OutboxEvent, sql: str = "") -> None:
    async with db.transaction():
        if sql:
            await db.execute(sql)
        await publish_many(db, list(events))


async def test_live_events_follow_the_offset_frame_in_order(
    dispatcher: Dispatcher, db: asyncpg.Connection
) -> None:
    alice = connect(dispatcher, "alice")
    await opened(alice)
    await commit(
        db, stream_message("m1", stream_id="general"), stream_message("m2", stream_id="secret")
    )
    await pump(dispatcher, db)
    await alice.until(lambda: alice.entities() == ["m1", "m2"])
    kinds = [f.get("event") for f in alice.frames()]
    assert kinds == ["offset", "change", "change"]
    assert alice.frames()[0]["data"]["cursor"] == format_cursor(0)
    await alice.close()
    assert len(dispatcher.manager) == 0 and dispatcher.cache.user_count == 0


async def test_events_committed_between_snapshot_and_dispatch_are_not_lost(
    dispatcher: Dispatcher, db: asyncpg.Connection
) -> None:
    await commit(db, stream_message("before", stream_id="general"))
    await pump(dispatcher, db)  # dispatcher at 1
    await commit(db, stream_message("gap", stream_id="general"))  # committed, not dispatched yet
    alice = connect(dispatcher, "alice")  # snapshot at 2: "gap" is before `now`
    await opened(alice)
    await commit(db, stream_message("after", stream_id="general"))
    await pump(dispatcher, db)
    await alice.until(lambda: "after" in alice.entities())
    assert alice.entities() == ["after"]
    await alice.close()


async def test_connecting_behind_the_dispatcher_replays_the_window(
    dispatcher: Dispatcher, db: asyncpg.Connection
) -> None:
    for i in range(3):
        await commit(db, stream_message(f"m{i}", stream_id="general"))
    await pump(dispatcher, db)
    alice = connect(dispatcher, "alice", after=1)
    await opened(alice)
    frames = alice.frames()
    assert [f.get("event") for f in frames] == ["change", "change", "offset"]
    assert alice.entities() == ["m1", "m2"]
    assert frames[-1]["id"] == format_cursor(3)
    await alice.close()


async def test_catch_up_older_than_the_window_pages_from_postgres(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO workspaces (id) VALUES ('w1');"
        "INSERT INTO streams (id, workspace_id, visibility) VALUES ('general', 'w1', 'public');"
        "INSERT INTO workspace_members (workspace_id, user_id) VALUES ('w1', 'alice')"
    )
    small = Dispatcher(
        InProcessBus(), pool, StreamSubscriberManager(), AccessCache(), window_events=5, page_size=7
    )
    await small.start()
    await commit(db, *[stream_message(f"m{i}", stream_id="general") for i in range(40)])
    await pump(small, db)
    assert small.window.floor == 35
    alice = connect(small, "alice", after=0)
    await opened(alice)
    assert alice.entities() == [f"m{i}" for i in range(40)]
    await commit(db, stream_message("live", stream_id="general"))
    await pump(small, db)
    await alice.until(lambda: alice.entities()[-1] == "live")
    assert len(alice.entities()) == 41
    await alice.close()


async def test_private_stream_and_invited_member_rules(
    dispatcher: Dispatcher, db: asyncpg.Connection
) -> None:
    alice, bob, frank = (connect(dispatcher, u) for u in ("alice", "bob", "frank"))
    for conn in (alice, bob, frank):
        await opened(conn)
    await commit(
        db,
        stream_message("secret-1", stream_id="secret"),
        stream_message("general-1", stream_id="general"),
        OutboxEvent("notification.created", "notification", "create", "n-frank", user_id="frank"),
        stream_message("other-ws", workspace_id="w2", stream_id="w2-general"),
    )
    await pump(dispatcher, db)
    await alice.until(lambda: len(alice.entities()) == 2)
    await bob.until(lambda: len(bob.entities()) == 1)
    await frank.until(lambda: len(frank.entities()) == 1)
    assert alice.entities() == ["secret-1", "general-1"]
    assert bob.entities() == ["general-1"]
    assert frank.entities() == ["n-frank"]
    for conn in (alice, bob, frank):
        await conn.close()


async def test_membership_changes_take_effect_live_at_their_position(
    dispatcher: Dispatcher, db: asyncpg.Connection
) -> None:
    carol = connect(dispatcher, "carol")  # no membership at all yet
    bob = connect(dispatcher, "bob")
    await opened(carol)
    await opened(bob)
    joined = access_change("membership", "create", "w1:carol", workspace_id="w1", user_id="carol")
    added = access_change(
        "stream_member",
        "create",
        "secret:bob",
        workspace_id="w1",
        stream_id="secret",
        user_id="bob",
    )
    await commit(db, stream_message("before-join", stream_id="general"))
    await commit(
        db,
        joined,
        sql="INSERT INTO workspace_members (workspace_id, user_id) VALUES ('w1', 'carol')",
    )
    await commit(
        db,
        stream_message("after-join", stream_id="general"),
        stream_message("secret-before-add", stream_id="secret"),
    )
    await commit(
        db, added, stream_message("secret-after-add", stream_id="secret"),
        sql="INSERT INTO stream_members (stream_id, user_id) VALUES ('secret', 'bob')",
    )  # fmt: skip
    await pump(dispatcher, db)
    await carol.until(lambda: "after-join" in carol.entities())
    await bob.until(lambda: "secret-after-add" in bob.entities())
    assert carol.entities() == ["w1:carol", "after-join"]
    assert bob.entities() == ["before-join", "after-join", "secret:bob", "secret-after-add"]

    removed = access_change("membership", "delete", "w1:carol", workspace_id="w1", user_id="carol")
    await commit(
        db, stream_message("removed-same-tx", stream_id="general"), removed,
        sql="DELETE FROM workspace_members WHERE workspace_id = 'w1' AND user_id = 'carol'",
    )  # fmt: skip
    await commit(db, stream_message("after-removal", stream_id="general"))
    await pump(dispatcher, db)
    await bob.until(lambda: "after-removal" in bob.entities())
    # After-commit semantics: the message committed with the removal is not delivered.
    assert carol.entities() == ["w1:carol", "after-join", "w1:carol"]
    assert dispatcher.manager.channels_of(f"sub-carol-{None}") == {"user:carol"}
    for conn in (carol, bob):
        await conn.close()
    assert dispatcher.cache.workspace_count == 0


async def test_private_stream_created_with_its_member_reaches_the_creator(
    dispatcher: Dispatcher, db: asyncpg.Connection
) -> None:
    bob = connect(dispatcher, "bob")
    alice = connect(dispatcher, "alice")
    await opened(bob)
    await opened(alice)
    created = access_change("stream", "create", "plans", workspace_id="w1", stream_id="plans")
    await commit(
        db,
        created,
        sql="INSERT INTO streams (id, workspace_id, visibility) VALUES ('plans', 'w1', 'private');"
        "INSERT INTO stream_members (stream_id, user_id) VALUES ('plans', 'bob')",
    )
    await commit(db, stream_message("marker", stream_id="general"))
    await pump(dispatcher, db)
    await bob.until(lambda: "marker" in bob.entities())
    await alice.until(lambda: "marker" in alice.entities())
    # bob's membership row was committed with the stream but not announced on its own: the
    # stream's after-image lists its members, so bob (not alice) receives the announcement.
    assert bob.entities() == ["plans", "marker"]
    assert alice.entities() == ["marker"]
    await bob.close()
    await alice.close()


async def test_slow_consumer_is_cut_off_without_delaying_others(
    dispatcher: Dispatcher, db: asyncpg.Connection
) -> None:
    slow = Subscriber("slow", "bob", max_buffer_bytes=2_000)
    slow_frames = open_stream(dispatcher, StreamRequest("bob"), slow)
    assert (await slow_frames.__anext__()) == b""  # first: the (empty) retry frame
    opening = await slow_frames.__anext__()  # offset frame; then never read again
    assert b"event: offset" in opening
    alice = connect(dispatcher, "alice")
    await opened(alice)
    await commit(db, *[stream_message(f"m{i}", stream_id="general") for i in range(30)])
    await pump(dispatcher, db)
    await alice.until(lambda: len(alice.entities()) == 30)
    assert slow.closed and slow.close_reason == "slow_consumer"
    assert dispatcher.manager.get("slow") is None
    rest = [chunk async for chunk in slow_frames]
    assert parse(rest)[-1] == {"event": "close", "data": {"reason": "slow_consumer"}}
    await alice.close()
    await publish(db, stream_message("unused", stream_id="general"))  # the connection still works


async def test_workspace_loaded_mid_stream_is_judged_as_it_stood_at_the_join(
    dispatcher: Dispatcher, db: asyncpg.Connection
) -> None:
    """Issue 3: a user joins a workspace no connected user is active in; its streams are loaded
    while the database is already ahead. A stream made private after the join must still
    deliver the message committed between the join and that change."""
    carol = connect(dispatcher, "carol")
    await opened(carol)
    joined = access_change("membership", "create", "w2:carol", workspace_id="w2", user_id="carol")
    made_private = access_change(
        "stream", "update", "w2-general", workspace_id="w2", stream_id="w2-general"
    )
    await commit(
        db,
        joined,
        sql="INSERT INTO workspace_members (workspace_id, user_id) VALUES ('w2', 'carol')",
    )
    await commit(db, stream_message("while-public", workspace_id="w2", stream_id="w2-general"))
    await commit(
        db, made_private, sql="UPDATE streams SET visibility = 'private' WHERE id = 'w2-general'"
    )
    await commit(db, stream_message("while-private", workspace_id="w2", stream_id="w2-general"))
    created = access_change("stream", "create", "w2-new", workspace_id="w2", stream_id="w2-new")
    await commit(
        db,
        created,
        sql="INSERT INTO streams (id, workspace_id, visibility) VALUES ('w2-new', 'w2', 'public')",
    )
    await commit(db, stream_message("in-new", workspace_id="w2", stream_id="w2-new"))
    await pump(dispatcher, db)  # all of it at once: the load happens with the database ahead
    await carol.until(lambda: "in-new" in carol.entities())
    assert carol.entities() == ["w2:carol", "while-public", "w2-new", "in-new"]
    await carol.close()
