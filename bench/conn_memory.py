"""Where an idle `/me/stream` connection's memory goes: a tracemalloc breakdown per connection.

    .venv/bin/python -m bench.conn_memory [--connections 5000] [--top 25] [--frames 1]

The relay and the database come from `bench.targets.userstream.UserstreamTarget` (a fresh
database, one public stream, `--connections` members); the gateway under measure runs in this
process (uvicorn, uvloop, httptools, the app from `gateway.app.app_from_env` with the target's
settings), so that `tracemalloc` sees its allocations. `sseload` holds `--connections` idle
streams, one per user, each past its `event: offset`. Printed: RSS and traced Python memory per
connection (after - before, divided by N), then the `--top` allocation sites by bytes per
connection (`tracemalloc.Snapshot.compare_to`, grouped by line, or by traceback with
`--frames` > 1). The difference between RSS and traced bytes is memory Python does not trace:
uvloop's and httptools' C structures, allocator overhead and fragmentation. tracemalloc adds
its own overhead per traced block, so RSS here exceeds the `idle` scenario's figure.
"""

import argparse
import asyncio
import gc
import os
import tracemalloc
from pathlib import Path

import uvicorn
import uvloop

from bench import loadclient
from bench.scenarios import EVENT_STREAM_HEADERS, rss_bytes, wait_measuring, watch_phase
from bench.targets.userstream import UserstreamTarget
from tests.services import PgServer, free_port, postgres_server, redis_server

SETTLE_S = 2.0
"""Pause after every connection is ready, before the second snapshot, seconds."""


async def measure(args: argparse.Namespace, target: UserstreamTarget) -> None:
    """Start the in-process gateway, snapshot, connect, snapshot, print the breakdown."""
    os.environ.update(target.env())
    from gateway.app import app_from_env

    port = free_port()
    config = uvicorn.Config(
        app_from_env(), host="127.0.0.1", port=port, loop="none", http="httptools",
        log_config=None, lifespan="on",
    )  # fmt: skip
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn exposes a flag, not an event)
        await asyncio.sleep(0.05)
    gc.collect()
    rss0, before = rss_bytes([os.getpid()]), tracemalloc.take_snapshot()
    paths = target.paths(args.connections, "broadcast")
    with watch_phase() as watch:
        load = asyncio.create_task(
            loadclient.run_load(
                "127.0.0.1", port, paths, connections=len(paths), cpu=None,
                ready_marker=target.ready_marker, headers=EVENT_STREAM_HEADERS,
                duration_s=SETTLE_S + 3, connect_timeout_s=30,
            )
        )  # fmt: skip
        await wait_measuring(watch, load)
    await asyncio.sleep(SETTLE_S)
    gc.collect()
    rss1, after = rss_bytes([os.getpid()]), tracemalloc.take_snapshot()
    result = await load
    server.should_exit = True
    await serving
    n = result.ready or 1
    traced = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"connections ready: {result.ready} of {result.connections}")
    print(f"RSS per connection:    {(rss1 - rss0) / n:8.0f} bytes (with tracemalloc's overhead)")
    print(f"traced per connection: {traced / n:8.0f} bytes (Python objects)")
    print("\ntraced bytes per connection, by where they were allocated:")
    for where, size in by_package(after.compare_to(before, "filename")):
        if abs(size / n) >= 1:
            print(f"{size / n:8.0f} B  {where}")
    print(f"\ntop {args.top} allocation sites, bytes and blocks per connection:")
    group = "traceback" if args.frames > 1 else "lineno"
    for stat in after.compare_to(before, group)[: args.top]:
        where = stat.traceback.format(limit=args.frames)
        print(f"{stat.size_diff / n:8.0f} B {stat.count_diff / n:6.1f} blocks  {where[0].strip()}")
        for line in where[1:]:
            print(f"{'':28}{line.strip()}")


def by_package(stats: list[tracemalloc.StatisticDiff]) -> list[tuple[str, int]]:
    """Size differences summed by package (`uvicorn`, `starlette`, `asyncio`, this project's
    `core`/`sync`/`gateway`, ...), largest first: the file path's first component under
    `site-packages`, the standard library or this checkout."""
    sums: dict[str, int] = {}
    root = str(Path(__file__).resolve().parent.parent)
    for stat in stats:
        path = stat.traceback[0].filename
        if "site-packages/" in path:
            name = path.split("site-packages/", 1)[1].split("/", 1)[0]
        elif path.startswith(root):
            name = path[len(root) + 1 :].split("/", 1)[0]
        elif "/lib/python3" in path:
            parts = path.split("/lib/python3", 1)[1].split("/")
            name = parts[1] if len(parts) > 2 else parts[-1]
        else:
            name = path
        sums[name] = sums.get(name, 0) + stat.size_diff
    return sorted(sums.items(), key=lambda item: -item[1])


async def main_async(args: argparse.Namespace, pg: PgServer, redis_url: str) -> None:
    """Seed the database and start the relay (`UserstreamTarget`); run `measure`."""
    target = UserstreamTarget(pg, redis_url, env={"USERSTREAM_LOG_LEVEL": "error"})
    await target.start(cpu="0-1", users=args.connections, scope="broadcast")
    try:
        await measure(args, target)
    finally:
        await target.stop()


def main() -> None:
    """Parse the options, build the load client, trace and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--top", type=int, default=25, help="allocation sites to print")
    parser.add_argument("--frames", type=int, default=1, help="frames per allocation site")
    args = parser.parse_args()
    loadclient.build()
    with postgres_server() as pg, redis_server() as redis_url:
        tracemalloc.start(args.frames)
        uvloop.run(main_async(args, pg, redis_url))


if __name__ == "__main__":
    main()
