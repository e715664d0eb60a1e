"""`GET /me/stream` end to end: real uvicorn, relay, Postgres, Redis and SSE clients (issue 2).

World: workspace `w1` with alice and bob active; public channel `general`; private channel
`secret` with alice only. Events are published by the SDK and by raw SQL.
"""

import asyncio

import asyncpg
import httpx
import orjson

from core.publish import OutboxEvent, publish, publish_many
from tests.e2e.harness import Processes, StreamClient, bearer
from tests.e2e.sequence import seed
from tests.factories import stream_message

CHANGE_KEYS = [
    "cursor", "type", "resourceType", "action", "entityId", "workspaceId",
    "streamId", "userId", "actorId", "createdAt", "data", "tx",
]  # fmt: skip


async def test_changes_reach_exactly_the_users_the_rules_allow(
    processes: Processes, db: asyncpg.Connection
) -> None:
    await seed(db)
    gateway = processes.gateway("--with-relay")
    alice = await StreamClient(gateway.url, bearer("alice")).connect()
    bob = await StreamClient(gateway.url, bearer("bob")).connect()

    async with db.transaction():
        await publish(
            db,
            stream_message(
                "m1",
                stream_id="secret",
                actor_id="alice",
                data={"text": "message m1"},
                tx={"id": "t1", "sourceId": "tab-1"},
            ),
        )
    async with db.transaction():
        await publish_many(
            db,
            [stream_message("m2", stream_id="general"), stream_message("m3", stream_id="general")],
        )
    async with db.transaction():
        await publish(
            db,
            OutboxEvent(
                "notification.created", "notification", "create", "n1", user_id="bob",
                data={"text": "for bob"},
            ),
        )  # fmt: skip
    await db.execute(
        "INSERT INTO outbox (type, resource_type, action, entity_id, workspace_id, stream_id, data)"
        " VALUES ('stream_event.created', 'stream_event', 'create', 'm4', 'w1', 'secret',"
        " '{\"text\": \"raw\"}'), ('workspace.updated', 'workspace', 'update', 'w1', 'w1', NULL,"
        " NULL)"
    )

    await alice.wait_for(lambda: len(alice.changes()) == 5)
    await bob.wait_for(lambda: len(bob.changes()) == 4)
    assert [c["entityId"] for c in alice.changes()] == ["m1", "m2", "m3", "m4", "w1"]
    assert [c["entityId"] for c in bob.changes()] == ["m2", "m3", "n1", "w1"]

    first = alice.changes()[0]
    assert list(first) == CHANGE_KEYS
    assert first["type"] == "stream_event.created"
    assert first["resourceType"] == "stream_event"
    assert first["data"] == {"text": "message m1"}
    assert first["tx"] == {"id": "t1", "sourceId": "tab-1"}
    assert first["userId"] is None
    assert first["createdAt"].endswith("Z")
    assert alice.changes()[4]["data"] is None and alice.changes()[4]["tx"] is None

    for client in (alice, bob):
        changes = [e for e in client.events if e.event == "change"]
        assert all(e.id == orjson.loads(e.data)["cursor"] for e in changes)
        cursors = [e.id for e in changes]
        assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
        assert all(len(c) == 16 for c in cursors)
    await alice.close()
    await bob.close()


async def test_stream_headers_and_opening_frames(
    processes: Processes, db: asyncpg.Connection
) -> None:
    await seed(db)
    gateway = processes.gateway("--with-relay")
    alice = await StreamClient(gateway.url, bearer("alice")).connect()
    assert alice.status == 200
    assert alice.response_headers is not None
    assert alice.response_headers["content-type"].startswith("text/event-stream")
    assert alice.response_headers["cache-control"] == "no-cache"
    assert alice.response_headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in alice.response_headers
    offset = next(e for e in alice.events if e.event == "offset")
    assert orjson.loads(offset.data) == {"cursor": offset.id}
    assert alice.retry is not None and 2000 <= alice.retry <= 5000
    await alice.close()


async def test_keepalive_comment_is_sent_at_the_configured_interval(
    processes: Processes, db: asyncpg.Connection
) -> None:
    await seed(db)
    gateway = processes.gateway("--with-relay", env={"USERSTREAM_KEEPALIVE_S": "0.2"})
    received = b""
    async with (
        asyncio.timeout(10),
        httpx.AsyncClient(timeout=10) as client,
        client.stream("GET", f"{gateway.url}/me/stream", headers=bearer("alice")) as response,
    ):
        async for chunk in response.aiter_bytes():
            received += chunk
            if received.count(b": ping\n\n") >= 2:
                break
    assert b"event: offset" in received


async def test_two_gateways_on_one_redis_deliver_each_event_once_to_each_client(
    processes: Processes, db: asyncpg.Connection
) -> None:
    await seed(db)
    processes.start("relay")
    first = processes.gateway()
    second = processes.gateway()
    on_first = await StreamClient(first.url, bearer("alice")).connect()
    on_second = await StreamClient(second.url, bearer("bob")).connect()
    also_first = await StreamClient(first.url, bearer("bob")).connect()

    for batch in range(5):
        async with db.transaction():
            await publish_many(
                db, [stream_message(f"e{batch}-{i}", stream_id="general") for i in range(20)]
            )
    expected = [f"e{b}-{i}" for b in range(5) for i in range(20)]
    for client in (on_first, on_second, also_first):
        await client.wait_for(lambda c=client: len(c.changes()) >= len(expected))
    # A last sentinel proves nothing else was queued behind the 100 events.
    async with db.transaction():
        await publish(db, stream_message("sentinel", stream_id="general"))
    for client in (on_first, on_second, also_first):
        await client.wait_for(lambda c=client: c.changes()[-1]["entityId"] == "sentinel")
        assert [c["entityId"] for c in client.changes()] == [*expected, "sentinel"]
        await client.close()
