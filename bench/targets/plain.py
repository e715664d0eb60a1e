"""The plain Starlette + sse-starlette + Redis pub/sub app (`bench.targets.plain_app`) as a
benchmark target.

The app runs under uvicorn (uvloop event loop, httptools parser: what `uvicorn[standard]`
installs), `--workers N` processes pinned with `taskset`. Events are published with Redis
PUBLISH, one pipeline (no MULTI) per `publish()` call, to `<prefix>ws1` (broadcast) or
`<prefix>u<i>` (targeted), where the prefix is unique to each start so that runs sharing a
Redis server never cross.

Redis: `redis_url` if given, else `BENCH_REDIS_URL`, else 127.0.0.1:6379; when that does not
answer, a throwaway server (`tests.services.RedisProcess`) is started and stopped with the
target.
"""

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bench.targets import ChannelServer, Scope
from bench.targets.processes import PinnedProcess, wait_until_serving
from tests.services import RedisProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
GRACEFUL_SHUTDOWN_S = 2
"""uvicorn's `--timeout-graceful-shutdown`: open SSE responses are cancelled after this."""


async def _redis_answers(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_timeout=2)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


class PlainTarget(ChannelServer):
    """`bench.targets.plain_app` under uvicorn, as the `Target` protocol of `bench.targets`.

    `ready_marker` is the `: connected` comment the app sends once Redis has confirmed the
    channel's SUBSCRIBE.
    """

    name = "plain"
    ready_marker = b": connected"

    def __init__(self, redis_url: str | None = None) -> None:
        self._redis_url = redis_url or os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL)
        self._prefix = ""
        self._dir: Path | None = None
        self._server: PinnedProcess | None = None
        self._own_redis: RedisProcess | None = None
        self._redis: aioredis.Redis | None = None

    async def start(self, *, cpu: str, users: int, scope: Scope, workers: int = 1) -> None:
        """Start `uvicorn bench.targets.plain_app:app --workers <workers>` under
        `taskset -c cpu`; returns once `/healthz` answers. Raises RuntimeError if it fails."""
        redis_url = self._redis_url
        if not await _redis_answers(redis_url):
            self._own_redis = RedisProcess()
            self._own_redis.start()
            redis_url = self._own_redis.url
        pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=4)
        self._redis = aioredis.Redis.from_pool(pool)
        self._prefix = f"bench:plain:{uuid.uuid4().hex[:12]}:"
        self._port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="bench-plain-"))
        argv = [
            sys.executable, "-m", "uvicorn", "bench.targets.plain_app:app",
            "--host", self._host, "--port", str(self._port),
            "--workers", str(workers),
            "--loop", "uvloop", "--http", "httptools",
            "--backlog", "4096",
            "--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN_S),
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PLAIN_REDIS_URL": redis_url,
            "PLAIN_CHANNEL_PREFIX": self._prefix,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])
            ),
        }
        self._server = PinnedProcess(
            argv, cpu=cpu, log_path=self._dir / "uvicorn.log", env=env, cwd=ROOT
        )
        try:
            await wait_until_serving(self._server, self._host, self._port, "/healthz")
        except RuntimeError:
            await self.stop()
            raise

    async def publish(self, scope: Scope, bodies: list[tuple[int, bytes]]) -> None:
        """PUBLISH each body to `<prefix>ws1` or `<prefix>u<i>` in one pipeline. Raises
        RuntimeError before `start`, RedisError when Redis fails."""
        if self._redis is None:
            raise RuntimeError("PlainTarget.publish before start")
        async with self._redis.pipeline(transaction=False) as pipe:
            for user, body in bodies:
                channel = "ws1" if scope == "broadcast" else f"u{user}"
                pipe.publish(self._prefix + channel, body)
            await pipe.execute()

    def server_pids(self) -> list[int]:
        """The uvicorn process and, with `workers > 1`, its worker processes."""
        return self._server.pids() if self._server is not None else []

    async def stop(self) -> None:
        """Stop uvicorn (SIGTERM, SIGKILL after 5 s), close the publishing connection, stop a
        Redis started here and remove the temporary directory."""
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._own_redis is not None:
            self._own_redis.stop()
            self._own_redis = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
