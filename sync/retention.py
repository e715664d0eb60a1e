"""Retention of the outbox: deleting old rows in small batches, and the pruning watermark.

`prune_batch(conn, ...)` is one step. In a single statement it deletes at most `batch_size`
committed rows whose `committed_at` is more than `retention_s` seconds old, oldest first, and
raises `outbox_retention.pruned_through` (core/schema/003_retention.sql) to the largest
position it deleted, so the deletion and the watermark become visible together. Every deleted
row is at or below the watermark; a cursor below it is older than the retained history and
gets `must-refetch` (PROTOCOL.md §3, sync/catchup.py). Rows a step never deletes:

- the newest committed row, so `core.cursors.current_position` (the largest position in the
  table) never goes back, even after a long quiet period;
- rows past `upto`, the pruning relay's position: they have not reached the bus yet;
- rows of transactions not yet committed (they have no `committed_at`), and rows another
  session holds locked (`SKIP LOCKED`: the step never waits; a row skipped below the
  watermark is harmless, as no cursor below it is served).

Publishers are never blocked: a step locks only the old rows it deletes, which no publisher
touches, and never takes the commit lock of 002_outbox.sql. Keeping each step small bounds its
locks, its WAL burst and the dead tuples autovacuum reclaims after it.

`Pruner` schedules the steps inside the active relay's loop (sync/relay.py): one step every
`interval_s`, and steps back to back while they come back full (a backlog, e.g. right after
retention is first enabled), one per relay step, so relaying never waits behind a long delete.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from core.types import Connection

logger = logging.getLogger(__name__)

# Oldest first by `committed_at` (its index), which follows position order: both are drawn
# under the commit lock. Should the clock ever step back, rows are still deleted by age and
# the watermark is still the largest position deleted, so no retained cursor is affected.
_PRUNE = """
WITH doomed AS (
    SELECT seq FROM outbox
     WHERE committed_at < now() - make_interval(secs => $1::float8)
       AND seq <= $2
       AND seq < (SELECT max(seq) FROM outbox)
     ORDER BY committed_at
     LIMIT $3
       FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM outbox WHERE seq IN (SELECT seq FROM doomed) RETURNING seq
), marked AS (
    UPDATE outbox_retention
       SET pruned_through = greatest(pruned_through, (SELECT max(seq) FROM gone)),
           pruned_at = now()
     WHERE EXISTS (SELECT 1 FROM gone)
    RETURNING pruned_through
)
SELECT (SELECT count(*) FROM gone) AS deleted,
       coalesce((SELECT pruned_through FROM marked),
                (SELECT pruned_through FROM outbox_retention)) AS pruned_through
"""

_PRUNED_THROUGH = "SELECT pruned_through FROM outbox_retention"


@dataclass(frozen=True, slots=True)
class PruneResult:
    """One step's outcome: rows `deleted`, and the watermark `pruned_through` after it."""

    deleted: int
    pruned_through: int


async def prune_batch(
    conn: Connection, *, retention_s: float, batch_size: int, upto: int
) -> PruneResult:
    """Delete at most `batch_size` rows committed more than `retention_s` seconds ago, at
    positions up to `upto` and below the newest, oldest first (module docstring), and raise
    the watermark to the largest position deleted; one statement, atomic.

    Raises ValueError for `retention_s` <= 0 or `batch_size` < 1; asyncpg errors when
    Postgres fails (then nothing is deleted and the watermark is unchanged).
    """
    if not retention_s > 0:
        raise ValueError(f"retention_s must be > 0 seconds, got {retention_s}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    row = await conn.fetchrow(_PRUNE, float(retention_s), upto, batch_size)
    return PruneResult(int(row["deleted"]), int(row["pruned_through"]))


async def pruned_through(conn: Connection) -> int:
    """The pruning watermark: the largest position ever deleted by retention (0: none).

    Rows past it are all retained. It only grows, and it grows in the same transaction as the
    deletion, so a reader that reads rows past `p` and then finds `pruned_through(conn) <= p`
    knows that none of those rows had been deleted (sync/catchup.py).
    """
    return int(await conn.fetchval(_PRUNED_THROUGH))


class Pruner:
    """When to prune, and how much: the retention settings and the schedule of the steps.

    `retention_s`: age in seconds past which a committed row is deleted (> 0; default 24 h).
    `batch_size`: rows per step (>= 1). `interval_s`: seconds between steps once caught up
    (> 0). `clock`: monotonic seconds (tests may pass their own).
    `deleted` counts the rows this pruner deleted; `pruned_through` is the watermark after
    its last step (0 before the first). Raises ValueError for a value out of range.
    """

    def __init__(
        self,
        *,
        retention_s: float = 86_400.0,
        batch_size: int = 1000,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for label, value in (("retention_s", retention_s), ("interval_s", interval_s)):
            if not value > 0:
                raise ValueError(f"{label} must be > 0 seconds, got {value}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.retention_s = retention_s
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.deleted = 0
        self.pruned_through = 0
        self._clock = clock
        self._next_at = clock()

    def due(self) -> bool:
        """True when the next step should run: at first, `interval_s` after a step that
        caught up or failed, and at once after a full step."""
        return self._clock() >= self._next_at

    async def step(self, conn: Connection, upto: int) -> bool:
        """Run one `prune_batch` on `conn`, keeping rows past `upto` (the caller's relay
        position); True when the batch came back full, so another step is due at once.

        Raises what `prune_batch` raises; the next step is then due `interval_s` later.
        """
        self._next_at = self._clock() + self.interval_s
        result = await prune_batch(
            conn, retention_s=self.retention_s, batch_size=self.batch_size, upto=upto
        )
        self.deleted += result.deleted
        self.pruned_through = result.pruned_through
        if result.deleted:
            logger.debug(
                "outbox: pruned %d rows, history now starts after position %d",
                result.deleted,
                result.pruned_through,
            )
        full = result.deleted == self.batch_size
        if full:
            self._next_at = self._clock()
        return full
