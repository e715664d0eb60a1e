"""The client recovers by itself (PROTOCOL.md §3, §6): from a gateway restart, a refused
token, and answers that ask it to come back later (429, 503), backing off with jitter.

The 401 and 429 come from the real gateway (a bad or expired token; a per-user connection
limit of one, held by another client). The gateway never answers `/me/stream` with 503 (a
draining gateway sends `close` instead), so the 503s are answered by Playwright routing in
front of the gateway, which passes the later requests through (`route.continue_()`).
"""

import asyncio
import time
from urllib.parse import urlparse

import asyncpg
import orjson
import pytest
from playwright.async_api import Route

from tests.browser.harness import App, all_messages, assert_exactly_once, gaps, without
from tests.e2e.harness import StreamClient, bearer, eventually, token


async def check_every_change(app: App, db: asyncpg.Connection, load: dict[str, object]) -> None:
    """One prefetch, no reset, and every change after it applied exactly once."""
    bootstraps = load["bootstraps"]
    assert isinstance(bootstraps, list) and len(bootstraps) == 1, bootstraps
    assert load["resets"] == []
    expected = without(await all_messages(db), bootstraps[0]["ids"])
    assert expected
    assert isinstance(load["applied"], list)
    assert_exactly_once(load["applied"], expected)


async def test_a_gateway_restarted_on_the_same_address_is_resumed_alone(
    app: App, db: asyncpg.Connection
) -> None:
    app.start_relay()
    await app.serve()
    publisher = app.publisher()
    tab = await app.open()
    await tab.live()
    publisher.start()
    await tab.wait("window.load.applied.length >= 5", None, 15, "five changes")
    await app.stop_gateway()  # each stream gets `close` (shutdown), then nothing listens
    await asyncio.sleep(0.5)
    await app.serve()
    await asyncio.sleep(0.5)
    last = await publisher.stop()
    await tab.has_applied(last)

    load = await tab.load()
    await check_every_change(app, db, load)
    statuses = [status for status, _ in load["statuses"]]
    assert statuses.count("live") >= 2, statuses  # live again after the restart
    assert await app.connections() == 1


@pytest.mark.parametrize(
    "refused",
    [
        pytest.param("not-a-jwt", id="malformed"),
        pytest.param(token("alice", ttl_s=-60), id="expired"),
    ],
)
async def test_a_refused_token_is_replaced(app: App, db: asyncpg.Connection, refused: str) -> None:
    app.start_relay()
    await app.serve()
    app.tokens.queued.append(refused)
    publisher = app.publisher()
    tab = await app.open()
    await tab.live()
    assert (await tab.load())["tokens"] == 2  # the refused one, then a good one
    assert await app.metric("userstream_rejected_connects_total", status="401") >= 1
    await publisher.commit(3)
    await tab.has_applied(publisher.ids[-1])
    await check_every_change(app, db, await tab.load())


async def test_over_the_connection_limit_the_client_backs_off_then_connects(
    app: App, db: asyncpg.Connection
) -> None:
    app.start_relay()
    await app.serve(USERSTREAM_MAX_CONNECTIONS_PER_USER="1")
    holder = await StreamClient(app.origin, bearer("alice")).connect()
    publisher = app.publisher()
    try:
        tab = await app.open(backoffBaseMs=100, backoffCapMs=400)
        blocked_s = 2.0
        await asyncio.sleep(blocked_s / 2)
        await publisher.commit(3)  # committed while the client cannot connect
        await asyncio.sleep(blocked_s / 2)
    finally:
        await holder.close()
    released = time.monotonic()
    await tab.live()
    await publisher.commit(3)
    await tab.has_applied(publisher.ids[-1])

    refused = [t for t in tab.eventsource_times() if t < released]
    # Backing off: more than one try, far fewer than a client retrying at once would make.
    assert 3 <= len(refused) <= 40, len(refused)
    # Each refused by the gateway (the last one may have arrived after the release).
    assert await app.metric("userstream_rejected_connects_total", status="429") >= len(refused) - 1
    assert max(gaps(refused)) < 0.4 + 0.8, gaps(refused)  # the cap, plus the status probe
    await check_every_change(app, db, await tab.load())


def stream_path(url: str) -> bool:
    """Whether `url` is the gateway's stream."""
    return urlparse(url).path == "/me/stream"


async def test_unavailable_answers_back_off_with_jitter_and_honour_retry_after(
    app: App, db: asyncpg.Connection
) -> None:
    refusals = 14
    refused_connections = 0
    last_refused = False
    body = orjson.dumps({"type": "about:blank", "title": "Service Unavailable", "status": 503})

    async def unavailable(route: Route) -> None:
        """503 to the first `refusals` EventSource connections and to the status probes
        that follow them (the first with `Retry-After: 1`); later requests go through."""
        nonlocal refused_connections, last_refused
        if route.request.resource_type == "eventsource":
            last_refused = refused_connections < refusals
            refused_connections += last_refused
        if not last_refused:
            await route.continue_()
            return
        headers = {"Retry-After": "1"} if refused_connections == 1 else {}
        await route.fulfill(
            status=503, headers=headers, content_type="application/problem+json", body=body
        )

    app.start_relay()
    await app.serve()
    await app.context.route(stream_path, unavailable)
    publisher = app.publisher()
    tab = await app.open(backoffBaseMs=100, backoffCapMs=400)
    await tab.wait("window.load.bootstraps.length === 1", None, 10, "the prefetch")
    await publisher.commit(3)  # committed while the client backs off
    await tab.live(timeout_s=30)
    await publisher.commit(3)
    await tab.has_applied(publisher.ids[-1])

    times = tab.eventsource_times()
    assert refused_connections == refusals
    assert len(times) == refusals + 1, len(times)  # one connection once they go through
    waits = gaps(times)
    assert waits[0] >= 0.95, waits  # Retry-After: 1 is a lower bound
    assert max(waits[1:]) < 0.4 + 0.8, waits  # backoffCapMs, plus the status probe
    capped = waits[3:]  # 100 ms * 2**attempt passed the 400 ms cap: random(0, 400 ms) each
    assert max(capped) - min(capped) > 0.1, f"no jitter: {capped}"

    async def connected() -> bool:
        return await app.connections() == 1

    await eventually(connected, "the stream to open on the gateway")
    await check_every_change(app, db, await tab.load())
