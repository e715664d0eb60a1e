"""Commit-to-receipt latency through the whole pipeline, in the end-to-end test setup.

Setup, per ingest mode (core/schema/ingest.py): a fresh database (migrated, then
`set_ingest_mode`), `userstream relay` and `userstream serve` as OS processes sharing one
Redis, `--clients` SSE clients (httpx-sse, one process) connected as members of one workspace
once the relay leads (in wal mode: once its slot streams). A publisher commits `--events`
events at `--rate` per second through the SDK, one transaction each; each client records when
each event arrives. Latency = arrival time minus the time the publisher's COMMIT returned
(same clock, same machine); this benchmark has always measured from there.

Baseline, measured in the same run: the latency of a bare Postgres LISTEN/NOTIFY round trip
(commit -> notification on another connection), the floor any outbox-based design pays.

Server. `--ingest wal` (the default) and `--ingest both` (wal, then trigger, on the same
server, so the two are comparable) run on a Postgres 16 with logical decoding and durable
commits started here (`bench.database.durable_logical_server`: fsync, synchronous_commit and
full_page_writes on); `--ingest trigger` alone runs on the tests' server
(`tests.services.postgres_server`, as before ingest modes existed). The header names the
server's version and commit settings.

    .venv/bin/python -m bench.latency [--ingest wal|trigger|both] [--clients 20] [--events 400]
                                      [--rate 100]
"""

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Final

import asyncpg
import nanoid

from bench.database import durable_logical_server, wait_leading
from core.publish import OutboxEvent, publish
from core.schema.ingest import Mode, set_ingest_mode
from core.schema.migrations import migrate
from tests.e2e.harness import JWT_SECRET, Processes, StreamClient, bearer
from tests.services import PgServer, postgres_server, redis_server

INGEST_CHOICES: Final = ("wal", "trigger", "both")
"""`--ingest`: one ingest mode, or `both` (wal then trigger, on one server)."""

DEFINITION: Final = (
    "latency = receipt at the client - return of the publisher's COMMIT (same clock); the"
    " definition this benchmark has always used (unchanged)"
)

Row = dict[str, float]


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of `samples_s` (seconds), in milliseconds."""
    ordered = sorted(samples_s)
    quantiles = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": quantiles[49] * 1e3, "p99": quantiles[98] * 1e3, "max": ordered[-1] * 1e3}


async def notify_baseline(dsn: str, count: int, rate: float) -> list[float]:
    """Latency of COMMIT -> LISTEN callback on another connection, `count` times."""
    listener = await asyncpg.connect(dsn)
    sender = await asyncpg.connect(dsn)
    arrivals: dict[str, float] = {}
    await listener.add_listener("bench", lambda *args: arrivals.setdefault(args[3], time.time()))
    sent: dict[str, float] = {}
    for i in range(count):
        async with sender.transaction():
            await sender.execute("SELECT pg_notify('bench', $1)", str(i))
        sent[str(i)] = time.time()
        await asyncio.sleep(1 / rate)
    await asyncio.sleep(0.5)
    await listener.close()
    await sender.close()
    return [arrivals[k] - sent[k] for k in sent if k in arrivals]


async def seed(conn: asyncpg.Connection, users: int) -> None:
    """Workspace `w1` with a public stream `s1` and `users` active members u0..u{n-1}."""
    await conn.execute("INSERT INTO workspaces (id) VALUES ('w1')")
    await conn.execute(
        "INSERT INTO streams (id, workspace_id, visibility) VALUES ('s1', 'w1', 'public')"
    )
    await conn.executemany(
        "INSERT INTO workspace_members (workspace_id, user_id) VALUES ('w1', $1)",
        [(f"u{i}",) for i in range(users)],
    )


async def pipeline(dsn: str, url: str, clients: int, count: int, rate: float) -> list[float]:
    """Latency samples (s) of `count` events at `rate`/s into `clients` connected clients."""
    streams = [await StreamClient(url, bearer(f"u{i}")).connect() for i in range(clients)]
    arrivals: list[dict[str, float]] = [{} for _ in streams]

    async def watch(index: int) -> None:
        seen = 0
        while len(arrivals[index]) < count:
            events = streams[index].events
            for event in events[seen:]:
                if event.event == "change":
                    arrivals[index][event.data] = time.time()
            seen = len(events)
            await asyncio.sleep(0)

    watchers = [asyncio.create_task(watch(i)) for i in range(clients)]
    conn = await asyncpg.connect(dsn)
    sent: dict[str, float] = {}
    for i in range(count):
        async with conn.transaction():
            await publish(
                conn,
                OutboxEvent("stream_event.created", "stream_event", "create", f"e{i}",
                            workspace_id="w1", stream_id="s1", data={"i": i}),
            )  # fmt: skip
        sent[f"e{i}"] = time.time()
        await asyncio.sleep(1 / rate)
    await asyncio.wait_for(asyncio.gather(*watchers), timeout=30)
    await conn.close()
    samples = []
    for per_client in arrivals:
        for data, arrived in per_client.items():
            entity = data.split('"entityId":"', 1)[1].split('"', 1)[0]
            samples.append(arrived - sent[entity])
    for stream in streams:
        await stream.close()
    return samples


async def run(
    pg: PgServer, redis_url: str, mode: Mode, clients: int, count: int, rate: float
) -> tuple[Row, Row]:
    """Set up a database in ingest `mode` and its processes, wait until the relay leads,
    measure the NOTIFY baseline then the pipeline; returns both as `percentiles` rows."""
    name = f"usbench_{nanoid.generate('abcdefghijklmnopqrstuvwxyz', 8)}"
    dsn = await pg.create_database(name)
    processes = Processes(
        {
            "DATABASE_URL": dsn,
            "REDIS_URL": redis_url,
            "USERSTREAM_REDIS_PREFIX": f"{name}:",
            "USERSTREAM_JWT_SECRET": JWT_SECRET,
            "USERSTREAM_LOG_LEVEL": "warning",
        }
    )
    try:
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        await set_ingest_mode(conn, mode)
        await seed(conn, clients)
        await conn.close()
        processes.start("relay")
        await wait_leading(dsn, mode)
        gateway = processes.gateway()
        baseline = percentiles(await notify_baseline(dsn, count, rate))
        result = percentiles(await pipeline(dsn, gateway.url, clients, count, rate))
    finally:
        processes.stop_all()
        await pg.drop_database(name)
    return baseline, result


async def describe(pg: PgServer) -> str:
    """The server's version and commit settings, one line."""
    conn = await asyncpg.connect(pg.dsn("postgres"))
    try:
        names = ("server_version", "fsync", "synchronous_commit", "wal_level")
        values = {n: await conn.fetchval(f"SHOW {n}") for n in names}
    finally:
        await conn.close()
    where = "pgserver, durable settings" if pg.data_dir else f"{pg.host}:{pg.port}"
    return (
        f"postgres {values['server_version']} ({where}): fsync={values['fsync']}"
        f" synchronous_commit={values['synchronous_commit']} wal_level={values['wal_level']}"
    )


async def run_all(
    pg: PgServer, redis_url: str, modes: Sequence[Mode], clients: int, count: int, rate: float
) -> None:
    """Measure each mode in turn on `pg`, then print one table."""
    server = await describe(pg)
    results = [(mode, *await run(pg, redis_url, mode, clients, count, rate)) for mode in modes]
    print(
        f"commit -> receipt, {count} events at {rate:g}/s, {clients} clients, cpus {os.cpu_count()}"
    )
    print(server)
    print(DEFINITION)
    print(f"{'':<34}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for mode, baseline, result in results:
        for label, row in (
            (f"{mode}: LISTEN/NOTIFY (baseline)", baseline),
            (f"{mode}: userstream pipeline", result),
        ):
            print(f"{label:<34}{row['p50']:>10.2f}{row['p99']:>10.2f}{row['max']:>10.2f}")
        print(f"{mode + ': ratio p50 / p99':<34}{result['p50'] / baseline['p50']:>10.1f}"
              f"{result['p99'] / baseline['p99']:>10.1f}")  # fmt: skip


@contextlib.contextmanager
def server_for(modes: Sequence[Mode]) -> Iterator[PgServer]:
    """The durable logical-decoding server when wal is among `modes`, else the tests' server."""
    with durable_logical_server() if "wal" in modes else postgres_server() as pg:
        yield pg


def main() -> None:
    """Parse options and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument(
        "--ingest", choices=INGEST_CHOICES, default="wal", help="ingest mode (both: wal, trigger)"
    )
    args = parser.parse_args()
    modes: tuple[Mode, ...] = ("wal", "trigger") if args.ingest == "both" else (args.ingest,)
    with server_for(modes) as pg, redis_server() as redis_url:
        asyncio.run(run_all(pg, redis_url, modes, args.clients, args.events, args.rate))


if __name__ == "__main__":
    main()
