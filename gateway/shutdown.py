"""Graceful shutdown of a gateway process: close every stream, spread over a drain window.

On SIGTERM the process stops in uvicorn's order (STYLE.md §7), without a gap for any client:

1. uvicorn's signal handler sets `Server.should_exit`; within one tick (0.1 s) uvicorn closes
   its listening sockets (no new connections) and closes idle keep-alive connections.
2. `Drain.install_signal_handlers`, called from the lifespan startup (uvicorn installs its own
   handlers just before it), chained a handler in front of uvicorn's: the same signal wakes
   `Drain.run` at once, no polling.
3. `Drain.begin` closes each stream of this process with `Dispatcher.disconnect(subscriber,
   "shutdown")`: a jittered `retry:` and `event: close` `{"reason": "shutdown"}` (PROTOCOL.md
   §3). The closes are spread over `[0, drain_s)`: the streams, in random order, get one
   random instant in each of `n` equal slices of the window, so their reconnects reach the
   other replicas at an even rate instead of all at once (FIELD-NOTES §2 "Reconnect storms").
   Until its turn a stream stays live: the dispatcher runs until the lifespan shutdown.
4. A response ends once its close frame is written, or `send_timeout_s` (plus at most the
   one-second sweep of `gateway.deadlines`) after its socket stopped accepting (a client that
   stopped reading); `SHUTDOWN_MARGIN_S` covers the sweep.
5. With every connection closed, uvicorn runs the lifespan shutdown (`Runtime.close`: tasks,
   bus, pool), then re-raises the SIGTERM it caught; `userstream serve` exits with status 0.
   Its `timeout_graceful_shutdown` is `server_shutdown_timeout_s`, longer than all of the above.

Streams are not closed from the lifespan shutdown: uvicorn runs it only after every connection
has closed (`Server.shutdown`), so a stream waiting for it would hold the process until the
graceful timeout (FIELD-NOTES §1, §2; uvicorn PR #2829, which sent `http.disconnect` to
streams on shutdown, was reverted in #2913). The chained signal handler is the notice of
shutdown an app gets before that.

Requests during the drain: new connections are refused by the closed listening socket, a
network error after which an EventSource reconnects (WHATWG HTML §9.2.3, "reestablish the
connection") and a load balancer tries another replica. A request accepted before that but
reaching `/me/stream` after the drain began is answered `200 text/event-stream` with only the
`retry:` and `close` frames (`Drain.farewell`), and ends: an EventSource reconnects after a
200 that ends, whereas a 503 would "fail the connection" for good (WHATWG HTML §9.2.3).
"""

import asyncio
import contextlib
import logging
import math
import random
import signal
from collections.abc import Callable
from types import FrameType

from core.frames import encode_close
from core.types import Frame
from gateway.settings import Settings
from sync.dispatcher import Dispatcher
from sync.subscribers import Subscriber

logger = logging.getLogger(__name__)

_Handler = Callable[[int, FrameType | None], object]

SHUTDOWN = "shutdown"
"""The `close` reason sent to streams of a stopping gateway (PROTOCOL.md §3)."""

SHUTDOWN_MARGIN_S = 2
"""Seconds uvicorn's graceful timeout leaves beyond the last stream's close, for scheduling."""

SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""The signals that start the drain (the ones uvicorn handles)."""


def server_shutdown_timeout_s(settings: Settings) -> int:
    """uvicorn's `timeout_graceful_shutdown`, whole seconds: the drain window, then
    `send_timeout_s` for the last close frame to be accepted by its socket, then
    `SHUTDOWN_MARGIN_S`. Keep an orchestrator's kill deadline (Kubernetes
    `terminationGracePeriodSeconds`, default 30 s) above it."""
    return math.ceil(settings.drain_s + settings.send_timeout_s) + SHUTDOWN_MARGIN_S


class Drain:
    """The open streams of one gateway process, and their closing on shutdown.

    `track` each stream's subscriber when it is created and `untrack` it when its response
    ends. `run(stop)` waits for `shutdown_event` (set by the signal handlers
    `install_signal_handlers` chains) and then calls `begin`. `drain_s` (seconds, >= 0;
    ValueError otherwise) is the window the closes are spread over; `rng` makes the spread
    reproducible.
    """

    def __init__(
        self, dispatcher: Dispatcher, drain_s: float, *, rng: random.Random | None = None
    ) -> None:
        if drain_s < 0:
            raise ValueError(f"drain_s must be >= 0 s, got {drain_s}")
        self.dispatcher = dispatcher
        self.drain_s = drain_s
        self.shutdown_event = asyncio.Event()
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

    def install_signal_handlers(self) -> None:
        """In front of the current SIGTERM and SIGINT handlers (uvicorn's `handle_exit` while
        it serves), put one that sets `shutdown_event` and then calls the previous handler.
        Call it from the event loop's thread; does nothing outside the main thread (signal
        handlers can only be set there) or for a signal with no Python handler to chain."""
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(
                signum: int, frame: FrameType | None, previous: _Handler = previous
            ) -> None:
                loop.call_soon_threadsafe(self.shutdown_event.set)
                previous(signum, frame)

            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(sig, handler)

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
