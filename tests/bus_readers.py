"""`Reader`: reads a bus in a task of its own and records what it gets, for tests of buses and
of what relays publish. The `readers` fixture (tests/conftest.py) starts them and stops them
at teardown."""

import asyncio
import contextlib

import pytest

from core.events import Event
from sync.bus import Batch, Bus

WAIT_S = 10.0
"""How long a test waits for a reader to reach a position before it fails (not a timing check)."""


class Reader:
    """Iterates `bus.read(after)` in a task of its own, recording every batch it gets."""

    def __init__(self, bus: Bus, after: int = 0) -> None:
        self.batches: list[Batch] = []
        self.task = asyncio.create_task(self._consume(bus, after))

    async def _consume(self, bus: Bus, after: int) -> None:
        async for item in bus.read(after):
            self.batches.append(item)

    @property
    def position(self) -> int:
        """The last position received (0 before the first batch)."""
        return self.batches[-1].last if self.batches else 0

    def events(self) -> list[Event]:
        """Every event once, in bus order; a position already received is skipped, as readers
        do when a relay that took over publishes a page again."""
        seen, out = 0, []
        for item in self.batches:
            for event in item.events:
                if event.seq > seen:
                    out.append(event)
                    seen = event.seq
        return out

    def entity_ids(self) -> list[str]:
        """The entity ids of `events()`, in bus order."""
        return [event.entity_id for event in self.events()]

    async def reach(self, position: int) -> None:
        """Wait until a batch ending at or past `position` came (fails after WAIT_S)."""
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while self.position < position:
            if self.task.done():
                self.task.result()
                raise AssertionError(f"reader ended at {self.position}, before {position}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"reader at {self.position}, not at {position} in {WAIT_S}s")
            await asyncio.sleep(0.01)

    async def ended(self) -> None:
        """Wait until the iterator ended by itself (fails after WAIT_S or if it raised)."""
        done, _ = await asyncio.wait({self.task}, timeout=WAIT_S)
        assert self.task in done, f"reader still running {WAIT_S}s after the bus closed"
        self.task.result()

    async def stop(self) -> None:
        """Cancel the task and wait for it."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def wait_for_record(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Wait until a log record containing `text` was emitted (fails after WAIT_S)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not any(text in record.getMessage() for record in caplog.records):
        assert asyncio.get_running_loop().time() < deadline, f"no log record with {text!r}"
        await asyncio.sleep(0.01)
