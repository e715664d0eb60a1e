"""The relay barrier of wal ingest mode: wait until everything a snapshot saw has a position.

In wal mode the relay gives positions after commit (sync/wal.py), so a snapshot may see
transactions that have no position yet; their access changes reach the dispatcher later, at
positions past the snapshot's largest one. A reader that must know the state *at a position*
(a connect that installs a user's access, a workspace loaded mid-stream) writes a barrier row
after its snapshot and waits for the relay to position it: the barrier's transaction began
after the snapshot, so its commit record follows the commit record of every transaction the
snapshot saw, and the relay positions in that order. Every transaction the snapshot saw thus
has a position below the barrier's, and its access images can be replayed from Postgres or the
dispatcher's window. The row is an internal event (`core.events.BARRIER_TYPE`): never
delivered, pruned with the rest of the outbox.

In trigger mode no barrier is needed: positions are drawn at commit.
"""

import asyncio
import logging

import asyncpg
import nanoid

from core.events import BARRIER_TYPE
from core.types import Connection

logger = logging.getLogger(__name__)

BARRIER_WAIT_S = 2.0
"""Longest wait for the relay to position a barrier, seconds; past it the caller goes on
without (as when the dispatcher cannot catch up: sync/access_cache.py)."""

_INSERT = (
    "INSERT INTO outbox (type, resource_type, action, entity_id, user_id)"
    " VALUES ($1, 'barrier', 'create', $2, 'userstream') RETURNING id"
)
_POSITION = "SELECT seq FROM outbox WHERE id = $1"


class RelayBarrier:
    """The barriers of one pool (`wait`). Callers that arrive before a barrier row is written
    share it (its INSERT starts after each of their snapshots), so a connect storm writes one
    row per round trip, not one per connect. `timeout_s`: see `wait`."""

    def __init__(self, pool: asyncpg.Pool, timeout_s: float = BARRIER_WAIT_S) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self.forming: asyncio.Future[int | None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def wait(self) -> int | None:
        """Write a barrier row (or join one not yet written) and return its position once the
        relay gave it one: every transaction committed before this call has a smaller
        position. None when the relay did not position it within `timeout_s` seconds (relay
        down or held back). Raises what asyncpg raises when Postgres fails."""
        if self.forming is None:
            self.forming = asyncio.get_running_loop().create_future()
            task = asyncio.get_running_loop().create_task(self._write(self.forming))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(self.forming)

    async def _write(self, done: "asyncio.Future[int | None]") -> None:
        try:
            async with self.pool.acquire() as conn:
                self.forming = None  # callers from now on may hold later snapshots
                row_id = await conn.fetchval(_INSERT, BARRIER_TYPE, nanoid.generate(size=12))
                done.set_result(await _positioned(conn, row_id, self.timeout_s))
        except BaseException as exc:
            if self.forming is done:
                self.forming = None
            if not done.done():
                done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise


async def _positioned(conn: Connection, row_id: int, timeout_s: float) -> int | None:
    delay = 0.0005
    try:
        async with asyncio.timeout(timeout_s):
            while (seq := await conn.fetchval(_POSITION, row_id)) is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
    except TimeoutError:
        logger.info("relay barrier not positioned within %.1f s: going on", timeout_s)
        return None
    return int(seq)
