"""`GET /client/userstream.js` from a real gateway process (PROTOCOL.md §6,
gateway/client_script.py): the repository's client, as a JavaScript module with a strong ETag,
a cache lifetime, and `304 Not Modified` on revalidation (RFC 9110 §13.1.2)."""

import hashlib
import re
from pathlib import Path

import httpx

from tests.e2e.harness import Processes

CLIENT = Path(__file__).resolve().parents[2] / "client" / "userstream.js"


async def test_the_client_is_served_with_a_strong_etag_and_revalidated_with_304(
    processes: Processes,
) -> None:
    gateway = processes.gateway()  # not in demo mode: every gateway serves the client
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        first = await client.get("/client/userstream.js")
        etag = first.headers["etag"]
        same = await client.get("/client/userstream.js", headers={"If-None-Match": etag})
        listed = await client.get(
            "/client/userstream.js", headers={"If-None-Match": f'"other", W/{etag}'}
        )
        anything = await client.get("/client/userstream.js", headers={"If-None-Match": "*"})
        stale = await client.get("/client/userstream.js", headers={"If-None-Match": '"other"'})
        head = await client.head("/client/userstream.js")

    assert first.status_code == 200
    assert first.headers["content-type"] == "text/javascript; charset=utf-8"
    assert first.headers["cache-control"] == "public, max-age=300"
    assert first.content == CLIENT.read_bytes()
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag), etag  # strong: no W/ prefix
    assert etag == '"' + hashlib.sha256(first.content).hexdigest()[:32] + '"'
    assert "content-encoding" not in first.headers

    for revalidated in (same, listed, anything):
        assert revalidated.status_code == 304
        assert revalidated.content == b""
        assert revalidated.headers["etag"] == etag
        assert revalidated.headers["cache-control"] == "public, max-age=300"
    assert stale.status_code == 200
    assert stale.content == first.content
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["etag"] == etag
