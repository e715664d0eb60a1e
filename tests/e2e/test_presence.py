"""Presence end to end (PROTOCOL.md §5): two real gateways on one Redis and one Postgres, real
SSE connections read byte for byte (`tests.e2e.test_ephemeral.RawStream`).

Intervals are small to keep the tests fast: ticks every 0.2 s, a grace of 1 s, heartbeats that
live 1.5 s. Time limits below are loose bounds of the protocol's promises (within about one
interval, after the grace, within grace plus TTL), with slack for a loaded machine.

World: workspace `w1` with alice, bob, erin and frank active, carol invited; dave is in no
workspace.
"""

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from core.publish import OutboxEvent, publish_many
from tests.e2e.harness import Gateway, Processes, scrape, token
from tests.e2e.sequence import seed
from tests.e2e.test_ephemeral import RawStream, assert_problem, subscribed

INTERVAL_S = 0.2
GRACE_S = 1.0
TTL_S = 1.5
ENV = {
    "USERSTREAM_PRESENCE": "true",  # off by default in e2e tests (tests/e2e/conftest.py)
    "USERSTREAM_PRESENCE_INTERVAL_S": str(INTERVAL_S),
    "USERSTREAM_PRESENCE_GRACE_S": str(GRACE_S),
    "USERSTREAM_PRESENCE_TTL_S": str(TTL_S),
}
REMOVE_ERIN = OutboxEvent(
    "membership.deleted", "membership", "delete", "w1:erin", workspace_id="w1", user_id="erin"
)

SLACK_S = 2.0
"""Allowance for process scheduling on a shared machine, on top of each promised bound."""


async def seed_world(db: asyncpg.Connection) -> None:
    await seed(db)
    await db.execute(
        """
        INSERT INTO users (id, name) VALUES
            ('carol', 'Carol'), ('dave', 'Dave'), ('erin', 'Erin'), ('frank', 'Frank');
        INSERT INTO workspace_members (workspace_id, user_id, status) VALUES
            ('w1', 'carol', 'invited'), ('w1', 'erin', 'active'), ('w1', 'frank', 'active');
        """
    )


@pytest.fixture
async def gateways(
    processes: Processes, db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two gateways (the first runs the relay) on the seeded world, both subscribed to the
    presence channel."""
    await seed_world(db)
    first = processes.gateway("--with-relay", env=ENV)
    second = processes.gateway(env=ENV)
    await subscribed(redis_url, f"{redis_prefix}presence", 2)
    yield first, second


def presence(stream: RawStream) -> list[dict[str, Any]]:
    """The data of every `presence` frame the stream received, in order."""
    return [f["data"] for f in stream.frames() if f.get("event") == "presence"]


def went(stream: RawStream, kind: str, user: str) -> Callable[[], bool]:
    """A condition: some presence frame of `stream` lists `user` under `kind`."""
    return lambda: any(user in frame[kind] for frame in presence(stream))


async def get_presence(url: str, user: str | None, **options: Any) -> httpx.Response:
    """`GET /me/presence` as `user` (Bearer), or with `options` (params, headers...)."""
    headers = {"Authorization": f"Bearer {token(user)}"} if user is not None else {}
    headers.update(options.pop("headers", {}))
    params = options.pop("params", {"workspaceId": "w1"})
    async with httpx.AsyncClient(base_url=url, timeout=10, **options) as client:
        return await client.get("/me/presence", params=params, headers=headers)


async def online(url: str, user: str = "alice") -> list[str]:
    response = await get_presence(url, user)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["workspaceId"] == "w1"
    return list(body["online"])


async def test_a_user_online_on_one_gateway_shows_on_the_other_within_about_an_interval(
    gateways: tuple[Gateway, Gateway],
) -> None:
    one, two = gateways
    alice = await RawStream(one.url, "alice").connect()
    bob: RawStream | None = None
    try:
        await alice.wait_for(went(alice, "online", "alice"))  # herself, from her own gateway
        started = time.monotonic()
        bob = await RawStream(two.url, "bob").connect()
        await alice.wait_for(went(alice, "online", "bob"))
        shown_after_s = time.monotonic() - started
        await bob.wait_for(went(bob, "online", "bob"))
        assert await online(one.url) == ["alice", "bob"]
        assert await online(two.url, "bob") == ["alice", "bob"]
        samples = await scrape(f"{one.url}/metrics")
    finally:
        await alice.close()
        if bob is not None:
            await bob.close()

    assert shown_after_s < INTERVAL_S + SLACK_S
    assert presence(alice) == [
        {"workspaceId": "w1", "online": ["alice"], "offline": []},
        {"workspaceId": "w1", "online": ["bob"], "offline": []},
    ]
    assert all("id" not in f for f in alice.frames() if f.get("event") == "presence")
    # A stream's frames carry changes from when it went live on (the set before it comes
    # from GET /me/presence): bob's first frame has his own arrival.
    assert "bob" in presence(bob)[0]["online"]

    def sample(name: str) -> float:
        return samples[(name, ())]

    assert sample("userstream_presence_frames_total") >= 2
    assert sample("userstream_presence_announcements_published_total") >= 1
    assert sample("userstream_presence_announcements_received_total") >= 1
    assert sample("userstream_presence_online_users") == 1  # alice, on this gateway
    assert sample("userstream_presence_online_pairs") == 2  # (w1, alice), (w1, bob)


async def test_a_reconnect_within_the_grace_sends_no_offline(
    gateways: tuple[Gateway, Gateway],
) -> None:
    one, two = gateways
    alice = await RawStream(one.url, "alice").connect()
    # alice's own arrival first, so that bob's is not batched into the same frame
    await alice.wait_for(went(alice, "online", "alice"))
    bob = await RawStream(two.url, "bob").connect()
    try:
        await alice.wait_for(went(alice, "online", "bob"))
        await bob.close()
        bob = await RawStream(one.url, "bob").connect()  # back, on the other gateway
        await asyncio.sleep(2 * GRACE_S + 4 * INTERVAL_S)  # the old stream's grace is over
        assert await online(two.url) == ["alice", "bob"]
    finally:
        await alice.close()
        await bob.close()

    assert not went(alice, "offline", "bob")()
    assert [f for f in presence(alice) if "bob" in f["online"]] == [
        {"workspaceId": "w1", "online": ["bob"], "offline": []}
    ]


async def test_a_real_disconnect_sends_offline_after_the_grace(
    gateways: tuple[Gateway, Gateway],
) -> None:
    one, two = gateways
    alice = await RawStream(one.url, "alice").connect()
    bob = await RawStream(two.url, "bob").connect()
    try:
        await alice.wait_for(went(alice, "online", "bob"))
        await bob.close()
        closed = time.monotonic()
        await alice.wait_for(went(alice, "offline", "bob"))
        offline_after_s = time.monotonic() - closed
        assert await online(one.url) == ["alice"]
    finally:
        await alice.close()

    assert GRACE_S <= offline_after_s < GRACE_S + 2 * INTERVAL_S + SLACK_S
    assert presence(alice)[-1] == {"workspaceId": "w1", "online": [], "offline": ["bob"]}


async def test_the_users_of_a_killed_gateway_go_offline_within_grace_and_ttl(
    gateways: tuple[Gateway, Gateway],
) -> None:
    one, two = gateways
    alice = await RawStream(one.url, "alice").connect()
    erin = await RawStream(two.url, "erin").connect()
    try:
        await alice.wait_for(went(alice, "online", "erin"))
        os.kill(two.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        await alice.wait_for(went(alice, "offline", "erin"))
        offline_after_s = time.monotonic() - killed
        assert await online(one.url) == ["alice"]
    finally:
        await alice.close()
        await erin.close()

    assert offline_after_s < GRACE_S + TTL_S + SLACK_S


async def test_get_me_presence_answers_active_members_only(
    gateways: tuple[Gateway, Gateway],
) -> None:
    one, two = gateways
    bob = await RawStream(two.url, "bob").connect()
    try:
        deadline = time.monotonic() + 10
        while await online(one.url, "frank") != ["bob"]:  # frank has no stream anywhere
            assert time.monotonic() < deadline, "bob never showed online"
            await asyncio.sleep(INTERVAL_S)
        response = await get_presence(one.url, "frank")
        assert response.headers["cache-control"] == "no-store"
        assert response.json() == {"workspaceId": "w1", "online": ["bob"]}

        assert_problem(await get_presence(one.url, "dave"), 403, "not an active member")
        assert_problem(await get_presence(two.url, "carol"), 403, "workspace 'w1'")  # invited
        other = await get_presence(one.url, "bob", params={"workspaceId": "w2"})
        assert_problem(other, 403, "w2")
        assert_problem(await get_presence(one.url, "bob", params={}), 400, "workspaceId")
        empty = await get_presence(one.url, "bob", params={"workspaceId": ""})
        assert_problem(empty, 400, "workspaceId")
        assert_problem(await get_presence(one.url, None), 401, "no credentials")
        bad = {"Authorization": "Bearer not-a-jwt"}
        assert_problem(await get_presence(one.url, None, headers=bad), 401, "invalid token")
        cookie = await get_presence(one.url, None, cookies={"userstream_token": token("erin")})
        assert cookie.status_code == 200, cookie.text
        query = {"workspaceId": "w1", "access_token": token("erin")}
        assert (await get_presence(two.url, None, params=query)).status_code == 200
    finally:
        await bob.close()


async def test_a_removed_member_stops_receiving_presence_of_the_workspace_at_once(
    gateways: tuple[Gateway, Gateway], db: asyncpg.Connection
) -> None:
    one, two = gateways
    erin = await RawStream(one.url, "erin").connect()
    alice = await RawStream(one.url, "alice").connect()
    frank: RawStream | None = None
    try:
        await erin.wait_for(went(erin, "online", "alice"))  # erin receives presence
        async with db.transaction():
            await db.execute(
                "DELETE FROM workspace_members WHERE workspace_id = 'w1' AND user_id = 'erin'"
            )
            await publish_many(db, [REMOVE_ERIN])
        await erin.wait_for(lambda: any(f.get("event") == "change" for f in erin.frames()))
        removed_at = len(erin.frames())
        frank = await RawStream(two.url, "frank").connect()
        await alice.wait_for(went(alice, "online", "frank"))
        await alice.wait_for(went(alice, "offline", "erin"))  # no stream of hers counts there
        assert_problem(await get_presence(one.url, "erin"), 403, "not an active member")
    finally:
        await alice.close()
        await erin.close()
        if frank is not None:
            await frank.close()

    later = erin.frames()[removed_at:]
    assert [f.get("event") for f in later if "event" in f] == []
    assert not went(erin, "online", "frank")()


async def test_presence_off_sends_no_frames_and_writes_no_heartbeat(
    processes: Processes, db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> None:
    await seed_world(db)
    gateway = processes.gateway("--with-relay", env={**ENV, "USERSTREAM_PRESENCE": "false"})
    alice = await RawStream(gateway.url, "alice").connect()
    bob = await RawStream(gateway.url, "bob").connect()
    try:
        await asyncio.sleep(4 * INTERVAL_S)
        response = await get_presence(gateway.url, "alice")
        assert_problem(response, 404, "presence is off")
    finally:
        await alice.close()
        await bob.close()
    assert presence(alice) == [] and presence(bob) == []
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert [k async for k in client.scan_iter(match=f"{redis_prefix}presence:*")] == []
    finally:
        await client.aclose()
