"""Bad input at the edge (PROTOCOL.md §3): 401 problem JSON for bad credentials, 400 for a bad
`offset`, `must-refetch` (never 400) for a bad `Last-Event-ID`; every credential source works."""

import time

import httpx
import jwt

from tests.e2e.harness import JWT_SECRET, Processes, StreamClient, bearer, token


def assert_problem(response: httpx.Response, status: int, detail: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == status
    assert detail in body["detail"], body


async def test_bad_credentials_get_401_and_bad_offset_400(processes: Processes) -> None:
    gateway = processes.gateway("--with-relay")
    url = f"{gateway.url}/me/stream"
    now = int(time.time())
    no_exp = jwt.encode({"sub": "alice"}, JWT_SECRET)
    no_sub = jwt.encode({"exp": now + 60}, JWT_SECRET)
    cases = [
        ({}, {}, "no credentials"),
        ({"Authorization": "Basic YWxpY2U6eA=="}, {}, "Bearer"),
        ({"Authorization": "Bearer not-a-jwt"}, {}, "invalid token"),
        (bearer("alice", ttl_s=-60), {}, "expired"),
        (
            {"Authorization": f"Bearer {token('alice', secret='forged-' + JWT_SECRET)}"},
            {},
            "Signature",
        ),
        ({"Authorization": f"Bearer {no_exp}"}, {}, "exp"),
        ({"Authorization": f"Bearer {no_sub}"}, {}, "sub"),
        # The first credential present decides: a bad bearer token loses despite a good cookie.
        (
            {"Authorization": "Bearer nope", "Cookie": f"userstream_token={token('alice')}"},
            {},
            "invalid token",
        ),
        ({}, {"access_token": "nope"}, "invalid token"),
    ]
    async with httpx.AsyncClient(timeout=5) as client:
        for headers, params, detail in cases:
            response = await client.get(url, headers=headers, params=params)
            assert_problem(response, 401, detail)
            assert "www-authenticate" in response.headers
        for offset in ("garbage", "00000000000000zz", "000000000000000A", "1"):
            response = await client.get(url, headers=bearer("alice"), params={"offset": offset})
            assert_problem(response, 400, "offset")


async def test_every_credential_source_opens_a_stream(processes: Processes) -> None:
    gateway = processes.gateway("--with-relay")
    sources = [
        ({"Authorization": f"Bearer {token('alice')}"}, {}),
        ({"Cookie": f"userstream_token={token('alice')}"}, {}),
        ({}, {"access_token": token("alice")}),
    ]
    for headers, params in sources:
        client = await StreamClient(gateway.url, headers, params).connect()
        assert client.status == 200
        await client.close()


async def test_malformed_last_event_id_gets_must_refetch_then_live(processes: Processes) -> None:
    gateway = processes.gateway("--with-relay")
    headers = {**bearer("alice"), "Last-Event-ID": "not-a-cursor"}
    client = await StreamClient(gateway.url, headers, {"offset": "garbage"}).connect()
    assert client.status == 200
    assert client.kinds()[:2] == ["must-refetch", "offset"]
    await client.close()


async def test_cursor_ahead_of_the_stream_gets_must_refetch(processes: Processes) -> None:
    gateway = processes.gateway("--with-relay")
    params = {"offset": "00000000ffffffff"}
    client = await StreamClient(gateway.url, bearer("alice"), params).connect()
    assert client.kinds()[:2] == ["must-refetch", "offset"]
    await client.close()
