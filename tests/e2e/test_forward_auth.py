"""Forward auth (USERSTREAM_AUTH_URL) with a real gateway process and a local core API
(`tests.identity_server`): sessions admitted by cookie, bearer or query parameter; refusals are
401; a slow or failing upstream is 503 with Retry-After and opens no stream; one upstream call
serves many connects (cache) and many concurrent connects (coalescing); a revoked session ends
its open streams with `event: close` `unauthorized` within the revalidation interval; and no
credential, cookie or upstream answer body reaches a log line."""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.e2e.harness import Gateway, Processes, StreamClient
from tests.identity_server import SESSION_COOKIE, IdentityServer

TIMEOUT_S = 0.5
REVALIDATE_S = 1.0
MARKER = "answer-body-marker-7f3a"
"""Put in upstream answer bodies; must never reach a log line."""


@pytest.fixture
def upstream() -> Iterator[IdentityServer]:
    server = IdentityServer().start()
    yield server
    server.stop()


def start_gateway(
    processes: Processes,
    upstream: IdentityServer,
    log_file: Path | None = None,
    **env: str,
) -> Gateway:
    return processes.gateway(
        "--with-relay",
        env={
            "USERSTREAM_JWT_SECRET": "",
            "USERSTREAM_AUTH_URL": upstream.check_url,
            "USERSTREAM_AUTH_TIMEOUT_S": str(TIMEOUT_S),
            "USERSTREAM_AUTH_REVALIDATE_S": str(REVALIDATE_S),
            **env,
        },
        log_file=log_file,
    )


def cookie(session: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={session}; theme=dark"}


async def opens(gateway: Gateway, headers: dict[str, str], **params: str) -> bool:
    """True when a stream opens with `headers` (its `offset` event arrives)."""
    client = StreamClient(gateway.url, headers, params)
    try:
        await client.connect()
    finally:
        await client.close()
    return client.status == 200


async def test_admitted_by_cookie_bearer_or_query_and_refused_with_401(
    processes: Processes, upstream: IdentityServer
) -> None:
    gateway = start_gateway(processes, upstream)
    alice = upstream.session("alice", admin=False, note=MARKER)
    assert await opens(gateway, cookie(alice))
    assert upstream.forwarded[-1] == {"Cookie": f"{SESSION_COOKIE}={alice}; theme=dark"}
    bob = upstream.session("bob", expiresAt=time.time() + 600)
    assert await opens(gateway, {"Authorization": f"Bearer {bob}"})
    carol = upstream.session("carol")
    assert await opens(gateway, {}, access_token=carol)
    assert upstream.forwarded[-1] == {"Authorization": f"Bearer {carol}"}

    async with httpx.AsyncClient(timeout=10) as client:
        for headers in (cookie("sess-unknown"), {}):
            refused = await client.get(f"{gateway.url}/me/stream", headers=headers)
            assert refused.status_code == 401, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert "www-authenticate" in refused.headers
        upstream.check_status = 403
        forbidden = await client.get(f"{gateway.url}/me/stream", headers=cookie("sess-other"))
        assert forbidden.status_code == 401, forbidden.text
        assert "HTTP 403" in forbidden.json()["detail"]
        # expired per the upstream's own expiresAt
        upstream.check_status = None
        stale = upstream.session("dave", expiresAt=time.time() - 5)
        expired = await client.get(f"{gateway.url}/me/stream", headers=cookie(stale))
        assert expired.status_code == 401, expired.text


async def test_slow_or_failing_upstream_is_503_with_retry_after_and_no_stream(
    processes: Processes, upstream: IdentityServer
) -> None:
    gateway = start_gateway(processes, upstream)
    alice = upstream.session("alice")
    async with httpx.AsyncClient(timeout=10) as client:
        upstream.delay_s = TIMEOUT_S * 3
        slow = await client.get(f"{gateway.url}/me/stream", headers=cookie(alice))
        assert slow.status_code == 503, slow.text
        assert slow.headers["content-type"] == "application/problem+json"
        assert int(slow.headers["retry-after"]) >= 1
        assert f"no answer within {TIMEOUT_S:g} s" in slow.json()["detail"]
        upstream.delay_s = 0
        upstream.failing = True
        failing = await client.get(f"{gateway.url}/me/stream", headers=cookie(alice))
        assert failing.status_code == 503 and "HTTP 503" in failing.json()["detail"]
        upstream.failing = False
        # an unavailable answer is not cached: the session opens as soon as the upstream is back
        assert await opens(gateway, cookie(alice))
        metrics = (await client.get(f"{gateway.url}/metrics")).text
    assert 'userstream_auth_upstream_calls_total{outcome="unavailable"} 2.0' in metrics


async def test_cache_and_coalescing_make_one_upstream_call(
    processes: Processes, upstream: IdentityServer
) -> None:
    # re-checks of the open streams would add calls: none is due within the test
    gateway = start_gateway(
        processes,
        upstream,
        USERSTREAM_AUTH_REVALIDATE_S="60",
        USERSTREAM_MAX_CONNECTIONS_PER_USER="50",
    )
    alice = upstream.session("alice")
    for _ in range(10):
        assert await opens(gateway, cookie(alice))
    assert upstream.check_requests == 1  # ten connects, one call

    bob = upstream.session("bob")
    upstream.delay_s = 0.3
    before = upstream.check_requests
    storm = await asyncio.gather(*(opens(gateway, cookie(bob)) for _ in range(20)))
    assert all(storm)
    assert upstream.check_requests - before == 1  # twenty concurrent connects, one call

    refused_before = upstream.check_requests
    async with httpx.AsyncClient(timeout=10) as client:
        answers = await asyncio.gather(
            *(client.get(f"{gateway.url}/me/stream", headers=cookie("sess-x")) for _ in range(5))
        )
    assert {a.status_code for a in answers} == {401}
    assert upstream.check_requests - refused_before == 1  # refusals are cached too


def closed(client: StreamClient) -> str | None:
    """The reason of the stream's `event: close`, if it has one."""
    for event in client.events:
        if event.event == "close":
            reason: str = orjson.loads(event.data)["reason"]
            return reason
    return None


async def test_a_revoked_session_ends_its_streams_within_the_revalidation_interval(
    processes: Processes, upstream: IdentityServer
) -> None:
    gateway = start_gateway(processes, upstream)
    alice, bob = upstream.session("alice"), upstream.session("bob")
    alice_streams = [await StreamClient(gateway.url, cookie(alice)).connect() for _ in range(2)]
    bob_stream = await StreamClient(gateway.url, cookie(bob)).connect()
    try:
        await asyncio.sleep(REVALIDATE_S * 1.5)  # re-checked at least once, still valid
        assert all(closed(s) is None for s in [*alice_streams, bob_stream])
        calls = upstream.check_requests
        assert calls >= 3  # alice and bob once each to connect, and again since

        upstream.revoke(alice)
        revoked_at = time.monotonic()
        for stream in alice_streams:
            await stream.wait_for(lambda s=stream: "close" in s.kinds(), timeout_s=REVALIDATE_S * 3)
        took_s = time.monotonic() - revoked_at
        assert [closed(s) for s in alice_streams] == ["unauthorized", "unauthorized"]
        # within the interval, with room for one re-check pass and the call itself
        assert took_s <= REVALIDATE_S + 1.0, took_s
        assert closed(bob_stream) is None
        # the refusal the re-check found is what a reconnect gets
        async with httpx.AsyncClient(timeout=10) as client:
            again = await client.get(f"{gateway.url}/me/stream", headers=cookie(alice))
        assert again.status_code == 401, again.text
    finally:
        for stream in [*alice_streams, bob_stream]:
            await stream.close()


async def test_no_credential_cookie_or_answer_body_reaches_the_logs(
    processes: Processes, upstream: IdentityServer, tmp_path: Path
) -> None:
    log_file = tmp_path / "gateway.log"
    gateway = start_gateway(
        processes,
        upstream,
        log_file,
        USERSTREAM_LOG_LEVEL="debug",
        USERSTREAM_LOG_FORMAT="json",
    )
    secrets = [upstream.session(f"user-{n}", note=MARKER) for n in range(3)]
    streams = [
        await StreamClient(gateway.url, cookie(secrets[0])).connect(),
        await StreamClient(gateway.url, {"Authorization": f"Bearer {secrets[1]}"}).connect(),
        await StreamClient(gateway.url, {}, {"access_token": secrets[2]}).connect(),
    ]
    async with httpx.AsyncClient(timeout=10) as client:
        await client.get(f"{gateway.url}/me/stream", headers=cookie("sess-refused-secret"))
        upstream.check_status, upstream.check_body = (
            200,
            f'{{"userId": 7, "x": "{MARKER}"}}'.encode(),
        )
        malformed = await client.get(f"{gateway.url}/me/stream", headers=cookie("sess-bad-body"))
        assert malformed.status_code == 503, malformed.text
        upstream.check_status = upstream.check_body = None
        upstream.revoke(secrets[0])
        await streams[0].wait_for(lambda: "close" in streams[0].kinds(), REVALIDATE_S * 3)
    for stream in streams:
        await stream.close()
    processes.stop_all()

    lines = log_file.read_text().splitlines()
    entries = [orjson.loads(line) for line in lines]
    messages = [entry["msg"] for entry in entries]
    assert "stream closed: session revoked" in messages  # the log did capture this run
    assert any("auth service unavailable" in m for m in messages)
    assert any(entry["logger"] == "uvicorn.access" for entry in entries)
    forbidden = [*secrets, "sess-refused-secret", "sess-bad-body", MARKER, SESSION_COOKIE + "="]
    leaks = [(word, line) for line in lines for word in forbidden if word in line]
    assert leaks == []
