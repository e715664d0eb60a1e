"""`SignalReader`: reads a bus's ephemeral signals in a task of its own, for tests of buses.

A subscription starts a moment after its iterator's first step (over Redis, once SUBSCRIBE is
answered), and pub/sub keeps nothing for a subscriber that is not there yet, so a test first
waits with `subscribed` until probe signals reach every reader, then publishes what it checks;
`signals` leaves the probes out.
"""

import asyncio
import contextlib
import itertools

from core.signals import Signal
from sync.bus import Bus
from tests.bus_readers import WAIT_S

PROBE_TYPE = "test.probe"
"""`type` of the signals `subscribed` publishes."""

_probes = itertools.count(1)


def make_signal(**fields: str | None) -> Signal:
    """A typing signal in w1/s1 from u1 with `{"on": true}` data; `fields` replace any field."""
    values: dict[str, str | None] = {
        "type": "typing",
        "workspace_id": "w1",
        "stream_id": "s1",
        "user_id": None,
        "actor_id": "u1",
        "data": '{"on":true}',
        "at": "2026-12-05T10:00:00.123Z",
    }
    values.update(fields)
    return Signal(**values)  # type: ignore[arg-type]


class SignalReader:
    """Iterates `bus.signals()` in a task of its own, recording every signal it gets."""

    def __init__(self, bus: Bus) -> None:
        self.received: list[Signal] = []
        self.task = asyncio.create_task(self._consume(bus))

    async def _consume(self, bus: Bus) -> None:
        async for signal in bus.signals():
            self.received.append(signal)

    def signals(self) -> list[Signal]:
        """What was received, probes left out, in order."""
        return [s for s in self.received if s.type != PROBE_TYPE]

    async def wait_for(self, count: int) -> None:
        """Wait until `count` signals other than probes came (fails after WAIT_S)."""
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while len(self.signals()) < count:
            if self.task.done():
                self.task.result()
                raise AssertionError(f"reader ended with {self.signals()}")
            assert asyncio.get_running_loop().time() < deadline, f"got only {self.signals()}"
            await asyncio.sleep(0.01)

    async def ended(self) -> None:
        """Wait until the iterator ended by itself (fails after WAIT_S or if it raised)."""
        done, _ = await asyncio.wait({self.task}, timeout=WAIT_S)
        assert self.task in done, f"signal reader still running {WAIT_S}s after the bus closed"
        self.task.result()

    async def stop(self) -> None:
        """Cancel the task and wait for it."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def subscribed(bus: Bus, *readers: SignalReader) -> None:
    """Publish probe signals until every reader got one of them: from then on, each reader
    receives whatever is published. Fails after WAIT_S."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    sent: set[str | None] = set()
    while not all(
        any(s.type == PROBE_TYPE and s.data in sent for s in r.received) for r in readers
    ):
        assert asyncio.get_running_loop().time() < deadline, "readers never subscribed"
        probe = make_signal(type=PROBE_TYPE, data=str(next(_probes)))
        sent.add(probe.data)
        await bus.publish_signal(probe)
        await asyncio.sleep(0.02)
