"""Bus input on a core of its own: the channel bus's reader of one quarter against the stream
bus's reader of everything, with nothing else on that core.

`bench.fanout` measures each replica's bus input beside its loaded gateways, on a machine
whose two cores every process shares: the readers there run whenever Redis, the relay, the
publisher and five gateways leave them a core, and their CPU swings between repeats. In a
deployment a gateway replica does not share its core with Redis or the relay. Here only the
bus readers (`bench.bus_input`: a replica's `Bus.read` alone, no HTTP server, dispatcher or
presence) run, on `--reader-cpus` (cpu 0 by default), and everything else on the other cpus:
this process (the publisher), the Postgres server (the benchmarks' durable Postgres 16, wal
ingest) and every Redis, all started pinned, and the relay. Each reader's CPU is read from
`/proc/<pid>/task/*/schedstat` (time on a cpu, ns), not clock ticks.

Per `--commit-ms` interval (the publisher commits the events due every that many ms in one
transaction: one relay batch each), `--repeats` times, alternating, each setup runs once: a
fresh database (`bench.fanout`'s world of `--users` users in four quarters with their
workspaces), a relay on the setup's bus, its readers, `--rate` events/s from
`bench.fanout.MixedPublisher` (user and workspace events), `--warmup` seconds, then a window
of `--window` seconds:

- `stream`: the stream bus on one Redis, one reader of everything: "100 %";
- `channels-single` and `channels-cluster`: the channel bus on one Redis and on a
  `--nodes`-node Redis Cluster, one reader subscribing quarter 0's topics (what that quarter's
  replica subscribes) and one subscribing none (ticks only).

Reported per interval and setup: each reader's CPU (s/s, mean over repeats), its share of the
reader of everything of the same interval (goal for quarter 0 on the cluster: at most 0.35),
per repeat too, the events and batches read per second, any event read out of order or batch
past a gap (each must be 0), and the relay's CPU against the stream bus's relay. Prints a
table and writes JSON to `--out`.

    .venv/bin/python -m bench.input_share [--commit-ms 10,50] [--repeats 2] [--window 30]
        [--warmup 5] [--rate 2000] [--nodes 3] [--reader-cpus 0]
        [--setups stream,channels-single,channels-cluster] [--out bench/results-input-share.json]
"""

import argparse
import asyncio
import datetime
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nanoid
import orjson

from bench.database import wait_leading
from bench.fanout import (
    CHANNELS_CLUSTER,
    CHANNELS_SINGLE,
    GOAL_BUS_INPUT,
    INPUT_READERS,
    SETUPS,
    STREAM,
    BusSetup,
    InputReader,
    MixedPublisher,
    World,
    bus_setups,
    forget_keys,
    input_counts,
    input_row,
    mean,
    pinned,
    ratio,
    redis_binary,
    run_processes,
    seeded_database,
    start_input_reader,
    stop_input_readers,
    summarize_inputs,
)
from bench.latency import server_for
from bench.scenarios import on_cpu_seconds, parse_cpus
from bench.suite import machine
from core.schema.ingest import Mode
from tests.redis_cluster import RedisCluster
from tests.services import PgServer, RedisProcess

logger = logging.getLogger("bench.input_share")

DEFAULT_OUT: Final = Path(__file__).parent / "results-input-share.json"

START_S: Final = 2.0
"""Seconds the readers get to connect and subscribe before the publisher starts."""


@dataclass(frozen=True, slots=True)
class Options:
    """The command line: commit intervals (s), repeats, window and warm-up (s), events/s,
    cluster nodes, the readers' cpus, the setups run, where the process logs go; the world and
    the ingest mode (`bench.fanout`'s and wal, except in the smoke test)."""

    commits_s: tuple[float, ...] = (0.01, 0.05)
    repeats: int = 2
    window_s: float = 30.0
    warmup_s: float = 5.0
    rate: float = 2000.0
    nodes: int = 3
    reader_cpus: frozenset[int] = frozenset({0})
    setups: tuple[str, ...] = SETUPS
    log_dir: Path | None = None
    world: World = field(default_factory=World)
    ingest: Mode = "wal"


async def measure_setup(
    pg: PgServer, options: Options, setup: BusSetup, commit_s: float, log_dir: Path
) -> dict[str, Any]:
    """One run of `setup` (module docstring); returns each reader's figures (`input_row`) and
    the relay's CPU (s/s). Raises TimeoutError when the relay does not lead, RuntimeError when
    a reader exits or reports nothing, what asyncpg raises."""
    world = options.world
    name = f"usinput_{nanoid.generate('abcdefghijklmnopqrstuvwxyz', 8)}"
    run_logs = log_dir / name
    run_logs.mkdir(parents=True)
    dsn = await seeded_database(pg, name, world, options.ingest)
    prefix = f"{name}:"
    processes = run_processes(setup, dsn, prefix)
    readers: list[InputReader] = []
    stop = asyncio.Event()
    publishing: asyncio.Task[None] | None = None
    try:
        relay = processes.start("relay", log_file=run_logs / "relay.log")
        await wait_leading(dsn, options.ingest)
        kind = STREAM if setup.bus == STREAM else "channels"
        for label in INPUT_READERS[kind]:
            reader = start_input_reader(setup, world, label, dsn, prefix, run_logs)
            os.sched_setaffinity(reader.process.pid, options.reader_cpus)
            readers.append(reader)
        await asyncio.sleep(START_S)
        publisher = MixedPublisher(dsn, world, options.rate, 0.1, 1, commit_s)
        publishing = asyncio.create_task(publisher.run(stop), name="publisher")
        await asyncio.sleep(options.warmup_s)
        starts = [await input_counts(r) for r in readers]
        relay_cpu, began = on_cpu_seconds([relay.pid]), time.monotonic()
        await asyncio.sleep(options.window_s)
        seconds = time.monotonic() - began
        relay_cpu = on_cpu_seconds([relay.pid]) - relay_cpu
        ends = [await input_counts(r) for r in readers]
        stop.set()
        await publishing
    finally:
        await stop_input_readers(readers)
        stop.set()
        if publishing is not None and not publishing.done():
            publishing.cancel()
        await asyncio.to_thread(processes.stop_all)
        await pg.drop_database(name)
        await forget_keys(setup, prefix)
    return {
        "setup": setup.name,
        "commit_ms": commit_s * 1000,
        "window_s": seconds,
        "relay_cpu_per_s": relay_cpu / seconds,
        "inputs": {
            r.label: input_row(first, last, seconds, None)
            for r, first, last in zip(readers, starts, ends, strict=True)
        },
    }


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per commit interval and channel-bus setup, `bench.fanout.summarize_inputs` of its runs
    against the stream bus's of the same interval (each reader's mean CPU in s/s and its share
    of the reader of everything, overall and per repeat), with the quarter-0 reader's events
    and batches per second, the relay's CPU and its ratio to the stream bus's relay, and any
    disorder or gap of any reader of the interval."""
    rows = []
    for commit_ms in sorted({run["commit_ms"] for run in runs}):
        of = [run for run in runs if run["commit_ms"] == commit_ms]
        stream = [run for run in of if run["setup"] == STREAM]
        for setup in (CHANNELS_SINGLE, CHANNELS_CLUSTER):
            these = [run for run in of if run["setup"] == setup]
            if not these or not stream:
                continue
            inputs = summarize_inputs(stream, these)
            relay = mean([r["relay_cpu_per_s"] for r in these])
            quarter = [r["inputs"]["quarter0"] for r in these]
            every_row = [row for run in of for row in run["inputs"].values()]
            rows.append(
                {
                    "commit_ms": commit_ms,
                    "setup": setup,
                    **inputs,
                    "quarter_events_per_s": mean([q["events_per_s"] for q in quarter]),
                    "batches_per_s": mean([q["batches_per_s"] for q in quarter]),
                    "relay_cpu_per_s": relay,
                    "relay_of_stream": ratio(relay, mean([r["relay_cpu_per_s"] for r in stream])),
                    "disorder": sum(row["disorder"] for row in every_row),
                    "gaps": sum(row["gaps"] for row in every_row),
                    "goal_met": inputs["share"] is not None and inputs["share"] <= GOAL_BUS_INPUT,
                }
            )
    return rows


async def measure(pg: PgServer, options: Options, log_dir: Path) -> list[dict[str, Any]]:
    """Every interval, repeat and setup in turn, with one Redis and one cluster for all;
    returns the runs. Raises what `measure_setup` raises."""
    single = RedisProcess()
    cluster = RedisCluster(options.nodes)
    every = bus_setups(single, cluster)
    runs = []
    try:
        await asyncio.to_thread(single.start)
        if CHANNELS_CLUSTER in options.setups:
            await asyncio.to_thread(cluster.start)
        for commit_s in options.commits_s:
            for repeat in range(1, options.repeats + 1):
                for name in options.setups:
                    run = await measure_setup(pg, options, every[name], commit_s, log_dir)
                    run["repeat"] = repeat
                    logger.info("%s", line(run))
                    runs.append(run)
    finally:
        await asyncio.to_thread(cluster.stop)
        await asyncio.to_thread(single.stop)
    return runs


def line(run: dict[str, Any]) -> str:
    """One run in a line: each reader's CPU (ms/s) and events/s."""
    readers = ", ".join(
        f"{label} {row['cpu_per_s'] * 1000:.2f} ms/s ({row['events_per_s']:.0f} events/s)"
        for label, row in run["inputs"].items()
    )
    relay = run["relay_cpu_per_s"] * 1000
    return (
        f"commit {run['commit_ms']:g} ms, repeat {run['repeat']}, {run['setup']}: {readers};"
        f" relay {relay:.1f} ms/s"
    )


def print_summary(rows: Sequence[dict[str, Any]]) -> None:
    """The summary as a table."""
    print(
        f"{'commit':>7} {'setup':<17} {'everything':>10} {'quarter 0':>9} {'share':>6}"
        f" {'per repeat':<16} {'ticks only':>10} {'tick share':>10} {'goal':>5}"
    )
    for row in rows:
        repeats = " ".join(f"{s:.2f}" for s in row["share_per_repeat"] if s is not None)
        everything, quarter = row["everything_cpu_per_s"], row["quarter_cpu_per_s"]
        print(
            f"{row['commit_ms']:>4g} ms {row['setup']:<17}"
            f" {everything * 1000:>7.2f} ms {quarter * 1000:>6.2f} ms"
            f" {row['share']:>6.3f} {repeats:<16} {row['ticks_only_cpu_per_s'] * 1000:>7.2f} ms"
            f" {row['ticks_only_share']:>10.3f} {'met' if row['goal_met'] else 'no':>5}"
        )


def parse(argv: Sequence[str] | None) -> tuple[Options, Path]:
    """The command line (module docstring). Exits with 2 for a bad value."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.input_share", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--commit-ms", default="10,50", help="commit intervals, ms")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the window")
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second")
    parser.add_argument("--nodes", type=int, default=3, help="Redis Cluster nodes")
    parser.add_argument("--reader-cpus", default="0", help="the readers' cpus (taskset -c)")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--logs", type=Path, default=None, help="folder of the process logs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    setups = tuple(args.setups.split(","))
    if unknown := set(setups) - set(SETUPS):
        parser.error(f"unknown setups: {', '.join(sorted(unknown))}")
    if STREAM not in setups:
        parser.error("the stream setup is the baseline: it must run")
    try:
        commits = tuple(float(ms) / 1000 for ms in args.commit_ms.split(","))
        readers = frozenset(parse_cpus(args.reader_cpus))
    except ValueError as exc:
        parser.error(str(exc))
    if not readers or not readers < os.sched_getaffinity(0):
        parser.error(f"--reader-cpus must leave this machine's other cpus to the rest: {readers}")
    options = Options(
        commits_s=commits,
        repeats=args.repeats,
        window_s=args.window,
        warmup_s=args.warmup,
        rate=args.rate,
        nodes=args.nodes,
        reader_cpus=readers,
        setups=setups,
        log_dir=args.logs,
    )
    return options, args.out


def main(argv: Sequence[str] | None = None) -> int:
    """Run every setup, print the summary, write the report; 1 when a reader read an event out
    of order or past a gap, else 0."""
    options, out = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="userstream-input-share-"))
    began = datetime.datetime.now(datetime.UTC)
    rest = os.sched_getaffinity(0) - options.reader_cpus
    with pinned(rest), server_for(("wal",)) as pg:
        runs = asyncio.run(measure(pg, options, log_dir))
    rows = summarize(runs)
    print_summary(rows)
    report = {
        "started": began.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.UTC) - began).total_seconds()),
        "options": {
            "commit_ms": [c * 1000 for c in options.commits_s],
            "repeats": options.repeats,
            "window_s": options.window_s,
            "warmup_s": options.warmup_s,
            "rate": options.rate,
            "nodes": options.nodes,
            "reader_cpus": sorted(options.reader_cpus),
            "setups": list(options.setups),
        },
        "machine": machine(),
        "redis": redis_binary(),
        "runs": runs,
        "summary": rows,
        "logs": str(log_dir),
    }
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    return 1 if any(row["disorder"] or row["gaps"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
