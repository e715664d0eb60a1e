"""A logical replication stream on the asyncio loop: psycopg2's replication protocol support,
driven without blocking.

asyncpg does not speak the streaming replication protocol (COPY BOTH); psycopg2 does
(`LogicalReplicationConnection`, `ReplicationCursor`), and its asynchronous connections never
block: each call starts the work and `poll()` says whether the socket must become readable or
writable (psycopg2 docs, "Asynchronous support" and "Replication support objects"). `_wait`
turns that into awaits on `loop.add_reader` / `add_writer`, so the stream shares the relay's
loop with its asyncpg connection. psycopg2 answers the server's keep-alives and sends the
standby status update (the acknowledged LSN) every `status_interval_s` by itself, from inside
`read_message()`.

Use (sync/wal.py): `open()`, then `create_slot()` when the slot is missing (its exported
snapshot is valid until the next command on this connection), then `start()`, then `read()`
in a loop and `acknowledge()` what is durably recorded; `close()` at the end.
"""

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from sync.pgoutput import LSN

REPLICATION_FAULTS: tuple[type[BaseException], ...] = (psycopg2.Error,)
"""What psycopg2 raises when the server or the connection fails (OperationalError, ...)."""


@dataclass(frozen=True, slots=True)
class NewSlot:
    """A slot just created: changes committed after `consistent_lsn` will be streamed, and
    `snapshot` (valid until the next command on the replication connection) sees exactly the
    transactions committed before it."""

    consistent_lsn: LSN
    snapshot: str


def parse_lsn(text: str) -> LSN:
    """`16/B374D848` (Postgres' text form of pg_lsn) as a 64-bit integer."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: LSN) -> str:
    """A 64-bit LSN in Postgres' text form, e.g. `16/B374D848`."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFF_FFFF:X}"


class ReplicationStream:
    """One logical replication connection to `dsn` (a libpq DSN or URI), reading `slot` through
    `publications` with pgoutput protocol version 1.

    `status_interval_s`: how often psycopg2 reports the acknowledged LSN to the server.
    Every method raises psycopg2.Error (REPLICATION_FAULTS) when the server refuses or the
    connection fails, and OSError when the socket does.
    """

    def __init__(
        self, dsn: str, slot: str, publications: tuple[str, ...], *, status_interval_s: float = 1.0
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publications = publications
        self.status_interval_s = status_interval_s
        self._conn: Any = None
        self._cursor: Any = None

    async def open(self, timeout_s: float) -> None:
        """Connect in replication mode."""
        self._conn = psycopg2.connect(
            self.dsn,
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
            async_=True,
            connect_timeout=max(1, round(timeout_s)),
        )
        async with asyncio.timeout(timeout_s):
            await self._wait()
        self._cursor = self._conn.cursor()

    async def create_slot(self, timeout_s: float) -> NewSlot:
        """CREATE_REPLICATION_SLOT with pgoutput, exporting its snapshot (PostgreSQL docs,
        "Streaming Replication Protocol"). Raises psycopg2.Error if the slot exists."""
        await self._execute(
            f"CREATE_REPLICATION_SLOT \"{self.slot}\" LOGICAL pgoutput (SNAPSHOT 'export')",
            timeout_s,
        )
        _name, consistent, snapshot, _plugin = self._cursor.fetchone()
        return NewSlot(parse_lsn(consistent), snapshot)

    async def start(self, start_lsn: LSN, timeout_s: float) -> None:
        """START_REPLICATION from `start_lsn` (the server starts at the slot's confirmed LSN
        if that is later, and sends whole transactions committed after it, in commit order)."""
        self._cursor.start_replication(
            slot_name=self.slot,
            decode=False,
            start_lsn=start_lsn,
            options={"proto_version": "1", "publication_names": ",".join(self.publications)},
            status_interval=self.status_interval_s,
        )
        async with asyncio.timeout(timeout_s):
            await self._wait()

    async def read(self, timeout_s: float, limit: int) -> list[bytes]:
        """Up to `limit` messages' pgoutput payloads, waiting at most `timeout_s` seconds for
        the first; [] when none came."""
        messages: list[bytes] = []
        while len(messages) < limit:
            message = self._cursor.read_message()
            if message is not None:
                messages.append(message.payload)
                continue
            if messages:
                break
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ready(self._conn.fileno(), writable=False)
            except TimeoutError:
                break
            timeout_s = 0.0  # read what arrived, never wait twice
        return messages

    async def readable(self) -> None:
        """Wait until the server has sent something (it may be less than a message)."""
        await self._ready(self._conn.fileno(), writable=False)

    def acknowledge(self, lsn: LSN) -> None:
        """Report `lsn` as flushed: the server may then free the WAL before it. psycopg2 sends
        it with the next status update (at most `status_interval_s` later)."""
        self._cursor.send_feedback(flush_lsn=lsn)

    def close(self) -> None:
        """Close the connection at once (idempotent; never raises)."""
        conn, self._conn, self._cursor = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(psycopg2.Error):
                conn.close()

    async def _execute(self, sql: str, timeout_s: float) -> None:
        self._cursor.execute(sql)
        async with asyncio.timeout(timeout_s):
            await self._wait()

    async def _wait(self) -> None:
        """Drive the connection's pending operation to completion (psycopg2's `poll()` loop)."""
        conn = self._conn
        while True:
            state = conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            if state == psycopg2.extensions.POLL_READ:
                await self._ready(conn.fileno(), writable=False)
            elif state == psycopg2.extensions.POLL_WRITE:
                await self._ready(conn.fileno(), writable=True)
            else:
                raise psycopg2.OperationalError(f"unexpected poll state {state}")

    @staticmethod
    async def _ready(fd: int, *, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        add, remove = (loop.add_writer, loop.remove_writer)
        if not writable:
            add, remove = (loop.add_reader, loop.remove_reader)

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        add(fd, wake)
        try:
            await ready
        finally:
            remove(fd)
