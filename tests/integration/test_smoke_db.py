"""The fixtures give each test a migrated database of its own."""

import asyncpg

from core.schema.migrations import migrations


async def test_each_test_gets_a_migrated_database(db: asyncpg.Connection) -> None:
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0
    assert await db.fetchval("SELECT count(*) FROM userstream_migrations") == len(migrations())
