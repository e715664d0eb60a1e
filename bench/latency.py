"""Commit-to-receipt latency through the whole pipeline, in the end-to-end test setup.

Setup: a fresh database, `userstream relay` and `userstream serve` as OS processes sharing one
Redis, `--clients` SSE clients (httpx-sse, one process) connected as members of one workspace.
A publisher commits `--events` events at `--rate` per second through the SDK, one transaction
each; each client records when each event arrives. Latency = arrival time minus the time the
publisher's COMMIT returned (same clock, same machine).

Baseline, measured in the same run: the latency of a bare Postgres LISTEN/NOTIFY round trip
(commit -> notification on another connection), the floor any outbox-based design pays.

    .venv/bin/python -m bench.latency [--clients 20] [--events 400] [--rate 100]
"""

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Sequence

import asyncpg
import nanoid

from core.publish import OutboxEvent, publish
from core.schema.migrations import migrate
from tests.e2e.harness import JWT_SECRET, Processes, StreamClient, bearer
from tests.services import PgServer, postgres_server, redis_server


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


async def run(pg: PgServer, redis_url: str, clients: int, count: int, rate: float) -> None:
    """Set up a database and processes, measure baseline then pipeline, print a table."""
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
        await seed(conn, clients)
        await conn.close()
        processes.start("relay")
        gateway = processes.gateway()
        baseline = percentiles(await notify_baseline(dsn, count, rate))
        result = percentiles(await pipeline(dsn, gateway.url, clients, count, rate))
    finally:
        processes.stop_all()
        await pg.drop_database(name)
    print(
        f"commit -> receipt, {count} events at {rate:g}/s, {clients} clients, cpus {os.cpu_count()}"
    )
    print(f"{'':<28}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for label, row in (("LISTEN/NOTIFY (baseline)", baseline), ("userstream pipeline", result)):
        print(f"{label:<28}{row['p50']:>10.2f}{row['p99']:>10.2f}{row['max']:>10.2f}")
    print(f"{'ratio p50 / p99':<28}{result['p50'] / baseline['p50']:>10.1f}"
          f"{result['p99'] / baseline['p99']:>10.1f}")  # fmt: skip


def main() -> None:
    """Parse options and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    args = parser.parse_args()
    with postgres_server() as pg, redis_server() as redis_url:
        asyncio.run(run(pg, redis_url, args.clients, args.events, args.rate))


if __name__ == "__main__":
    main()
