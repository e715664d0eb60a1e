"""The access of users who send signals, for the sender's check of PROTOCOL.md §5 (403).

A signal is judged "as of now" against the gateway's in-memory access state, the dispatcher's
`AccessCache`, with no query per signal. A sender with a stream open on this gateway is in it
already. Any other sender (their stream is on another replica, or they have none) has their
access loaded into the cache the way a connect loads it (sync/catchup.py: one snapshot, the
dispatcher brought to its position, `AccessCache.install`), and held there as one more
connection of theirs for `hold_s` after their last signal, so that a burst of typing signals
costs one load; the event flow keeps the held state current meanwhile. `sweep` releases the
holds that expired. A held sender counts among the cache's users (`/admin/status` "users").
"""

import asyncio
import time
from collections.abc import Callable

from core.access import AccessState
from sync.access_cache import AccessCache
from sync.catchup import install_access
from sync.dispatcher import Dispatcher

HOLD_S = 60.0
"""Seconds a sender's loaded access stays held after their last signal."""


class SenderAccess:
    """Loads and holds senders' access in `dispatcher.cache` (see the module docstring).

    `hold_s` must be > 0 (ValueError otherwise); `clock` gives monotonic seconds.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        hold_s: float = HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if hold_s <= 0:
            raise ValueError(f"hold_s must be > 0, got {hold_s}")
        self.dispatcher = dispatcher
        self.hold_s = hold_s
        self._clock = clock
        self._held: dict[str, tuple[AccessCache, float]] = {}
        """User id -> the cache their access is installed in, and when the hold ends."""
        self._loading: dict[str, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._held)

    async def state_for(self, user_id: str) -> AccessState:
        """The dispatcher's access state, holding `user_id`'s access: loaded first when the
        gateway does not hold it (one load per user at a time, shared by concurrent calls).

        Raises AccessLoadFailed or the Postgres errors of `sync.faults.SERVICE_FAULTS` when
        it cannot be loaded.
        """
        cache = self.dispatcher.cache
        held = self._held.get(user_id)
        if held is not None and held[0] is cache:
            self._held[user_id] = (cache, self._clock() + self.hold_s)
            return cache.state
        if held is not None:
            del self._held[user_id]  # the dispatcher resynced: the hold went with its cache
        if user_id in cache.state.users:
            return cache.state  # a stream of theirs holds it
        pending = self._loading.get(user_id)
        if pending is None:
            pending = asyncio.ensure_future(self._load(user_id))
            self._loading[user_id] = pending
            pending.add_done_callback(lambda done: self._loaded(user_id, done))
        await asyncio.shield(pending)
        return self.dispatcher.cache.state

    def sweep(self) -> None:
        """Release every hold that ended (a sender silent for `hold_s`)."""
        now = self._clock()
        current = self.dispatcher.cache
        for user_id, (cache, until) in list(self._held.items()):
            if until <= now:
                del self._held[user_id]
                if cache is current:
                    cache.release(user_id)

    async def _load(self, user_id: str) -> None:
        """Install `user_id`'s access as a connect does (`sync.catchup.install_access`), then
        hold it."""
        cache, _, _ = await install_access(self.dispatcher, user_id)
        self._held[user_id] = (cache, self._clock() + self.hold_s)

    def _loaded(self, user_id: str, done: asyncio.Future[None]) -> None:
        if self._loading.get(user_id) is done:
            del self._loading[user_id]
        if not done.cancelled():
            done.exception()  # retrieved here too: a caller that went away never reads it
