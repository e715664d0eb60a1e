"""Each open stream's deadlines, checked by one sweep a second rather than timers per stream.

Three deadlines per stream:
- send timeout: a stream whose socket accepts nothing for `send_timeout_s` while data waits is
  ended (PROTOCOL.md §4 Isolation: a client that stopped reading must not hold the gateway's
  memory or a task forever). Each write records when it began (`Stream.writing_since`, one
  clock read) and clears it when the socket took the bytes;
- token expiry: at its token's `exp` a stream ends with `event: close` `token_expired`
  (PROTOCOL.md §3);
- credential re-check (forward auth): `credentials` gives the runtime what to ask the auth
  service again, and `apply` ends the streams of a revoked credential with `event: close`
  `unauthorized` and moves the expiry of a renewed one.

`Deadlines.sweep`, run every `SWEEP_INTERVAL_S` by the runtime, acts on both. An
`asyncio.timeout` around each write cost 8 % of a saturated gateway's CPU in the broadcast
benchmark, and a `call_later` handle per stream 0.6 KB of its memory (bench/RESULTS.md).
"""

import time
from collections.abc import Mapping
from typing import Protocol

from gateway.auth import Principal

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
    user_id: str
    """Whose stream it is."""
    credential: str | None
    """The key of the credential it was opened with (`Principal.credential`), if re-checked."""

    def abort(self, reason: str) -> None:
        """End the stream now with `reason` (the write in flight is cancelled)."""

    def expire(self) -> None:
        """End the stream with `event: close` `token_expired` (once; later calls do nothing)."""

    def revoke(self) -> None:
        """End the stream with `event: close` `unauthorized` (once; later calls do nothing)."""


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

    def credentials(self) -> set[str]:
        """The credential keys of the streams opened with one (`Stream.credential`)."""
        return {s.credential for s in self._streams if s.credential is not None}

    def apply(self, verdicts: Mapping[str, Principal | None]) -> int:
        """Act on fresh decisions about credentials (`Authenticator.recheck`): `revoke` every
        stream whose credential is refused (None) or now names another user; move the expiry
        of the others to the principal's. Returns how many streams were revoked."""
        revoked = 0
        for stream in list(self._streams):
            key = stream.credential
            if key is None or key not in verdicts:
                continue
            principal = verdicts[key]
            if principal is None or principal.user_id != stream.user_id:
                self._streams.discard(stream)
                stream.revoke()
                revoked += 1
            else:
                stream.expires_at = principal.expires_at
        return revoked

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
