"""The schema the gateway owns, applied by `userstream migrate` (idempotent).

Migrations are the numbered `NNN_name.sql` files beside this module, applied in order, each in
its own transaction, and recorded in `userstream_migrations`; concurrent migrators serialise on
an advisory lock. The SQL refers to the NOTIFY channel and the commit lock by placeholders that
are filled from the constants below, so each name is defined once.
"""

from dataclasses import dataclass
from importlib import resources

from core.types import Connection

NOTIFY_CHANNEL = "userstream_outbox"
"""The channel the outbox trigger NOTIFYs at commit (a wake-up hint, no payload)."""

COMMIT_LOCK_KEY = 7_318_893_215_001
"""Advisory lock (transaction level) taken by every outbox commit: see 002_outbox.sql."""

MIGRATION_LOCK_KEY = 7_318_893_215_002
"""Advisory lock (session level) held while migrating."""

RELAY_LOCK_KEY = 7_318_893_215_003
"""Advisory lock (session level) held by the one active relay."""

_PLACEHOLDERS = {"@NOTIFY_CHANNEL@": NOTIFY_CHANNEL, "@COMMIT_LOCK@": str(COMMIT_LOCK_KEY)}


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file: `version` from its `NNN_` prefix, `sql` with placeholders filled."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """All migrations shipped with the package, in version order."""
    found = []
    for entry in resources.files("core.schema").iterdir():
        if entry.name.endswith(".sql"):
            sql = entry.read_text()
            for placeholder, value in _PLACEHOLDERS.items():
                sql = sql.replace(placeholder, value)
            found.append(Migration(int(entry.name.split("_", 1)[0]), entry.name, sql))
    return sorted(found, key=lambda m: m.version)


async def migrate(conn: Connection) -> list[str]:
    """Apply the migrations not yet applied; return the names applied (empty when up to date)."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS userstream_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM userstream_migrations")}
        applied = []
        for migration in migrations():
            if migration.version in done:
                continue
            await conn.execute("BEGIN")
            try:
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO userstream_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            applied.append(migration.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
