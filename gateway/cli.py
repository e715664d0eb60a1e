"""The `userstream` command line: it parses options and hands over (uvicorn's `main.py` style).

    userstream migrate [--ingest auto|wal|trigger]   apply the schema, set the ingest mode
    userstream relay                        run an outbox relay (one active, others standby)
    userstream serve [--host H] [--port P] [--with-relay] [--workers N]
    userstream token --user ID [--ttl S] [--admin]
    userstream demo [--host H] [--port P] [--rate R]   (R: changes per second, default 5)

Settings come from the environment (`gateway.settings`); options override them.
"""

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Literal

import asyncpg
import uvicorn
import uvloop

from core.schema.ingest import MODES, IngestUnavailable, Mode, set_ingest_mode
from core.schema.migrations import migrate
from gateway.admin import serve_metrics
from gateway.auth import JwtAuthenticator
from gateway.logs import configure_logging
from gateway.runtime import make_bus, make_relay
from gateway.settings import Settings
from gateway.shutdown import server_shutdown_timeout_s


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="userstream", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    migrate_cmd = commands.add_parser("migrate", help="apply the database schema (idempotent)")
    migrate_cmd.add_argument(
        "--ingest",
        choices=("auto", *MODES),
        default="auto",
        help="how the relay reads the outbox: wal (logical decoding) or trigger; auto keeps"
        " the mode chosen before, else picks wal where the server allows it",
    )
    commands.add_parser("relay", help="move outbox rows to the bus, in commit order")
    serve = commands.add_parser("serve", help="run the gateway (GET /me/stream)")
    serve.add_argument("--host", help="address to listen on (USERSTREAM_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (USERSTREAM_PORT)")
    serve.add_argument("--with-relay", action="store_true", help="also run the relay")
    serve.add_argument("--workers", type=int, default=1, help="gateway processes (needs Redis)")
    token = commands.add_parser("token", help="print a token signed with USERSTREAM_JWT_SECRET")
    token.add_argument("--user", required=True, help="the token's `sub`")
    token.add_argument("--ttl", type=float, default=3600, help="lifetime in seconds")
    token.add_argument("--admin", action="store_true", help='add `system_role: "admin"`')
    demo = commands.add_parser("demo", help="everything in one process, with simulated activity")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on")
    demo.add_argument("--port", type=int, default=8080, help="port to listen on (0: any)")
    demo.add_argument("--rate", type=float, default=5.0, help="simulated changes per second")
    return parser


async def _migrate(settings: Settings, ingest: Mode | Literal["auto"] = "auto") -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate(conn)
        choice = await set_ingest_mode(conn, ingest)
    finally:
        await conn.close()
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    print(f"ingest mode: {choice.mode}")
    for blocker in choice.wal_blockers if choice.mode == "trigger" else ():
        print(f"  wal not possible: {blocker}")


async def _relay(settings: Settings) -> None:
    if settings.metrics_port is not None:
        serve_metrics(settings.metrics_port, settings.host)
    bus = make_bus(settings)
    relay = make_relay(settings, bus)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await relay.run(stop)
    finally:
        await bus.close()


def _serve(settings: Settings, args: argparse.Namespace) -> None:
    overrides = {"USERSTREAM_HOST": args.host, "USERSTREAM_PORT": args.port}
    if args.with_relay:
        overrides["USERSTREAM_WITH_RELAY"] = "true"
    for key, value in overrides.items():
        if value is not None:
            os.environ[key] = str(value)
    settings = Settings()
    if args.workers > 1 and not settings.redis_url:
        sys.exit("--workers > 1 needs REDIS_URL: the in-process bus cannot reach other processes")
    if not settings.database_url:
        from gateway.embedded import start_embedded_postgres

        os.environ["DATABASE_URL"] = start_embedded_postgres(settings.data_dir).dsn
        asyncio.run(_migrate(Settings()))
    signal.signal(signal.SIGTERM, _stopped)
    uvicorn.run(
        "gateway.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        log_config=None,
        timeout_graceful_shutdown=server_shutdown_timeout_s(settings),
    )


def _stopped(signum: int, frame: FrameType | None) -> None:
    """SIGTERM while uvicorn's own handler is not installed: uvicorn re-raises the SIGTERM it
    handled once its graceful shutdown is over (the streams drained, `gateway.shutdown`), so
    the default action would report death by signal (status 143). A requested stop that
    completed is a success: exit 0."""
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `userstream` console script."""
    args = _parser().parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    if args.command == "serve":
        _serve(settings, args)
        return
    if args.command == "demo":
        from gateway.demo import run_demo

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_demo(settings, host=args.host, port=args.port, rate=args.rate))
        return
    if args.command == "token":
        print(JwtAuthenticator(settings).mint(args.user, args.ttl, **_admin(args.admin)))
        return
    if not settings.database_url:
        sys.exit("DATABASE_URL is not set")
    if args.command == "relay" and not settings.redis_url:
        sys.exit(
            "REDIS_URL is not set: a relay process publishes to Redis, where gateways read"
            " (for one process without Redis: userstream serve --with-relay)"
        )
    if args.command == "migrate":
        try:
            asyncio.run(_migrate(settings, args.ingest))
        except IngestUnavailable as exc:
            sys.exit(f"userstream migrate: {exc}")
    else:
        uvloop.run(_relay(settings))  # the gateway's loop too (uvicorn picks uvloop)


def _admin(admin: bool) -> dict[str, str]:
    return {"system_role": "admin"} if admin else {}


if __name__ == "__main__":
    main()
