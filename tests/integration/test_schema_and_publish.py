"""The outbox schema and the publisher SDK against a real Postgres (PROTOCOL.md §1, §4).

Each test has a migrated database of its own (`db`, `database_url`); a test that needs a second
session opens it with `connect` and closes it on exit.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from core.cursors import current_cursor, format_cursor, parse_cursor
from core.events import Event
from core.publish import InvalidEvent, OutboxEvent, publish, publish_many
from core.schema.migrations import migrate, migrations
from tests.conftest import short_id
from tests.factories import access_change, stream_message
from tests.services import PgServer

pytestmark = pytest.mark.trigger_only  # rows get positions at commit, from the trigger


@contextlib.asynccontextmanager
async def connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A second session on the test's database, closed on exit."""
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def outbox_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every outbox row, in insert (`id`) order."""
    return list(await conn.fetch("SELECT * FROM outbox ORDER BY id"))


async def cursor_of(conn: asyncpg.Connection, entity_id: str) -> str:
    """The cursor of the committed event announcing `entity_id`."""
    return format_cursor(
        await conn.fetchval("SELECT seq FROM outbox WHERE entity_id = $1", entity_id)
    )


# Migrations


async def test_migrate_on_a_migrated_database_applies_nothing(db: asyncpg.Connection) -> None:
    assert await migrate(db) == []
    assert await migrate(db) == []

    recorded = await db.fetch("SELECT version, name FROM userstream_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in recorded] == [
        (m.version, m.name) for m in migrations()
    ]


async def test_each_migration_can_be_applied_again_without_error(db: asyncpg.Connection) -> None:
    await publish(db, stream_message())

    for migration in migrations():
        await db.execute(migration.sql)

    [row] = await outbox_rows(db)
    assert row["seq"] is not None


@pytest.fixture
async def empty_database_url(pg_server: PgServer) -> AsyncIterator[str]:
    """DSN of a new database with nothing in it (dropped afterwards)."""
    name = f"ustempty_{short_id()}"
    dsn = await pg_server.create_database(name)
    try:
        yield dsn
    finally:
        await pg_server.drop_database(name)


async def test_migrate_applies_every_migration_once_on_an_empty_database(
    empty_database_url: str,
) -> None:
    names = [m.name for m in migrations()]
    assert names == [
        "001_stream_model.sql",
        "002_outbox.sql",
        "003_retention.sql",
        "004_ingest.sql",
        "005_topic_history.sql",
    ]

    async with connect(empty_database_url) as conn:
        assert await migrate(conn) == names
        assert await migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0


async def test_concurrent_migrators_apply_each_migration_once(empty_database_url: str) -> None:
    async with connect(empty_database_url) as first, connect(empty_database_url) as second:
        results = await asyncio.gather(migrate(first), migrate(second))

    assert sorted(results) == [[], [m.name for m in migrations()]]


# Publishing: positions and transactions


async def test_publish_returns_the_outbox_id_and_seq_is_drawn_at_commit(
    db: asyncpg.Connection,
) -> None:
    async with db.transaction():
        outbox_id = await publish(db, stream_message())
        [row] = await outbox_rows(db)
        assert row["id"] == outbox_id
        assert row["seq"] is None
        assert row["committed_at"] is None

    [row] = await outbox_rows(db)
    assert row["seq"] is not None and row["seq"] > 0
    assert row["committed_at"] >= row["created_at"]


async def test_publish_writes_the_columns_given(db: asyncpg.Connection) -> None:
    await publish(
        db,
        stream_message(data={"text": "hi", "n": [1, 2.5, None]}, tx={"id": "t", "sourceId": "x"}),
    )

    [row] = await outbox_rows(db)
    event = Event.from_row(dict(row))
    assert (event.type, event.resource_type, event.action, event.entity_id) == (
        "stream_event.created",
        "stream_event",
        "create",
        "ev1",
    )
    assert (event.workspace_id, event.stream_id, event.user_id, event.actor_id) == (
        "w1",
        "s1",
        None,
        "u1",
    )
    assert orjson.loads(event.data or "") == {"text": "hi", "n": [1, 2.5, None]}
    assert orjson.loads(event.tx or "") == {"id": "t", "sourceId": "x"}
    assert event.access is None


async def test_publish_without_data_or_tx_stores_sql_null(db: asyncpg.Connection) -> None:
    await publish(db, stream_message(data=None, tx=None))

    [row] = await outbox_rows(db)
    assert (row["data"], row["tx"]) == (None, None)


async def test_publish_many_writes_nothing_for_an_empty_list(db: asyncpg.Connection) -> None:
    assert await publish_many(db, []) == []
    assert await outbox_rows(db) == []


async def test_one_transaction_gets_consecutive_seqs_in_insert_order_and_one_xid(
    db: asyncpg.Connection,
) -> None:
    async with db.transaction():
        ids = [await publish(db, stream_message("e1"))]
        ids += await publish_many(
            db, [stream_message("e2"), stream_message("e3"), stream_message("e4")]
        )
        ids.append(await publish(db, stream_message("e5")))
        xid = await db.fetchval("SELECT pg_current_xact_id()::text::bigint")

    rows = await outbox_rows(db)
    assert [r["id"] for r in rows] == ids
    assert [r["entity_id"] for r in rows] == ["e1", "e2", "e3", "e4", "e5"]
    first = rows[0]["seq"]
    assert [r["seq"] for r in rows] == list(range(first, first + 5))
    assert {r["xid"] for r in rows} == {xid}


async def test_each_transaction_has_its_own_xid_and_later_seqs(db: asyncpg.Connection) -> None:
    async with db.transaction():
        await publish_many(db, [stream_message("a1"), stream_message("a2")])
    async with db.transaction():
        await publish_many(db, [stream_message("b1"), stream_message("b2")])

    a1, a2, b1, b2 = await outbox_rows(db)
    assert a1["xid"] == a2["xid"] != b1["xid"] == b2["xid"]
    assert a1["seq"] < a2["seq"] < b1["seq"] < b2["seq"]


async def test_seq_follows_commit_order_not_insert_order(
    db: asyncpg.Connection, database_url: str
) -> None:
    async with connect(database_url) as other:
        early = db.transaction()
        await early.start()
        early_id = await publish(db, stream_message("inserted-first"))

        async with other.transaction():
            late_id = await publish(other, stream_message("inserted-second"))

        await early.commit()

    assert early_id < late_id
    assert await cursor_of(db, "inserted-second") < await cursor_of(db, "inserted-first")


async def test_rolled_back_transaction_leaves_no_row(db: asyncpg.Connection) -> None:
    with pytest.raises(RuntimeError, match="change failed"):
        async with db.transaction():
            await publish(db, stream_message("rolled-back"))
            await publish_many(db, [stream_message("also-rolled-back")])
            raise RuntimeError("change failed")

    assert await outbox_rows(db) == []

    await publish(db, stream_message("kept"))
    assert [r["entity_id"] for r in await outbox_rows(db)] == ["kept"]


# Publishing: validation before writing

BAD_EVENTS = [
    ("empty type", stream_message(type=""), "type must be a non-empty string, got ''"),
    (
        "no resource type",
        stream_message(resource_type=None),
        "resource_type must be a non-empty string, got None",
    ),
    ("numeric entity id", stream_message(entity_id=42), "entity_id must be a non-empty string"),
    (
        "unknown action",
        stream_message(action="upsert"),
        r"action 'upsert' is not one of \['create', 'delete', 'update'\]",
    ),
    (
        "empty workspace id",
        stream_message(workspace_id=""),
        "workspace_id must be a non-empty string or None, got ''",
    ),
    ("numeric user id", stream_message(user_id=7), "user_id must be a non-empty string or None"),
    ("numeric actor id", stream_message(actor_id=7), "actor_id must be a non-empty string or None"),
    (
        "no scope",
        stream_message(workspace_id=None, stream_id=None),
        "event 'stream_event.created' for 'ev1': neither workspace_id nor user_id is set",
    ),
    (
        "membership without user",
        stream_message(resource_type="membership", type="membership.created", stream_id=None),
        "a 'membership' event must set user_id",
    ),
    (
        "stream member without stream",
        stream_message(
            resource_type="stream_member",
            type="stream_member.created",
            stream_id=None,
            user_id="u2",
        ),
        "a 'stream_member' event must set stream_id",
    ),
    (
        "stream without stream id",
        stream_message(resource_type="stream", type="stream.created", stream_id=None),
        "a 'stream' event must set stream_id",
    ),
    (
        "workspace without workspace id",
        stream_message(
            resource_type="workspace",
            type="workspace.updated",
            workspace_id=None,
            stream_id=None,
            user_id="u1",
        ),
        "a 'workspace' event must set workspace_id",
    ),
    (
        "unserializable data",
        stream_message(data={"blob": object()}),
        "data is not JSON-serializable",
    ),
    ("unserializable tx", stream_message(tx={"id": {1, 2}}), "tx is not JSON-serializable"),
    (
        "oversize data",
        stream_message(data={"text": "x" * 70_000}),
        "data is 70012 bytes serialized; the limit is 65536 bytes",
    ),
]


@pytest.mark.parametrize(
    ("event", "message"), [case[1:] for case in BAD_EVENTS], ids=[case[0] for case in BAD_EVENTS]
)
async def test_invalid_event_is_refused_before_writing_and_the_transaction_goes_on(
    db: asyncpg.Connection, event: OutboxEvent, message: str
) -> None:
    async with db.transaction():
        with pytest.raises(InvalidEvent, match=message):
            await publish(db, event)
        with pytest.raises(InvalidEvent, match=message):
            await publish_many(db, [stream_message("good"), event])
        assert await outbox_rows(db) == []

        await publish(db, stream_message("after"))

    assert [r["entity_id"] for r in await outbox_rows(db)] == ["after"]


def test_invalid_event_is_a_value_error() -> None:
    assert issubclass(InvalidEvent, ValueError)


# The database's own checks, for publishers that write raw SQL (PROTOCOL.md §1)

_RAW_INSERT = (
    "INSERT INTO outbox (type, resource_type, action, entity_id, workspace_id, user_id, data)"
    " VALUES ('x.created', 'x', 'create', 'e1', $1, $2, $3::jsonb)"
)


async def test_database_refuses_a_row_with_neither_workspace_nor_user(
    db: asyncpg.Connection,
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="outbox_needs_workspace_or_user") as info:
        await db.execute(_RAW_INSERT, None, None, None)

    assert info.value.constraint_name == "outbox_needs_workspace_or_user"
    await db.execute(_RAW_INSERT, None, "u1", None)
    await db.execute(_RAW_INSERT, "w1", None, None)
    assert len(await outbox_rows(db)) == 2


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        (
            "INSERT INTO outbox (type, resource_type, action, entity_id, workspace_id)"
            " VALUES ('x.created', 'x', 'upsert', 'e1', 'w1')",
            "outbox_action",
        ),
        (
            "INSERT INTO outbox (type, resource_type, action, entity_id, workspace_id)"
            " VALUES ('', 'x', 'create', 'e1', 'w1')",
            "outbox_type_not_empty",
        ),
        (
            "INSERT INTO outbox (type, resource_type, action, entity_id, workspace_id)"
            " VALUES ('x.created', 'x', 'create', '', 'w1')",
            "outbox_entity_id_not_empty",
        ),
    ],
)
async def test_database_refuses_rows_the_sdk_would_refuse(
    db: asyncpg.Connection, statement: str, constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match=constraint):
        await db.execute(statement)


async def test_database_refuses_data_over_64_kib(db: asyncpg.Connection) -> None:
    too_big = orjson.dumps("x" * 65_535).decode()  # 65,537 bytes with its quotes

    with pytest.raises(asyncpg.CheckViolationError, match="outbox_data_max_64kib") as info:
        await db.execute(_RAW_INSERT, "w1", None, too_big)

    assert info.value.constraint_name == "outbox_data_max_64kib"


async def test_data_of_exactly_64_kib_is_accepted_by_sdk_and_database(
    db: asyncpg.Connection,
) -> None:
    await publish(db, stream_message(data="x" * 65_534))  # 65,536 bytes with its quotes

    assert await db.fetchval("SELECT octet_length(data::text) FROM outbox") == 65_536
    with pytest.raises(InvalidEvent, match="data is 65537 bytes serialized; the limit is 65536"):
        await publish(db, stream_message(data="x" * 65_535))


async def test_sdk_measures_data_as_postgres_prints_it(db: asyncpg.Connection) -> None:
    # Compact JSON is 60,001 bytes; Postgres prints "[0, 0, ..., 0]": 90,000 bytes.
    data = [0] * 30_000
    assert len(orjson.dumps(data)) <= 65_536

    with pytest.raises(InvalidEvent, match="data is 90000 bytes serialized; the limit is 65536"):
        await publish(db, stream_message(data=data))
    with pytest.raises(asyncpg.CheckViolationError, match="outbox_data_max_64kib"):
        await db.execute(_RAW_INSERT, "w1", None, orjson.dumps(data).decode())


async def test_sdk_measures_large_data_with_values_only_orjson_serializes(
    db: asyncpg.Connection,
) -> None:
    """Regression: the Postgres-form size of data over 32 KiB was computed with the standard
    `json` module, which raised TypeError (not InvalidEvent) for a datetime that orjson
    serializes. The size is now measured from orjson's JSON text."""
    when = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)

    await publish(db, stream_message("fits", data={"when": when, "text": "x" * 40_000}))
    with pytest.raises(InvalidEvent, match="the limit is 65536 bytes"):
        await publish(db, stream_message("too-big", data={"when": when, "text": "x" * 70_000}))

    data = await db.fetchval("SELECT data FROM outbox WHERE entity_id = 'fits'")
    assert orjson.loads(data)["when"] == "2026-11-20T10:00:00+00:00"


# The access after-image, captured at commit (PROTOCOL.md §1, §2)


async def _seed_workspace(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO workspaces (id, name) VALUES ('w1', 'One')")
    await conn.execute("INSERT INTO users (id, name) VALUES ('u1', 'Ada'), ('u2', 'Bo')")
    await conn.execute(
        "INSERT INTO streams (id, workspace_id, visibility, name)"
        " VALUES ('s1', 'w1', 'public', 'general')"
    )


async def _access(conn: asyncpg.Connection, entity_id: str) -> Any:
    text = await conn.fetchval("SELECT access FROM outbox WHERE entity_id = $1", entity_id)
    return None if text is None else orjson.loads(text)


async def test_membership_after_image_is_the_row_as_committed(db: asyncpg.Connection) -> None:
    await _seed_workspace(db)

    async with db.transaction():
        await db.execute(
            "INSERT INTO workspace_members (workspace_id, user_id, status)"
            " VALUES ('w1', 'u2', 'invited')"
        )
        await publish(
            db, access_change("membership", "create", "m1", workspace_id="w1", user_id="u2")
        )
        # Changed again later in the same transaction: the event carries the final state.
        await db.execute("UPDATE workspace_members SET status = 'active', role = 'admin'")

    row = (await _access(db, "m1"))["row"]
    assert (row["workspace_id"], row["user_id"], row["status"], row["role"]) == (
        "w1",
        "u2",
        "active",
        "admin",
    )


async def test_stream_member_after_image_shows_joining_and_leaving(db: asyncpg.Connection) -> None:
    await _seed_workspace(db)
    scope = {"workspace_id": "w1", "stream_id": "s1", "user_id": "u2"}

    async with db.transaction():
        await db.execute("INSERT INTO stream_members (stream_id, user_id) VALUES ('s1', 'u2')")
        await publish(db, access_change("stream_member", "create", "joined", **scope))
    async with db.transaction():
        await db.execute("UPDATE stream_members SET left_at = now() WHERE user_id = 'u2'")
        await publish(db, access_change("stream_member", "update", "left", **scope))

    joined, left = (await _access(db, "joined"))["row"], (await _access(db, "left"))["row"]
    assert (joined["stream_id"], joined["user_id"], joined["left_at"]) == ("s1", "u2", None)
    assert left["left_at"] is not None


async def test_stream_after_image_carries_visibility_and_parent(db: asyncpg.Connection) -> None:
    await _seed_workspace(db)

    async with db.transaction():
        await db.execute(
            "INSERT INTO streams (id, workspace_id, stream_type, parent_stream_id, visibility)"
            " VALUES ('t1', 'w1', 'thread', 's1', 'inherit')"
        )
        await publish(
            db, access_change("stream", "create", "t1", workspace_id="w1", stream_id="t1")
        )

    row = (await _access(db, "t1"))["row"]
    assert (row["id"], row["workspace_id"], row["visibility"], row["parent_stream_id"]) == (
        "t1",
        "w1",
        "inherit",
        "s1",
    )
    assert row["status"] == "active"


async def test_workspace_after_image_is_the_workspace_row(db: asyncpg.Connection) -> None:
    await _seed_workspace(db)

    async with db.transaction():
        await db.execute("UPDATE workspaces SET name = 'Renamed' WHERE id = 'w1'")
        await publish(db, access_change("workspace", "update", "w1", workspace_id="w1"))

    row = (await _access(db, "w1"))["row"]
    assert (row["id"], row["name"]) == ("w1", "Renamed")


async def test_stream_after_image_lists_members_unless_public(db: asyncpg.Connection) -> None:
    """Members added in the transaction that announces a private stream can read the
    announcement without a `stream_member` event of their own (PROTOCOL.md §2)."""
    await _seed_workspace(db)
    async with db.transaction():
        await db.execute(
            "INSERT INTO streams (id, workspace_id, visibility) VALUES ('p1', 'w1', 'private');"
            "INSERT INTO stream_members (stream_id, user_id) VALUES ('p1', 'u2'), ('p1', 'u1');"
            "INSERT INTO stream_members (stream_id, user_id, left_at) VALUES ('p1', 'u3', now())"
        )
        await publish(
            db, access_change("stream", "create", "p1", workspace_id="w1", stream_id="p1")
        )
        await db.execute(
            "INSERT INTO streams (id, workspace_id, visibility) VALUES ('pub', 'w1', 'public')"
        )
        await publish(
            db, access_change("stream", "create", "pub", workspace_id="w1", stream_id="pub")
        )
    assert (await _access(db, "p1"))["members"] == ["u1", "u2"]
    assert (await _access(db, "pub"))["members"] is None


@pytest.mark.parametrize(
    ("resource_type", "delete_sql", "scope"),
    [
        ("membership", "DELETE FROM workspace_members", {"workspace_id": "w1", "user_id": "u2"}),
        (
            "stream_member",
            "DELETE FROM stream_members",
            {"workspace_id": "w1", "stream_id": "s1", "user_id": "u2"},
        ),
        (
            "stream",
            "DELETE FROM streams WHERE id = 's1'",
            {"workspace_id": "w1", "stream_id": "s1"},
        ),
        ("workspace", "DELETE FROM workspaces", {"workspace_id": "w1"}),
    ],
)
async def test_after_image_of_a_deleted_row_is_null(
    db: asyncpg.Connection, resource_type: str, delete_sql: str, scope: dict[str, str]
) -> None:
    await _seed_workspace(db)
    await db.execute("INSERT INTO workspace_members (workspace_id, user_id) VALUES ('w1', 'u2')")
    await db.execute("INSERT INTO stream_members (stream_id, user_id) VALUES ('s1', 'u2')")

    async with db.transaction():
        await publish(db, access_change(resource_type, "delete", "gone", **scope))
        await db.execute(delete_sql)

    assert (await _access(db, "gone"))["row"] is None


async def test_events_that_do_not_change_access_carry_no_after_image(
    db: asyncpg.Connection,
) -> None:
    await _seed_workspace(db)

    await publish(db, stream_message("plain"))
    await publish(db, access_change("notification", "create", "n1", user_id="u1"))

    assert await _access(db, "plain") is None
    assert await _access(db, "n1") is None


async def test_committed_rows_become_events(db: asyncpg.Connection) -> None:
    await _seed_workspace(db)
    await db.execute("INSERT INTO workspace_members (workspace_id, user_id) VALUES ('w1', 'u2')")
    await publish_many(
        db,
        [
            stream_message("plain"),
            access_change("membership", "update", "m1", workspace_id="w1", user_id="u2"),
        ],
    )

    plain, membership = [Event.from_row(dict(row)) for row in await outbox_rows(db)]

    assert plain.access is None
    assert membership.changes_access
    assert membership.access is not None
    assert membership.access["row"]["status"] == "active"
    assert membership.seq == plain.seq + 1
    assert membership.created_at.endswith("Z")


# current_cursor: the prefetch cursor (PROTOCOL.md §3)


async def test_current_cursor_of_an_empty_outbox_is_position_zero(db: asyncpg.Connection) -> None:
    assert await current_cursor(db) == "0000000000000000"


async def test_current_cursor_in_repeatable_read_splits_events_at_the_snapshot(
    db: asyncpg.Connection, database_url: str
) -> None:
    async with connect(database_url) as other, connect(database_url) as slow:
        await publish(other, stream_message("before-begin"))
        # In flight when the snapshot is taken, committed after it.
        in_flight = slow.transaction()
        await in_flight.start()
        await publish(slow, stream_message("in-flight"))

        async with db.transaction(isolation="repeatable_read"):
            # Committed after BEGIN but before the first statement, which takes the snapshot.
            await publish(other, stream_message("before-snapshot"))
            cursor = await current_cursor(db)
            visible = {r["entity_id"] for r in await db.fetch("SELECT entity_id FROM outbox")}

            await publish(other, stream_message("after-snapshot"))
            await in_flight.commit()

            assert await current_cursor(db) == cursor
            assert {r["entity_id"] for r in await db.fetch("SELECT entity_id FROM outbox")} == (
                visible
            )

    assert visible == {"before-begin", "before-snapshot"}
    assert await cursor_of(db, "before-begin") < cursor
    assert await cursor_of(db, "before-snapshot") == cursor
    assert await cursor_of(db, "after-snapshot") > cursor
    assert await cursor_of(db, "in-flight") > cursor
    assert parse_cursor(cursor) == await db.fetchval(
        "SELECT seq FROM outbox WHERE entity_id = 'before-snapshot'"
    )


async def test_stream_events_carry_the_row_as_it_stood_before_their_transaction(
    db: asyncpg.Connection,
) -> None:
    """A gateway loading a workspace mid-stream sets touched streams back with `before`."""
    await _seed_workspace(db)
    async with db.transaction():
        await db.execute("UPDATE streams SET visibility = 'private' WHERE id = 's1'")
        await db.execute("UPDATE streams SET name = 'renamed' WHERE id = 's1'")
        await publish(
            db, access_change("stream", "update", "s1", workspace_id="w1", stream_id="s1")
        )
    async with db.transaction():
        await db.execute("INSERT INTO streams (id, workspace_id) VALUES ('s2', 'w1')")
        await publish(
            db, access_change("stream", "create", "s2", workspace_id="w1", stream_id="s2")
        )
    async with db.transaction():  # announced without touching the row: before == after
        await publish(
            db, access_change("stream", "update", "s2", workspace_id="w1", stream_id="s2")
        )
    images = [
        orjson.loads(r["access"])
        for r in await db.fetch(
            "SELECT access FROM outbox WHERE resource_type = 'stream' ORDER BY seq"
        )
    ]
    assert images[0]["before"]["visibility"] == "public"
    assert images[0]["before"]["name"] == "general"
    assert images[0]["row"]["visibility"] == "private"
    assert images[1]["before"] is None
    assert images[2]["before"] == images[2]["row"]
