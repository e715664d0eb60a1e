"""`GET /me/stream`: one user's live stream of changes as Server-Sent Events (PROTOCOL.md §3).

The response is `SSEResponse`, a bare ASGI streamer, rather than sse-starlette's
`EventSourceResponse`: each connection costs the server's own task plus one small task that
waits for `http.disconnect`, where sse-starlette runs an anyio task group of four more per
connection (FIELD-NOTES §1; measured in bench/RESULTS.md, "Per-connection cost"). What
sse-starlette did per connection is done once per process instead:
- keep-alive: `Dispatcher.ping_idle` queues `: ping` to every stream sent nothing since its
  previous pass (`Runtime` calls it every half `keepalive_s`), not a timer per connection;
- shutdown: `gateway.shutdown.Drain` closes every stream with `event: close` (shutdown);
- send timeout and token expiry: `gateway.deadlines.Deadlines`, one sweep a second.

The route is a bare ASGI endpoint (`stream_endpoint`) that `gateway.app.Gateway` calls before
Starlette's middleware stack and router: a long-lived response would otherwise keep their
coroutine frames, `send` wrappers and `Request` copies alive for its whole life (6.6 KB per
connection) and pass every write through two wrappers (8 % of a saturated gateway's CPU;
bench/RESULTS.md, "Per-connection memory" and "Hot path"). Only CORS, when configured, wraps it.

Frames are pre-encoded bytes, one encoding per event shared by every subscriber, and all
frames queued for a connection go out in one write (`Subscriber.frames`). Lines end in `\\n`;
`Cache-Control` is `no-cache` and nothing is compressed (PROTOCOL.md §3).
"""

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, cast

import nanoid
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from core.cursors import InvalidCursor, parse_stream_cursor
from core.types import Frame
from gateway.auth import AuthError, Principal
from gateway.deadlines import SEND_TIMEOUT
from gateway.problems import problem
from gateway.runtime import Runtime, retry_frame
from gateway.shutdown import Drain
from sync import metrics
from sync.catchup import StreamRequest, open_stream
from sync.subscribers import Subscriber

logger = logging.getLogger(__name__)

PATH = "/me/stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"
_START_HEADERS = [
    (name, value)
    for name, value in Response(media_type=MEDIA_TYPE, headers=HEADERS).raw_headers
    if name != b"content-length"
]
"""`HEADERS` and the content type as Starlette encodes them, once, without the
`content-length: 0` of an empty body (copied per response: middleware may add to the list
it is given)."""

CLIENT = "client"
"""Disconnect reason of a stream its client ended (metrics and logs)."""
TOKEN_EXPIRED = "token_expired"
"""The `close` reason of a stream whose token expired (PROTOCOL.md §3)."""
UNAUTHORIZED = "unauthorized"
"""The `close` reason of a stream whose session the auth service revoked (forward auth)."""


class SSEResponse(Response):
    """One open `/me/stream` response: writes `frames` (bytes, each a run of complete SSE
    frames) until they end, the client disconnects, a write waits past the send timeout, the
    token expires or the session is revoked (all found by `runtime.deadlines`,
    `gateway.deadlines`).

    `subscriber` is the connection's send buffer: its `chunk_committed_at` feeds the
    commit-to-write histogram, and its `close_reason` names why the stream ended. When the
    response ends, however it ends, the user's slot in the per-user limit is released, the
    subscriber untracked, and the disconnect counted with its reason (`CLIENT`,
    `SEND_TIMEOUT`, or the subscriber's close reason). The bookkeeping lives in this one object,
    with no closure or timer per connection.
    """

    media_type = MEDIA_TYPE

    def __init__(
        self,
        runtime: Runtime,
        principal: Principal,
        subscriber: Subscriber,
        frames: AsyncGenerator[Frame, None],
    ) -> None:
        # No `super().__init__`: with no body it would send `content-length: 0`; the headers
        # are `_START_HEADERS`, the same for every stream.
        self.status_code = 200
        self.background = None
        self.runtime = runtime
        self.user_id = principal.user_id
        self.expires_at = principal.expires_at
        self.credential = principal.credential
        self.subscriber = subscriber
        self.frames = frames
        self.writing_since = 0.0
        self._send: Send | None = None
        self._task: asyncio.Task[Any] | None = None
        self._aborted: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = self._task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(self._watch(receive))
        deadlines = self.runtime.deadlines
        deadlines.add(self)
        reason = CLIENT
        try:
            await send(
                {"type": "http.response.start", "status": 200, "headers": list(_START_HEADERS)}
            )
            self._send = send
            reason = await self._write_all(send)
        except asyncio.CancelledError:
            if self._aborted is None:
                raise
            task.uncancel()
            # A stream already ended on purpose (its close frame stuck behind a full socket)
            # keeps that reason: it was cut, the abort only dropped the connection.
            reason = self.subscriber.close_reason or self._aborted
        except OSError:  # the server reports a lost client on write (ASGI 2.4 OSError)
            reason = CLIENT
        finally:
            self.subscriber.write_now = None
            deadlines.discard(self)
            watcher.cancel()
            await self.frames.aclose()
            self._closed(reason)

    async def _write_all(self, send: Send) -> str:
        subscriber = self.subscriber
        write_now = self._write_now
        async for chunk in self.frames:
            self.writing_since = time.monotonic()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.writing_since = 0.0
            subscriber.write_now = write_now  # the socket took the chunk without backlog
            if subscriber.chunk_committed_at:
                metrics.COMMIT_TO_WRITE.observe(time.time() - subscriber.chunk_committed_at)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return subscriber.close_reason or CLIENT

    def _write_now(self, frame: Frame, committed_at: float) -> None:
        """`Subscriber.write_now`: hand `frame` to the server's `send` and run it to its end
        here, synchronously, as it ends without waiting while the socket's buffer is under its
        high-water mark. If it waits instead (the buffer filled: the bytes are with the
        transport, only the wait for room remains), the wait is dropped and direct writes stop
        until the task's next write has waited for room (`_write_all`). If `send` fails (the
        client is gone), direct writes stop and the task ends the stream."""
        subscriber = self.subscriber
        assert self._send is not None  # set before the first chunk, which enables this
        message = {"type": "http.response.body", "body": frame, "more_body": True}
        step = cast(Coroutine[Any, Any, None], self._send(message))
        try:
            step.send(None)
        except StopIteration:
            pass
        except Exception:  # the task meets the same failure at its next write
            subscriber.write_now = None
        else:
            step.close()
            subscriber.write_now = None
        if committed_at:
            metrics.COMMIT_TO_WRITE.observe(time.time() - committed_at)

    def abort(self, reason: str) -> None:
        """End the response now with `reason` (`gateway.deadlines.Stream`): cancel its task.
        Only the first call counts."""
        if self._aborted is not None or self._task is None:
            return
        self._aborted = reason
        if reason == SEND_TIMEOUT:
            logger.info(
                "stream closed: client accepted nothing for %.1f s",
                self.runtime.deadlines.send_timeout_s,
                extra={"conn": self.subscriber.id, "user": self.user_id},
            )
        self._task.cancel()

    def expire(self) -> None:
        """The token expired: `event: close` `token_expired` (`gateway.deadlines.Stream`)."""
        self.expires_at = float("inf")
        self.runtime.dispatcher.disconnect(self.subscriber, TOKEN_EXPIRED)

    def revoke(self) -> None:
        """The session was revoked: `event: close` `unauthorized` (`gateway.deadlines.Stream`)."""
        self.expires_at = float("inf")
        self.credential = None
        logger.info(
            "stream closed: session revoked",
            extra={"conn": self.subscriber.id, "user": self.user_id},
        )
        self.runtime.dispatcher.disconnect(self.subscriber, UNAUTHORIZED)

    def _closed(self, reason: str) -> None:
        runtime = self.runtime
        runtime.limiter.release(self.user_id)
        runtime.drain.untrack(self.subscriber)
        metrics.CONNECTIONS.dec()
        metrics.DISCONNECTS.labels(reason).inc()
        logger.debug(
            "stream closed: %s", reason, extra={"conn": self.subscriber.id, "user": self.user_id}
        )

    async def _watch(self, receive: Receive) -> None:
        """Wait for `http.disconnect` and abort the response: uvicorn's `send` returns
        silently once the client is gone (FIELD-NOTES §2), so only `receive` tells."""
        message: Message = {}
        while message.get("type") != "http.disconnect":
            message = await receive()
        self.abort(CLIENT)


def stream_request(request: Request, user_id: str, admin: bool) -> StreamRequest:
    """Where the stream starts: `Last-Event-ID` wins over `offset` (PROTOCOL.md §3).

    A malformed `offset` raises InvalidCursor (the caller answers 400); a malformed
    `Last-Event-ID`, which a browser resends by itself, becomes `must-refetch` instead, since a
    400 would end its EventSource for good (WHATWG HTML §9.2.3).
    """
    last_event_id = request.headers.get("last-event-id", "").strip()
    if last_event_id:
        try:
            cursor = parse_stream_cursor(last_event_id)
        except InvalidCursor as exc:
            return StreamRequest(user_id, admin, refetch_reason=f"Last-Event-ID: {exc}")
    else:
        offset = request.query_params.get("offset", "now")
        if offset == "now":
            return StreamRequest(user_id, admin)
        cursor = parse_stream_cursor(offset)
    return StreamRequest(user_id, admin, after=cursor.position, prefetch=cursor.snapshot)


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
    """401 without a valid token, 503 while the auth service cannot tell, 400 for a malformed
    `offset`, 429 past the per-user cap, `shutdown_response` while the process drains, else
    the SSE stream, which ends with `event: close` `token_expired` when the token does,
    `unauthorized` when forward auth revokes the session, or `shutdown` at its turn in the
    drain."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    try:
        principal = await runtime.auth.authenticate(request)
    except AuthError as exc:
        return refused(exc.status, str(exc), **exc.headers)
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
    runtime.drain.track(subscriber)
    metrics.CONNECTS.inc()
    metrics.CONNECTIONS.inc()
    logger.debug(
        "stream opened (%s)", start.after, extra={"conn": subscriber.id, "user": principal.user_id}
    )
    frames = open_stream(
        runtime.dispatcher,
        start,
        subscriber,
        first=retry_frame(settings),
        page_size=settings.catchup_page_size,
        watcher=runtime.presence,
    )
    return SSEResponse(runtime, principal, subscriber, frames)


async def stream_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """`GET /me/stream` as a bare ASGI app (see the module docstring); other methods get 405.
    `scope["app"]` must be the `Gateway` (it holds the runtime)."""
    if scope["method"] not in ("GET", "HEAD"):
        response: Response = problem(405, "use GET", headers={"Allow": "GET, HEAD"})
    else:
        response = await me_stream(Request(scope, receive))
    await response(scope, receive, send)
