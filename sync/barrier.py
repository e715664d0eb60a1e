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

logger = logging.getLogger(__name__)

BARRIER_WAIT_S = 2.0
"""Longest wait for the relay to position a barrier, seconds; past it the caller goes on
without (as when the dispatcher cannot catch up: sync/access_cache.py)."""

_INSERT = (
    "INSERT INTO outbox (type, resource_type, action, entity_id, user_id)"
    " VALUES ($1, 'barrier', 'create', $2, 'userstream') RETURNING id"
)
_POSITION = "SELECT seq FROM outbox WHERE id = $1"


async def relay_barrier(pool: asyncpg.Pool, timeout_s: float = BARRIER_WAIT_S) -> int | None:
    """Write a barrier row and return its position once the relay gave it one: every
    transaction committed before this call has a smaller position. None when the relay did
    not position it within `timeout_s` seconds (relay down or held back). Raises what asyncpg
    raises when Postgres fails."""
    async with pool.acquire() as conn:
        row_id = await conn.fetchval(_INSERT, BARRIER_TYPE, nanoid.generate(size=12))
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
