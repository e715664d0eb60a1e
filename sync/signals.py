"""The signal fan-out: one per gateway process, it hands the bus's ephemeral signals to the
connections §2 routes them to (PROTOCOL.md §5).

Every replica reads every signal from the bus (`Bus.signals`), the replica that accepted it
included, and delivers it to its own live subscribers: those on the signal's one channel
(`core.channels.channel_for`) whom `core.access.can_receive` allows, judged against the access
state as it stands when the signal arrives (the dispatcher's, at its position), except the
sender's own connections (`Signal.actor_id`). The frame (`core.frames.encode_ephemeral`, no
`id:` line) is encoded once and queued to each; a subscriber whose buffer is full is cut off
as a slow consumer, as for changes (PROTOCOL.md §4 Isolation).

Only registered subscribers receive signals, and a stream is registered at the moment its
`offset` frame is queued (sync/catchup.py `_go_live`): a stream still catching up is not sent
the signals that arrive meanwhile (they are not queued for later), and the first signal it
gets follows its `offset` frame. Signals are never held anywhere, so no catch-up, no recent
window and no resume replays one.
"""

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from core.access import can_receive
from core.channels import channel_for
from core.frames import encode_ephemeral
from core.signals import Signal
from core.types import Frame
from sync import metrics
from sync.bus import Bus
from sync.dispatcher import Dispatcher
from sync.subscribers import Subscriber
from sync.waits import wait_any

logger = logging.getLogger(__name__)

RESTART_BASE_S = 0.1
RESTART_CAP_S = 5.0
"""Pause before reading one of the bus's iterators again after it failed or ended, seconds:
doubling from RESTART_BASE_S up to RESTART_CAP_S, with up to as much again at random."""


async def keep_reading(
    consume: Callable[[], Awaitable[None]], stop: asyncio.Event, what: str
) -> None:
    """Run `consume` (which reads one of the bus's iterators to its end) until `stop` is set,
    running it again after it fails (logged, naming `what`) or ends (bus closed), after a
    pause of RESTART_BASE_S doubling up to RESTART_CAP_S, jittered (centrifuge
    `runForever`: the restart sits around the loop, not inside it)."""
    delay_s = RESTART_BASE_S
    while not stop.is_set():
        reader = asyncio.ensure_future(consume())
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (reader, stopper):
            task.cancel()
        await asyncio.gather(reader, stopper, return_exceptions=True)
        if stop.is_set():
            return
        if reader in done and not reader.cancelled() and reader.exception() is not None:
            logger.warning("reading %s failed: %r", what, reader.exception())
        pause_s = delay_s * (1 + random.random())
        delay_s = min(delay_s * 2, RESTART_CAP_S)
        await wait_any((stop,), pause_s)


FLUSH_DELAY_S = 0.005
"""How long a signal's frame may wait in a subscriber's queue for the next ones, seconds.
Signals come one per bus message, each in a step of its own: flushed at once, every signal
would cost one socket write per reader (the bench's `signals` scenario spent a third of the
gateway's time there); 5 ms lets the signals of a busy stream share writes."""


class SignalFanOut:
    """Delivers signals from `bus` to the subscribers of `dispatcher` (its manager, access
    cache and slow-consumer handling); see the module docstring."""

    def __init__(self, bus: Bus, dispatcher: Dispatcher) -> None:
        self.bus = bus
        self.dispatcher = dispatcher
        self.delivered = 0
        self._unflushed: dict[Subscriber, None] = {}
        """Subscribers given frames since the last flush, each once (an ordered set)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver every signal from the bus until `stop` is set; read again after the
        iterator fails or ends (bus closed), with jittered backoff (`keep_reading`)."""
        await keep_reading(self._consume, stop, "signals")

    async def _consume(self) -> None:
        async for signal in self.bus.signals():
            self.deliver(signal)

    def deliver(self, signal: Signal) -> int:
        """Queue `signal`'s frame to every subscriber that may receive it now, except the
        sender's, to be flushed within FLUSH_DELAY_S; return how many got it. Never awaits."""
        dispatcher = self.dispatcher
        subscribers = dispatcher.manager.get_by_channel(channel_for(signal))
        if not subscribers:
            return 0
        state = dispatcher.cache.state
        sender = signal.actor_id
        frame: Frame | None = None
        delivered = 0
        slow: list[Subscriber] = []
        for subscriber in subscribers:
            if subscriber.user_id == sender:
                continue
            if not can_receive(state, subscriber.user_id, signal, admin=subscriber.admin):
                continue
            if frame is None:
                frame = encode_ephemeral(signal)
            if subscriber.queue(frame):
                self._flush_later(subscriber)
                delivered += 1
            else:
                slow.append(subscriber)
        self.delivered += delivered
        metrics.SIGNAL_FRAMES.inc(delivered)
        for subscriber in slow:
            dispatcher.cut_off(subscriber)
        return delivered

    def _flush_later(self, subscriber: Subscriber) -> None:
        if not self._unflushed:
            asyncio.get_running_loop().call_later(FLUSH_DELAY_S, self._flush)
        self._unflushed[subscriber] = None

    def _flush(self) -> None:
        unflushed, self._unflushed = self._unflushed, {}
        for subscriber in unflushed:
            subscriber.flush()
