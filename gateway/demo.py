"""`userstream demo`: the whole pipeline in one process, with simulated activity.

With no `DATABASE_URL` it starts an embedded Postgres in `<data_dir>/pgdata`; with no
`REDIS_URL` it uses the in-process bus. It migrates, seeds a demo workspace, serves the
gateway (relay included) and the `/demo` page, runs the activity simulator, and prints, for
two users with different access, a ready `curl -N` command with a fresh token.
"""

import asyncio
import contextlib
import logging
import secrets

import asyncpg
import uvicorn
from pydantic import SecretStr

from core.schema.ingest import set_ingest_mode
from core.schema.migrations import migrate
from gateway.app import create_app
from gateway.auth import JwtAuthenticator
from gateway.demo_page import DEMO_TOKEN_TTL_S
from gateway.demo_world import DemoWorld, seed
from gateway.embedded import EmbeddedPostgres, start_embedded_postgres
from gateway.settings import Settings
from gateway.simulator import ActivitySimulator

logger = logging.getLogger(__name__)


def demo_settings(settings: Settings, database_url: str) -> Settings:
    """Settings for demo mode: relay in process, demo routes on, a session secret if none."""
    update: dict[str, object] = {"database_url": database_url, "demo": True, "with_relay": True}
    if settings.jwt_secret is None and settings.jwt_public_key is None:
        update["jwt_secret"] = SecretStr(secrets.token_urlsafe(32))
    return settings.model_copy(update=update)


def banner(settings: Settings, world: DemoWorld, base_url: str, ingest: str) -> str:
    """The text printed once the demo listens: the page URL, the ingest mode
    (core/schema/ingest.py) and two curl commands."""
    auth = JwtAuthenticator(settings)
    lines = [
        "",
        f"userstream demo is live ({ingest} ingest): open {base_url}/demo in a browser,"
        " or stream as:",
        "",
    ]
    for example in world.access_examples:
        token = auth.mint(example.user_id, DEMO_TOKEN_TTL_S)
        lines += [
            f"  # {example.name} ({example.user_id}): {example.sees}",
            f"  curl -N -H 'Authorization: Bearer {token}' {base_url}/me/stream",
            "",
        ]
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)


async def _prepare(database_url: str) -> tuple[DemoWorld, str]:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
        choice = await set_ingest_mode(conn, "auto")
        for blocker in choice.wal_blockers:
            logger.info("trigger ingest: %s", blocker)
        return await seed(conn), choice.mode
    finally:
        await conn.close()


async def _listening(server: uvicorn.Server, task: "asyncio.Task[None]") -> int:
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the gateway stopped while starting")
        await asyncio.sleep(0.02)
    return int(server.servers[0].sockets[0].getsockname()[1])


async def run_demo(settings: Settings, *, host: str, port: int, rate: float) -> None:
    """Run the demo until SIGINT/SIGTERM; `port` 0 picks a free port, `rate` is changes/s."""
    embedded: EmbeddedPostgres | None = None
    database_url = settings.database_url
    if not database_url:
        embedded = await asyncio.to_thread(start_embedded_postgres, settings.data_dir)
        database_url = embedded.dsn
    try:
        settings = demo_settings(settings, database_url)
        world, ingest = await _prepare(database_url)
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings), host=host, port=port, log_config=None)
        )
        serving = asyncio.create_task(server.serve())
        actual_port = await _listening(server, serving)
        stop = asyncio.Event()
        async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as pool:
            simulator = ActivitySimulator(pool, world, rate_per_s=rate)
            simulating = asyncio.create_task(simulator.run(stop))
            print(banner(settings, world, f"http://{host}:{actual_port}", ingest), flush=True)
            await serving
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await simulating
    finally:
        if embedded is not None:
            embedded.stop()
