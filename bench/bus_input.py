"""A gateway replica's bus input, alone: one bus reader in a process of its own.

`bench.fanout` runs this beside the gateways, under the same event flow, to measure what a
replica spends on bus input directly rather than as a difference of loaded replicas (which
mixes in delivery work): the process builds the bus a gateway builds (`sync.bus_redis.RedisBus`
for `--bus stream`, reading everything; `sync.bus_channels.ChannelBus` for `--bus channels`,
subscribing the `user:{id}` topics of `--users` and the `workspace:{id}` topics of
`--workspaces`, as a replica serving those users does), reads it from the outbox's current
position with `Bus.read`, and counts what arrives. No HTTP server, dispatcher or presence runs.

On SIGUSR1 it appends one JSON line to `--out`: `{"events", "batches", "disorder", "position",
"gaps"}` (events and batches read so far; `disorder`: events at or before a position already
read; `gaps`: batches whose `prev` is past the position read, which a gateway would fill from
Postgres). It runs until SIGTERM or SIGINT.

    .venv/bin/python -m bench.bus_input --bus channels --redis-url redis://127.0.0.1:6379/0
        --prefix P: --dsn postgresql://... --users u0-u1999 --workspaces w0-w19 --out F
"""

import argparse
import asyncio
import signal
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg
import orjson
import uvloop

from core.channels import user_channel, workspace_channel
from core.cursors import current_position
from sync.bus import Bus
from sync.bus_channels import ChannelBus
from sync.bus_redis import RedisBus


@dataclass(slots=True)
class Counts:
    """What the reader has read so far (see the module docstring)."""

    events: int = 0
    batches: int = 0
    disorder: int = 0
    gaps: int = 0
    position: int = 0


def names(spec: str) -> list[str]:
    """`u0-u1999` as `u0`..`u1999`, `w3` as itself, `` as none. Raises ValueError for a range
    whose ends differ in their prefix."""
    if not spec:
        return []
    if "-" not in spec:
        return [spec]
    low, high = spec.split("-", 1)
    head = low.rstrip("0123456789")
    if not high.startswith(head):
        raise ValueError(f"{spec!r}: both ends need the same prefix")
    return [f"{head}{i}" for i in range(int(low[len(head) :]), int(high[len(head) :]) + 1)]


async def read(bus: Bus, after: int, counts: Counts) -> None:
    """Read `bus` after position `after` into `counts` until it ends."""
    counts.position = after
    async for batch in bus.read(after):
        counts.batches += 1
        if batch.prev > counts.position:
            counts.gaps += 1
        for event in batch.events:
            if event.seq <= counts.position:
                counts.disorder += 1
            counts.events += 1
            counts.position = max(counts.position, event.seq)
        counts.position = max(counts.position, batch.last)


async def run(args: argparse.Namespace) -> None:
    """Build the bus, subscribe, read until SIGTERM; SIGUSR1 appends the counts to `--out`."""
    pool = await asyncpg.create_pool(args.dsn, min_size=1, max_size=2)
    bus: Bus
    if args.bus == "stream":
        bus = RedisBus(args.redis_url, args.prefix)
    else:
        bus = ChannelBus(args.redis_url, args.prefix, pool=pool)
    async with pool.acquire() as conn:
        after = await current_position(conn)
    topics = [user_channel(u) for u in names(args.users)]
    topics += [workspace_channel(w) for w in names(args.workspaces)]
    bus.subscribe(topics, after)
    counts = Counts()
    out: Path = args.out
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def report() -> None:
        with out.open("ab") as file:
            file.write(orjson.dumps(asdict(counts)) + b"\n")

    loop.add_signal_handler(signal.SIGUSR1, report)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reading = asyncio.create_task(read(bus, after, counts))
    await stop.wait()
    await bus.close()
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    await pool.close()


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.bus_input", description=__doc__)
    parser.add_argument("--bus", choices=("stream", "channels"), required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--users", default="", help="user ids: u0-u1999, u5 or none")
    parser.add_argument("--workspaces", default="", help="workspace ids: w0-w19, w3 or none")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    uvloop.run(run(args))  # the event loop uvicorn runs the gateway on


if __name__ == "__main__":
    main()
