"""The ingest mode: how committed outbox rows reach the relay, chosen by `userstream migrate`.

- `wal`: the relay consumes a logical replication slot (`pgoutput`) through the publications
  `OUTBOX_PUBLICATION` (outbox inserts, columns `id` and `seq` only) and `ACCESS_PUBLICATION`
  (every change to the access tables), and gives positions itself (sync/wal.py). The
  publisher's commit holds nothing but its own INSERT: no trigger, lock, NOTIFY or UPDATE.
  Needs `wal_level = logical`, Postgres 15 or newer (publication column lists), a free
  replication slot and WAL sender, and a role with the REPLICATION attribute.
- `trigger`: the commit trigger of 002_outbox.sql draws positions at commit under one lock
  and NOTIFYs the relay. Works on every Postgres; every publishing commit of the database is
  serialised through it (bench/RESULTS.md, "Writer cost").

The mode lives in `userstream_ingest` (004_ingest.sql); every process reads it at start
(`ingest_mode`) and logs it. `set_ingest_mode` switches, in one transaction with the mode row:
it installs or drops the triggers and the publications. Switching from wal to trigger first
gives positions to rows the relay has not yet reached (in id order), so nothing is left
behind; switching to wal leaves the slot to the relay, which creates it and positions the rows
committed before it (sync/wal.py, bootstrap).
"""

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Literal

from core.schema.migrations import COMMIT_LOCK_KEY
from core.types import Connection

logger = logging.getLogger(__name__)

Mode = Literal["trigger", "wal"]
MODES: tuple[Mode, ...] = ("trigger", "wal")

OUTBOX_PUBLICATION = "userstream_outbox"
"""Publication of outbox inserts (columns `id`, `seq`), read by the relay in wal mode."""

ACCESS_PUBLICATION = "userstream_access"
"""Publication of the access tables (PROTOCOL.md §2), read by the relay in wal mode."""

ACCESS_TABLES = ("workspaces", "workspace_members", "streams", "stream_members")
"""The tables whose committed changes decide who may receive what (PROTOCOL.md §2)."""

MIN_SERVER_VERSION = 150000
"""Postgres 15: publication column lists and pgoutput's skipping of empty transactions."""

_TRIGGERS_OFF = """
DROP TRIGGER IF EXISTS outbox_commit ON outbox;
DROP TRIGGER IF EXISTS streams_before ON streams;
"""
# The triggers of 002_outbox.sql, installed again when switching back to trigger mode.
_TRIGGERS_ON = """
DROP TRIGGER IF EXISTS outbox_commit ON outbox;
CREATE CONSTRAINT TRIGGER outbox_commit
    AFTER INSERT ON outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION userstream_outbox_commit();
DROP TRIGGER IF EXISTS streams_before ON streams;
CREATE TRIGGER streams_before
    AFTER INSERT OR UPDATE OR DELETE ON streams
    FOR EACH ROW EXECUTE FUNCTION userstream_streams_before();
"""
_PUBLICATIONS_OFF = f"""
DROP PUBLICATION IF EXISTS {OUTBOX_PUBLICATION};
DROP PUBLICATION IF EXISTS {ACCESS_PUBLICATION};
"""
# `streams` keeps whole before-images in the log (REPLICA IDENTITY FULL): a gateway that loads
# a workspace ahead of its position sets streams back with them (sync/access_cache.py).
_PUBLICATIONS_ON = f"""
{_PUBLICATIONS_OFF}
CREATE PUBLICATION {OUTBOX_PUBLICATION} FOR TABLE outbox (id, seq) WITH (publish = 'insert');
CREATE PUBLICATION {ACCESS_PUBLICATION} FOR TABLE {", ".join(ACCESS_TABLES)}
    WITH (publish = 'insert, update, delete');
ALTER TABLE streams REPLICA IDENTITY FULL;
"""
# Rows committed in wal mode that the relay has not positioned yet, in id order, one
# transaction's rows together; and the sequence moved past every position the relay gave.
_POSITION_LEFTOVERS = f"""
SELECT pg_advisory_xact_lock({COMMIT_LOCK_KEY});
SELECT setval('outbox_seq', greatest((SELECT max(seq) FROM outbox), 1),
              (SELECT max(seq) FROM outbox) IS NOT NULL);
UPDATE outbox o SET seq = n.seq, committed_at = coalesce(o.committed_at, clock_timestamp())
  FROM (SELECT id, nextval('outbox_seq') AS seq
          FROM (SELECT id, min(id) OVER (PARTITION BY xid) AS first FROM outbox
                 WHERE seq IS NULL ORDER BY first, id) ordered) n
 WHERE o.id = n.id;
"""


class IngestUnavailable(RuntimeError):
    """`wal` was asked for where it cannot work; the message names each missing setting."""


@dataclass(frozen=True, slots=True)
class IngestChoice:
    """The mode set, and why `wal` was not possible (empty when it was)."""

    mode: Mode
    wal_blockers: tuple[str, ...]


def slot_name(database: str) -> str:
    """The replication slot of one database: `userstream_<database>`, lower-cased, with every
    character outside [a-z0-9_] replaced by `_` and cut to Postgres' 63-byte name limit.
    Slot names are per server, so each database needs its own."""
    return ("userstream_" + re.sub(r"[^a-z0-9_]", "_", database.lower()))[:63]


async def wal_blockers(conn: Connection) -> list[str]:
    """What keeps wal mode from working on `conn`'s server, one clear sentence each.

    Checks `wal_level`, the server version, `max_replication_slots`, `max_wal_senders` and
    whether the current role may replicate (superuser or REPLICATION attribute; on managed
    services a role such as RDS's `rds_replication` grants it and shows here as the attribute
    only through membership, so membership of a role named `*replication*` counts too).
    """
    row = await conn.fetchrow(
        """
        SELECT current_setting('wal_level') AS wal_level,
               current_setting('server_version_num')::int AS version,
               current_setting('max_replication_slots')::int AS slots,
               current_setting('max_wal_senders')::int AS senders,
               r.rolname, r.rolsuper OR r.rolreplication OR EXISTS (
                   SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                    WHERE m.member = r.oid AND g.rolname LIKE '%replication%') AS may_replicate
          FROM pg_roles r WHERE r.rolname = current_user
        """
    )
    blockers = []
    if row["wal_level"] != "logical":
        blockers.append(
            f"wal_level is {row['wal_level']!r}: logical decoding needs wal_level = logical"
            " (postgresql.conf or ALTER SYSTEM, then a restart)"
        )
    if row["version"] < MIN_SERVER_VERSION:
        blockers.append(f"Postgres {row['version']} is older than 15 (publication column lists)")
    if row["slots"] < 1:
        blockers.append("max_replication_slots is 0: one slot per database is needed")
    if row["senders"] < 1:
        blockers.append("max_wal_senders is 0: one WAL sender per relay is needed")
    if not row["may_replicate"]:
        blockers.append(
            f"role {row['rolname']!r} may not replicate: ALTER ROLE {row['rolname']} REPLICATION"
            " (or the provider's replication role)"
        )
    return blockers


async def ingest_mode(conn: Connection) -> Mode:
    """The mode recorded in `conn`'s database ('trigger' before 004_ingest.sql ran)."""
    mode = await conn.fetchval(
        "SELECT coalesce((SELECT mode FROM userstream_ingest),"
        " 'trigger') WHERE to_regclass('userstream_ingest') IS NOT NULL"
    )
    return "wal" if mode == "wal" else "trigger"


async def set_ingest_mode(conn: Connection, requested: Mode | Literal["auto"]) -> IngestChoice:
    """Set the ingest mode of `conn`'s database (migrated first) and return the choice.

    `auto` keeps the mode chosen before, if any; the first time, it picks `wal` when
    `wal_blockers` finds nothing, else `trigger`. Setting the mode the database has re-applies
    it (idempotent). Raises IngestUnavailable, naming every missing setting, when `wal` is
    requested (or kept) where it cannot work, and ValueError for an unknown mode.
    """
    if requested not in (*MODES, "auto"):
        raise ValueError(f"ingest mode must be one of auto, trigger, wal; got {requested!r}")
    blockers = tuple(await wal_blockers(conn))
    mode: Mode
    if requested == "auto":
        chosen = await conn.fetchrow("SELECT mode, changed_at FROM userstream_ingest")
        if chosen["changed_at"] is not None:
            mode = "wal" if chosen["mode"] == "wal" else "trigger"
        else:
            mode = "trigger" if blockers else "wal"
    else:
        mode = requested
    if mode == "wal" and blockers:
        raise IngestUnavailable("wal ingest is not possible here: " + "; ".join(blockers))
    await conn.execute("BEGIN")
    try:
        if mode == "wal":
            await conn.execute(_TRIGGERS_OFF + _PUBLICATIONS_ON)
        else:
            await conn.execute(_PUBLICATIONS_OFF + _TRIGGERS_ON)
            await conn.execute(_POSITION_LEFTOVERS)
        await conn.execute("UPDATE userstream_ingest SET mode = $1, changed_at = now()", mode)
        await conn.execute("COMMIT")
    except BaseException:
        await conn.execute("ROLLBACK")
        raise
    if mode == "trigger":
        # The slot would hold WAL for ever: drop it, ending a relay that still reads it.
        slot = await database_slot(conn)
        if await release_slot(conn, slot):
            await conn.execute("SELECT pg_drop_replication_slot($1)", slot)
    return IngestChoice(mode, blockers)


async def database_slot(conn: Connection) -> str:
    """The replication slot of `conn`'s database (`slot_name` of `current_database()`)."""
    return slot_name(str(await conn.fetchval("SELECT current_database()")))


async def release_slot(conn: Connection, slot: str, timeout_s: float = 5.0) -> bool:
    """End the WAL sender reading replication slot `slot`, if one does, and wait until the
    slot is free (a slot serves one reader). Returns whether the slot exists. Raises
    TimeoutError when it is still read after `timeout_s` seconds (a relay reconnecting as
    fast as it is ended: stop the relays and try again)."""
    for _ in range(max(1, round(timeout_s / 0.05))):
        row = await conn.fetchrow(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", slot
        )
        if row is None:
            return False
        if row["active_pid"] is None:
            return True
        await conn.execute("SELECT pg_terminate_backend($1)", row["active_pid"])
        await asyncio.sleep(0.05)
    raise TimeoutError(f"replication slot {slot} is still read after {timeout_s} s")
