"""`GET /me/stream`: one user's live stream of changes as Server-Sent Events (PROTOCOL.md §3).

The response is `SSEResponse`, a bare ASGI streamer, rather than sse-starlette's
`EventSourceResponse`: each connection costs the server's own task plus one small task that
waits for `http.disconnect`, where sse-starlette runs an anyio task group of four more per
connection (FIELD-NOTES §1; measured in bench/RESULTS.md, "Per-connection cost"). What
sse-starlette did per connection is done once per process instead:
- keep-alive: `Dispatcher.ping_idle` queues `: ping` to every stream idle for a whole interval
  (`Runtime` calls it every `keepalive_s`), not a timer per connection;
- shutdown: `gateway.shutdown.Drain` closes every stream with `event: close` (shutdown);
- send timeout: `asyncio.timeout` around each write (a timer handle, not a task).

Frames are pre-encoded bytes, one encoding per event shared by every subscriber, and all
frames queued for a connection go out in one write (`Subscriber.frames`). Lines end in `\\n`;
`Cache-Control` is `no-cache` and nothing is compressed (PROTOCOL.md §3).
"""

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable

import nanoid
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from core.cursors import InvalidCursor, parse_cursor
from core.types import Frame
from gateway.auth import AuthError
from gateway.problems import problem
from gateway.runtime import Runtime, retry_frame
from gateway.shutdown import Drain
from sync import metrics
from sync.catchup import StreamRequest, open_stream
from sync.subscribers import Subscriber

logger = logging.getLogger(__name__)

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"

CLIENT = "client"
"""Disconnect reason of a stream its client ended (metrics and logs)."""
SEND_TIMEOUT = "send_timeout"
"""Disconnect reason of a stream whose socket accepted nothing for `send_timeout_s` while data
waited (PROTOCOL.md §4 Isolation)."""


class SSEResponse(Response):
    """An ASGI response writing `frames` (bytes, each a run of complete SSE frames) until they
    end, the client disconnects, or one write waits longer than `send_timeout_s` seconds.

    `subscriber` is the connection's send buffer: its `chunk_committed_at` feeds the
    commit-to-write histogram, and its `close_reason` names why the stream ended. `on_close`
    is called once with that reason (`CLIENT`, `SEND_TIMEOUT`, or the subscriber's close
    reason), however the response ends.
    """

    media_type = MEDIA_TYPE

    def __init__(
        self,
        frames: AsyncGenerator[Frame, None],
        subscriber: Subscriber,
        *,
        send_timeout_s: float,
        on_close: Callable[[str], None],
    ) -> None:
        # No `super().__init__`: with no body it would send `content-length: 0` (Starlette's
        # `StreamingResponse` sets up its headers the same way).
        self.status_code = 200
        self.background = None
        self.init_headers(HEADERS)
        self.frames = frames
        self.subscriber = subscriber
        self.send_timeout_s = send_timeout_s
        self.on_close = on_close
        self._client_gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(self._watch(receive, task))
        reason = CLIENT
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            reason = await self._write_all(send)
        except asyncio.CancelledError:
            if not self._client_gone:
                raise
            task.uncancel()
        except OSError:  # the server reports a lost client on write (ASGI 2.4 OSError)
            reason = CLIENT
        finally:
            watcher.cancel()
            await self.frames.aclose()
            self.on_close(reason)

    async def _write_all(self, send: Send) -> str:
        subscriber = self.subscriber
        async for chunk in self.frames:
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except TimeoutError:
                logger.info(
                    "stream closed: client accepted nothing for %.1f s",
                    self.send_timeout_s,
                    extra={"conn": subscriber.id, "user": subscriber.user_id},
                )
                return SEND_TIMEOUT
            if subscriber.chunk_committed_at:
                metrics.COMMIT_TO_WRITE.observe(time.time() - subscriber.chunk_committed_at)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return subscriber.close_reason or CLIENT

    async def _watch(self, receive: Receive, task: "asyncio.Task[None]") -> None:
        """Wait for `http.disconnect` and cancel the response: uvicorn's `send` returns
        silently once the client is gone (FIELD-NOTES §2), so only `receive` tells."""
        message: Message = {}
        while message.get("type") != "http.disconnect":
            message = await receive()
        self._client_gone = True
        task.cancel()


def stream_request(request: Request, user_id: str, admin: bool) -> StreamRequest:
    """Where the stream starts: `Last-Event-ID` wins over `offset` (PROTOCOL.md §3).

    A malformed `offset` raises InvalidCursor (the caller answers 400); a malformed
    `Last-Event-ID`, which a browser resends by itself, becomes `must-refetch` instead, since a
    400 would end its EventSource for good (WHATWG HTML §9.2.3).
    """
    last_event_id = request.headers.get("last-event-id", "").strip()
    if last_event_id:
        try:
            return StreamRequest(user_id, admin, after=parse_cursor(last_event_id))
        except InvalidCursor as exc:
            return StreamRequest(user_id, admin, refetch_reason=f"Last-Event-ID: {exc}")
    offset = request.query_params.get("offset", "now")
    if offset == "now":
        return StreamRequest(user_id, admin)
    return StreamRequest(user_id, admin, after=parse_cursor(offset))


def shutdown_response(drain: Drain) -> Response:
    """`200 text/event-stream` whose whole body is a jittered `retry:` and `event: close`
    `{"reason": "shutdown"}`: the EventSource reconnects (to another replica) after the
    `retry:` delay, where a 503 would end it for good (WHATWG HTML §9.2.3)."""
    return Response(drain.farewell(), media_type=MEDIA_TYPE, headers=HEADERS)


def refused(status: int, detail: str, **headers: str) -> Response:
    """A problem response to a `/me/stream` request, counted by status."""
    metrics.REJECTED.labels(str(status)).inc()
    return problem(status, detail, headers=headers or None)


async def me_stream(request: Request) -> Response:
    """401 without a valid token, 400 for a malformed `offset`, 429 past the per-user cap,
    `shutdown_response` while the process drains, else the SSE stream, which ends with
    `event: close` `token_expired` when the token does, or `shutdown` at its turn in the drain."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    try:
        principal = runtime.auth.authenticate(request)
    except AuthError as exc:
        return refused(401, str(exc), **{"WWW-Authenticate": 'Bearer realm="userstream"'})
    if runtime.drain.draining:
        return shutdown_response(runtime.drain)
    try:
        start = stream_request(request, principal.user_id, principal.admin)
    except InvalidCursor as exc:
        return refused(400, f"offset: {exc}")
    if not runtime.limiter.acquire(principal.user_id):
        limit = runtime.limiter.limit
        return refused(429, f"user {principal.user_id!r} already has {limit} open streams")
    subscriber = Subscriber(
        nanoid.generate(size=12),
        principal.user_id,
        max_buffer_bytes=settings.max_buffer_bytes,
        admin=principal.admin,
    )
    log_extra = {"conn": subscriber.id, "user": principal.user_id}
    runtime.drain.track(subscriber)
    metrics.CONNECTS.inc()
    metrics.CONNECTIONS.inc()
    logger.debug("stream opened (%s)", start.after, extra=log_extra)
    frames = open_stream(
        runtime.dispatcher,
        start,
        subscriber,
        first=retry_frame(settings),
        page_size=settings.catchup_page_size,
    )
    expiry = asyncio.get_running_loop().call_later(
        max(0.0, principal.expires_at - time.time()),
        runtime.dispatcher.disconnect,
        subscriber,
        "token_expired",
    )

    def on_close(reason: str) -> None:
        expiry.cancel()
        runtime.limiter.release(principal.user_id)
        runtime.drain.untrack(subscriber)
        metrics.CONNECTIONS.dec()
        metrics.DISCONNECTS.labels(reason).inc()
        logger.debug("stream closed: %s", reason, extra=log_extra)

    return SSEResponse(
        frames, subscriber, send_timeout_s=settings.send_timeout_s, on_close=on_close
    )
