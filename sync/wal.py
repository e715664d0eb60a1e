"""Wal ingest: committed transactions from a logical replication slot, positioned and published.

The active relay (sync/relay.py) runs a `WalIngest` when the database's ingest mode is `wal`
(core/schema/ingest.py). The publisher's commit holds only its own INSERT; everything else
happens here, after the commit:

1. Read. `sync.replication.ReplicationStream` streams the slot through the publications of
   core/schema/ingest.py; `sync.pgoutput.Decoder` decodes it. The server sends each
   transaction whole, after its commit, in the order of the commit records in the WAL; that
   order becomes the positions. Outbox inserts carry only `id` and `seq`; changes to the
   access tables carry whole rows (and `streams` its before-image, REPLICA IDENTITY FULL).
2. Position, in one Postgres transaction per group of transactions read together: every
   access-table change becomes an access-image event written to the outbox by the relay
   (`ACCESS_IMAGE_TYPE`, never delivered, see core/events.py), ahead of its transaction's
   own rows, so those rows are judged against the state after their transaction (PROTOCOL.md
   §2), announced or not; the transaction's outbox rows get the next positions (`UPDATE ...
   RETURNING`, which also reads them for the bus); and `outbox_relay` records `assigned` (the
   last position given) and `lsn` (the end of the last transaction). A row is updated only
   once its transaction is visible: the commit record reaches the log, and so the slot, a
   moment before the transaction becomes visible, and an UPDATE would miss it. Hence every
   snapshot that sees a position sees the transactions of every position before it, the
   rule the prefetch cursor relies on (core/cursors.py). Rows that are not valid events go to
   `outbox_dead_letters`. Without access changes the whole step is one statement; a row
   written by a statement whose group was not recorded gets the same position again.
3. Publish the group's events to the bus as one `Batch`, then acknowledge the slot up to the
   recorded `lsn`, so the server may free the WAL before it.

Pipeline. The three stages wait on three different servers (the WAL sender, Postgres, Redis),
so `step` overlaps them: while one group is being positioned, the messages that arrived
meanwhile are decoded into the next group, and the previous group is still being published.
Groups are published one at a time, in order, each naming the last position of the one
before (`Batch.prev`), and each is acknowledged only after its own publish.

Bus outages. Positions are durable in Postgres before anything is published, so a bus that
refuses a publish (Redis down: ConnectionError) stops only the publishing: the relay goes on
positioning and acknowledging the slot, gateways read the positioned rows from the outbox
(degraded mode, `sync.dispatcher`), and every `BUS_RETRY_S` the relay publishes what it owes,
`(position, assigned]`, from Postgres, in order, before it publishes any new group.

Exactly once. A transaction is positioned once: after a crash the slot sends again what was
not acknowledged, and transactions that end at or before the recorded `lsn` are skipped,
their positions being already durable; events positioned but perhaps never published (a crash
between 2 and 3) are published again from Postgres at start (`(position, assigned]`); the bus
refuses what it already holds. The relay's own access-image inserts come back through the
slot with `seq` set and are skipped.

Bootstrap. When the slot is missing (first start, or dropped after the server invalidated it
for holding too much WAL: `wal_status = 'lost'`), the relay creates it, and in the snapshot the
creation exports (which sees exactly the transactions committed before the slot's first
streamed one) positions every outbox row that has none yet, in id order with each
transaction's rows together. Nothing is skipped silently: rows committed while no slot
existed are positioned then; only their relative order is by id rather than by commit.
"""

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import orjson

from core.events import ACCESS_IMAGE_TYPE, Event, MalformedEvent
from core.schema.ingest import ACCESS_PUBLICATION, OUTBOX_PUBLICATION, release_slot
from core.types import Connection, Row
from sync import metrics
from sync.bus import Batch, Bus
from sync.outbox import COLUMNS, Malformed, read_page, record_dead_letters
from sync.pgoutput import (
    LSN,
    Begin,
    Commit,
    Decoder,
    Delete,
    Insert,
    Update,
)
from sync.replication import ReplicationStream, format_lsn

logger = logging.getLogger(__name__)

BUS_RETRY_S = 0.5
"""While the bus refuses publishes, how often the relay tries again, seconds."""

VISIBILITY_WAIT_S = 5.0
"""Longest wait for a streamed transaction to become visible before its rows are taken as
deleted, seconds (the gap between commit record and visibility is normally microseconds)."""

PgConnection: TypeAlias = "asyncpg.Connection[Any]"
"""The relay's own connection: positioning needs transactions, beyond `core.types.Connection`."""

_POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

# Access tables -> the resource_type of their image events.
_ACCESS = {
    "workspaces": "workspace",
    "workspace_members": "membership",
    "streams": "stream",
    "stream_members": "stream_member",
}
_ACTIONS = {Insert: "create", Update: "update", Delete: "delete"}

# asyncpg reads and writes `pg_lsn` as an int, as the LSNs are held here.
_LOAD = (
    "SELECT position, coalesce(assigned, position) AS assigned, coalesce(lsn, '0/0') AS lsn"
    " FROM outbox_relay WHERE name = $1"
)
_RECORD_TEMPLATE = (
    "UPDATE outbox_relay SET position = greatest(position, {published}), assigned = {assigned},"
    " lsn = {lsn}, updated_at = now() WHERE name = {name}"
)
_RECORD = _RECORD_TEMPLATE.format(name="$1", published="$2", assigned="$3", lsn="$4")
# `o.seq = v.seq`: a row positioned by a statement whose group was not recorded gets the same
# position again (positions follow from the recorded `assigned` and the slot's order).
_POSITION_ROWS = f"""
UPDATE outbox o SET seq = v.seq, committed_at = v.committed_at
  FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[]) AS v(id, seq, committed_at)
 WHERE o.id = v.id AND (o.seq IS NULL OR o.seq = v.seq)
RETURNING {", ".join("o." + c.strip() for c in COLUMNS.split(","))}
"""
# The common step in one statement, one round trip: position the rows and, only if every one
# was found, record the group (a data-modifying CTE runs in the statement's transaction).
_POSITION_AND_RECORD = f"""
WITH positioned AS ({_POSITION_ROWS}),
recorded AS (
    {_RECORD_TEMPLATE.format(name="$4", published="$5", assigned="$6", lsn="$7")}
       AND (SELECT count(*) FROM positioned) = $8
    RETURNING 1)
SELECT positioned.*, (SELECT count(*) FROM recorded) AS recorded FROM positioned
"""
_INSERT_IMAGES = f"""
INSERT INTO outbox (seq, xid, type, resource_type, action, entity_id, workspace_id, stream_id,
                    user_id, access, committed_at)
SELECT i.seq, i.xid, '{ACCESS_IMAGE_TYPE}', i.resource_type, i.action, i.entity_id,
       coalesce(i.workspace_id, (SELECT s.workspace_id FROM streams s WHERE s.id = i.stream_id)),
       i.stream_id, i.user_id, i.access::jsonb, i.committed_at
  FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
              $7::text[], $8::text[], $9::text[], $10::timestamptz[])
       AS i(seq, xid, resource_type, action, entity_id, workspace_id, stream_id, user_id,
            access, committed_at)
RETURNING {COLUMNS}
"""
_VISIBLE = "SELECT pg_visible_in_snapshot($1::text::xid8, pg_current_snapshot())"


@dataclass(slots=True)
class AccessChange:
    """One committed change to an access table, as the relay's image event will carry it."""

    resource_type: str
    action: str
    row: Row | None
    before: Row | None
    key: Row


@dataclass(slots=True)
class Transaction:
    """One committed transaction from the slot: its 32-bit xid, where its commit record ends
    (`end_lsn`), its commit time, its outbox rows (ids, in log order) and access changes."""

    xid32: int
    commit_time_us: int
    end_lsn: LSN = 0
    outbox_ids: list[int] = field(default_factory=list)
    access: list[AccessChange] = field(default_factory=list)

    @property
    def committed_at(self) -> datetime:
        """The commit time (pgoutput counts microseconds from 2000-01-01 UTC)."""
        return _POSTGRES_EPOCH + timedelta(microseconds=self.commit_time_us)

    @property
    def size(self) -> int:
        """Positions the transaction takes: one per access change and per outbox row."""
        return len(self.access) + len(self.outbox_ids)


class TransactionReader:
    """Turns pgoutput messages into whole `Transaction`s (a transaction may span reads).

    Changes to relations other than the outbox and the access tables cannot arrive (the
    publications name no others) and are ignored; outbox rows that arrive with `seq` set are
    the relay's own access images and are skipped. Raises `sync.pgoutput.DecodeError` on bytes
    it cannot decode.
    """

    def __init__(self) -> None:
        self._decoder = Decoder()
        self._open: Transaction | None = None

    def feed(self, payloads: Sequence[bytes]) -> list[Transaction]:
        """Decode `payloads` in order; return the transactions whose commit they include."""
        done: list[Transaction] = []
        for payload in payloads:
            message = self._decoder.decode(payload)
            if isinstance(message, Begin):
                self._open = Transaction(message.xid, message.commit_time_us)
            elif isinstance(message, Commit):
                if self._open is not None:
                    self._open.end_lsn = message.end_lsn
                    if self._open.size:
                        done.append(self._open)
                self._open = None
            elif isinstance(message, Insert | Update | Delete) and self._open is not None:
                self._change(self._open, message)
        return done

    @staticmethod
    def _change(txn: Transaction, message: Insert | Update | Delete) -> None:
        table = message.relation.name
        if table == "outbox":
            if isinstance(message, Insert) and message.new.get("seq") is None:
                txn.outbox_ids.append(int(message.new["id"] or 0))
            return
        resource_type = _ACCESS.get(table)
        if resource_type is None:
            return
        old = message.old if isinstance(message, Update | Delete) else None
        new: Row | None = None
        if isinstance(message, Insert):
            new = dict(message.new)
        elif isinstance(message, Update):
            # Unchanged TOASTed values are not resent; the before-image has them (FULL).
            new = {**{k: (old or {}).get(k) for k in message.unchanged}, **message.new}
        before = old if isinstance(message, Update | Delete) else None
        txn.access.append(
            AccessChange(resource_type, _ACTIONS[type(message)], new, before, new or old or {})
        )


@dataclass(slots=True)
class Positioned:
    """What one positioning transaction produced: events in position order, malformed rows,
    the last position given, and the end LSN recorded."""

    events: list[Event]
    malformed: list[Malformed]
    assigned: int
    lsn: LSN


def _full_xid(xid32: int, reference: int) -> int:
    """The 64-bit xid (epoch and xid) of a 32-bit `xid32` no more than 2**31 before the
    64-bit `reference` (the positioning transaction's own xid)."""
    return reference - ((reference - xid32) & 0xFFFF_FFFF)


def _image_row(change: AccessChange, seq: int, xid: int, committed_at: datetime) -> tuple[Any, ...]:
    key = change.key
    if change.resource_type == "workspace":
        workspace_id, stream_id, user_id, entity = key.get("id"), None, None, key.get("id")
    elif change.resource_type == "stream":
        workspace_id, stream_id, user_id = key.get("workspace_id"), key.get("id"), None
        entity = key.get("id")
    else:
        workspace_id, stream_id, user_id = (
            key.get("workspace_id"),
            key.get("stream_id"),
            key.get("user_id"),
        )
        entity = f"{workspace_id or stream_id}:{user_id}"
    access: dict[str, Any] = {"row": change.row}
    if change.resource_type == "stream":
        access["before"] = change.before
    return (
        seq,
        xid,
        change.resource_type,
        change.action,
        entity,
        workspace_id,
        stream_id,
        user_id,
        orjson.dumps(access).decode(),
        committed_at,
    )


async def position(
    conn: PgConnection,
    name: str,
    txns: Sequence[Transaction],
    assigned: int,
    published: int,
) -> Positioned:
    """Give positions to `txns` (in order) after `assigned`, in one transaction on `conn`
    that also records `assigned`, the end LSN and `published` in `outbox_relay` row `name`.

    Without access changes that is one statement (`_POSITION_AND_RECORD`); when a row was
    not found (its transaction not yet visible) or there are access images to write, an
    explicit transaction does it step by step. Raises what asyncpg raises; nothing is
    recorded then, and the same transactions get the same positions on the next attempt.
    """
    ids: list[int] = []
    seqs: list[int] = []
    times: list[datetime] = []
    owner: dict[int, Transaction] = {}
    changes: list[tuple[AccessChange, int, Transaction]] = []  # each with its position
    next_seq = assigned
    for txn in txns:
        for change in txn.access:
            next_seq += 1
            changes.append((change, next_seq, txn))
        committed_at = txn.committed_at
        for row_id in txn.outbox_ids:
            next_seq += 1
            ids.append(row_id)
            seqs.append(next_seq)
            times.append(committed_at)
            owner[row_id] = txn
    lsn = txns[-1].end_lsn
    record = (name, published, next_seq, lsn)
    if not changes:
        rows = await conn.fetch(_POSITION_AND_RECORD, ids, seqs, times, *record, len(ids))
        if len(rows) == len(ids):
            events, malformed = _events(rows)
            await record_dead_letters(conn, malformed)
            return Positioned(events, malformed, next_seq, lsn)
    async with conn.transaction():
        reference = int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))
        rows = []
        if changes:
            images = [
                _image_row(change, seq, _full_xid(txn.xid32, reference), txn.committed_at)
                for change, seq, txn in changes
            ]
            rows += await conn.fetch(_INSERT_IMAGES, *map(list, zip(*images, strict=True)))
        if ids:
            rows += await _position_rows(conn, ids, seqs, times, owner, reference)
        events, malformed = _events(rows)
        await record_dead_letters(conn, malformed)
        await conn.execute(_RECORD, *record)
    return Positioned(events, malformed, next_seq, lsn)


def _events(rows: list[Row]) -> tuple[list[Event], list[Malformed]]:
    """Rows in position order as events, and the rows that are not valid events."""
    events, malformed = [], []
    for row in sorted(rows, key=lambda r: int(r["seq"])):
        try:
            events.append(Event.from_row(row))
        except MalformedEvent as exc:
            malformed.append(Malformed(row, str(exc)))
    return events, malformed


async def _position_rows(
    conn: Connection,
    ids: list[int],
    seqs: list[int],
    times: list[datetime],
    owner: dict[int, Transaction],
    reference: int,
) -> list[Row]:
    """UPDATE the rows' positions, waiting for transactions not yet visible (module doc).

    Rows still missing are looked for again until their transactions are visible; an UPDATE
    run *after* every missing row's transaction was seen visible and still not finding them
    proves them deleted (logged; their positions stay unused)."""
    rows: list[Row] = list(await conn.fetch(_POSITION_ROWS, ids, seqs, times))
    deadline = asyncio.get_running_loop().time() + VISIBILITY_WAIT_S
    delay = 0.0005
    while len(rows) < len(ids):
        done = {int(r["id"]) for r in rows}
        missing = [i for i, row_id in enumerate(ids) if row_id not in done]
        xids = {_full_xid(owner[ids[i]].xid32, reference) for i in missing}
        all_visible = all([bool(await conn.fetchval(_VISIBLE, str(x))) for x in xids])
        late = asyncio.get_running_loop().time() > deadline
        if not all_visible and not late:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        found = await conn.fetch(
            _POSITION_ROWS,
            [ids[i] for i in missing],
            [seqs[i] for i in missing],
            [times[i] for i in missing],
        )
        rows += found
        if (all_visible or late) and len(found) < len(missing):
            gone = [ids[i] for i in missing if ids[i] not in {int(r["id"]) for r in found}]
            logger.warning(
                "%d outbox rows of committed transactions are gone (ids %s...): not published",
                len(gone),
                gone[:5],
            )
            break
    return rows


class WalIngest:
    """The wal-mode side of the active relay: slot in, positions, bus out (module docstring).

    `dsn`: the relay's Postgres DSN (libpq form; the replication connection must reach
    Postgres directly, not through a transaction-mode pooler). `slot`: the slot name
    (`core.schema.ingest.database_slot`). `name`: the `outbox_relay` row. `read_limit`: messages
    read per step at most. `timeout_s` bounds connects and commands.
    """

    def __init__(
        self,
        dsn: str,
        bus: Bus,
        *,
        slot: str,
        name: str,
        read_limit: int = 20_000,
        timeout_s: float = 5.0,
    ) -> None:
        self.bus = bus
        self.slot = slot
        self.name = name
        self.read_limit = read_limit
        self.timeout_s = timeout_s
        self.position = 0
        self.assigned = 0
        self.lsn: LSN = 0
        self.dead_letters = 0
        self._stream = ReplicationStream(dsn, slot, (OUTBOX_PUBLICATION, ACCESS_PUBLICATION))
        self._reader = TransactionReader()
        self._ahead: list[Transaction] = []  # read while the previous group was positioned
        self._publishing: asyncio.Future[None] | None = None
        self._bus_failed_at: float | None = None
        """Monotonic time of the last refused publish, while `(position, assigned]` is owed."""

    async def start(self, conn: PgConnection) -> None:
        """Open the slot's stream (creating the slot and bootstrapping when it is missing or
        lost), publish what was positioned but maybe not published, and start streaming.

        `conn` is the leader's connection (it holds the relay lock). Raises asyncpg or
        psycopg2 errors, or TimeoutError, when Postgres fails; the caller restarts.
        """
        row = await conn.fetchrow(_LOAD, self.name)
        if row is None:
            raise RuntimeError(f"outbox_relay has no row {self.name!r}: lead() creates it")
        self.position, self.assigned = int(row["position"]), int(row["assigned"])
        self.lsn = int(row["lsn"])
        await self._stream.open(self.timeout_s)
        # A slot serves one reader: the previous relay's WAL sender, if it lingers, belongs to
        # a session that lost the lock (dead or deposed).
        exists = await release_slot(conn, self.slot, self.timeout_s)
        status = await conn.fetchval(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", self.slot
        )
        if exists and status == "lost":
            logger.error("replication slot %s was invalidated: recreating it", self.slot)
            await conn.execute("SELECT pg_drop_replication_slot($1)", self.slot)
            exists = False
        if not exists:
            new = await self._stream.create_slot(self.timeout_s)
            await self._bootstrap(conn, new.snapshot, new.consistent_lsn)
        await self._publish_owed(conn)
        await self._stream.start(self.lsn, self.timeout_s)
        logger.info(
            "relay reading slot %s from %s at position %d",
            self.slot,
            format_lsn(self.lsn),
            self.assigned,
        )

    async def step(self, conn: PgConnection, wait_s: float) -> int:
        """Position the next group of whole transactions and hand it to the bus; returns the
        events and malformed rows positioned (0 when nothing came within `wait_s` seconds).

        The stages overlap (module docstring, "Pipeline"): while Postgres positions this
        group, the messages that arrived meanwhile are read and decoded; the group is
        published once the previous group's publish (started by the previous step) is done,
        and acknowledged after its own. The publish may still run when the step returns;
        `flush()` waits for it. `conn` is free again when the step returns. While the bus
        refuses publishes (ConnectionError) positioning goes on and what is owed is published
        later (module docstring, "Bus outages"). Raises what asyncpg or psycopg2 raise, and
        what else `bus.publish` raises (surfacing at the next step); the caller then closes
        this ingest and starts a new one, which publishes again what was positioned (`start`).
        """
        failed_at = self._bus_failed_at
        if failed_at is not None and time.monotonic() - failed_at >= BUS_RETRY_S:
            await self.flush()
            await self._publish_owed(conn)
        txns, self._ahead = self._ahead, []
        if not txns:
            txns = await self._read(0.0 if self._publishing else wait_s)
        if not txns:
            await self.flush()
            return 0
        positioning = asyncio.ensure_future(
            position(conn, self.name, txns, self.assigned, self.position)
        )
        try:
            self._ahead = await self._read_while(positioning)
        except BaseException:
            positioning.cancel()
            await asyncio.gather(positioning, return_exceptions=True)
            raise
        done = await positioning
        self.assigned, self.lsn = done.assigned, done.lsn
        if done.malformed:
            for item in done.malformed:
                logger.warning(
                    "outbox row %s (position %s) is malformed, kept in outbox_dead_letters: %s",
                    item.row["id"],
                    item.row["seq"],
                    item.error,
                )
            self.dead_letters += len(done.malformed)
            metrics.DEAD_LETTERS.inc(len(done.malformed))
        await self.flush()
        self._publishing = asyncio.ensure_future(self._publish_group(done))
        return len(done.events) + len(done.malformed)

    async def flush(self) -> None:
        """Wait for the publish a step left running (if any) and its acknowledgement; raises
        what `bus.publish` raised."""
        publishing, self._publishing = self._publishing, None
        if publishing is not None:
            await publishing

    def close(self) -> None:
        """Close the replication connection and cancel a publish in progress (never raises;
        what was positioned and not published is published by the next `start`)."""
        publishing, self._publishing = self._publishing, None
        if publishing is not None:
            if publishing.done() and not publishing.cancelled():
                publishing.exception()  # retrieved: the failure was logged by the caller
            publishing.cancel()
        self._stream.close()

    async def _read(self, wait_s: float) -> list[Transaction]:
        """The whole transactions in what the slot sent, waiting up to `wait_s` seconds for
        the first message."""
        return self._decode(await self._stream.read(wait_s, self.read_limit))

    def _decode(self, messages: list[bytes]) -> list[Transaction]:
        """The whole transactions `messages` complete, less those already recorded."""
        return [t for t in self._reader.feed(messages) if t.end_lsn > self.lsn]

    async def _read_while(self, busy: "asyncio.Future[Any]") -> list[Transaction]:
        """Read and decode what the slot sends until `busy` is done or `read_limit` messages
        came, so the server keeps streaming while Postgres positions the previous group."""
        txns: list[Transaction] = []
        count = 0
        while not busy.done() and count < self.read_limit:
            messages = await self._stream.read(0.0, self.read_limit - count)
            if messages:
                count += len(messages)
                txns += self._decode(messages)
                continue
            readable = asyncio.ensure_future(self._stream.readable())
            try:
                await asyncio.wait((busy, readable), return_when=asyncio.FIRST_COMPLETED)
            finally:
                readable.cancel()
        return txns

    async def _publish_group(self, done: Positioned) -> None:
        """Publish a positioned group unless earlier positions are still owed to the bus
        (they go first, from Postgres: `_publish_owed`), then acknowledge the slot: the
        positions are durable either way."""
        if self._bus_failed_at is None:
            try:
                await self._publish(done.events)
                self.position = done.assigned
            except ConnectionError as exc:
                self._bus_refused(exc)
        self._stream.acknowledge(done.lsn)

    async def _publish_owed(self, conn: Connection) -> None:
        """Publish `(position, assigned]` from Postgres (`_republish`); when the bus refuses,
        note it and leave the rest owed."""
        try:
            await self._republish(conn)
        except ConnectionError as exc:
            self._bus_refused(exc)
            return
        if self._bus_failed_at is not None:
            self._bus_failed_at = None
            logger.info("the bus accepts publishes again: published up to %d", self.position)

    def _bus_refused(self, exc: ConnectionError) -> None:
        log = logger.debug if self._bus_failed_at is not None else logger.warning
        log(
            "the bus refused a publish (%s): positioning goes on, publishing from position %d"
            " once it answers",
            exc,
            self.position,
        )
        self._bus_failed_at = time.monotonic()

    async def _publish(self, events: list[Event]) -> None:
        if events:
            await self.bus.publish(Batch(self.position, tuple(events)))
            metrics.RELAY_BATCHES.inc()
            metrics.RELAY_EVENTS.inc(len(events))

    async def _republish(self, conn: Connection) -> None:
        """Publish the events of `(position, assigned]` again: a crash or a failed publish may
        have come between positioning them and publishing them; the bus refuses what it holds
        already."""
        while self.position < self.assigned:
            page = await read_page(conn, self.position, 1000)
            if page.last == self.position:
                break
            await self._publish(page.events)
            self.position = page.last
        self.position = self.assigned
        await conn.execute(_RECORD, self.name, self.position, self.assigned, self.lsn)

    async def _bootstrap(self, conn: PgConnection, snapshot: str, consistent_lsn: LSN) -> None:
        """Position, in the new slot's exported snapshot, every row committed before the slot
        that has no position yet (module docstring), and record the slot's start LSN."""
        async with conn.transaction(isolation="repeatable_read"):
            await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            top = int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM outbox"))
            start = max(top, self.assigned)
            count = await conn.fetchval(
                """
                WITH pending AS (
                    SELECT id, min(id) OVER (PARTITION BY xid) AS first
                      FROM outbox WHERE seq IS NULL),
                ordered AS (
                    SELECT id, $1::bigint + row_number() OVER (ORDER BY first, id) AS seq
                      FROM pending),
                done AS (
                    UPDATE outbox o SET seq = ordered.seq,
                           committed_at = coalesce(o.committed_at, clock_timestamp())
                      FROM ordered WHERE o.id = ordered.id RETURNING 1)
                SELECT count(*) FROM done
                """,
                start,
            )
            self.assigned = start + int(count)
            self.lsn = consistent_lsn
            await conn.execute(_RECORD, self.name, 0, self.assigned, self.lsn)
        logger.info(
            "replication slot %s created at %s; %d earlier rows positioned",
            self.slot,
            format_lsn(consistent_lsn),
            count,
        )
