"""Waiting on several `asyncio.Event`s at once, with a timeout: the pause of every loop that a
stop (or a wake-up) must cut short (the relay's, presence's, the signal readers')."""

import asyncio
from collections.abc import Iterable


async def wait_any(events: Iterable[asyncio.Event], timeout_s: float) -> None:
    """Return when one of `events` is set or after `timeout_s` seconds (at once if <= 0),
    whichever is first. Never raises but cancellation."""
    events = list(events)
    if timeout_s <= 0 or any(event.is_set() for event in events):
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
