"""The SQL reference of PROTOCOL.md §2 (`tests.reference_access`) checked against hand-written
answers, so that the property test comparing the gateway with it compares with something right.

World (users alice, bob, carol, dave, erin, frank; dave's token carries `system_role: "admin"`):
- `w1`: alice, bob, dave, erin active; carol invited. `w2`: bob active; dave invited.
- `w1` streams: `general` public; `secret` private (alice and carol current, bob left, frank,
  who is in no workspace, current); `dm` a DM of alice and erin; threads `t-general` (inherit
  from general), `t-secret` (inherit from secret), `tt-secret` (inherit from t-secret),
  `t-private` (private thread of general, bob current); `chain0` private with erin current and
  `chain1`..`chain11`, each inheriting from the one before; `cycle-a` and `cycle-b` inheriting
  from each other, erin a current member of `cycle-b`.
- `w2` streams: `w2-public` public; `w2-private` private with bob current.
"""

from typing import Any

import asyncpg
import pytest

from core.publish import OutboxEvent, publish
from tests.reference_access import MAX_INHERIT_DEPTH, readers_of

USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
ADMINS = ("dave",)
W1_ACTIVE = {"alice", "bob", "dave", "erin"}

CHAIN = [f"chain{i}" for i in range(MAX_INHERIT_DEPTH + 2)]


async def seed(db: asyncpg.Connection) -> None:
    await db.execute(
        """
        INSERT INTO workspaces (id) VALUES ('w1'), ('w2');
        INSERT INTO workspace_members (workspace_id, user_id, status) VALUES
            ('w1', 'alice', 'active'), ('w1', 'bob', 'active'), ('w1', 'carol', 'invited'),
            ('w1', 'dave', 'active'), ('w1', 'erin', 'active'),
            ('w2', 'bob', 'active'), ('w2', 'dave', 'invited');
        INSERT INTO streams (id, workspace_id, stream_type, visibility, parent_stream_id) VALUES
            ('general', 'w1', 'channel', 'public', NULL),
            ('secret', 'w1', 'channel', 'private', NULL),
            ('dm', 'w1', 'dm', 'private', NULL),
            ('t-general', 'w1', 'thread', 'inherit', 'general'),
            ('t-secret', 'w1', 'thread', 'inherit', 'secret'),
            ('tt-secret', 'w1', 'thread', 'inherit', 't-secret'),
            ('t-private', 'w1', 'thread', 'private', 'general'),
            ('cycle-a', 'w1', 'thread', 'inherit', NULL),
            ('cycle-b', 'w1', 'thread', 'inherit', 'cycle-a'),
            ('chain0', 'w1', 'channel', 'private', NULL),
            ('w2-public', 'w2', 'channel', 'public', NULL),
            ('w2-private', 'w2', 'channel', 'private', NULL);
        UPDATE streams SET parent_stream_id = 'cycle-b' WHERE id = 'cycle-a';
        INSERT INTO stream_members (stream_id, user_id, left_at) VALUES
            ('secret', 'alice', NULL), ('secret', 'carol', NULL), ('secret', 'bob', now()),
            ('secret', 'frank', NULL), ('dm', 'alice', NULL), ('dm', 'erin', NULL),
            ('t-private', 'bob', NULL), ('chain0', 'erin', NULL), ('cycle-b', 'erin', NULL),
            ('w2-private', 'bob', NULL);
        """
    )
    await db.executemany(
        "INSERT INTO streams (id, workspace_id, stream_type, visibility, parent_stream_id)"
        " VALUES ($1, 'w1', 'thread', 'inherit', $2)",
        list(zip(CHAIN[1:], CHAIN, strict=False)),
    )


def message(stream_id: str, workspace_id: str = "w1") -> OutboxEvent:
    return OutboxEvent(
        "stream_event.created",
        "stream_event",
        "create",
        f"m-{stream_id}",
        workspace_id=workspace_id,
        stream_id=stream_id,
    )


CASES: list[tuple[str, OutboxEvent, set[str]]] = [
    ("public-stream-to-active-members", message("general"), W1_ACTIVE),
    ("private-stream-to-current-members-and-admin", message("secret"), {"alice", "dave"}),
    ("dm-to-its-two-members-and-admin", message("dm"), {"alice", "erin", "dave"}),
    ("inherit-from-public", message("t-general"), W1_ACTIVE),
    ("inherit-from-private", message("t-secret"), {"alice", "dave"}),
    ("inherit-twice-from-private", message("tt-secret"), {"alice", "dave"}),
    ("private-thread-of-public-channel", message("t-private"), {"bob", "dave"}),
    ("inherit-chain-of-10-reaches-the-root", message(CHAIN[10]), {"erin", "dave"}),
    ("inherit-chain-of-11-stops-short", message(CHAIN[11]), {"dave"}),
    ("inherit-cycle-ends", message("cycle-a"), {"erin", "dave"}),
    ("other-workspace-public", message("w2-public", "w2"), {"bob"}),
    ("invited-admin-reads-nothing-private", message("w2-private", "w2"), {"bob"}),
    ("stream-outside-the-event-workspace", message("secret", "w2"), set()),
    ("unknown-stream", message("nowhere"), set()),
    (
        "workspace-only-to-active-members",
        OutboxEvent("workspace.updated", "workspace", "update", "w1", workspace_id="w1"),
        W1_ACTIVE,
    ),
    (
        "user-event-to-that-user-only",
        OutboxEvent(
            "notification.created",
            "notification",
            "create",
            "n1",
            workspace_id="w1",
            stream_id="general",
            user_id="carol",
        ),
        {"carol"},
    ),
    (
        "user-event-to-a-user-in-no-workspace",
        OutboxEvent("notification.created", "notification", "create", "n2", user_id="frank"),
        {"frank"},
    ),
    (
        "stream-member-event-to-the-member-only",
        OutboxEvent(
            "stream_member.deleted",
            "stream_member",
            "delete",
            "secret:bob",
            workspace_id="w1",
            stream_id="secret",
            user_id="bob",
        ),
        {"bob"},
    ),
]


@pytest.mark.parametrize(("event", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_reference_readers_follow_protocol_section_2(
    db: asyncpg.Connection, event: OutboxEvent, expected: set[str]
) -> None:
    await seed(db)
    async with db.transaction():
        outbox_id = await publish(db, event)
    assert await readers_of(db, [outbox_id], USERS, ADMINS) == {outbox_id: expected}


async def test_without_the_admin_claim_private_streams_are_members_only(
    db: asyncpg.Connection,
) -> None:
    await seed(db)
    async with db.transaction():
        secret = await publish(db, message("secret"))
        deep = await publish(db, message(CHAIN[11]))
    assert await readers_of(db, [secret, deep], USERS) == {secret: {"alice"}, deep: set()}


async def test_readers_reflect_the_state_after_the_events_transaction(
    db: asyncpg.Connection,
) -> None:
    """A change and a message in one transaction: the message is judged after the change."""
    await seed(db)
    events: dict[str, Any] = {}
    async with db.transaction():
        await db.execute("UPDATE stream_members SET left_at = NULL WHERE user_id = 'bob'")
        await db.execute("DELETE FROM workspace_members WHERE user_id = 'alice'")
        await db.execute("UPDATE workspace_members SET status = 'active' WHERE user_id = 'carol'")
        events["secret"] = await publish(db, message("secret"))
        events["general"] = await publish(db, message("general"))
    readers = await readers_of(db, events.values(), USERS)
    assert readers[events["secret"]] == {"bob", "carol"}
    assert readers[events["general"]] == {"bob", "carol", "dave", "erin"}


async def test_readers_of_nothing_and_of_unknown_ids(db: asyncpg.Connection) -> None:
    await seed(db)
    assert await readers_of(db, [], USERS) == {}
    assert await readers_of(db, [987654], USERS) == {987654: set()}
