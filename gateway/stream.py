"""`GET /me/stream`: one user's live stream of changes as Server-Sent Events (PROTOCOL.md §3).

Departures from sse-starlette's defaults: frames are pre-encoded bytes (one encoding per event,
shared by every subscriber); the keep-alive is the bare comment `: ping`; lines end in `\\n`;
`Cache-Control` is `no-cache` as PROTOCOL.md §3 says; a send that times out ends the stream
quietly (logged as a stalled client) instead of surfacing as an application error; on
shutdown a stream is not cancelled at once but closed with `event: close` (shutdown) at its
turn in the drain window, and a request that arrives during the drain gets only that farewell
(`gateway.shutdown`).
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import nanoid
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from core.cursors import InvalidCursor, parse_cursor
from gateway.auth import AuthError
from gateway.problems import problem
from gateway.runtime import Runtime, retry_frame
from gateway.shutdown import Drain, stream_grace_s
from sync.catchup import StreamRequest, open_stream
from sync.subscribers import Subscriber

logger = logging.getLogger(__name__)

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamResponse(EventSourceResponse):
    """An EventSourceResponse whose send timeout (a stalled client, PROTOCOL.md §4) ends only
    that stream, with a log line, not an "Exception in ASGI application"; `on_close` runs
    once the response is over, however it ends."""

    def __init__(self, *args: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            logger.info("stream closed: client accepted nothing for %ss", self.send_timeout)
        finally:
            self.on_close()


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
    return Response(drain.farewell(), media_type="text/event-stream", headers=HEADERS)


async def me_stream(request: Request) -> Response:
    """401 without a valid token, 400 for a malformed `offset`, 429 past the per-user cap,
    `shutdown_response` while the process drains, else the SSE stream, which ends with
    `event: close` `token_expired` when the token does, or `shutdown` at its turn in the drain."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    try:
        principal = runtime.auth.authenticate(request)
    except AuthError as exc:
        return problem(401, str(exc), headers={"WWW-Authenticate": 'Bearer realm="userstream"'})
    if runtime.drain.draining:
        return shutdown_response(runtime.drain)
    try:
        start = stream_request(request, principal.user_id, principal.admin)
    except InvalidCursor as exc:
        return problem(400, f"offset: {exc}")
    if not runtime.limiter.acquire(principal.user_id):
        limit = runtime.limiter.limit
        return problem(429, f"user {principal.user_id!r} already has {limit} open streams")
    subscriber = Subscriber(
        nanoid.generate(size=12),
        principal.user_id,
        max_buffer_bytes=settings.max_buffer_bytes,
        admin=principal.admin,
    )
    runtime.drain.track(subscriber)
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

    def on_close() -> None:
        expiry.cancel()
        runtime.limiter.release(principal.user_id)
        runtime.drain.untrack(subscriber)

    return StreamResponse(
        frames,
        headers=HEADERS,
        ping=settings.keepalive_s,
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
        sep="\n",
        send_timeout=settings.send_timeout_s,
        shutdown_event=runtime.drain.shutdown_event,
        shutdown_grace_period=stream_grace_s(settings),
        on_close=on_close,
    )
