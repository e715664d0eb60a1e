"""The outbox relay: committed outbox rows to the bus, in commit order, by one active relay.

`OutboxRelay.run(stop)` is a loop around one testable step, `relay_once()`, in the style of
arq's `main()` / `_poll_iteration()` (STYLE.md §7):

1. Connect on a dedicated connection (FIELD-NOTES §3) and become the active relay by the
   advisory lock of `sync.leader`, or stay standby and try again every `standby_retry_s`.
2. As leader, load the durable position from `outbox_relay` and LISTEN on
   `core.schema.migrations.NOTIFY_CHANNEL` (the commit trigger's wake-up hint).
3. Step: read one page after the position (`sync.outbox.read_page`, which owns the commit-order
   rule), keep malformed rows in `outbox_dead_letters`, publish the events as one `Batch`
   whose `prev` is the position before the page, then record the page's last position.
4. With a `sync.retention.Pruner`, prune one batch of old outbox rows when it is due (only
   the active relay prunes, on its own connection, never past its own position).
5. After a full page (or a full pruning batch), step again at once; otherwise wait for a
   NOTIFY or `poll_interval_s`, whichever comes first. The poll is the source of truth,
   NOTIFY only shortens the wait, and the poll query (run under `query_timeout_s`) is also
   the liveness check of the connection: asyncpg never reports a half-open one by itself
   (FIELD-NOTES §3, asyncpg#519).

Guarantees. The position advances only after the bus accepted the page (or refused it as
already published), so no row is lost or skipped. Delivery to the bus is at least once: a
page retried after a failure, or re-read by a relay that takes over before its predecessor
recorded its position, may overlap what the bus holds; the bus refuses a batch that adds
nothing, and readers skip positions they have (`sync.bus`).

Failures restart the loop, not the step (centrifuge's `runForever`), after a jittered
exponential backoff (redis-py's `EqualJitterBackoff`: base `BACKOFF_BASE_S`, capped at
`BACKOFF_CAP_S`; a bus that refuses a publish while Postgres answers is tried again after at
most `sync.wal.BUS_RETRY_S`, since gateways read the outbox until it is back), forever: a
relay outlives outages of Postgres and of the bus. After a
failure the relay keeps its connection, and so its leadership, only when that connection
still answers (the bus failed); otherwise it drops it, reconnects, competes for leadership
again, re-LISTENs and polls at once, since notifications sent meanwhile are gone.

Departures from arq: no job semantics; the step reports the rows it read, and a full page
skips the wait.

Ingest modes (core/schema/ingest.py). The above is `trigger` mode. In `wal` mode, read at each
`lead()`, step 2 opens the database's replication slot instead of LISTENing, and the step is
`sync.wal.WalIngest.step`: the slot pushes each transaction at its commit, the relay gives
positions, records them, publishes, and acknowledges the slot; there is no poll query, and
the wait is the wait for the slot's next message.
"""

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.backoff import EqualJitterBackoff

from core.cursors import format_cursor
from core.schema.ingest import database_slot, ingest_mode
from core.schema.migrations import NOTIFY_CHANNEL
from core.types import Connection
from sync import leader, metrics
from sync.bus import Batch, Bus
from sync.faults import SERVICE_FAULTS
from sync.outbox import Page, read_page, record_dead_letters
from sync.replication import REPLICATION_FAULTS
from sync.retention import Pruner
from sync.waits import wait_any
from sync.wal import BUS_RETRY_S, PgConnection, WalIngest

logger = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.1
"""Backoff after the first failure of a streak: 0.1 to 0.2 s, doubling per failure."""

BACKOFF_CAP_S = 5.0
"""Largest backoff between restarts: 2.5 to 5 s."""

LAG_INTERVAL_S = 1.0
"""While behind, how often the relay measures its lag (`relay_lag`, a count query), seconds;
in wal mode, how often it reads its slot's retained WAL and lag (`slot_status`)."""

WAL_WAIT_S = 0.2
"""In wal mode, how long one step waits for the slot's next message, seconds (bounds how long
`stop` waits for the step in progress)."""

_FAULTS = (*SERVICE_FAULTS, *REPLICATION_FAULTS)

APPLICATION_NAME_PREFIX = "userstream-relay-"
"""`application_name` of relay connections is this prefix plus the OS pid (`pg_stat_activity`)."""

_SERVER_SETTINGS = {
    # Let the server notice a vanished relay host within ~25 s and free the lock (TCP only;
    # ignored on Unix sockets). postgresql.org/docs/current/runtime-config-connection.html
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}

_ENSURE_ROW = "INSERT INTO outbox_relay (name) VALUES ($1) ON CONFLICT (name) DO NOTHING"
_LOAD_POSITION = "SELECT position FROM outbox_relay WHERE name = $1"
# `greatest`: a position never moves back, even if a deposed leader wrote late.
_SAVE_POSITION = (
    "UPDATE outbox_relay SET position = greatest(position, $2), updated_at = now() WHERE name = $1"
)
_POSITION_ROW = "SELECT position, assigned, updated_at FROM outbox_relay WHERE name = $1"
_LAG = """
SELECT count(*) AS rows,
       coalesce(greatest(extract(epoch FROM clock_timestamp() - min(committed_at)), 0), 0)::float8
           AS seconds
  FROM outbox
 WHERE seq > coalesce((SELECT position FROM outbox_relay WHERE name = $1), 0)
"""


class OutboxRelay:
    """Moves outbox rows to `bus` (see the module docstring); one per process at most.

    `dsn`: Postgres DSN. `name`: the `outbox_relay` row holding this relay's position (relays
    of different names keep separate positions but share one leadership lock). `batch_size`:
    rows per step, >= 1 (a page completes its last transaction, so it may hold more).
    `poll_interval_s`, `standby_retry_s`, `query_timeout_s`: seconds, > 0; `query_timeout_s`
    bounds every query and the connect, and so how long a dead connection goes unnoticed
    while a query runs. `listen=False`: no LISTEN, polling only. `pruner`: the outbox
    retention to apply while leading (`prune_once`); None: the outbox is never pruned.

    `is_leader` is True while this relay holds the lock; `position` is the last position it
    published (valid once leader); `dead_letters` counts the malformed rows this relay moved
    past (each kept in `outbox_dead_letters`). Raises ValueError for a value out of range.
    """

    def __init__(
        self,
        dsn: str,
        bus: Bus,
        *,
        name: str = "default",
        batch_size: int = 500,
        poll_interval_s: float = 1.0,
        standby_retry_s: float = 1.0,
        listen: bool = True,
        query_timeout_s: float = 5.0,
        pruner: Pruner | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for label, value in (
            ("poll_interval_s", poll_interval_s),
            ("standby_retry_s", standby_retry_s),
            ("query_timeout_s", query_timeout_s),
        ):
            if not value > 0:
                raise ValueError(f"{label} must be > 0 seconds, got {value}")
        self.dsn = dsn
        self.bus = bus
        self.name = name
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.standby_retry_s = standby_retry_s
        self.listen = listen
        self.query_timeout_s = query_timeout_s
        self.pruner = pruner
        self.is_leader = False
        self.position = 0
        self.dead_letters = 0
        self._conn: asyncpg.Connection[Any] | None = None
        self._wake = asyncio.Event()
        self._standby = False
        self._failures = 0
        self._lag_measured = 0.0
        self._backoff = EqualJitterBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)
        self.wal: WalIngest | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set, standing by while another relay leads.

        Any failure restarts the loop after a backoff (module docstring); nothing is raised
        but cancellation. On `stop` the current step finishes, then the lock is released and
        the connection closed; cancellation closes them too.
        """
        try:
            while not stop.is_set():
                try:
                    if await self._await_leadership(stop):
                        await self._relay_until(stop)
                except Exception as exc:
                    delay = await self._recover(exc)
                    await wait_any((stop,), delay)
        finally:
            await self.close()

    async def _await_leadership(self, stop: asyncio.Event) -> bool:
        while not stop.is_set():
            if await self.lead():
                return True
            self._failures = 0
            await wait_any((stop,), self.standby_retry_s)
        return False

    async def _relay_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            rows = await self.relay_once()
            more = await self.prune_once()
            self._failures = 0
            if self.wal is None and rows < self.batch_size and not more:
                await wait_any((stop, self._wake), self.poll_interval_s)
        if self.wal is not None:
            await self.wal.flush()

    async def lead(self) -> bool:
        """Connect if needed and try once to become the active relay; True when leader.

        On success: the `outbox_relay` row exists, `position` is loaded from it, the
        connection LISTENs (unless `listen=False`) and the next step will run at once; in wal
        mode, the slot is open instead (`WalIngest.start`, which may bootstrap it).
        Raises asyncpg/OS errors or TimeoutError (after `query_timeout_s`) when Postgres
        is unreachable; `run` then drops the connection, which frees a lock taken before
        the failure (a direct caller does so with `close()`).
        """
        if self.is_leader:
            return True
        conn = await self._connection()
        async with asyncio.timeout(self.query_timeout_s):
            if not await leader.try_acquire(conn):
                if not self._standby:
                    logger.info("relay standby: another relay holds the lock (%s)", self.name)
                    self._standby = True
                return False
            await conn.execute(_ENSURE_ROW, self.name)
            self.position = int(await conn.fetchval(_LOAD_POSITION, self.name))
            mode = await ingest_mode(conn)
            if mode == "trigger" and self.listen:
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        if mode == "wal":
            self.wal = WalIngest(
                self.dsn,
                self.bus,
                slot=await database_slot(conn),
                name=self.name,
                read_limit=4 * self.batch_size,  # about batch_size events of 1-row txns
                timeout_s=self.query_timeout_s,
            )
            await self.wal.start(conn)
            self.position = self.wal.position
        self.is_leader, self._standby = True, False
        self._wake.set()
        logger.info("relay active: %s at position %d (%s ingest)", self.name, self.position, mode)
        return True

    async def relay_once(self) -> int:
        """One step: read a page after `position`, publish it, record the new position.

        Returns the rows read (events and malformed rows; 0 when caught up). Malformed rows
        are kept in `outbox_dead_letters` and logged, never retried; a page of malformed rows
        only is not published. The position is left unchanged when anything fails, so the
        page is read again by the next step. Raises RuntimeError when this relay is not the
        leader (call `lead()` first), TimeoutError when a query exceeds `query_timeout_s`,
        asyncpg/OS errors when Postgres fails, and whatever `bus.publish` raises.
        In wal mode the step is `WalIngest.step`, whose publish may end after it returns
        (`WalIngest.flush` waits for it).
        """
        if not self.is_leader or self._conn is None:
            raise RuntimeError(f"relay {self.name!r} is not the active relay: call lead() first")
        conn = self._conn
        if self.wal is not None:
            return await self._relay_wal(conn, self.wal)
        async with asyncio.timeout(self.query_timeout_s):
            page = await read_page(conn, self.position, self.batch_size)
            if page.malformed:
                await _record_malformed(conn, page)
        if page.events:
            accepted = await self.bus.publish(Batch(self.position, tuple(page.events)))
            if not accepted:
                logger.debug("relay: batch up to %d was already on the bus", page.last)
            metrics.RELAY_BATCHES.inc()
            metrics.RELAY_EVENTS.inc(len(page.events))
        if page.last > self.position:
            async with asyncio.timeout(self.query_timeout_s):
                await conn.execute(_SAVE_POSITION, self.name, page.last)
            self.position = page.last
            self.dead_letters += len(page.malformed)
            metrics.DEAD_LETTERS.inc(len(page.malformed))
        rows = len(page.events) + len(page.malformed)
        await self._measure_lag(conn, caught_up=rows < self.batch_size)
        return rows

    async def _relay_wal(self, conn: PgConnection, wal: WalIngest) -> int:
        """The wal-mode step (`WalIngest.step`, each query under `query_timeout_s`)."""
        rows = await wal.step(conn, WAL_WAIT_S)
        self.position = wal.position
        self.dead_letters = wal.dead_letters
        now = time.monotonic()
        if now - self._lag_measured >= LAG_INTERVAL_S:
            async with asyncio.timeout(self.query_timeout_s):
                slot = await slot_status(conn, wal.slot)
            metrics.RELAY_SLOT_RETAINED_BYTES.set(slot.retained_bytes if slot else 0)
            metrics.RELAY_SLOT_LAG_BYTES.set(slot.lag_bytes if slot else 0)
            self._lag_measured = now
        return rows

    async def _measure_lag(self, conn: Connection, *, caught_up: bool) -> None:
        """Set the relay-lag gauges: zero when a short page shows it caught up, else (at most
        once per `LAG_INTERVAL_S`) from `relay_lag`."""
        now = time.monotonic()
        if caught_up:
            metrics.RELAY_LAG_ROWS.set(0)
            metrics.RELAY_LAG_SECONDS.set(0)
        elif now - self._lag_measured >= LAG_INTERVAL_S:
            async with asyncio.timeout(self.query_timeout_s):
                rows, seconds = await relay_lag(conn, self.name)
            metrics.RELAY_LAG_ROWS.set(rows)
            metrics.RELAY_LAG_SECONDS.set(seconds)
        else:
            return
        self._lag_measured = now

    async def prune_once(self) -> bool:
        """Run one pruning step if this relay leads and its pruner is due; True when the
        step deleted a full batch (more is due at once). Rows past `position` are kept.

        A failure (Postgres error, or `query_timeout_s` passed) is logged and not raised:
        relaying goes on, and the pruner tries again `interval_s` later. If the connection
        itself is lost, the next `relay_once` fails and the loop reconnects.
        """
        pruner, conn = self.pruner, self._conn
        if pruner is None or conn is None or not self.is_leader or not pruner.due():
            return False
        try:
            async with asyncio.timeout(self.query_timeout_s):
                return await pruner.step(conn, self.position)
        except SERVICE_FAULTS as exc:
            logger.warning("outbox pruning failed, retrying in %.0f s: %r", pruner.interval_s, exc)
            return False

    async def close(self) -> None:
        """Release the lock and close the connection (idempotent; never raises).

        Closing ends the session, which releases the lock even when the unlock itself fails.
        """
        conn, self._conn = self._conn, None
        was_leader, self.is_leader, self._standby = self.is_leader, False, False
        self._close_wal()
        if conn is None:
            return
        try:
            async with asyncio.timeout(self.query_timeout_s):
                if was_leader:
                    await leader.release(conn)
                await conn.close()
        except Exception as exc:
            logger.debug("relay connection closed abruptly: %r", exc)
        finally:
            if not conn.is_closed():
                conn.terminate()
        if was_leader:
            logger.info("relay stopped: %s released at position %d", self.name, self.position)

    async def _connection(self) -> "asyncpg.Connection[Any]":
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._drop()
        settings = {"application_name": f"{APPLICATION_NAME_PREFIX}{os.getpid()}"}
        self._conn = await asyncpg.connect(
            self.dsn,
            timeout=self.query_timeout_s,
            server_settings={**settings, **_SERVER_SETTINGS},
        )
        self._conn.add_termination_listener(self._on_terminated)
        return self._conn

    async def _recover(self, exc: Exception) -> float:
        """After a failure: keep a leader's connection if it still answers, else drop it.
        Returns the backoff before the loop restarts, in seconds."""
        self._failures += 1
        delay = self._backoff.compute(self._failures)
        traceback = not isinstance(exc, _FAULTS)
        if self.is_leader and await self._answers():
            if isinstance(exc, ConnectionError):  # the bus refused; gateways read the outbox
                delay = min(delay, BUS_RETRY_S)
            logger.warning(
                "relay step failed at position %d, retrying in %.2f s: %r",
                self.position,
                delay,
                exc,
                exc_info=traceback,
            )
        else:
            logger.warning(
                "relay connection lost%s, reconnecting in %.2f s: %r",
                " (was active)" if self.is_leader else "",
                delay,
                exc,
                exc_info=traceback,
            )
            self._drop()
        return delay

    def _drop(self) -> None:
        """Close the connection at once, without a goodbye: the server ends the session
        and so frees the lock, if the session is still alive."""
        conn, self._conn = self._conn, None
        self.is_leader = self._standby = False
        self._close_wal()
        if conn is not None:
            conn.terminate()

    def _close_wal(self) -> None:
        wal, self.wal = self.wal, None
        if wal is not None:
            wal.close()

    async def _answers(self) -> bool:
        conn = self._conn
        if conn is None or conn.is_closed():
            return False
        try:
            async with asyncio.timeout(self.query_timeout_s):
                await conn.fetchval("SELECT 1")
        except Exception:
            return False
        return True

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        # Synchronous on purpose: asyncpg runs it with call_soon, and a burst of
        # notifications coalesces into one set() (FIELD-NOTES §3).
        self._wake.set()

    def _on_terminated(self, conn: object) -> None:
        # asyncpg noticed the connection close: step at once, so the step fails and the
        # loop reconnects without waiting for the next poll.
        self._wake.set()


async def _record_malformed(conn: Connection, page: Page) -> None:
    for item in page.malformed:
        logger.warning(
            "outbox row %s (position %s) is malformed, kept in outbox_dead_letters: %s",
            item.row["id"],
            item.row["seq"],
            item.error,
        )
    await record_dead_letters(conn, page.malformed)


async def relay_lag(conn: Connection, name: str = "default") -> tuple[int, float]:
    """Rows committed but not yet relayed, and seconds since the oldest of them committed.

    Returns `(0, 0.0)` when the relay is caught up. Both come from one query over the outbox
    rows whose `seq` is past the position recorded in `outbox_relay` for `name` (0 when the
    relay never ran): `count(*)` of those rows, and `clock_timestamp() - min(committed_at)`
    in seconds, floored at 0. Uncommitted rows have no `seq` and are not counted. The range
    scan on the unique `seq` index costs in proportion to the lag, not to the table.
    Raises what asyncpg raises when Postgres fails.
    """
    row = await conn.fetchrow(_LAG, name)
    return int(row["rows"]), float(row["seconds"])


_SLOT_STATUS = """
SELECT s.active, s.wal_status,
       coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn), 0)::bigint AS retained,
       coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn), 0)::bigint AS lag,
       coalesce(extract(epoch FROM a.flush_lag), 0)::float8 AS lag_seconds
  FROM pg_replication_slots s LEFT JOIN pg_stat_replication a ON a.pid = s.active_pid
 WHERE s.slot_name = $1
"""


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """A replication slot as `pg_replication_slots` shows it (PostgreSQL docs):
    `wal_status` "lost" means the server invalidated it (the relay recreates it,
    sync/wal.py); `retained_bytes`: WAL it keeps from being removed (from its `restart_lsn`);
    `lag_bytes`: WAL written since the LSN it last acknowledged (`confirmed_flush_lsn`);
    `lag_seconds`: its reader's flush lag (`pg_stat_replication.flush_lag`, 0 caught up)."""

    name: str
    active: bool
    wal_status: str
    retained_bytes: int
    lag_bytes: int
    lag_seconds: float


async def slot_status(conn: Connection, slot: str) -> SlotStatus | None:
    """The replication slot `slot`, or None when it does not exist. Raises what asyncpg
    raises when Postgres fails."""
    row = await conn.fetchrow(_SLOT_STATUS, slot)
    if row is None:
        return None
    return SlotStatus(
        slot,
        bool(row["active"]),
        str(row["wal_status"]),
        int(row["retained"]),
        int(row["lag"]),
        round(float(row["lag_seconds"]), 3),
    )


async def relay_status(conn: Connection, name: str = "default") -> dict[str, object]:
    """The relay's progress as `/readyz` and `/admin/status` report it (JSON types).

    Trigger ingest: `{"ingest", "position" (cursor or None), "updated_at", "lag_rows",
    "lag_seconds"}` (`relay_lag`). Wal ingest: the same keys, `position` being the last
    position given and `lag_rows` None (rows not yet positioned are not counted: that would
    scan the outbox), `lag_seconds` the slot's flush lag, plus `slot`: `{"name", "active",
    "wal_status", "retained_bytes", "lag_bytes"}` (`SlotStatus`), or None when the slot does
    not exist.
    Raises what asyncpg raises when Postgres fails.
    """
    row = await conn.fetchrow(_POSITION_ROW, name)
    updated_at = row["updated_at"].isoformat() if row else None
    if await ingest_mode(conn) == "trigger":
        rows, seconds = await relay_lag(conn, name)
        return {
            "ingest": "trigger",
            "position": format_cursor(int(row["position"])) if row else None,
            "updated_at": updated_at,
            "lag_rows": rows,
            "lag_seconds": round(seconds, 3),
        }
    slot = await slot_status(conn, await database_slot(conn))
    assigned = row["assigned"] if row else None
    return {
        "ingest": "wal",
        "position": format_cursor(int(assigned)) if assigned is not None else None,
        "updated_at": updated_at,
        "lag_rows": None,
        "lag_seconds": slot.lag_seconds if slot else 0.0,
        "slot": None
        if slot is None
        else {
            "name": slot.name,
            "active": slot.active,
            "wal_status": slot.wal_status,
            "retained_bytes": slot.retained_bytes,
            "lag_bytes": slot.lag_bytes,
        },
    }
