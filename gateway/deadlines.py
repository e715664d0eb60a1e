"""Each open stream's deadlines, checked by one sweep a second rather than timers per stream.

Two deadlines per stream:
- send timeout: a stream whose socket accepts nothing for `send_timeout_s` while data waits is
  ended (PROTOCOL.md §4 Isolation: a client that stopped reading must not hold the gateway's
  memory or a task forever). Each write records when it began (`Stream.writing_since`, one
  clock read) and clears it when the socket took the bytes;
- token expiry: at its token's `exp` a stream ends with `event: close` `token_expired`
  (PROTOCOL.md §3).

`Deadlines.sweep`, run every `SWEEP_INTERVAL_S` by the runtime, acts on both. An
`asyncio.timeout` around each write cost 8 % of a saturated gateway's CPU in the broadcast
benchmark, and a `call_later` handle per stream 0.6 KB of its memory (bench/RESULTS.md).
"""

import time
from typing import Protocol

SWEEP_INTERVAL_S = 1.0
"""How often `sweep` runs, seconds: a deadline is acted on within this much after it passed."""

SEND_TIMEOUT = "send_timeout"
"""Disconnect reason of a stream whose socket accepted nothing for `send_timeout_s` while data
waited (PROTOCOL.md §4 Isolation)."""


class Stream(Protocol):
    """An open stream, as the sweep sees it."""

    writing_since: float
    """`time.monotonic()` when the write in flight began, seconds; 0.0 while none is."""
    expires_at: float
    """When the stream's token expires, epoch seconds."""

    def abort(self, reason: str) -> None:
        """End the stream now with `reason` (the write in flight is cancelled)."""

    def expire(self) -> None:
        """End the stream with `event: close` `token_expired` (once; later calls do nothing)."""


class Deadlines:
    """The open streams of one process, and the sweep over their deadlines.

    `send_timeout_s` must be > 0 (ValueError otherwise). `add` a stream when its response
    starts and `discard` it when the response ends.
    """

    def __init__(self, send_timeout_s: float) -> None:
        if send_timeout_s <= 0:
            raise ValueError(f"send_timeout_s must be > 0, got {send_timeout_s}")
        self.send_timeout_s = send_timeout_s
        self._streams: set[Stream] = set()

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: Stream) -> None:
        """Watch `stream` from now on."""
        self._streams.add(stream)

    def discard(self, stream: Stream) -> None:
        """Stop watching `stream` (unknown streams are ignored)."""
        self._streams.discard(stream)

    def sweep(self, monotonic: float | None = None, epoch: float | None = None) -> int:
        """Abort with `SEND_TIMEOUT` every stream whose write in flight began `send_timeout_s`
        or more before `monotonic` (default `time.monotonic()`), and `expire` every other one
        whose token expired by `epoch` (default `time.time()`). Returns how many were aborted
        or expired."""
        stuck_before = (time.monotonic() if monotonic is None else monotonic) - self.send_timeout_s
        now = time.time() if epoch is None else epoch
        stuck = [s for s in self._streams if 0.0 < s.writing_since <= stuck_before]
        for stream in stuck:
            self._streams.discard(stream)
            stream.abort(SEND_TIMEOUT)
        expired = [s for s in self._streams if s.expires_at <= now]
        for stream in expired:
            stream.expire()
        return len(stuck) + len(expired)
