"""Graceful shutdown of a gateway process: close every stream, spread over a drain window.

On SIGTERM the process stops in uvicorn's order (STYLE.md §7), without a gap for any client:

1. uvicorn's signal handler sets `Server.should_exit`; within one tick (0.1 s) uvicorn closes
   its listening sockets (no new connections) and closes idle keep-alive connections.
2. sse-starlette's shutdown watcher, which polls every `WATCH_INTERVAL_S` (it finds uvicorn's
   `Server` through the SIGTERM handler, or through the `handle_exit` it patches at import),
   sets the `shutdown_event` of every open response. Every `/me/stream` response shares
   `Drain.shutdown_event`, so the first one wakes `Drain.run`.
3. `Drain.begin` closes each stream of this process with `Dispatcher.disconnect(subscriber,
   "shutdown")`: a jittered `retry:` and `event: close` `{"reason": "shutdown"}` (PROTOCOL.md
   §3). The closes are spread over `[0, drain_s)`: the streams, in random order, get one
   random instant in each of `n` equal slices of the window, so their reconnects reach the
   other replicas at an even rate instead of all at once (FIELD-NOTES §2 "Reconnect storms").
   Until its turn a stream stays live: the dispatcher runs until the lifespan shutdown.
4. A response ends once its close frame is written. sse-starlette cancels one still open
   `stream_grace_s` after shutdown was detected (a client that stopped reading).
5. With every connection closed, uvicorn runs the lifespan shutdown (`Runtime.close`: tasks,
   bus, pool), then re-raises the SIGTERM it caught; `userstream serve` exits with status 0.
   Its `timeout_graceful_shutdown` is `server_shutdown_timeout_s`, longer than all of the above.

Streams are not closed from the lifespan shutdown: uvicorn runs it only after every connection
has closed (`Server.shutdown`), so a stream waiting for it would hold the process until the
graceful timeout (FIELD-NOTES §1, §2; uvicorn PR #2829, which sent `http.disconnect` to
streams on shutdown, was reverted in #2913). The sse-starlette watcher is the only notice of
shutdown an app gets before that; `create_app` still builds everything explicitly.

Requests during the drain: new connections are refused by the closed listening socket, a
network error after which an EventSource reconnects (WHATWG HTML §9.2.3, "reestablish the
connection") and a load balancer tries another replica. A request accepted before that but
reaching `/me/stream` after the drain began is answered `200 text/event-stream` with only the
`retry:` and `close` frames (`Drain.farewell`), and ends: an EventSource reconnects after a
200 that ends, whereas a 503 would "fail the connection" for good (WHATWG HTML §9.2.3).

Departure from sse-starlette's default (`shutdown_grace_period=0`: every stream is cancelled
at once, without a `close` frame): the cooperative shutdown of sse-starlette 3.3 (#167).
Its cost: during the drain its grace loop wakes each open response every 0.1 s.
"""

import asyncio
import logging
import math
import random

import anyio

from core.frames import encode_close
from core.types import Frame
from gateway.settings import Settings
from sync.dispatcher import Dispatcher
from sync.subscribers import Subscriber

logger = logging.getLogger(__name__)

SHUTDOWN = "shutdown"
"""The `close` reason sent to streams of a stopping gateway (PROTOCOL.md §3)."""

WATCH_INTERVAL_S = 0.5
"""How often sse-starlette's watcher looks for a shutdown, seconds (`_shutdown_watcher`)."""

SHUTDOWN_MARGIN_S = 2
"""Seconds uvicorn's graceful timeout leaves beyond the last stream's grace, for scheduling."""


def stream_grace_s(settings: Settings) -> float:
    """Seconds a stream may stay open once shutdown is detected before sse-starlette cancels
    it (`shutdown_grace_period`): the drain window, then `send_timeout_s` for its close frame
    to be accepted by the socket."""
    return settings.drain_s + settings.send_timeout_s


def server_shutdown_timeout_s(settings: Settings) -> int:
    """uvicorn's `timeout_graceful_shutdown`, whole seconds: detection, then the longest a
    stream may drain (`stream_grace_s`), then `SHUTDOWN_MARGIN_S`. sse-starlette: the grace
    "should be less than your ASGI server's graceful shutdown timeout". Keep an orchestrator's
    kill deadline (Kubernetes `terminationGracePeriodSeconds`, default 30 s) above it."""
    return math.ceil(WATCH_INTERVAL_S + stream_grace_s(settings)) + SHUTDOWN_MARGIN_S


class Drain:
    """The open streams of one gateway process, and their closing on shutdown.

    `track` each stream's subscriber when it is created and `untrack` it when its response
    ends. `shutdown_event` is the `anyio.Event` to hand every response as sse-starlette's
    `shutdown_event`; `run(stop)` waits for it and then calls `begin`. `drain_s` (seconds,
    >= 0; ValueError otherwise) is the window the closes are spread over; `rng` makes the
    spread reproducible. Create it inside the event loop (anyio needs the running backend).
    """

    def __init__(
        self, dispatcher: Dispatcher, drain_s: float, *, rng: random.Random | None = None
    ) -> None:
        if drain_s < 0:
            raise ValueError(f"drain_s must be >= 0 s, got {drain_s}")
        self.dispatcher = dispatcher
        self.drain_s = drain_s
        self.shutdown_event = anyio.Event()
        self.draining = False
        self._streams: set[Subscriber] = set()
        self._rng = rng or random.Random()

    def __len__(self) -> int:
        return len(self._streams)

    def track(self, subscriber: Subscriber) -> None:
        """Count a new stream in; during the drain it is closed at once."""
        self._streams.add(subscriber)
        if self.draining:
            self._close(subscriber)

    def untrack(self, subscriber: Subscriber) -> None:
        """The stream's response has ended (closed by anyone, or its client left)."""
        self._streams.discard(subscriber)
        if self.draining and not self._streams:
            logger.info("drain complete: every stream is closed")

    def farewell(self) -> Frame:
        """The whole body of a stream refused during the drain: a jittered `retry:` frame and
        `event: close` `{"reason": "shutdown"}` (PROTOCOL.md §3)."""
        return self.dispatcher.retry_frame() + encode_close(SHUTDOWN)

    async def run(self, stop: asyncio.Event) -> None:
        """Wait until shutdown is detected, then `begin`; return early when `stop` is set."""
        shutdown = asyncio.ensure_future(self.shutdown_event.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({shutdown, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (shutdown, stopper):
            task.cancel()
        await asyncio.gather(shutdown, stopper, return_exceptions=True)
        if self.shutdown_event.is_set():
            self.begin()

    def begin(self) -> None:
        """Schedule the close of every open stream over `[0, drain_s)` (the module docstring,
        step 3) without waiting. Calling it again does nothing."""
        if self.draining:
            return
        self.draining = True
        streams = list(self._streams)
        self._rng.shuffle(streams)
        logger.info("shutting down: closing %d streams over %.1f s", len(streams), self.drain_s)
        loop = asyncio.get_running_loop()
        slice_s = self.drain_s / len(streams) if streams else 0.0
        for index, subscriber in enumerate(streams):
            loop.call_later((index + self._rng.random()) * slice_s, self._close, subscriber)

    def _close(self, subscriber: Subscriber) -> None:
        if subscriber in self._streams:
            self.dispatcher.disconnect(subscriber, SHUTDOWN)
