"""Leadership of the outbox relay: one Postgres session-level advisory lock, one holder.

The active relay holds `core.schema.migrations.RELAY_LOCK_KEY` on its own connection, made with
`asyncpg.connect()` and never taken from a pool: a pool's `reset()` on release runs
`pg_advisory_unlock_all()` and `UNLISTEN *`, dropping both the lock and the wake-up the relay
relies on, and handing the connection to other code would hand the lock along with it
(FIELD-NOTES §3, asyncpg#189).
Postgres releases a session lock when its backend ends, so a relay whose process or connection
dies frees the lock without doing anything, and a standby that retries `try_acquire` takes over.
Centrifugo's PostgreSQL consumer elects its workers the same way (advisory locks), per partition.

Advisory locks are per database: relays of different databases never contend.
"""

from core.schema.migrations import RELAY_LOCK_KEY
from core.types import Connection

_HOLDER_QUERY = """
SELECT l.pid
  FROM pg_locks l
 WHERE l.locktype = 'advisory'
   AND l.granted
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid::bigint = $1
   AND l.objid::bigint = $2
   AND l.objsubid = 1
"""
# A bigint advisory key shows in pg_locks as classid = high 32 bits, objid = low 32 bits and
# objsubid = 1 (postgresql.org/docs/current/view-pg-locks.html).


async def try_acquire(conn: Connection, key: int = RELAY_LOCK_KEY) -> bool:
    """Take the session-level advisory lock `key` on `conn` without waiting.

    True when `conn` now holds it (also when it already did: session locks stack, and each
    acquisition needs its own `release`), False when another session holds it. Raises what
    asyncpg raises when the connection is unusable (asyncpg.InterfaceError, OSError, ...).
    """
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))


async def release(conn: Connection, key: int = RELAY_LOCK_KEY) -> bool:
    """Release one acquisition of the session-level lock `key` held by `conn`.

    False (and a server WARNING) when `conn` did not hold it. Closing the connection releases
    every lock it holds, so a relay that cannot run this loses nothing.
    """
    return bool(await conn.fetchval("SELECT pg_advisory_unlock($1)", key))


async def holder_pid(conn: Connection, key: int = RELAY_LOCK_KEY) -> int | None:
    """Backend pid (`pg_stat_activity.pid`) of the session holding `key` in `conn`'s database,
    or None when nobody holds it. Join with `pg_stat_activity` to see its `application_name`
    (the relay sets `userstream-relay-<OS pid>`)."""
    value = await conn.fetchval(_HOLDER_QUERY, key >> 32, key & 0xFFFF_FFFF)
    return None if value is None else int(value)
