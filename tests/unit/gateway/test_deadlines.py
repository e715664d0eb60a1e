"""Per-stream deadlines: `Deadlines.sweep` aborts writes stuck past the send timeout and
expires streams whose token expired; an `SSEResponse` whose socket accepts nothing ends with
reason `send_timeout`, one whose token expires with `event: close` `token_expired`."""

import asyncio
import time
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.types import Message

from core.frames import encode_close
from gateway.deadlines import SEND_TIMEOUT, Deadlines
from gateway.stream import TOKEN_EXPIRED, SSEResponse
from sync.subscribers import Subscriber

FAR = float("inf")


class FakeStream:
    def __init__(self, writing_since: float = 0.0, expires_at: float = FAR) -> None:
        self.writing_since = writing_since
        self.expires_at = expires_at
        self.ended: list[str] = []

    def abort(self, reason: str) -> None:
        self.ended.append(reason)

    def expire(self) -> None:
        self.ended.append(TOKEN_EXPIRED)


def test_sweep_aborts_writes_older_than_the_timeout_and_expires_expired_tokens() -> None:
    deadlines = Deadlines(send_timeout_s=10)
    idle, fresh, due, old = FakeStream(), FakeStream(95.0), FakeStream(90.0), FakeStream(1.0)
    expired, valid = FakeStream(expires_at=1000.0), FakeStream(expires_at=1000.5)
    streams = (idle, fresh, due, old, expired, valid)
    for stream in streams:
        deadlines.add(stream)
    assert deadlines.sweep(monotonic=100.0, epoch=1000.0) == 3
    assert [s.ended for s in streams] == [
        [],
        [],
        [SEND_TIMEOUT],
        [SEND_TIMEOUT],
        [TOKEN_EXPIRED],
        [],
    ]
    assert len(deadlines) == 4  # aborted streams are no longer watched; expired ones end later
    deadlines.discard(expired)
    assert deadlines.sweep(monotonic=200.0, epoch=1001.0) == 2  # `fresh` stuck, `valid` expired


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="send_timeout_s"):
        Deadlines(send_timeout_s=0)


class Harness:
    """An SSEResponse on fake runtime parts: body writes wait for `send_body`, the client
    disconnects when `disconnect` is set."""

    def __init__(self, deadlines: Deadlines, expires_at: float = FAR) -> None:
        self.deadlines = deadlines
        self.subscriber = Subscriber("c1", "alice", max_buffer_bytes=1024)
        self.released: list[str] = []
        self.sent: list[Message] = []
        self.writing = asyncio.Event()
        self.disconnect = asyncio.Event()
        self.send_body: asyncio.Future[None] = asyncio.Future()
        runtime: Any = SimpleNamespace(
            deadlines=deadlines,
            limiter=SimpleNamespace(release=self.released.append),
            drain=SimpleNamespace(untrack=lambda subscriber: None),
            dispatcher=SimpleNamespace(
                disconnect=lambda subscriber, reason: subscriber.close(reason)
            ),
        )
        self.response = SSEResponse(runtime, "alice", expires_at, self.subscriber, self.frames())

    async def frames(self) -> AsyncGenerator[bytes, None]:
        yield b"retry: 1000\n\n"
        async for chunk in self.subscriber.frames():
            yield chunk

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and message["body"].startswith(b"retry"):
            self.writing.set()
            await self.send_body

    async def receive(self) -> Message:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    def start(self) -> "asyncio.Future[None]":
        return asyncio.ensure_future(self.response({"type": "http"}, self.receive, self.send))


async def test_a_write_stuck_past_the_timeout_ends_the_stream_as_send_timeout() -> None:
    harness = Harness(Deadlines(1.0))
    task = harness.start()
    await harness.writing.wait()
    assert len(harness.deadlines) == 1 and harness.response.writing_since > 0
    harness.deadlines.sweep(monotonic=time.monotonic() + 0.5)  # not stuck for long enough
    assert not task.done()
    harness.deadlines.sweep(monotonic=time.monotonic() + 1.0)
    await asyncio.wait_for(task, 5)
    assert len(harness.deadlines) == 0
    assert harness.released == ["alice"]
    assert [m["type"] for m in harness.sent] == ["http.response.start", "http.response.body"]


async def test_a_client_disconnect_during_a_stuck_write_ends_the_stream() -> None:
    harness = Harness(Deadlines(100.0))
    task = harness.start()
    await harness.writing.wait()
    harness.deadlines.sweep()
    harness.disconnect.set()
    await asyncio.wait_for(task, 5)
    assert harness.released == ["alice"] and len(harness.deadlines) == 0


async def test_an_expired_token_ends_the_stream_with_close_token_expired() -> None:
    harness = Harness(Deadlines(100.0), expires_at=time.time() + 60)
    harness.send_body.set_result(None)
    task = harness.start()
    await harness.writing.wait()
    assert harness.deadlines.sweep() == 0
    assert harness.deadlines.sweep(epoch=time.time() + 61) == 1
    await asyncio.wait_for(task, 5)
    bodies = b"".join(m.get("body", b"") for m in harness.sent)
    assert bodies.endswith(encode_close(TOKEN_EXPIRED))
    assert harness.subscriber.close_reason == TOKEN_EXPIRED
