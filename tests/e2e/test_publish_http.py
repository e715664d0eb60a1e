"""`POST /publish` on a real gateway process (PROTOCOL.md §1: "an HTTP publish endpoint with a
service token serves services that cannot reach the database"; `gateway.publish`).

World (`tests.e2e.sequence.seed`): workspace `w1` with alice and bob active; `general` public,
`secret` private with alice only.
"""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from tests.e2e.harness import Processes, StreamClient, bearer, eventually, scrape
from tests.e2e.sequence import WAIT_S, seed
from tests.factories import PUBLISHED
from tests.services import PgServer

PUBLISH_TOKEN = "publish-secret-for-tests-5d1c9e"
"""The gateway's `USERSTREAM_PUBLISH_TOKEN` in these tests."""

WRONG_TOKEN = "not-the-publish-token-77a0"

ON = {"USERSTREAM_PUBLISH_TOKEN": PUBLISH_TOKEN}


def message(entity_id: str, stream_id: str = "general", **fields: Any) -> dict[str, Any]:
    """A valid `stream_event.created` in `stream_id` of `w1`, as JSON fields of the request."""
    return {
        "type": "stream_event.created",
        "resource_type": "stream_event",
        "action": "create",
        "entity_id": entity_id,
        "workspace_id": "w1",
        "stream_id": stream_id,
        "actor_id": "alice",
        "data": {"text": f"hello from {entity_id}"},
        **fields,
    }


def publisher(url: str, token: str | None = PUBLISH_TOKEN) -> httpx.AsyncClient:
    """An HTTP client of the gateway at `url` sending `Authorization: Bearer <token>`."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=10)


async def publish(client: httpx.AsyncClient, *events: Any) -> httpx.Response:
    return await client.post("/publish", json={"events": list(events)})


def assert_problem(response: httpx.Response, status: int, detail: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert detail in body["detail"], body
    return body


async def outbox_rows(db: asyncpg.Connection) -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM outbox WHERE {PUBLISHED}"))


async def publish_metrics(url: str) -> dict[str, float]:
    """The publish counters of the gateway at `url` from its `/metrics`: each
    `userstream_publish_requests_total` sample keyed by its status, and
    `userstream_published_events_total` keyed "events"."""
    counts: dict[str, float] = {}
    for (name, labels), value in (await scrape(f"{url}/metrics")).items():
        if name == "userstream_publish_requests_total":
            counts[dict(labels)["status"]] = value
        elif name == "userstream_published_events_total":
            counts["events"] = value
    return counts


async def test_a_published_event_reaches_the_streams_of_those_who_may_see_it(
    processes: Processes, db: asyncpg.Connection
) -> None:
    await seed(db)
    gateway = processes.gateway("--with-relay", env=ON)
    alice = await StreamClient(gateway.url, bearer("alice")).connect()
    bob = await StreamClient(gateway.url, bearer("bob")).connect()
    tx = {"id": "tx-m1", "sourceId": "tab-1"}
    async with publisher(gateway.url) as client:
        response = await publish(
            client,
            message("m1", tx=tx),
            message("s1", stream_id="secret"),
            {
                "type": "notification.created",
                "resource_type": "notification",
                "action": "create",
                "entity_id": "n1",
                "user_id": "bob",
            },
        )
    assert response.status_code == 202, response.text
    await alice.wait_for(lambda: len(alice.changes()) == 2)
    await bob.wait_for(lambda: len(bob.changes()) == 2)
    await alice.close()
    await bob.close()

    assert [c["entityId"] for c in alice.changes()] == ["m1", "s1"]
    assert [c["entityId"] for c in bob.changes()] == ["m1", "n1"]
    first = alice.changes()[0]
    assert first["data"] == {"text": "hello from m1"}
    assert first["tx"] == tx
    assert first["streamId"] == "general"
    assert first["actorId"] == "alice"


async def test_the_events_of_one_request_commit_in_one_transaction_in_order(
    processes: Processes, db: asyncpg.Connection
) -> None:
    await seed(db)
    gateway = processes.gateway("--with-relay", env=ON)
    alice = await StreamClient(gateway.url, bearer("alice")).connect()
    order = ["e3", "e1", "e2"]
    async with publisher(gateway.url) as client:
        response = await publish(client, *(message(e) for e in order))
    assert response.status_code == 202, response.text
    body = response.json()
    await alice.wait_for(lambda: len(alice.changes()) == 3)
    await alice.close()

    rows = await db.fetch(
        f"SELECT id, seq, xid, entity_id FROM outbox WHERE {PUBLISHED} ORDER BY seq"
    )
    assert body == {"accepted": 3, "ids": [r["id"] for r in rows]}
    assert [r["entity_id"] for r in rows] == order
    assert len({r["xid"] for r in rows}) == 1
    assert [r["seq"] for r in rows] == list(range(rows[0]["seq"], rows[0]["seq"] + 3))
    assert [c["entityId"] for c in alice.changes()] == order


async def test_the_endpoint_is_off_without_a_publish_token(
    processes: Processes, db: asyncpg.Connection
) -> None:
    gateway = processes.gateway()
    async with publisher(gateway.url) as client:
        response = await publish(client, message("m1"))
    assert_problem(response, 404, "USERSTREAM_PUBLISH_TOKEN")
    assert await outbox_rows(db) == 0


async def test_a_missing_or_wrong_token_gets_401_and_no_token_is_logged(
    processes: Processes, db: asyncpg.Connection, tmp_path: Path
) -> None:
    log_file = tmp_path / "gateway.log"
    env = {**ON, "USERSTREAM_LOG_FORMAT": "json", "USERSTREAM_LOG_LEVEL": "debug"}
    gateway = processes.gateway(env=env, log_file=log_file)
    refused = []
    for headers in (
        {},
        {"Authorization": f"Bearer {WRONG_TOKEN}"},
        {"Authorization": f"Bearer {PUBLISH_TOKEN}x"},
        {"Authorization": f"Basic {PUBLISH_TOKEN}"},
        {"Authorization": PUBLISH_TOKEN},
    ):
        async with publisher(gateway.url, token=None) as client:
            refused.append(
                await client.post("/publish", json={"events": [message("m1")]}, headers=headers)
            )
    async with publisher(gateway.url, token=None) as client:
        # The scheme is case-insensitive (RFC 9110 §11.1).
        lower = {"Authorization": f"bearer {PUBLISH_TOKEN}"}
        accepted = await client.post("/publish", json={"events": [message("m2")]}, headers=lower)
    await asyncio.sleep(0.5)  # let the gateway write its access log lines
    processes.stop_all()

    for response in refused:
        assert_problem(response, 401, "publish token")
        assert response.headers["www-authenticate"] == "Bearer"
    assert accepted.status_code == 202, accepted.text
    assert await db.fetchval(f"SELECT array_agg(entity_id) FROM outbox WHERE {PUBLISHED}") == ["m2"]
    text = log_file.read_text()
    assert "POST /publish" in text
    assert PUBLISH_TOKEN not in text and WRONG_TOKEN not in text


async def test_a_body_that_is_not_a_json_object_of_events_gets_400(
    processes: Processes, db: asyncpg.Connection
) -> None:
    gateway = processes.gateway(env=ON)
    cases = [
        (b"", "not JSON"),
        (b'{"events": [', "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b'[{"type": "x"}]', '"events"'),
        (b'{"event": []}', '"events"'),
        (orjson.dumps({"events": [message("m1")], "extra": 1}), '"events"'),
        (b'{"events": {"0": {}}}', "array"),
        (b'{"events": []}', "empty"),
    ]
    async with publisher(gateway.url) as client:
        for content, detail in cases:
            response = await client.post(
                "/publish", content=content, headers={"Content-Type": "application/json"}
            )
            assert_problem(response, 400, detail)
    assert await outbox_rows(db) == 0


async def test_invalid_events_get_422_naming_each_by_index_and_nothing_is_written(
    processes: Processes, db: asyncpg.Connection
) -> None:
    gateway = processes.gateway(env=ON)
    no_scope = message("x3")
    del no_scope["workspace_id"]
    no_type = message("x6")
    del no_type["type"]
    events = [
        message("ok0"),
        message("x1", action="created"),
        message("ok2"),
        no_scope,
        message("x4", color="red"),
        42,
        no_type,
        message("x7", tx="tab-1"),
        message("x8", data={"text": "x" * 70_000}),
        {**message("x9"), "stream_id": 7},
        {**message("x10"), "resource_type": "membership"},
    ]
    async with publisher(gateway.url) as client:
        response = await publish(client, *events)
        # Postgres text and jsonb cannot store U+0000: the SDK refuses it, by index.
        nul = await publish(
            client,
            message("ok0"),
            message("bad\u0000id"),
            message("x2", data={"text": "a\u0000b"}),
            message("x3", tx={"\u0000": "t"}),
            message("ok4", data={"text": "\\u0000 as six characters"}),
        )
    body = assert_problem(response, 422, "9 of 11 events are invalid")
    assert body["title"] == "Unprocessable Content"
    by_index = {e["index"]: e["detail"] for e in body["errors"]}
    assert sorted(by_index) == [1, 3, 4, 5, 6, 7, 8, 9, 10]
    assert "action 'created'" in by_index[1]
    assert "neither workspace_id nor user_id" in by_index[3]
    assert "color" in by_index[4]
    assert "JSON object" in by_index[5]
    assert "type" in by_index[6]
    assert "tx" in by_index[7]
    assert "65536 bytes" in by_index[8]
    assert "stream_id" in by_index[9]
    assert "user_id" in by_index[10]
    nul_errors = assert_problem(nul, 422, "3 of 5 events are invalid")["errors"]
    assert [e["index"] for e in nul_errors] == [1, 2, 3]
    assert "entity_id contains a NUL character" in nul_errors[0]["detail"]
    assert "data contains a NUL character" in nul_errors[1]["detail"]
    assert "tx contains a NUL character" in nul_errors[2]["detail"]
    assert await outbox_rows(db) == 0


async def test_data_postgres_refuses_after_validation_gets_422_without_indexes(
    processes: Processes, db: asyncpg.Connection
) -> None:
    """jsonb keeps numbers as `numeric` and prints them in full: 250 times `1e300` is about
    1.5 KB of JSON but 75 KB as Postgres prints it, past the 64 KiB CHECK on `data`, which the
    SDK measures on JSON text. Postgres refuses the batch (SQLSTATE 23514)."""
    gateway = processes.gateway(env=ON)
    async with publisher(gateway.url) as client:
        response = await publish(client, message("ok"), message("big", data=[1e300] * 250))
    body = assert_problem(response, 422, "Postgres refused the events; nothing was published")
    assert "outbox_data_max_64kib" in body["detail"]
    assert body["errors"] == []
    assert await outbox_rows(db) == 0


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _status_after_partial_body(url: str, declared: int, sent: bytes) -> bytes:
    """The status line answered to a POST that declares `declared` bytes and sends only
    `sent`: a server that waited for the whole body would never answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /publish HTTP/1.1\r\nHost: gateway\r\n"
            + f"Authorization: Bearer {PUBLISH_TOKEN}\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n".encode()
            + sent
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    return head.split(b"\r\n", 1)[0]


async def test_oversize_bodies_and_batches_get_413(
    processes: Processes, db: asyncpg.Connection
) -> None:
    env = {**ON, "USERSTREAM_PUBLISH_MAX_BYTES": "4096", "USERSTREAM_PUBLISH_MAX_EVENTS": "3"}
    gateway = processes.gateway(env=env)
    # A new client for each request: a gateway may close a connection whose body it refused.
    async with publisher(gateway.url) as client:
        too_many = await publish(client, *(message(f"m{n}") for n in range(4)))
    async with publisher(gateway.url) as client:
        declared = await publish(client, message("big", data={"text": "x" * 5000}))
    async with publisher(gateway.url) as client:
        chunked = await client.post(
            "/publish", content=_chunks(b'{"events": [', b" " * 3000, b" " * 3000, b"]}")
        )
    async with publisher(gateway.url) as client:
        within = await publish(client, *(message(f"m{n}") for n in range(3)))
    early = await _status_after_partial_body(gateway.url, 100_000_000, b'{"events": [')

    assert_problem(too_many, 413, "4 events; the limit is 3")
    assert_problem(declared, 413, "the limit is 4096 bytes")
    assert_problem(chunked, 413, "4096 bytes")
    assert early.startswith(b"HTTP/1.1 413"), early
    assert within.status_code == 202, within.text
    assert await outbox_rows(db) == 3
    # Each answer is counted before it is sent, so all five are in by now.
    assert await publish_metrics(gateway.url) == {"413": 4, "202": 1, "events": 3}


async def test_postgres_outage_gets_503_with_retry_after(
    processes: Processes, db: asyncpg.Connection, pg_server: PgServer
) -> None:
    """An outage of this test's database: new connections refused and every existing one
    terminated (the shared server itself is never stopped)."""
    await seed(db)
    gateway = processes.gateway(env=ON)
    database = await db.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(pg_server.dsn("postgres"))
    try:
        async with publisher(gateway.url) as client:
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                database,
            )
            down = await publish(client, message("m1"))
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')

            async def accepted() -> bool:
                return (await publish(client, message("m2"))).status_code == 202

            await eventually(
                accepted, "a publish after Postgres accepts connections again", timeout_s=WAIT_S
            )
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert_problem(down, 503, "Postgres is unavailable")
    assert int(down.headers["retry-after"]) > 0
    check = await asyncpg.connect(pg_server.dsn(database))
    try:
        assert await check.fetchval(
            f"SELECT array_agg(entity_id) FROM outbox WHERE {PUBLISHED}"
        ) == ["m2"]
    finally:
        await check.close()
