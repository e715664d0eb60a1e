"""`SSEResponse` on fake runtime parts: a socket that accepts nothing ends the stream as
`send_timeout`, an expired token with `event: close` `token_expired`, a revoked session with
`event: close` `unauthorized` (a renewed one moves the expiry), and frames for an idle writer go
to the socket from the dispatcher's side (`Subscriber.write_now`) until it fills."""

import asyncio
import time
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

from starlette.types import Message

from core.frames import encode_close
from gateway.auth import Principal
from gateway.deadlines import Deadlines
from gateway.stream import TOKEN_EXPIRED, UNAUTHORIZED, SSEResponse
from sync.subscribers import Subscriber

FAR = float("inf")


class Harness:
    """An SSEResponse on fake runtime parts: body writes wait for `send_body`, the client
    disconnects when `disconnect` is set."""

    def __init__(
        self, deadlines: Deadlines, expires_at: float = FAR, credential: str | None = None
    ) -> None:
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
        principal = Principal("alice", False, expires_at, credential=credential)
        self.response = SSEResponse(runtime, principal, self.subscriber, self.frames())

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


async def test_a_revoked_session_ends_its_stream_and_a_renewed_one_moves_the_expiry() -> None:
    deadlines = Deadlines(100.0)
    harness = Harness(deadlines, expires_at=time.time() + 60, credential="key-1")
    other = Harness(deadlines, credential="key-2")
    for each in (harness, other):
        each.send_body.set_result(None)
    task, other_task = harness.start(), other.start()
    await harness.writing.wait()
    await other.writing.wait()
    assert deadlines.credentials() == {"key-1", "key-2"}
    renewed = Principal("alice", False, time.time() + 600, credential="key-1")
    assert deadlines.apply({"key-1": renewed}) == 0
    assert harness.response.expires_at == renewed.expires_at
    assert deadlines.sweep(epoch=time.time() + 61) == 0  # the old expiry no longer applies
    assert deadlines.apply({"key-1": None, "unknown": None}) == 1
    await asyncio.wait_for(task, 5)
    bodies = b"".join(m.get("body", b"") for m in harness.sent)
    assert bodies.endswith(encode_close(UNAUTHORIZED))
    assert harness.subscriber.close_reason == UNAUTHORIZED
    assert deadlines.credentials() == {"key-2"} and not other_task.done()
    # the same credential now naming another user is a revocation too
    stranger = Principal("mallory", False, FAR, credential="key-2")
    assert deadlines.apply({"key-2": stranger}) == 1
    await asyncio.wait_for(other_task, 5)
    assert other.subscriber.close_reason == UNAUTHORIZED


async def test_direct_writes_stop_when_the_socket_fills_and_resume_once_it_drained() -> None:
    harness = Harness(Deadlines(100.0))
    harness.send_body.set_result(None)
    room: asyncio.Future[None] = asyncio.Future()
    full = {"now": False}
    original_send = harness.send

    async def send(message: Message) -> None:
        await original_send(message)
        if full["now"]:
            full["now"] = False
            await room  # uvicorn's send waits for room after handing the bytes over

    harness.send = send  # type: ignore[method-assign]
    task = harness.start()
    subscriber = harness.subscriber
    await harness.writing.wait()
    for _ in range(5):
        await asyncio.sleep(0)
    assert subscriber.write_now is not None  # the writer is idle after its first write
    assert subscriber.queue(b"data: 1\n\n")  # written at once, from here
    subscriber.flush()
    assert harness.sent[-1]["body"] == b"data: 1\n\n"
    full["now"] = True
    assert subscriber.queue(b"data: 2\n\n")  # handed over, then the socket is full
    subscriber.flush()
    assert harness.sent[-1]["body"] == b"data: 2\n\n" and subscriber.write_now is None
    assert subscriber.queue(b"data: 3\n\n")  # queued for the task
    subscriber.flush()
    for _ in range(5):
        await asyncio.sleep(0)
    assert harness.sent[-1]["body"] == b"data: 3\n\n"
    assert subscriber.write_now is not None  # the task's write went through: direct again
    subscriber.close("shutdown")
    await asyncio.wait_for(task, 5)
    bodies = [m.get("body", b"") for m in harness.sent if m["type"] == "http.response.body"]
    assert bodies[1:4] == [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]
    assert subscriber.write_now is None
