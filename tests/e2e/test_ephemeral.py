"""Ephemeral signals end to end (PROTOCOL.md §5): two real gateways on one Redis and one
Postgres, real SSE connections read byte for byte.

World (`tests.e2e.sequence.seed`, plus two users): workspace `w1` with alice, bob and erin
active and carol invited; `general` public, `secret` private with alice and erin.

Where a test checks that a connection did *not* get a signal, it sends a marker afterwards
through the same gateway (`POST /publish`, ephemeral, `user_id` set: that user only); signals
from one gateway reach each replica in the order sent, so once the marker is there, the
signal before it would have been too.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from tests.e2e.harness import Gateway, Processes, control_channel, scrape, token
from tests.e2e.sequence import seed
from tests.factories import PUBLISHED
from tests.sse import parse

PUBLISH_TOKEN = "publish-secret-for-signal-tests-41a7"
ENV = {"USERSTREAM_PUBLISH_TOKEN": PUBLISH_TOKEN}
WAIT_S = 10.0


@dataclass
class RawStream:
    """One `/me/stream` connection whose bytes are kept as they came, so that a frame's lines
    (an `id:` or its absence) can be checked; `frames()` parses the complete ones."""

    url: str
    user: str
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytearray = field(default_factory=bytearray)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        headers = {"Authorization": f"Bearer {token(self.user)}", **self.headers}
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
            client.stream("GET", f"{self.url}/me/stream", headers=headers) as response,
        ):
            assert response.status_code == 200, await response.aread()
            async for chunk in response.aiter_raw():
                self.raw += chunk

    async def connect(self) -> "RawStream":
        self._task = asyncio.create_task(self._run())
        await self.wait_for(lambda: any(f.get("event") == "offset" for f in self.frames()))
        return self

    def frames(self) -> list[dict[str, Any]]:
        complete = bytes(self.raw[: self.raw.rfind(b"\n\n") + 2])
        return parse([complete]) if complete else []

    def signals(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The data of every `ephemeral` frame (of `type` `kind` if given), in order."""
        found = [f["data"] for f in self.frames() if f.get("event") == "ephemeral"]
        return [s for s in found if kind is None or s["type"] == kind]

    def ids(self) -> list[str]:
        """Every `id:` received, in order."""
        return [f["id"] for f in self.frames() if "id" in f]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if self._task is not None and self._task.done():
                self._task.result()
                raise AssertionError(f"{self.user}'s stream ended: {self.frames()}")
            assert time.monotonic() < deadline, f"{self.user} timed out with {self.frames()}"
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task


async def seed_world(db: asyncpg.Connection) -> None:
    await seed(db)
    await db.execute(
        """
        INSERT INTO users (id, name) VALUES ('carol', 'Carol'), ('erin', 'Erin');
        INSERT INTO workspace_members (workspace_id, user_id, status)
            VALUES ('w1', 'carol', 'invited'), ('w1', 'erin', 'active');
        INSERT INTO stream_members (stream_id, user_id) VALUES ('secret', 'erin');
        """
    )


async def subscribed(redis_url: str, channel: str, gateways: int) -> None:
    """Wait until `gateways` subscriptions listen on the pub/sub `channel` (PUBSUB NUMSUB):
    `{prefix}signals` or `{prefix}presence` (`control_channel` finds it on a cluster)."""
    redis_url, channel = await control_channel(redis_url, channel)
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + WAIT_S
        while (await client.pubsub_numsub(channel))[0][1] < gateways:
            assert time.monotonic() < deadline, f"fewer than {gateways} gateways subscribed"
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


@pytest.fixture
async def gateways(
    processes: Processes, db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two gateways (the first runs the relay) on the seeded world, both subscribed."""
    await seed_world(db)
    first = processes.gateway("--with-relay", env=ENV)
    second = processes.gateway(env=ENV)
    await subscribed(redis_url, f"{redis_prefix}signals", 2)
    yield first, second


async def send(url: str, user: str | None, body: Any, **options: Any) -> httpx.Response:
    """`POST /me/ephemeral` as `user` (Bearer), or with `options` (headers, cookies...)."""
    headers = {"Authorization": f"Bearer {token(user)}"} if user is not None else {}
    headers.update(options.pop("headers", {}))
    async with httpx.AsyncClient(base_url=url, timeout=10, **options) as client:
        if isinstance(body, bytes):
            return await client.post("/me/ephemeral", content=body, headers=headers)
        return await client.post("/me/ephemeral", json=body, headers=headers)


async def publish(url: str, *events: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {PUBLISH_TOKEN}"}
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as client:
        return await client.post("/publish", json={"events": list(events)})


def event(entity_id: str, **fields: Any) -> dict[str, Any]:
    """A `POST /publish` event in `general` of `w1` by alice; `fields` replace any field."""
    return {
        "type": "stream_event.created",
        "resource_type": "stream_event",
        "action": "create",
        "entity_id": entity_id,
        "workspace_id": "w1",
        "stream_id": "general",
        "actor_id": "alice",
        **fields,
    }


async def mark(url: str, *users: str) -> None:
    """Send each user a `marker` signal for them alone through the gateway at `url`."""
    markers = [
        event("marker", type="marker", user_id=user, stream_id=None, actor_id=None, ephemeral=True)
        for user in users
    ]
    response = await publish(url, *markers)
    assert response.status_code == 202, response.text


def assert_problem(response: httpx.Response, status: int, detail: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert detail in body["detail"], body


async def outbox_rows(db: asyncpg.Connection) -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM outbox WHERE {PUBLISHED}"))


async def test_a_signal_reaches_the_readers_of_its_scope_on_both_gateways_and_no_one_else(
    gateways: tuple[Gateway, Gateway], db: asyncpg.Connection
) -> None:
    one, two = gateways
    streams = {
        "alice@1": await RawStream(one.url, "alice").connect(),
        "alice@2": await RawStream(two.url, "alice").connect(),
        "bob@1": await RawStream(one.url, "bob").connect(),
        "bob@2": await RawStream(two.url, "bob").connect(),
        "carol@1": await RawStream(one.url, "carol").connect(),
        "erin@2": await RawStream(two.url, "erin").connect(),
    }
    rows = await outbox_rows(db)
    try:
        typing = {"type": "typing", "streamId": "general", "data": {"active": True}}
        assert (await send(one.url, "bob", typing)).status_code == 202
        secret = {"type": "typing", "streamId": "secret", "data": None}
        assert (await send(two.url, "alice", secret)).status_code == 202
        everyone = {"type": "status.away", "workspaceId": "w1"}
        assert (await send(one.url, "erin", everyone)).status_code == 202
        await mark(one.url, "alice", "bob", "carol", "erin")
        for stream in streams.values():
            await stream.wait_for(lambda s=stream: bool(s.signals("marker")))
    finally:
        for stream in streams.values():
            await stream.close()

    def seen(name: str) -> list[tuple[str, str | None, str]]:
        return [(s["type"], s["streamId"], s["userId"]) for s in streams[name].signals()]

    general = ("typing", "general", "bob")
    private = ("typing", "secret", "alice")
    away = ("status.away", None, "erin")
    marker = ("marker", None, None)
    assert seen("alice@1") == [general, away, marker]
    assert seen("alice@2") == [general, away, marker]
    assert seen("bob@1") == [away, marker]  # never the sender's own; never the private stream
    assert seen("bob@2") == [away, marker]
    assert seen("carol@1") == [marker]  # invited, not active: nothing of w1
    assert seen("erin@2") == [general, private, marker]
    frame = streams["alice@1"].signals()[0]
    assert frame == {
        "type": "typing",
        "workspaceId": "w1",
        "streamId": "general",
        "userId": "bob",
        "data": {"active": True},
        "at": frame["at"],
    }
    assert frame["at"].endswith("Z") and len(frame["at"]) == len("2026-12-05T10:00:00.123Z")
    assert not any(
        "id" in f for s in streams.values() for f in s.frames() if f.get("event") == "ephemeral"
    )
    assert await outbox_rows(db) == rows


async def test_signals_are_never_replayed_and_leave_the_cursor_alone(
    gateways: tuple[Gateway, Gateway], db: asyncpg.Connection
) -> None:
    one, two = gateways
    alice = await RawStream(one.url, "alice").connect()
    try:
        assert (await publish(one.url, event("m1"))).status_code == 202
        await alice.wait_for(lambda: len(alice.ids()) == 2)  # offset, m1
        typing = {"type": "typing", "streamId": "general", "data": {"n": 1}}
        assert (await send(two.url, "bob", typing)).status_code == 202
        await alice.wait_for(lambda: bool(alice.signals()))
        assert (await publish(one.url, event("m2"))).status_code == 202
        await alice.wait_for(lambda: len(alice.ids()) == 3)
    finally:
        await alice.close()
    kinds = [f.get("event") for f in alice.frames() if "event" in f]
    assert kinds == ["offset", "change", "ephemeral", "change"]
    offset, m1, m2 = alice.ids()

    # Resume from m1, before the signal, on the other gateway: m2 again, no signal.
    resumed = RawStream(two.url, "alice", headers={"Last-Event-ID": m1})
    await resumed.connect()
    try:
        await resumed.wait_for(lambda: len(resumed.ids()) == 2)
    finally:
        await resumed.close()
    assert [f.get("event") for f in resumed.frames() if "event" in f] == ["change", "offset"]
    assert resumed.ids()[0] == m2 <= resumed.ids()[1]
    assert resumed.signals() == []
    assert offset < m1 < m2


async def test_every_refusal_of_post_me_ephemeral(
    processes: Processes, db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> None:
    await seed_world(db)
    limited = {**ENV, "USERSTREAM_EPHEMERAL_RATE": "0.1", "USERSTREAM_EPHEMERAL_BURST": "3"}
    gateway = processes.gateway("--with-relay", env=limited)
    await subscribed(redis_url, f"{redis_prefix}signals", 1)
    url = gateway.url
    typing = {"type": "typing", "streamId": "general"}

    assert_problem(await send(url, None, typing), 401, "no credentials")
    bad = {"Authorization": "Bearer not-a-jwt"}
    assert_problem(await send(url, None, typing, headers=bad), 401, "invalid token")
    both = await send(url, None, typing, headers=bad, cookies={"userstream_token": token("bob")})
    assert_problem(both, 401, "invalid token")  # the first credential present decides
    cookie = await send(url, None, typing, cookies={"userstream_token": token("bob")})
    assert cookie.status_code == 202, cookie.text
    query = await send(url, None, typing, params={"access_token": token("alice")})
    assert query.status_code == 202, query.text

    # Each user's bucket holds 3: every request below after authentication takes a token.
    assert_problem(await send(url, "bob", {**typing, "streamId": "secret"}), 403, "secret")
    assert_problem(await send(url, "bob", {**typing, "streamId": "nowhere"}), 403, "nowhere")
    workspace = {"type": "typing", "workspaceId": "w1"}
    assert_problem(await send(url, "carol", workspace), 403, "workspace 'w1'")
    assert_problem(await send(url, "alice", {**workspace, "workspaceId": "w2"}), 403, "w2")

    assert_problem(await send(url, "dave", b"{not json"), 400, "not JSON")
    assert_problem(await send(url, "dave", [typing]), 400, "JSON object")
    assert_problem(await send(url, "dave", {**typing, "type": "Typing"}), 400, "[a-z0-9_.-]")
    assert_problem(await send(url, "frank", {**typing, "type": "t" * 65}), 400, "1-64")
    assert_problem(await send(url, "frank", {**typing, "workspaceId": "w1"}), 400, "exactly one")
    assert_problem(await send(url, "frank", {"type": "typing"}), 400, "exactly one")
    assert_problem(await send(url, "gus", {**typing, "extra": 1}), 400, "unknown members")

    fits = {**typing, "data": "x" * 1022}  # 1024 bytes serialized, quotes included
    assert (await send(url, "alice", fits)).status_code == 202
    assert_problem(await send(url, "gus", {**typing, "data": "x" * 1023}), 413, "1025 bytes")
    huge = b'{"type": "typing", "streamId": "general", "data": "' + b"x" * 8000 + b'"}'
    assert_problem(await send(url, "gus", huge), 413, "limit")

    for _ in range(3):
        assert (await send(url, "erin", typing)).status_code == 202
    limited_answer = await send(url, "erin", typing)
    assert_problem(limited_answer, 429, "erin")
    assert int(limited_answer.headers["retry-after"]) >= 1

    counts = {
        dict(labels).get("reason", ""): value
        for (name, labels), value in (await scrape(f"{url}/metrics")).items()
        if name in ("userstream_signals_refused_total", "userstream_signals_received_total")
    }
    assert counts == {
        "": 6,  # received: cookie, query, fits and erin's three
        "unauthorized": 3,
        "forbidden": 4,
        "bad_request": 7,
        "too_large": 2,
        "rate_limited": 1,
    }


async def test_publish_ephemeral_delivers_and_writes_nothing(
    gateways: tuple[Gateway, Gateway], db: asyncpg.Connection
) -> None:
    one, two = gateways
    alice = await RawStream(two.url, "alice").connect()
    bob = await RawStream(one.url, "bob").connect()
    rows = await outbox_rows(db)
    try:
        answer = await publish(
            one.url,
            event("t1", type="typing", data={"who": "alice"}, ephemeral=True),
            event("n1", type="nudge", user_id="alice", actor_id="bob", ephemeral=True),
        )
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"accepted": 2, "ids": [None, None]}
        mixed = await publish(two.url, event("m1"), event("t2", type="typing", ephemeral=True))
        assert mixed.status_code == 202, mixed.text
        assert mixed.json()["ids"][1] is None and isinstance(mixed.json()["ids"][0], int)
        await mark(one.url, "alice", "bob")
        await mark(two.url, "alice", "bob")
        for stream in (alice, bob):
            await stream.wait_for(lambda s=stream: len(s.signals("marker")) == 2)
    finally:
        await alice.close()
        await bob.close()

    assert await outbox_rows(db) == rows + 1  # m1 alone
    assert [(s["type"], s["userId"]) for s in bob.signals() if s["type"] != "marker"] == [
        ("typing", "alice"),
        ("typing", "alice"),
    ]
    assert bob.signals()[0]["data"] == {"who": "alice"}
    # alice sent both typing signals (actor_id): she gets only bob's nudge, meant for her.
    assert [(s["type"], s["userId"]) for s in alice.signals() if s["type"] != "marker"] == [
        ("nudge", "bob")
    ]
    invalid = await publish(one.url, event("x", action="explode", ephemeral=True))
    assert invalid.status_code == 422, invalid.text
    flag = await publish(one.url, event("x", ephemeral="yes"))
    assert flag.status_code == 422 and "ephemeral" in flag.text
