"""Access changes take effect for live connections at their position, over real HTTP
(issue 3, point 3): no reconnect is needed or forced."""

import asyncpg

from core.publish import OutboxEvent, publish_many
from tests.e2e.harness import Processes, StreamClient, bearer


async def commit(db: asyncpg.Connection, sql: str, *events: OutboxEvent) -> None:
    async with db.transaction():
        if sql:
            await db.execute(sql)
        await publish_many(db, list(events))


def message(entity_id: str, stream_id: str = "general") -> OutboxEvent:
    return OutboxEvent(
        "stream_event.created", "stream_event", "create", entity_id,
        workspace_id="w1", stream_id=stream_id,
    )  # fmt: skip


def membership(action: str, user_id: str) -> OutboxEvent:
    verb = {"create": "created", "update": "updated", "delete": "deleted"}[action]
    return OutboxEvent(
        f"membership.{verb}", "membership", action, f"w1:{user_id}",
        workspace_id="w1", user_id=user_id,
    )  # fmt: skip


async def test_joining_removal_and_activation_apply_to_live_streams(
    processes: Processes, db: asyncpg.Connection
) -> None:
    await db.execute(
        """
        INSERT INTO workspaces (id) VALUES ('w1');
        INSERT INTO streams (id, workspace_id, visibility) VALUES
            ('general', 'w1', 'public'), ('secret', 'w1', 'private');
        INSERT INTO workspace_members (workspace_id, user_id, status) VALUES
            ('w1', 'alice', 'active'), ('w1', 'frank', 'invited');
        """
    )
    gateway = processes.gateway("--with-relay")
    alice, carol, frank = [
        await StreamClient(gateway.url, bearer(user)).connect()
        for user in ("alice", "carol", "frank")
    ]
    await commit(db, "", message("before-join"))
    await commit(
        db,
        "INSERT INTO workspace_members (workspace_id, user_id) VALUES ('w1', 'carol')",
        membership("create", "carol"),
    )
    await commit(db, "", message("after-join"), message("private", "secret"))
    await commit(
        db,
        "DELETE FROM workspace_members WHERE workspace_id = 'w1' AND user_id = 'carol'",
        membership("delete", "carol"),
        message("with-removal"),
    )
    await commit(db, "", message("after-removal"))
    await commit(
        db,
        "UPDATE workspace_members SET status = 'active' WHERE user_id = 'frank'",
        membership("update", "frank"),
    )
    await commit(db, "", message("after-activation"))

    await alice.wait_for(lambda: "after-activation" in [c["entityId"] for c in alice.changes()])
    await frank.wait_for(lambda: "after-activation" in [c["entityId"] for c in frank.changes()])
    entity_ids = {
        name: [c["entityId"] for c in client.changes()]
        for name, client in (("alice", alice), ("carol", carol), ("frank", frank))
    }
    assert entity_ids["alice"] == [
        "before-join", "after-join", "with-removal", "after-removal", "after-activation",
    ]  # fmt: skip
    # "private" went to nobody: secret has no members.
    # carol: her own membership events by rule 1, the message after joining, nothing private,
    # nothing committed with or after her removal.
    assert entity_ids["carol"] == ["w1:carol", "after-join", "w1:carol"]
    # frank: invited, so nothing workspace-wide until activated; then at once.
    assert entity_ids["frank"] == ["w1:frank", "after-activation"]
    for client in (alice, carol, frank):
        assert client.kinds().count("offset") == 1  # never reconnected
        await client.close()
