"""The load client `sseload` tells PROTOCOL.md §5 frames apart: `event: ephemeral` frames are
events (counted, with latency) and are also counted on their own; `event: presence` frames are
not events and are counted apart, with their data bytes, per connection and by the gap between
two on one connection.

A small asyncio SSE server (chunked bodies, a frame split across chunks, `\\n` and `\\r\\n`
line ends) sends every connection the same known frames once every connection is open;
the client's JSON result must count exactly those.
"""

import asyncio
import shutil
import time

import orjson
import pytest

from bench import loadclient
from bench.loadclient import LoadResult

CONNECTIONS = 3
GAP_S = 0.3
"""Pause between a connection's two presence frames (and before connection 0's third)."""

PRESENCE_1 = b'{"workspaceId":"w1","online":["u1","u2"],"offline":[]}'
PRESENCE_2_LINES = (b"{", b'"offline":["u3"]}')
"""Two `data:` lines: the frame's data is the lines joined by one LF."""
PRESENCE_3 = b'{"workspaceId":"w1","online":[],"offline":["u9"]}'

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1)."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def ephemeral(user: str) -> bytes:
    """An `event: ephemeral` frame (core.frames.encode_ephemeral's shape) stamped now."""
    payload = {
        "type": "typing",
        "workspaceId": "w1",
        "streamId": "s2",
        "userId": user,
        "data": {"ts": time.time_ns()},
        "at": "2026-12-05T10:00:00.123Z",
    }
    return b"event: ephemeral\ndata: " + orjson.dumps(payload) + b"\n\n"


class FrameServer:
    """Answers every request with 200, a chunked SSE body starting `event: offset`, and once
    `CONNECTIONS` requests are open, the frames of `send_frames`."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.all_open = asyncio.Event()
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"event: offset\ndata: {}\n\n")
        )
        await writer.drain()
        self.writers.append(writer)
        if len(self.writers) == CONNECTIONS:
            self.all_open.set()
        await self.done.wait()
        writer.close()

    async def send_frames(self) -> None:
        await self.all_open.wait()
        await asyncio.sleep(0.3)  # the client's counted window has begun (no warm-up)
        head, tail = b"event: presence\ndata: " + PRESENCE_1[:10], PRESENCE_1[10:] + b"\n\n"
        for writer in self.writers:
            writer.write(chunk(head) + chunk(tail))  # one frame across two chunks
            writer.write(chunk(ephemeral("u1")))
            change = b'event: change\nid: c1\ndata: {"ts":%d}\n\n' % time.time_ns()
            writer.write(chunk(change + b": ping\n\n" + b"event: presence\n\n"))
        await asyncio.sleep(GAP_S)
        lines = b"".join(b"data: " + line + b"\r\n" for line in PRESENCE_2_LINES)
        for writer in self.writers:
            writer.write(chunk(b"event: presence\r\n" + lines + b"\r\n" + ephemeral("u2")))
        await asyncio.sleep(GAP_S)
        self.writers[0].write(chunk(b"event: presence\ndata: " + PRESENCE_3 + b"\n\n"))


async def run_client(port: int) -> LoadResult:
    """sseload against the server: `CONNECTIONS` connections, measured 1.5 s."""
    return await loadclient.run_load(
        "127.0.0.1",
        port,
        ["/"],
        connections=CONNECTIONS,
        cpu=None,
        ready_marker=b"event: offset",
        duration_s=1.5,
        connect_timeout_s=5,
    )


@pytest.mark.timeout(30)
async def test_ephemeral_and_presence_frames_are_counted_apart() -> None:
    await asyncio.to_thread(loadclient.build)
    frames = FrameServer()
    server = await asyncio.start_server(frames.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sender = asyncio.create_task(frames.send_frames())
        result = await run_client(port)
        await sender
    finally:
        frames.done.set()
        server.close()
        await server.wait_closed()

    assert (result.ready, result.failed, result.errors) == (CONNECTIONS, 0, {})
    assert result.events == 3 * CONNECTIONS  # two ephemeral frames and one change each
    assert result.ephemeral_events == 2 * CONNECTIONS
    assert result.latency_ms.count == 3 * CONNECTIONS
    presence = result.presence
    assert presence.events == presence.run_events == 2 * CONNECTIONS + 1
    second = len(b"\n".join(PRESENCE_2_LINES))
    expected_bytes = CONNECTIONS * (len(PRESENCE_1) + second) + len(PRESENCE_3)
    assert presence.data_bytes == presence.run_data_bytes == expected_bytes
    assert (presence.connections, presence.max_per_connection) == (CONNECTIONS, 3)
    assert presence.min_gap_ms is not None
    assert GAP_S * 1e3 * 0.8 <= presence.min_gap_ms <= GAP_S * 1e3 * 3
