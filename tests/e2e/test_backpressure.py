"""Backpressure through real sockets (PROTOCOL.md §4 Isolation): a client that stops reading
is cut off as a slow consumer while a reading client gets every event (bursts larger than the
1 MiB buffer included: an idle writer's socket takes them as they come), and a client whose
socket takes nothing while the gateway may still buffer for it ends after the send timeout.

The stalled client is a raw socket with a 4 KiB receive buffer that reads up to its `offset`
event and then never again. 300 events of 50 KB (15 MB) are far more than the loopback
socket buffers (a few MiB) and the gateway's own buffer can hold for it.

World (`tests.e2e.sequence.seed`): workspace `w1` with alice and bob active; `general` public.
"""

import asyncio
import socket
from urllib.parse import urlsplit

import asyncpg

from core.publish import publish_many
from tests.e2e.harness import Processes, StreamClient, bearer, eventually, scrape, token
from tests.e2e.sequence import seed
from tests.factories import stream_message

EVENTS = 300
BODY = "x" * 50_000


async def stalled_stream(url: str, user_id: str) -> socket.socket:
    """A `/me/stream` connection that reads up to its `offset` event and then stops."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (parts.hostname, parts.port))
    request = (
        f"GET /me/stream HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n"
        f"Authorization: Bearer {token(user_id)}\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    received = b""
    async with asyncio.timeout(10):
        while b"event: offset" not in received:
            received += await loop.sock_recv(sock, 4096)
    return sock


async def publish_large_events(db: asyncpg.Connection) -> None:
    """`EVENTS` messages in `general` with 50 KB of text each, 10 per transaction."""
    for batch in range(EVENTS // 10):
        async with db.transaction():
            await publish_many(
                db,
                [
                    stream_message(f"m{batch}-{i}", stream_id="general", data={"text": BODY})
                    for i in range(10)
                ],
            )


async def disconnects(url: str, reason: str) -> float:
    found = await scrape(f"{url}/metrics")
    return found.get(("userstream_disconnects_total", (("reason", reason),)), 0.0)


async def test_a_client_that_stops_reading_is_cut_off_while_others_get_everything(
    processes: Processes, db: asyncpg.Connection
) -> None:
    await seed(db)
    # The default buffer (1 MiB per connection); bob's close frame waits behind his full
    # socket, so his connection is dropped after the send timeout, counted as slow_consumer.
    gateway = processes.gateway("--with-relay", env={"USERSTREAM_SEND_TIMEOUT_S": "2"})
    alice = await StreamClient(gateway.url, bearer("alice")).connect()
    stalled = await stalled_stream(gateway.url, "bob")
    try:
        await publish_large_events(db)
        await alice.wait_for(lambda: len(alice.changes()) == EVENTS, timeout_s=60)
        assert [c["entityId"] for c in alice.changes()] == [
            f"m{b}-{i}" for b in range(EVENTS // 10) for i in range(10)
        ]

        async def cut_off() -> bool:
            return await disconnects(gateway.url, "slow_consumer") == 1

        await eventually(cut_off, "bob's stream cut off as a slow consumer")
        found = await scrape(f"{gateway.url}/metrics")
        assert found[("userstream_slow_consumer_disconnects_total", ())] == 1
        assert await disconnects(gateway.url, "send_timeout") == 0
        assert found[("userstream_connections", ())] == 1  # alice only
    finally:
        stalled.close()
        await alice.close()


async def test_a_socket_that_takes_nothing_ends_after_the_send_timeout(
    processes: Processes, db: asyncpg.Connection
) -> None:
    await seed(db)
    gateway = processes.gateway(
        "--with-relay",
        env={
            "USERSTREAM_MAX_BUFFER_BYTES": str(64 * 1024 * 1024),
            "USERSTREAM_SEND_TIMEOUT_S": "1",
        },
    )
    stalled = await stalled_stream(gateway.url, "bob")
    try:
        await publish_large_events(db)

        async def timed_out() -> bool:
            return await disconnects(gateway.url, "send_timeout") == 1

        await eventually(timed_out, "bob's stream ended by the send timeout", timeout_s=30)
        found = await scrape(f"{gateway.url}/metrics")
        assert found.get(("userstream_slow_consumer_disconnects_total", ()), 0) == 0
        assert found[("userstream_connections", ())] == 0
    finally:
        stalled.close()
