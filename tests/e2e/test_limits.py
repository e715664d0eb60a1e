"""Limits and hygiene of `/me/stream` (issue 3, point 5): per-user cap (429), CORS allow-list,
token expiry ends the stream with `event: close`, and no token ever reaches a log line."""

import asyncio
from pathlib import Path

import httpx
import orjson

from tests.e2e.harness import Processes, StreamClient, bearer, token


async def test_connections_past_the_per_user_cap_get_429(processes: Processes) -> None:
    gateway = processes.gateway("--with-relay", env={"USERSTREAM_MAX_CONNECTIONS_PER_USER": "2"})
    first = await StreamClient(gateway.url, bearer("alice")).connect()
    second = await StreamClient(gateway.url, bearer("alice")).connect()
    async with httpx.AsyncClient(timeout=5) as client:
        refused = await client.get(f"{gateway.url}/me/stream", headers=bearer("alice"))
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert "2 open streams" in refused.json()["detail"]
        other = await StreamClient(gateway.url, bearer("bob")).connect()  # others unaffected
        await first.close()

        async def reconnects() -> bool:
            try:
                client_again = await StreamClient(gateway.url, bearer("alice")).connect(2)
            except AssertionError:
                return False
            await client_again.close()
            return True

        for _ in range(50):  # the slot frees once the server has seen the disconnect
            if await reconnects():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("a closed stream did not free its slot")
    await second.close()
    await other.close()


async def test_stream_ends_with_close_token_expired(processes: Processes) -> None:
    gateway = processes.gateway("--with-relay")
    headers = {"Authorization": f"Bearer {token('alice', ttl_s=2)}"}
    client = await StreamClient(gateway.url, headers).connect()
    await client.wait_for(lambda: "close" in client.kinds(), timeout_s=15)
    close = next(e for e in client.events if e.event == "close")
    assert orjson.loads(close.data) == {"reason": "token_expired"}
    assert client.retry is not None
    await client.close()


async def test_cors_allows_listed_origins_only(processes: Processes) -> None:
    gateway = processes.gateway(
        "--with-relay", env={"USERSTREAM_CORS_ORIGINS": "https://app.example"}
    )
    preflight = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "last-event-id",
    }
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        allowed = await client.options(
            "/me/stream", headers={"Origin": "https://app.example", **preflight}
        )
        refused = await client.options(
            "/me/stream", headers={"Origin": "https://evil.example", **preflight}
        )
        simple = await client.get("/healthz", headers={"Origin": "https://app.example"})
        foreign = await client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    assert simple.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in foreign.headers


async def test_no_token_appears_in_any_log_line(processes: Processes, tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    gateway = processes.gateway(
        "--with-relay",
        env={"USERSTREAM_LOG_LEVEL": "debug", "USERSTREAM_LOG_FORMAT": "json"},
        log_file=log,
    )
    query_token, header_token, bad_token = token("alice"), token("bob"), token("x", ttl_s=-60)
    client = await StreamClient(gateway.url, {}, {"access_token": query_token}).connect()
    other = await StreamClient(gateway.url, {"Authorization": f"Bearer {header_token}"}).connect()
    async with httpx.AsyncClient(timeout=5) as http:
        await http.get(f"{gateway.url}/me/stream", params={"access_token": bad_token})
    await client.close()
    await other.close()
    processes.stop_all()
    text = log.read_text()
    assert "/me/stream" in text  # the access log did record the requests
    for secret in (query_token, header_token, bad_token):
        assert secret not in text
        assert secret.split(".")[1] not in text  # not even the claims part
    lines = [line for line in text.splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines)
    assert all(isinstance(orjson.loads(line), dict) for line in lines)
