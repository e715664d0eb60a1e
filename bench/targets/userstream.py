"""userstream as a benchmark target: `userstream serve` and `userstream relay` as OS processes.

`start` creates a fresh database on the given Postgres server, applies the migrations, sets
its ingest mode (`ingest`: `wal` or `trigger`, core/schema/ingest.py; wal needs a server with
logical decoding, e.g. `bench.database.durable_logical_server`), seeds workspace `w1` with a
public stream `s1` and `users` active members `u0..u{n-1}` (COPY), then starts
`userstream relay` and `userstream serve --port P [--workers N]` pinned with `taskset`.
Connections are `GET /me/stream?access_token=<HS256 JWT, sub u<i>>` (PROTOCOL.md §3); a
connection is subscribed once its `event: offset` frame arrives (the user's access is loaded).

Events go through the publisher SDK (`core.publish.publish_many`), one transaction per call
(PROTOCOL.md §1): broadcast events are `stream_event.created` in `w1`/`s1`, which every member
receives (PROTOCOL.md §2 rule 2, public stream); targeted events are `notification.created`
with `user_id` `u<i>`, which only that user receives (rule 1). The event's `data` is the
payload JSON as given (`orjson.Fragment`, not re-encoded by the SDK; Postgres stores it as
`jsonb`, which adds a space after `:` and `,`).

With `private_readers` = k > 0 the database also holds a private stream `s2` whose members are
`u0..u{k-1}` (PROTOCOL.md §2 rule 3: only they read it). `send_signals` sends ephemeral signals
(PROTOCOL.md §5) into it through `POST /publish` with `"ephemeral": true` (the target sets
`USERSTREAM_PUBLISH_TOKEN`); nothing reaches the outbox.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
import jwt
import nanoid
import orjson
import redis.asyncio as aioredis

from bench.database import wait_leading
from bench.targets import Scope
from bench.targets.processes import descendants
from core.publish import OutboxEvent, publish_many
from core.schema.ingest import Mode, set_ingest_mode
from core.schema.migrations import migrate
from tests.services import PgServer, free_port

JWT_SECRET = "bench-secret-that-is-long-enough-for-hs256"
PUBLISH_TOKEN = "bench-publish-token"
"""`USERSTREAM_PUBLISH_TOKEN` of the target: `POST /publish` is on."""
SIGNAL_TYPE = "typing"
"""The `type` of every signal `send_signals` sends."""
TOKEN_TTL_S = 7 * 86_400
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class UserstreamTarget:
    """The gateway under test; implements `bench.targets.Target`.

    `pg`: the Postgres server to create the database on; `redis_url`: the Redis the relay and
    gateway share (keys under a unique `USERSTREAM_REDIS_PREFIX`, deleted by `stop`);
    `relay_cpu`: `taskset -c` list for the relay (None: not pinned); `keepalive_s`: the
    keep-alive interval (`USERSTREAM_KEEPALIVE_S`, None: the default 15 s); `env`: further
    settings for both processes; `source`: run `gateway.cli` from this checkout of the project
    (a `git worktree` of another commit, to compare versions; None: this one); `ingest`: the
    database's ingest mode, set after the migrations; `private_readers`: members of the private
    stream `s2` (`u0..u{k-1}`; 0: no such stream). Raises RuntimeError from `start` when a
    process does not come up (or `ingest` is wal on a server without logical decoding).
    """

    name = "userstream"
    ready_marker = b"event: offset"

    def __init__(
        self,
        pg: PgServer,
        redis_url: str = "redis://127.0.0.1:6379/0",
        *,
        relay_cpu: str | None = None,
        keepalive_s: float | None = None,
        env: dict[str, str] | None = None,
        source: Path | None = None,
        ingest: Mode = "wal",
        private_readers: int = 0,
    ) -> None:
        self.pg = pg
        self.private_readers = private_readers
        self.ingest = ingest
        self.redis_url = redis_url
        self.relay_cpu = relay_cpu
        self.keepalive_s = keepalive_s
        self.extra_env = dict(env or {})
        self.source = source
        self.database = f"usbench_{nanoid.generate('abcdefghijklmnopqrstuvwxyz', 10)}"
        self.prefix = f"{self.database}:"
        self.port = 0
        self.workers = 1
        self.log_dir = Path(tempfile.mkdtemp(prefix="userstream-bench-"))
        self._serve: subprocess.Popen[bytes] | None = None
        self._relay: subprocess.Popen[bytes] | None = None
        self._conn: asyncpg.Connection | None = None
        self._created = False
        self._sequence = 0
        self._http: httpx.AsyncClient | None = None

    def env(self) -> dict[str, str]:
        """The environment of `serve` and `relay`: this process's, plus the target's settings."""
        env = {
            **os.environ,
            "DATABASE_URL": self.pg.dsn(self.database),
            "REDIS_URL": self.redis_url,
            "USERSTREAM_REDIS_PREFIX": self.prefix,
            "USERSTREAM_JWT_SECRET": JWT_SECRET,
            "USERSTREAM_LOG_LEVEL": "warning",
            "USERSTREAM_MAX_CONNECTIONS_PER_USER": "1000",
            "USERSTREAM_DRAIN_S": "0",
            "USERSTREAM_PUBLISH_TOKEN": PUBLISH_TOKEN,
        }
        if self.keepalive_s is not None:
            env["USERSTREAM_KEEPALIVE_S"] = str(self.keepalive_s)
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source)
        env.update(self.extra_env)
        return env

    def _spawn(self, cpu: str | None, name: str, *args: str) -> subprocess.Popen[bytes]:
        pin = ["taskset", "-c", cpu] if cpu else []
        with open(self.log_dir / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                [*pin, sys.executable, "-m", "gateway.cli", *args],
                env=self.env(),
                cwd=self.source,
                stdout=log,
                stderr=log,
            )

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last `lines` lines of the `serve` or `relay` log ('' when there is none)."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def start(self, *, cpu: str, users: int, scope: Scope, workers: int = 1) -> None:
        """Create and seed the database, start the relay and the gateway pinned to `cpu`, and
        wait (30 s at most each) until the relay leads (wal: its slot streams), then until
        `/readyz` answers 200 and all `workers` processes exist.
        Raises RuntimeError (after cleaning up) when something does not start."""
        self.workers = workers
        try:
            await self._create_database(users)
            self._relay = self._spawn(self.relay_cpu, "relay", "relay")
            self.port = free_port()
            extra = ["--workers", str(workers)] if workers > 1 else []
            self._serve = self._spawn(cpu, "serve", "serve", "--port", str(self.port), *extra)
            await wait_leading(self.pg.dsn(self.database), self.ingest, START_TIMEOUT_S)
            await self._wait_ready()
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, RuntimeError | OSError | asyncpg.PostgresError):
                raise RuntimeError(f"userstream did not start: {exc}") from exc
            raise

    async def _create_database(self, users: int) -> None:
        conn = await asyncpg.connect(await self.pg.create_database(self.database))
        self._created = True
        self._conn = conn
        await migrate(conn)
        await set_ingest_mode(conn, self.ingest)
        await conn.execute("INSERT INTO workspaces (id) VALUES ('w1')")
        await conn.execute(
            "INSERT INTO streams (id, workspace_id, visibility) VALUES ('s1', 'w1', 'public')"
        )
        await conn.copy_records_to_table(
            "workspace_members",
            records=[("w1", f"u{i}") for i in range(users)],
            columns=["workspace_id", "user_id"],
        )
        if self.private_readers:
            await conn.execute(
                "INSERT INTO streams (id, workspace_id, visibility) VALUES ('s2', 'w1', 'private')"
            )
            await conn.copy_records_to_table(
                "stream_members",
                records=[("s2", f"u{i}") for i in range(self.private_readers)],
                columns=["stream_id", "user_id"],
            )

    async def _wait_ready(self) -> None:
        url = f"http://127.0.0.1:{self.port}/readyz"
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                for name, process in (("serve", self._serve), ("relay", self._relay)):
                    if process is not None and process.poll() is not None:
                        raise RuntimeError(
                            f"{name} exited with {process.returncode}:\n{self.log_tail(name)}"
                        )
                with contextlib.suppress(httpx.HTTPError):
                    answer = await client.get(url)
                    spawned = self.workers == 1 or len(self.server_pids()) > self.workers
                    if answer.status_code == 200 and spawned:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway on port {self.port} not ready after 30 s")
                await asyncio.sleep(0.1)
        if self.workers > 1:
            await asyncio.sleep(1.0)  # the other workers finish their start-up

    def host_port(self) -> tuple[str, int]:
        """`("127.0.0.1", port)` of the gateway."""
        return "127.0.0.1", self.port

    def paths(self, users: int, scope: Scope) -> list[str]:
        """`/me/stream?access_token=<JWT for u<i>>` for i in 0..users-1 (both scopes: one
        connection per user; a broadcast reaches them all through the workspace)."""
        now = int(time.time())
        return [
            "/me/stream?access_token="
            + jwt.encode({"sub": f"u{i}", "iat": now, "exp": now + TOKEN_TTL_S}, JWT_SECRET)
            for i in range(users)
        ]

    async def publish(self, scope: Scope, bodies: list[tuple[int, bytes]]) -> None:
        """Commit `bodies` as outbox events in one transaction (`publish_many`)."""
        if not bodies or self._conn is None:
            return
        events = []
        for user, body in bodies:
            self._sequence += 1
            data = orjson.Fragment(body)
            if scope == "broadcast":
                event = OutboxEvent(
                    "stream_event.created", "stream_event", "create", f"e{self._sequence}",
                    workspace_id="w1", stream_id="s1", data=data,
                )  # fmt: skip
            else:
                event = OutboxEvent(
                    "notification.created", "notification", "create", f"n{self._sequence}",
                    user_id=f"u{user}", data=data,
                )  # fmt: skip
            events.append(event)
        async with self._conn.transaction():
            await publish_many(self._conn, events)

    async def send_signals(self, bodies: list[tuple[int, bytes]]) -> None:
        """Send one ephemeral signal per `(actor_index, body)` in one `POST /publish`
        (PROTOCOL.md §5: `"ephemeral": true`), each `typing` in `w1`/`s2` (`s1`, the public
        stream, without private readers), `actor_id` `u<actor_index>`, `data` the body JSON as
        given. Raises RuntimeError when the gateway does not answer 202, httpx.HTTPError when
        it cannot be reached."""
        if not bodies:
            return
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{self.port}",
                headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"},
                timeout=10,
            )
        stream = "s2" if self.private_readers else "s1"
        events = []
        for actor, body in bodies:
            self._sequence += 1
            events.append(
                {
                    "type": SIGNAL_TYPE, "resource_type": "stream", "action": "update",
                    "entity_id": f"t{self._sequence}", "workspace_id": "w1",
                    "stream_id": stream, "actor_id": f"u{actor}",
                    "data": orjson.Fragment(body), "ephemeral": True,
                }
            )  # fmt: skip
        answer = await self._http.post(
            "/publish",
            content=orjson.dumps({"events": events}),
            headers={"Content-Type": "application/json"},
        )
        if answer.status_code != 202:
            raise RuntimeError(f"POST /publish answered {answer.status_code}: {answer.text}")

    async def server_counters(self) -> dict[str, float]:
        """The gateway's Prometheus counters and gauges (`GET /metrics`), by sample name with
        labels, e.g. `userstream_slow_consumer_disconnects_total`; {} when unreachable. With
        `--workers N` only the process that answers is counted. Not part of `Target`: the
        suite reads it when a target has it."""
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                answer = await client.get(f"http://127.0.0.1:{self.port}/metrics")
        except httpx.HTTPError:
            return {}
        samples: dict[str, float] = {}
        for line in answer.text.splitlines():
            if line and not line.startswith("#"):
                name, _, number = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    samples[name] = float(number)
        return samples

    def server_pids(self) -> list[int]:
        """The `serve` process and its descendants (uvicorn's worker processes)."""
        if self._serve is None or self._serve.poll() is not None:
            return []
        return [self._serve.pid, *descendants(self._serve.pid)]

    async def stop(self) -> None:
        """SIGTERM the gateway and the relay (SIGKILL after 15 s), drop the database, delete the
        Redis keys under the prefix. Safe to call after a partial start or twice."""
        processes = [p for p in (self._serve, self._relay) if p is not None]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.to_thread(process.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        self._serve = self._relay = None
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.aclose()
            self._http = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
        if self._created:
            await self.pg.drop_database(self.database)
            self._created = False
        client = aioredis.Redis.from_url(self.redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{self.prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
