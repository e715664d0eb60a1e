"""The benchmarks' Postgres and relay readiness, shared by every benchmark that runs wal ingest.

`durable_logical_server()` starts a Postgres 16 from the `pgserver` wheel with logical
decoding and Postgres' durable defaults stated (`DURABLE_SETTINGS`), unlike the tests' server,
which trades durability for speed; `wait_leading()` waits until a relay leads a database in
either ingest mode (core/schema/ingest.py).
"""

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Final

import asyncpg

from core.schema.ingest import Mode, database_slot
from gateway.embedded import LOGICAL_DECODING
from tests.services import PgServer, logical_postgres_server

DURABLE_SETTINGS: Final[Mapping[str, str]] = {
    **LOGICAL_DECODING,
    "max_connections": "200",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
}
"""The benchmark server's settings: logical decoding and Postgres' durable defaults, stated."""

_POLL_S: Final = 0.01


@contextlib.contextmanager
def durable_logical_server() -> Iterator[PgServer]:
    """A Postgres 16 with logical decoding and durable commits, in a new temporary folder.

    `USERSTREAM_TEST_PG_WAL`, when set, names the server to use instead (as for
    `tests.services.logical_postgres_server`, which makes the cluster here with
    `DURABLE_SETTINGS`); stopped and deleted on exit. Raises subprocess.CalledProcessError or
    subprocess.TimeoutExpired if it cannot start.
    """
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    with logical_postgres_server(DURABLE_SETTINGS, prefix="userstream-bench-pg-") as server:
        yield server


async def wait_leading(dsn: str, mode: Mode, timeout_s: float = 30.0) -> None:
    """Wait until a relay leads `dsn`'s database: in wal mode its slot is streaming (active),
    in trigger mode its `outbox_relay` row exists. Raises TimeoutError after `timeout_s`."""
    conn = await asyncpg.connect(dsn)
    args: tuple[str, ...] = ()
    try:
        if mode == "wal":
            query = (
                "SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1),"
                " false)"
            )
            args = (await database_slot(conn),)
        else:
            query = "SELECT EXISTS (SELECT 1 FROM outbox_relay)"
        async with asyncio.timeout(timeout_s):
            while not await conn.fetchval(query, *args):  # noqa: ASYNC110 (polling Postgres)
                await asyncio.sleep(_POLL_S)
    finally:
        await conn.close()
