"""Interest-based fan-out: the channel bus against the stream bus, each replica's bus input.

With the stream bus (`USERSTREAM_BUS=stream`, sync/bus_redis.py) every gateway replica reads
and decodes every event; with the channel bus (`USERSTREAM_BUS=channels`,
sync/bus_channels.py) a replica subscribes only its connected users' topics (`user:{id}`,
`workspace:{id}`, sync/topics.py), on a Redis Cluster or one Redis. Two claims, each measured
against a baseline of the same invocation:

1. **Replicas with disjoint users** (`fanout`). A fresh database (migrated, then
   `set_ingest_mode`; `--ingest wal` by default, on the benchmarks' durable Postgres 16) holds
   `--users` users split into `--gateways` quarters of consecutive ids; each quarter has
   `--workspaces` workspaces of its own (`w<j>`, a public stream `s<j>` each, every user an
   active member of exactly one), so a workspace event concerns one quarter only. One
   `userstream relay` and `--gateways` loaded `userstream serve` processes, plus one extra
   gateway with no clients at all; each user holds one SSE stream to its quarter's gateway
   (the C load client `bench/client/sseload`, one process per gateway, not pinned). Once every
   stream is open and the gateways are quiet, each gateway's CPU at rest is read over 6 s
   (presence heartbeats, status reports, keep-alives; no event published); then this process
   publishes `--rate` events/s through the SDK (`core.publish.publish_many`, the events due
   every `--commit-ms` ms, 10 by default, in one transaction): each is a workspace event
   (`stream_event.created` in a random workspace, delivered to its members) with probability
   `--workspace-share`, else a user event (`notification.created` for a random user,
   delivered to that user). After `--warmup` seconds, every gateway process's CPU (utime +
   stime from `/proc/<pid>/stat`) and metrics are read, and again `--window` seconds later.
   Runs, alternating, `--repeats` times each:

   (a) + (c) the stream bus on one Redis (`tests.services.RedisProcess`): the loaded
       gateways (a), and the extra gateway (c), which reads the same event flow and serves
       nobody: the pure cost of reading everything, "100 %";
   (b) + (d) the channel bus on a `--nodes` node Redis Cluster (`tests.redis_cluster`): the
       loaded gateways (b), and the extra gateway (d), which subscribes no topic and hears
       only the ticks.

   A gateway whose `userstream_bus_degraded` gauge is 1 at the end of the window was reading
   the outbox, not the bus: the report counts them, and such runs say nothing of the bus.

   Delivery work is the same in (a) and (b) (same clients, same events), so a channel-bus
   replica's bus-input CPU is estimated as CPU(b) - (CPU(a) - CPU(c)), the mean over the
   loaded replicas, reported as a share of CPU(c) (goal: at most 0.35); per repeat and per
   replica as well, to show the spread. Also: events each replica received per second (a:
   `userstream_bus_events_total`, every event; b: `userstream_bus_received_events_total`,
   decoded from its topics' messages), bytes it received (a: the stream entries over the
   window, read back with XRANGE; b: `userstream_bus_received_bytes_total` by kind),
   deliveries (`userstream_deliveries_total`) per CPU-second of the loaded replicas, b / a
   (goal: at least 1), CPU(d) / CPU(c), the same figures with each replica's CPU at rest
   subtracted first (what the event flow itself costs), and each quarter's deliveries against
   the events published for it (workspace events times the workspace size). `--setups` picks
   the runs: besides the cluster, the channel bus on one Redis (the stream bus's) can run
   too, and with both the cluster's bus-input share is also estimated from the one-Redis share
   plus the cluster's extra tick cost, (d on the cluster - d on one Redis) / c.

   Bus input is also measured directly, with no delivery work to subtract: each run starts
   `bench.bus_input` processes beside the gateways, each the bus reader of a replica alone
   (no HTTP server, dispatcher or presence): on the stream bus one reading everything, on the
   channel bus one subscribing quarter 0's topics (what its loaded gateway subscribes) and one
   subscribing none (ticks only). Their CPU over the window (time on a cpu, from
   `/proc/<pid>/task/*/schedstat`), as a share of the reader of everything, is the direct
   bus-input share (goal: at most 0.35), with the events each read against those published
   for quarter 0, and any read out of order or past a gap. `bench.input_share` measures the
   same readers with a core of their own.

2. **Targeted on one Redis** (`targeted`): the suite's `targeted` scenario (bench/scenarios.py:
   10,000 users, 5,000 user events/s, gateway pinned to cpu 0, client, publisher and relay on
   cpu 1, one Redis: the machine's, as `bench.suite` uses) on the stream bus and on the
   channel bus in turn, `--targeted-rounds` times each, alternating; ratios channels / stream
   of deliveries/s, gateway CPU and p99.

Prints the tables and writes JSON to `--out` (default `bench/results-fanout.json`). Every
process, Redis and database started here is stopped or dropped whatever happens; process logs
stay in `--logs` (default: a new temporary folder), named in the report.

    .venv/bin/python -m bench.fanout [--users 8000] [--gateways 4] [--workspaces 20]
                                     [--rate 2000] [--commit-ms 10] [--workspace-share 0.1]
                                     [--warmup 3] [--window 20] [--repeats 2] [--nodes 3]
                                     [--setups stream,channels-single,channels-cluster]
                                     [--targeted-rounds 2] [--ingest wal|trigger]
                                     [--py-spy BINARY] [--out bench/results-fanout.json]
"""

import argparse
import asyncio
import contextlib
import datetime
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
import nanoid
import orjson
import redis.asyncio as aioredis

from bench import loadclient, scenarios
from bench.database import wait_leading
from bench.latency import describe, server_for
from bench.loadclient import LoadResult
from bench.scenarios import (
    EVENT_STREAM_HEADERS,
    FULL,
    QUICK,
    Context,
    cpu_seconds,
    on_cpu_seconds,
    parse_cpus,
)
from bench.suite import Bus, machine, target_factory
from bench.targets import payload
from core.publish import OutboxEvent, publish_many
from core.schema.ingest import MODES, Mode, set_ingest_mode
from core.schema.migrations import migrate
from tests.e2e.harness import JWT_SECRET, Gateway, Processes, Samples, scrape, token
from tests.redis_cluster import RedisCluster
from tests.services import PgServer, RedisProcess, _server_binary, redis_server

DEFAULT_OUT: Final = Path(__file__).parent / "results-fanout.json"

BODY_BYTES: Final = 200
"""Size of every event's `data` (`bench.targets.payload`), bytes."""

COMMIT_S: Final = 0.01
"""By default the publisher commits the events due every 10 ms in one transaction
(`--commit-ms`): about 100 relay batches/s."""

GOAL_BUS_INPUT: Final = 0.35
"""Goal: a channel-bus replica's bus-input CPU at most this share of reading everything."""

GOAL_DELIVERIES_PER_CORE: Final = 1.0
"""Goal: deliveries per CPU-second on the channel bus at least this times the stream bus's."""

CONNECT_TIMEOUT_S: Final = 60.0
"""Longest wait for every stream to be open on its gateway, seconds."""

SETTLE_S: Final = 10.0
"""Longest wait, once every stream is open, for the gateways to go quiet, seconds."""

QUIET_CORES: Final = 0.15
"""The gateways count as quiet when together they use less CPU than this (s/s) over 0.5 s."""

REST_S: Final = 6.0
"""Seconds over which each gateway's CPU at rest is read (every stream open, no event
published), before the publisher starts: three presence heartbeats (every 2 s by default)."""

TAIL_S: Final = 5.0
"""Each load client's measure phase outlasts the publisher's window by about this, seconds."""

TOKEN_TTL_S: Final = 3600

START_ATTEMPTS: Final = 3
"""Tries to start one gateway on a port of its own (`start_gateway`)."""

PORT_CHECK_S: Final = 10.0
"""Longest wait, once a gateway answers `/healthz`, to see it listening on its port, s."""

METRIC_KEYS: Final = {
    "connections": ("userstream_connections", ()),
    "deliveries": ("userstream_deliveries_total", ()),
    "bus_events": ("userstream_bus_events_total", ()),
    "received_events": ("userstream_bus_received_events_total", ()),
    "topic_bytes": ("userstream_bus_received_bytes_total", (("kind", "topic"),)),
    "tick_bytes": ("userstream_bus_received_bytes_total", (("kind", "tick"),)),
    "gap_fills": ("userstream_gap_fills_total", ()),
    "topics": ("userstream_bus_topics", ()),
    "degraded": ("userstream_bus_degraded", ()),
    "degraded_events": ("userstream_degraded_events_total", ()),
}
"""The gateway metrics read at both ends of the window, by short name."""

GAUGES: Final = frozenset({"connections", "topics", "degraded"})
"""Of `METRIC_KEYS`, those reported as their value at the end of the window, not a rate."""

STREAM: Final = "stream"
CHANNELS_SINGLE: Final = "channels-single"
CHANNELS_CLUSTER: Final = "channels-cluster"
SETUPS: Final = (STREAM, CHANNELS_SINGLE, CHANNELS_CLUSTER)
"""The runs' buses: the stream bus on one Redis, the channel bus on one Redis, the channel
bus on a Redis Cluster."""


@dataclass(frozen=True, slots=True)
class World:
    """`users` users (`u0..`) in `quarters` quarters of consecutive ids, one per loaded
    gateway; each quarter holds `workspaces` workspaces (`w<j>`, public stream `s<j>`) of
    consecutive users, every user an active member of one. Raises ValueError unless the users
    split evenly into quarters and a quarter evenly into its workspaces."""

    users: int = 8000
    quarters: int = 4
    workspaces: int = 20

    def __post_init__(self) -> None:
        if self.users % self.quarters or (self.users // self.quarters) % self.workspaces:
            raise ValueError(
                f"{self.users} users do not split evenly into {self.quarters} quarters of"
                f" {self.workspaces} workspaces"
            )

    @property
    def per_quarter(self) -> int:
        """Users of one quarter (streams of one loaded gateway)."""
        return self.users // self.quarters

    @property
    def workspace_size(self) -> int:
        """Members of one workspace (deliveries of one workspace event)."""
        return self.per_quarter // self.workspaces

    @property
    def all_workspaces(self) -> int:
        """Workspaces in all."""
        return self.quarters * self.workspaces

    def quarter_of_user(self, user: int) -> int:
        """The quarter of user `user`."""
        return user // self.per_quarter

    def quarter_of_workspace(self, workspace: int) -> int:
        """The quarter of workspace `workspace`."""
        return workspace // self.workspaces

    def users_of(self, quarter: int) -> range:
        """The user numbers of `quarter`."""
        return range(quarter * self.per_quarter, (quarter + 1) * self.per_quarter)


@dataclass(frozen=True, slots=True)
class Options:
    """The command line: the world, the load (events/s, the publisher's commit interval in
    s, share of workspace events), the phases (s: warm-up, window, longest settle, rest, the
    load clients' tail past the window), the setups run and the repeats of each, cluster
    nodes, ingest mode, rounds of the targeted comparison (0: not run) and its sizes
    (`targeted_quick`: the suite's quick ones), the publisher's random seed, where process
    logs go (None: a new temporary folder), and a py-spy binary to profile with (None: no
    profiles)."""

    world: World = field(default_factory=World)
    rate: float = 2000.0
    commit_s: float = COMMIT_S
    workspace_share: float = 0.1
    warmup_s: float = 3.0
    window_s: float = 20.0
    settle_s: float = SETTLE_S
    rest_s: float = REST_S
    tail_s: float = TAIL_S
    repeats: int = 2
    nodes: int = 3
    ingest: Mode = "wal"
    setups: tuple[str, ...] = SETUPS
    targeted_rounds: int = 2
    targeted_quick: bool = False
    seed: int = 1
    log_dir: Path | None = None
    py_spy: Path | None = None


# --- the world in Postgres ---------------------------------------------------------------------


async def seed_world(conn: asyncpg.Connection, world: World) -> None:
    """Workspaces `w<j>` with a public stream `s<j>` each, and every user `u<i>` an active
    member of workspace `w<i // workspace_size>` (COPY)."""
    workspaces = [(f"w{j}",) for j in range(world.all_workspaces)]
    await conn.copy_records_to_table("workspaces", records=workspaces, columns=["id"])
    await conn.copy_records_to_table(
        "streams",
        records=[(f"s{j}", f"w{j}", "public") for j in range(world.all_workspaces)],
        columns=["id", "workspace_id", "visibility"],
    )
    await conn.copy_records_to_table(
        "workspace_members",
        records=[(f"w{i // world.workspace_size}", f"u{i}") for i in range(world.users)],
        columns=["workspace_id", "user_id"],
    )


# --- the publisher -----------------------------------------------------------------------------


@dataclass(slots=True)
class Published:
    """Events published so far, by quarter: user events, workspace events."""

    user: list[int]
    workspace: list[int]

    def copy(self) -> "Published":
        """A snapshot."""
        return Published(list(self.user), list(self.workspace))

    def since(self, earlier: "Published") -> "Published":
        """What was published after the snapshot `earlier`."""
        return Published(
            [a - b for a, b in zip(self.user, earlier.user, strict=True)],
            [a - b for a, b in zip(self.workspace, earlier.workspace, strict=True)],
        )

    @property
    def total(self) -> int:
        """Every event."""
        return sum(self.user) + sum(self.workspace)


class MixedPublisher:
    """Commits `rate` events/s through the SDK, the events due every `commit_s` seconds in one
    transaction (`publish_many`), until `stop` is set: each a workspace event
    (`stream_event.created` in a random workspace's public stream) with probability
    `workspace_share`, else a user event
    (`notification.created` for a random user); `data` is `payload(200)` with `ts` taken just
    before the call. `published` counts them by quarter; `behind_max` is the most events ever
    due at once (a sign the publisher could not keep up); `elapsed_s` the time it ran. Raises
    what asyncpg raises."""

    def __init__(
        self,
        dsn: str,
        world: World,
        rate: float,
        workspace_share: float,
        seed: int,
        commit_s: float = COMMIT_S,
    ) -> None:
        self.dsn = dsn
        self.world = world
        self.rate = rate
        self.commit_s = commit_s
        self.workspace_share = workspace_share
        self.published = Published([0] * world.quarters, [0] * world.quarters)
        self.behind_max = 0
        self.elapsed_s = 0.0
        self._random = random.Random(seed)
        self._sequence = 0

    def _events(self, count: int) -> list[OutboxEvent]:
        world, pick = self.world, self._random
        data = orjson.Fragment(payload(BODY_BYTES, time.time_ns()))
        events = []
        for _ in range(count):
            self._sequence += 1
            if pick.random() < self.workspace_share:
                workspace = pick.randrange(world.all_workspaces)
                self.published.workspace[world.quarter_of_workspace(workspace)] += 1
                event = OutboxEvent(
                    "stream_event.created", "stream_event", "create", f"e{self._sequence}",
                    workspace_id=f"w{workspace}", stream_id=f"s{workspace}", data=data,
                )  # fmt: skip
            else:
                user = pick.randrange(world.users)
                self.published.user[world.quarter_of_user(user)] += 1
                event = OutboxEvent(
                    "notification.created", "notification", "create", f"n{self._sequence}",
                    user_id=f"u{user}", data=data,
                )  # fmt: skip
            events.append(event)
        return events

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set (see the class docstring)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            start = time.monotonic()
            next_tick = start
            sent = 0
            while not stop.is_set():
                due = int(self.rate * (time.monotonic() - start)) - sent
                if due > 0:
                    self.behind_max = max(self.behind_max, due)
                    events = self._events(due)
                    async with conn.transaction():
                        await publish_many(conn, events)
                    sent += due
                next_tick += self.commit_s
                await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            self.elapsed_s = time.monotonic() - start
        finally:
            await conn.close()


# --- readings ----------------------------------------------------------------------------------


def listening_pids(port: int) -> list[int]:
    """The processes listening on TCP `port` (`ss -Hltnp`, iproute2; this user's only)."""
    out = subprocess.run(
        ["ss", "-Hltnp", f"( sport = :{port} )"], capture_output=True, text=True, check=False
    ).stdout
    return sorted({int(pid) for pid in re.findall(r"pid=(\d+)", out)})


@dataclass(slots=True)
class Reading:
    """One gateway at one moment: its CPU seconds (utime + stime) and `METRIC_KEYS` values."""

    cpu_s: float
    metrics: dict[str, float]


async def read_gateway(gateway: Gateway, cpu_first: bool) -> Reading:
    """CPU and metrics of `gateway`; `cpu_first` reads CPU before scraping (at the end of a
    window) rather than after (at its start), so the scrape itself is never counted."""
    cpu = cpu_seconds([gateway.process.pid]) if cpu_first else 0.0
    samples: Samples = await scrape(f"{gateway.url}/metrics")
    if not cpu_first:
        cpu = cpu_seconds([gateway.process.pid])
    return Reading(cpu, {name: samples.get(key, 0.0) for name, key in METRIC_KEYS.items()})


def replica_row(start: Reading, end: Reading, seconds: float) -> dict[str, Any]:
    """One gateway's figures over a window of `seconds`: CPU s/s, and per second each counter
    of `METRIC_KEYS` (gauges: their value at the end)."""
    row: dict[str, Any] = {"cpu_s": end.cpu_s - start.cpu_s}
    row["cpu_per_s"] = row["cpu_s"] / seconds
    for name in METRIC_KEYS:
        if name in GAUGES:
            row[name] = end.metrics[name]
        else:
            row[name] = end.metrics[name] - start.metrics[name]
            row[f"{name}_per_s"] = row[name] / seconds
    return row


def _entry_position(entry_id: object) -> int:
    """The position of a stream entry ID (`<position>-0`, sync/bus_redis.py)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


async def stream_bytes(url: str, key: str, after: int, upto: int) -> tuple[int, int]:
    """Bytes and number of the stream bus's batches in `(after, upto]` (the `b` field of
    each entry of `key`, sync/bus_redis.py): what each stream-bus replica read over the
    window."""
    client = aioredis.Redis.from_url(url)
    total, batches, low = 0, 0, after
    try:
        while True:
            entries = await client.xrange(key, f"({low}-0", f"{upto}-0", count=1000)
            if not entries:
                return total, batches
            for _, fields in entries:
                total += len((fields or {}).get(b"b", b""))
            batches += len(entries)
            low = _entry_position(entries[-1][0])
    finally:
        await client.aclose()


async def stream_position(url: str, key: str) -> int:
    """The position of the stream bus's last batch (0 when empty)."""
    client = aioredis.Redis.from_url(url)
    try:
        entries = await client.xrevrange(key, "+", "-", count=1)
    finally:
        await client.aclose()
    return _entry_position(entries[0][0]) if entries else 0


# --- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BusSetup:
    """Where a run's bus lives: its `name` (`SETUPS`), `bus` (`USERSTREAM_BUS`), the Redis
    URL, what it is (for the report), and the ports of its Redis processes (for their CPU)."""

    name: str
    bus: Bus
    url: str
    where: str
    ports: tuple[int, ...]


def stream_paths(world: World, quarter: int) -> list[str]:
    """`/me/stream?access_token=<HS256 JWT>` for each user of `quarter`."""
    return [
        f"/me/stream?access_token={token(f'u{i}', ttl_s=TOKEN_TTL_S)}"
        for i in world.users_of(quarter)
    ]


async def wait_connected(
    gateways: Sequence[Gateway], count: int, loads: Sequence["asyncio.Task[LoadResult]"]
) -> None:
    """Wait until every gateway holds `count` streams (`userstream_connections`). Raises
    RuntimeError when a load client ended first, TimeoutError after CONNECT_TIMEOUT_S."""
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        while True:
            for load in loads:
                if load.done():
                    load.result()
                    raise RuntimeError("a load client ended before every stream was open")
            held = [
                (await scrape(f"{g.url}/metrics")).get(METRIC_KEYS["connections"], 0.0)
                for g in gateways
            ]
            if all(h >= count for h in held):
                return
            await asyncio.sleep(0.1)


async def rest_cpu(gateways: Sequence[Gateway], seconds: float) -> list[float]:
    """Each gateway's CPU s/s over `seconds` with every stream open and no event published:
    what it spends without events (presence heartbeats and ticks, status reports, keep-alives,
    the bus reader's idle wake-ups)."""
    pids = [g.process.pid for g in gateways]
    before, began = [cpu_seconds([pid]) for pid in pids], time.monotonic()
    await asyncio.sleep(seconds)
    after, elapsed = [cpu_seconds([pid]) for pid in pids], time.monotonic() - began
    return [(b - a) / elapsed for a, b in zip(before, after, strict=True)]


async def wait_quiet(gateways: Sequence[Gateway], limit_s: float) -> float:
    """Wait (about `limit_s` at most) until the gateways together use under QUIET_CORES over
    0.5 s; returns the seconds waited."""
    began = time.monotonic()
    pids = [g.process.pid for g in gateways]
    while time.monotonic() - began < limit_s:
        cpu0 = cpu_seconds(pids)
        await asyncio.sleep(0.5)
        if (cpu_seconds(pids) - cpu0) / 0.5 < QUIET_CORES:
            break
    return time.monotonic() - began


def client_row(result: LoadResult) -> dict[str, Any]:
    """A load client's figures: streams ready and failed, events and latency (ms, from the
    payload's `ts` to receipt) over its whole measure phase, streams the server closed."""
    return {
        "ready": result.ready,
        "failed": result.failed,
        "events": result.events,
        "p50_ms": result.latency_ms.p50,
        "p99_ms": result.latency_ms.p99,
        "max_ms": result.latency_ms.max,
        "closed_by_server": result.closed_by_server.healthy,
        "errors": result.errors,
    }


def merged_clients(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several load clients' rows as one: sums, and the worst latency figures."""
    errors: dict[str, int] = {}
    for row in rows:
        for kind, n in row["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    return {
        "ready": sum(r["ready"] for r in rows),
        "failed": sum(r["failed"] for r in rows),
        "events": sum(r["events"] for r in rows),
        "p50_ms_max": max(r["p50_ms"] for r in rows),
        "p99_ms_max": max(r["p99_ms"] for r in rows),
        "max_ms": max(r["max_ms"] for r in rows),
        "closed_by_server": sum(r["closed_by_server"] for r in rows),
        "errors": errors,
    }


async def start_gateways(processes: Processes, count: int, log_dir: Path) -> list[Gateway]:
    """`count` gateways started together (each waited for until `/healthz` answers and it
    holds its port); the last is the one without clients. Logs in `log_dir`. Raises
    RuntimeError when one does not come up in START_ATTEMPTS tries."""
    names = [f"gateway{q}" for q in range(count - 1)] + ["gateway-idle"]
    return list(await asyncio.gather(*(start_gateway(processes, log_dir, n) for n in names)))


async def start_gateway(processes: Processes, log_dir: Path, name: str) -> Gateway:
    """One gateway that answers `/healthz` and listens on its port itself. `free_port` only
    finds a port free at the time: a gateway started at the same moment (here or by anyone
    else on the machine) may take it first, and the `/healthz` that answered was then the
    other one's; such a gateway exits (uvicorn: status 3) and is started again on another
    port. Raises RuntimeError after START_ATTEMPTS tries."""
    for _ in range(START_ATTEMPTS):
        gateway = await asyncio.to_thread(processes.gateway, log_file=log_dir / f"{name}.log")
        port = int(gateway.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + PORT_CHECK_S
        while gateway.process.poll() is None and time.monotonic() < deadline:
            if gateway.process.pid in await asyncio.to_thread(listening_pids, port):
                return gateway
            await asyncio.sleep(0.1)
        gateway.process.kill()
        await asyncio.to_thread(gateway.process.wait)
        processes.started.remove(gateway.process)  # replaced: not a process that exited
    raise RuntimeError(f"{name} did not come up on a port of its own in {START_ATTEMPTS} tries")


def start_profiles(
    options: Options, gateways: Sequence[Gateway], log_dir: Path
) -> list[subprocess.Popen[bytes]]:
    """With `options.py_spy`, `py-spy record --nonblocking --format raw` over the window of
    the first loaded gateway and of the one without clients, into `log_dir`
    (`profile-gateway0.txt`, `profile-gateway-idle.txt`: collapsed stacks with counts)."""
    if options.py_spy is None:
        return []
    started = []
    for label, gateway in (("gateway0", gateways[0]), ("gateway-idle", gateways[-1])):
        argv = [str(options.py_spy), "record", "--nonblocking", "--format", "raw"]
        argv += ["--rate", "200", "--duration", str(math.ceil(options.window_s))]
        argv += ["--pid", str(gateway.process.pid), "-o", str(log_dir / f"profile-{label}.txt")]
        started.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return started


async def seeded_database(pg: PgServer, name: str, world: World, ingest: Mode) -> str:
    """A new database `name` on `pg`, migrated, in `ingest` mode and holding `world`; returns
    its DSN. Dropped again if any of that fails (what asyncpg raises)."""
    dsn = await pg.create_database(name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
            await set_ingest_mode(conn, ingest)
            await seed_world(conn, world)
        finally:
            await conn.close()
    except BaseException:
        await pg.drop_database(name)
        raise
    return dsn


def run_processes(setup: BusSetup, dsn: str, prefix: str) -> Processes:
    """The relay and gateways of a run on `setup`'s bus, its keys and channels under
    `prefix`: warnings only in their logs, no drain on stop."""
    return Processes(
        {
            "DATABASE_URL": dsn,
            "REDIS_URL": setup.url,
            "USERSTREAM_BUS": setup.bus,
            "USERSTREAM_REDIS_PREFIX": prefix,
            "USERSTREAM_JWT_SECRET": JWT_SECRET,
            "USERSTREAM_LOG_LEVEL": "warning",
            "USERSTREAM_DRAIN_S": "0",
        }
    )


async def measure_run(
    pg: PgServer, options: Options, setup: BusSetup, repeat: int, log_dir: Path
) -> dict[str, Any]:
    """One run on `setup`'s bus (module docstring, claim 1); returns its figures. Raises
    TimeoutError when the relay does not lead or the streams do not open in time,
    RuntimeError when a process or a load client fails, what asyncpg raises."""
    world = options.world
    name = f"usfanout_{nanoid.generate('abcdefghijklmnopqrstuvwxyz', 8)}"
    run_logs = log_dir / f"{setup.name}-{repeat}"
    run_logs.mkdir(parents=True, exist_ok=True)
    dsn = await seeded_database(pg, name, world, options.ingest)
    prefix = f"{name}:"
    processes = run_processes(setup, dsn, prefix)
    loads: list[asyncio.Task[LoadResult]] = []
    readers: list[InputReader] = []
    stop = asyncio.Event()
    publishing: asyncio.Task[None] | None = None
    try:
        relay = processes.start("relay", log_file=run_logs / "relay.log")
        gateways, _ = await asyncio.gather(
            start_gateways(processes, world.quarters + 1, run_logs),
            wait_leading(dsn, options.ingest),
        )
        loaded = gateways[:-1]
        kind = STREAM if setup.bus == STREAM else "channels"
        readers = [
            start_input_reader(setup, world, label, dsn, prefix, run_logs)
            for label in INPUT_READERS[kind]
        ]
        measure_s = sum(
            (options.settle_s, options.rest_s, options.warmup_s, options.window_s, options.tail_s)
        )
        for quarter, gateway in enumerate(loaded):
            port = int(gateway.url.rsplit(":", 1)[1])
            loads.append(
                asyncio.create_task(
                    loadclient.run_load(
                        "127.0.0.1",
                        port,
                        stream_paths(world, quarter),
                        connections=world.per_quarter,
                        cpu=None,
                        concurrency=250,
                        ready_marker=b"event: offset",
                        headers=EVENT_STREAM_HEADERS,
                        duration_s=measure_s,
                        connect_timeout_s=CONNECT_TIMEOUT_S,
                    )
                )
            )
        connect_began = time.monotonic()
        await wait_connected(loaded, world.per_quarter, loads)
        connect_s = time.monotonic() - connect_began
        settle_s = await wait_quiet(gateways, options.settle_s)
        rest = await rest_cpu(gateways, options.rest_s)
        publisher = MixedPublisher(
            dsn, world, options.rate, options.workspace_share, options.seed + repeat,
            options.commit_s,
        )  # fmt: skip
        publishing = asyncio.create_task(publisher.run(stop), name="publisher")
        await asyncio.sleep(options.warmup_s)
        key = f"{prefix}events"
        position0 = await stream_position(setup.url, key) if setup.bus == "stream" else 0
        starts = [await read_gateway(g, cpu_first=False) for g in gateways]
        input_starts = [await input_counts(r) for r in readers]
        profiles = start_profiles(options, gateways, run_logs)
        redis_pids = [pid for port in setup.ports for pid in listening_pids(port)]
        others0 = (cpu_seconds([relay.pid]), cpu_seconds(redis_pids))
        published0, t0 = publisher.published.copy(), time.monotonic()
        await asyncio.sleep(options.window_s)
        seconds = time.monotonic() - t0
        others1 = (cpu_seconds([relay.pid]), cpu_seconds(redis_pids))
        input_ends = [await input_counts(r) for r in readers]
        ends = [await read_gateway(g, cpu_first=True) for g in reversed(gateways)][::-1]
        for profile in profiles:
            await asyncio.to_thread(profile.wait, 30)
        published = publisher.published.since(published0)
        read_bytes: tuple[int, int] | None = None
        if setup.bus == "stream":
            position1 = await stream_position(setup.url, key)
            read_bytes = await stream_bytes(setup.url, key, position0, position1)
        stop.set()
        await publishing
        clients = [client_row(await load) for load in loads]
        exited = [f"{p.pid}: {p.returncode}" for p in processes.started if p.poll() is not None]
    finally:
        await stop_input_readers(readers)
        stop.set()
        if publishing is not None and not publishing.done():
            publishing.cancel()
        for load in loads:
            load.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        await asyncio.to_thread(processes.stop_all)
        await pg.drop_database(name)
        await forget_keys(setup, prefix)
    idle = replica_row(starts[-1], ends[-1], seconds)
    idle["rest_cpu_per_s"] = rest[-1]
    replicas = []
    for quarter, (start, end) in enumerate(zip(starts[:-1], ends[:-1], strict=True)):
        row = replica_row(start, end, seconds)
        expected = published.user[quarter] + published.workspace[quarter] * world.workspace_size
        row["quarter"] = quarter
        row["rest_cpu_per_s"] = rest[quarter]
        row["expected_deliveries"] = expected
        row["delivered_per_expected"] = row["deliveries"] / expected if expected else None
        row["clients"] = clients[quarter]
        replicas.append(row)
    inputs = {}
    wanted = {"quarter0": published.user[0] + published.workspace[0], "no-topics": 0}
    for reader, first, last in zip(readers, input_starts, input_ends, strict=True):
        inputs[reader.label] = input_row(first, last, seconds, wanted.get(reader.label))
    return {
        "setup": setup.name,
        "bus": setup.bus,
        "redis": setup.where,
        "repeat": repeat,
        "window_s": seconds,
        "connect_s": connect_s,
        "settle_s": settle_s,
        "published": {
            "events": published.total,
            "per_s": published.total / seconds,
            "user_by_quarter": published.user,
            "workspace_by_quarter": published.workspace,
            "publisher_behind_max": publisher.behind_max,
        },
        "replicas": replicas,
        "idle": idle,
        "inputs": inputs,
        "relay_cpu_per_s": (others1[0] - others0[0]) / seconds,
        "redis_cpu_per_s": (others1[1] - others0[1]) / seconds,
        "redis_processes": len(redis_pids),
        "stream_bytes_per_s": None if read_bytes is None else read_bytes[0] / seconds,
        "stream_batches_per_s": None if read_bytes is None else read_bytes[1] / seconds,
        "degraded_replicas": sum(1 for r in [*replicas, idle] if r["degraded"]),
        "clients": merged_clients(clients),
        "exited": exited,
        "logs": str(run_logs),
    }


async def forget_keys(setup: BusSetup, prefix: str) -> None:
    """Delete the run's keys (its stream, status and presence reports) on the bus's Redis;
    a cluster's keys expire on their own (only status and presence reports are kept)."""
    if setup.bus != "stream":
        return
    client = aioredis.Redis.from_url(setup.url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# --- derived figures ---------------------------------------------------------------------------


INPUT_READERS: Final = {STREAM: ("everything",), "channels": ("quarter0", "no-topics")}
"""The `bench.bus_input` processes of a run, by bus: on the stream bus one reading
everything; on the channel bus one subscribing quarter 0's topics (what its loaded replica
subscribes) and one subscribing none (ticks only)."""

REPORT_WAIT_S: Final = 5.0
"""Longest wait for a `bench.bus_input` process to append its counts, seconds."""


@dataclass(slots=True)
class InputReader:
    """A running `bench.bus_input` process: its `label` (`INPUT_READERS`) and counts file."""

    label: str
    process: subprocess.Popen[bytes]
    out: Path


def start_input_reader(
    setup: BusSetup, world: World, label: str, dsn: str, prefix: str, log_dir: Path
) -> InputReader:
    """Start `python -m bench.bus_input` on `setup`'s bus for the topics `label` names."""
    out = log_dir / f"input-{label}.jsonl"
    argv = [sys.executable, "-m", "bench.bus_input", "--bus", setup.bus]
    argv += ["--redis-url", setup.url, "--prefix", prefix, "--dsn", dsn, "--out", str(out)]
    if label == "quarter0":
        users = world.users_of(0)
        argv += ["--users", f"u{users[0]}-u{users[-1]}"]
        argv += ["--workspaces", f"w0-w{world.workspaces - 1}"]
    with open(log_dir / f"input-{label}.log", "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=log)
    return InputReader(label, process, out)


async def input_counts(reader: InputReader) -> dict[str, Any]:
    """`reader`'s time on a cpu (s, `on_cpu_seconds`, read first) and the counts it appends on
    SIGUSR1. Raises RuntimeError when it exited or appends nothing within `REPORT_WAIT_S`."""
    cpu = on_cpu_seconds([reader.process.pid])
    lines = reader.out.read_bytes().count(b"\n") if reader.out.exists() else 0
    reader.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + REPORT_WAIT_S
    while time.monotonic() < deadline:
        if reader.process.poll() is not None:
            raise RuntimeError(f"bus input reader {reader.label} exited")
        if reader.out.exists():
            text = reader.out.read_bytes().splitlines()
            if len(text) > lines:
                return {"cpu_s": cpu, **orjson.loads(text[-1])}
        await asyncio.sleep(0.05)
    raise RuntimeError(f"bus input reader {reader.label} reported nothing")


async def stop_input_readers(readers: Sequence[InputReader]) -> None:
    """SIGTERM every reader, then SIGKILL one still running 10 s later."""
    for reader in readers:
        reader.process.terminate()
    for reader in readers:
        try:
            await asyncio.to_thread(reader.process.wait, 10)
        except subprocess.TimeoutExpired:
            reader.process.kill()


def input_row(
    start: dict[str, Any], end: dict[str, Any], seconds: float, expected: int | None
) -> dict[str, Any]:
    """One input reader over the window: CPU s/s, events and batches per second, events
    against `expected` (None: all), events read out of order and gaps seen."""
    events = end["events"] - start["events"]
    return {
        "cpu_per_s": (end["cpu_s"] - start["cpu_s"]) / seconds,
        "events_per_s": events / seconds,
        "batches_per_s": (end["batches"] - start["batches"]) / seconds,
        "read_per_expected": events / expected if expected else None,
        "disorder": end["disorder"],
        "gaps": end["gaps"] - start["gaps"],
    }


def mean(values: Sequence[float]) -> float | None:
    """The arithmetic mean; None for no values."""
    return sum(values) / len(values) if values else None


def ratio(value: float | None, baseline: float | None) -> float | None:
    """`value / baseline`; None when either is unknown or the baseline is 0."""
    return value / baseline if value is not None and baseline else None


def spread(values: Sequence[float]) -> list[float] | None:
    """[lowest, highest] of `values`; None for no values."""
    return [min(values), max(values)] if values else None


def loaded(runs: Sequence[dict[str, Any]], key: str) -> list[float]:
    """`key` of every loaded replica of `runs`."""
    return [float(r[key]) for run in runs for r in run["replicas"] if r.get(key) is not None]


def cpu_figures(values: Sequence[float]) -> dict[str, Any]:
    """Mean and [lowest, highest] of CPU readings (s/s)."""
    return {"mean": mean(values), "spread": spread(values)}


def deliveries_per_cpu_s(runs: Sequence[dict[str, Any]]) -> float | None:
    """Deliveries of the loaded replicas of `runs` per CPU-second they used."""
    return ratio(sum(loaded(runs, "deliveries")), sum(loaded(runs, "cpu_s")))


def net_loaded(runs: Sequence[dict[str, Any]]) -> list[float]:
    """CPU s/s over the window less CPU s/s at rest, of every loaded replica of `runs`."""
    return [r["cpu_per_s"] - r["rest_cpu_per_s"] for run in runs for r in run["replicas"]]


def net_idle(runs: Sequence[dict[str, Any]]) -> list[float]:
    """CPU s/s over the window less CPU s/s at rest, of the clientless replica of `runs`."""
    return [run["idle"]["cpu_per_s"] - run["idle"]["rest_cpu_per_s"] for run in runs]


def input_cpu(runs: Sequence[dict[str, Any]], label: str) -> dict[int, float]:
    """CPU s/s of the `label` input reader of each of `runs`, by repeat."""
    return {r["repeat"]: r["inputs"][label]["cpu_per_s"] for r in runs if label in r["inputs"]}


def summarize_inputs(
    stream: Sequence[dict[str, Any]], channels: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The input readers (`bench.bus_input`) of a channel-bus setup against the stream bus's:
    the CPU of the one subscribing quarter 0's topics as a share of the one reading
    everything (overall and per repeat), the same for the one subscribing nothing (ticks
    only), the events the quarter-0 reader read against those published for quarter 0, and
    the events read out of order and gaps seen by any."""
    everything = input_cpu(stream, "everything")
    quarter, ticks = input_cpu(channels, "quarter0"), input_cpu(channels, "no-topics")
    rows = [row for run in channels for row in run["inputs"].values()]
    reads = [run["inputs"]["quarter0"]["read_per_expected"] for run in channels]
    return {
        "everything_cpu_per_s": mean(list(everything.values())),
        "quarter_cpu_per_s": mean(list(quarter.values())),
        "ticks_only_cpu_per_s": mean(list(ticks.values())),
        "share": ratio(mean(list(quarter.values())), mean(list(everything.values()))),
        "share_per_repeat": [
            ratio(cpu, everything.get(repeat)) for repeat, cpu in sorted(quarter.items())
        ],
        "ticks_only_share": ratio(mean(list(ticks.values())), mean(list(everything.values()))),
        "read_per_expected": spread([r for r in reads if r is not None]),
        "disorder": sum(row["disorder"] for row in rows),
        "gaps": sum(row["gaps"] for row in rows),
    }


def summarize_channels(
    stream: Sequence[dict[str, Any]], channels: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """One channel-bus setup's runs against the stream runs: CPU of its loaded (b) and
    clientless (d) replicas, the bus-input estimate b - (a - c) as a share of c (overall, per
    repeat, per replica), d / c, the same less each replica's CPU at rest (`net_`: what the
    event flow costs), events and bytes received per replica against the stream
    bus's, deliveries per CPU-second against the stream bus's, and how many loaded replicas
    ended the window in degraded mode (`userstream_bus_degraded` 1: they read the outbox, not
    the bus, so with any such reading the figures derived from the loaded replicas, bus input
    and deliveries per CPU-second against the stream bus's, are None)."""
    cpu_a, cpu_b = loaded(stream, "cpu_per_s"), loaded(channels, "cpu_per_s")
    cpu_c = [r["idle"]["cpu_per_s"] for r in stream]
    cpu_d = [r["idle"]["cpu_per_s"] for r in channels]
    mean_a, mean_b, mean_c, mean_d = mean(cpu_a), mean(cpu_b), mean(cpu_c), mean(cpu_d)
    delivery = None if mean_a is None or mean_c is None else mean_a - mean_c
    bus_input = None if mean_b is None or delivery is None else mean_b - delivery
    by_repeat = {r["repeat"]: r for r in stream}
    per_repeat, per_replica = [], []
    for b in channels:
        a = by_repeat.get(b["repeat"])
        if a is None or not a["idle"]["cpu_per_s"]:
            continue
        c_cpu = a["idle"]["cpu_per_s"]
        a_cpu, b_cpu = mean(loaded([a], "cpu_per_s")), mean(loaded([b], "cpu_per_s"))
        if a_cpu is not None and b_cpu is not None:
            per_repeat.append((b_cpu - (a_cpu - c_cpu)) / c_cpu)
        for ra, rb in zip(a["replicas"], b["replicas"], strict=True):
            per_replica.append((rb["cpu_per_s"] - (ra["cpu_per_s"] - c_cpu)) / c_cpu)
    net_a, net_b = mean(net_loaded(stream)), mean(net_loaded(channels))
    net_c, net_d = mean(net_idle(stream)), mean(net_idle(channels))
    net_input = None
    if net_a is not None and net_b is not None and net_c is not None:
        net_input = net_b - (net_a - net_c)
    events_a = mean(loaded(stream, "bus_events_per_s"))
    events_b = mean(loaded(channels, "received_events_per_s"))
    bytes_a = mean([r["stream_bytes_per_s"] for r in stream if r["stream_bytes_per_s"]])
    bytes_b = mean(
        [r["topic_bytes_per_s"] + r["tick_bytes_per_s"] for c in channels for r in c["replicas"]]
    )
    per_core_a, per_core_b = deliveries_per_cpu_s(stream), deliveries_per_cpu_s(channels)
    degraded = sum(1 for r in loaded(channels, "degraded") if r)
    if degraded:  # the loaded replicas read the outbox: nothing of theirs measures the bus
        bus_input = net_input = None
        per_repeat, per_replica = [], []
    return {
        "redis": channels[0]["redis"],
        "loaded_degraded": degraded,
        "cpu_per_s_loaded": cpu_figures(cpu_b),
        "cpu_per_s_no_clients": cpu_figures(cpu_d),
        "bus_input_cpu_per_s": bus_input,
        "bus_input_share": ratio(bus_input, mean_c),
        "bus_input_share_per_repeat": per_repeat,
        "bus_input_share_per_replica": spread(per_replica),
        "ticks_only_share": ratio(mean_d, mean_c),
        "rest_cpu_per_s_loaded": mean(loaded(channels, "rest_cpu_per_s")),
        "rest_cpu_per_s_no_clients": mean([r["idle"]["rest_cpu_per_s"] for r in channels]),
        "net_bus_input_cpu_per_s": net_input,
        "net_bus_input_share": ratio(net_input, net_c),
        "net_ticks_only_share": ratio(net_d, net_c),
        "received_events_per_s": events_b,
        "received_events_per_s_spread": spread(loaded(channels, "received_events_per_s")),
        "received_events_ratio": ratio(events_b, events_a),
        "received_bytes_per_s": bytes_b,
        "received_tick_bytes_per_s": mean(loaded(channels, "tick_bytes_per_s")),
        "received_bytes_ratio": ratio(bytes_b, bytes_a),
        "deliveries_per_cpu_s": per_core_b,
        "deliveries_per_cpu_s_ratio": None if degraded else ratio(per_core_b, per_core_a),
        "delivered_per_expected": spread(loaded(channels, "delivered_per_expected")),
        "gap_fills": sum(loaded(channels, "gap_fills")),
        "relay_cpu_per_s": mean([r["relay_cpu_per_s"] for r in channels]),
        "redis_cpu_per_s": mean([r["redis_cpu_per_s"] for r in channels]),
        "input_readers": summarize_inputs(stream, channels),
    }


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The claim-1 figures (module docstring) from every run: the stream bus's (a, c) and,
    for each channel-bus setup that ran, `summarize_channels`; with both channel setups, the
    cluster's bus-input share estimated from the one-Redis share plus the cluster's extra tick
    cost, (d on the cluster - d on one Redis) / c, which holds whatever the cluster's loaded
    replicas did."""
    stream = [r for r in runs if r["setup"] == STREAM]
    cpu_a = loaded(stream, "cpu_per_s")
    cpu_c = [r["idle"]["cpu_per_s"] for r in stream]
    mean_a, mean_c = mean(cpu_a), mean(cpu_c)
    summary: dict[str, Any] = {
        "goals": {
            "bus_input_share": GOAL_BUS_INPUT,
            "deliveries_per_cpu_s_ratio": GOAL_DELIVERIES_PER_CORE,
        },
        "stream": {
            "redis": stream[0]["redis"] if stream else None,
            "loaded_degraded": sum(1 for r in loaded(stream, "degraded") if r),
            "cpu_per_s_loaded": cpu_figures(cpu_a),
            "cpu_per_s_no_clients": cpu_figures(cpu_c),
            "delivery_cpu_per_s": None if mean_a is None or mean_c is None else mean_a - mean_c,
            "rest_cpu_per_s_loaded": mean(loaded(stream, "rest_cpu_per_s")),
            "rest_cpu_per_s_no_clients": mean([r["idle"]["rest_cpu_per_s"] for r in stream]),
            "net_cpu_per_s_no_clients": mean(net_idle(stream)),
            "received_events_per_s": mean(loaded(stream, "bus_events_per_s")),
            "received_bytes_per_s": mean(
                [r["stream_bytes_per_s"] for r in stream if r["stream_bytes_per_s"]]
            ),
            "batches_per_s": mean(
                [r["stream_batches_per_s"] for r in stream if r["stream_batches_per_s"]]
            ),
            "deliveries_per_cpu_s": deliveries_per_cpu_s(stream),
            "delivered_per_expected": spread(loaded(stream, "delivered_per_expected")),
            "relay_cpu_per_s": mean([r["relay_cpu_per_s"] for r in stream]),
            "redis_cpu_per_s": mean([r["redis_cpu_per_s"] for r in stream]),
        },
        "channels": {},
    }
    for name in (CHANNELS_SINGLE, CHANNELS_CLUSTER):
        channel_runs = [r for r in runs if r["setup"] == name]
        if channel_runs and stream:
            summary["channels"][name] = summarize_channels(stream, channel_runs)
    single = summary["channels"].get(CHANNELS_SINGLE)
    cluster = summary["channels"].get(CHANNELS_CLUSTER)
    if single and cluster and single["bus_input_share"] is not None and mean_c:
        extra = cluster["cpu_per_s_no_clients"]["mean"] - single["cpu_per_s_no_clients"]["mean"]
        summary["cluster_estimate"] = {
            "extra_tick_cpu_per_s": extra,
            "bus_input_share": single["bus_input_share"] + extra / mean_c,
        }
    return summary


# --- claim 2: the suite's targeted scenario on both buses ------------------------------------


TARGETED_KEYS: Final = ("deliveries_per_s", "server_cpu", "p50_ms", "p99_ms", "own_p99_ms")
"""The figures of a targeted row compared between the buses."""


@contextlib.contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """This process on `cpus` (`sched_setaffinity`) while in use, then where it was."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


async def compare_targeted(
    pg: PgServer, redis_url: str, rounds: int, ingest: Mode, quick: bool = False
) -> dict[str, Any]:
    """The suite's `targeted` scenario (`bench.scenarios.targeted`, suite pinning: gateway on
    cpu 0, client, publisher and relay on cpu 1) on the stream bus, then the channel bus, on
    the Redis at `redis_url`, `rounds` times; returns every row (with `bus` and `round`) and
    the ratios channels / stream of the means of `TARGETED_KEYS`."""
    rows: list[dict[str, Any]] = []
    sizes = QUICK if quick else FULL
    with pinned(parse_cpus("1")):
        for number in range(rounds):
            for bus in ("stream", "channels"):
                ctx = Context(
                    sizes=sizes,
                    server_cpu="0",
                    client_cpu="1",
                    targets=["userstream"],
                    make_target=target_factory(pg, redis_url, "1", None, ingest, bus),
                    idle_connections=(),
                )
                report = await scenarios.targeted(ctx)
                for row in report.rows:
                    rows.append({**row, "bus": bus, "round": number + 1})
                    print(f"  targeted, {bus}, round {number + 1}: {targeted_line(row)}")
    means: dict[str, dict[str, float | None]] = {}
    for bus in ("stream", "channels"):
        ok = [r for r in rows if r["bus"] == bus and "error" not in r]
        means[bus] = {
            k: mean([float(r[k]) for r in ok if r.get(k) is not None]) for k in TARGETED_KEYS
        }
    return {
        "sizes": {
            "connections": sizes.targeted_connections,
            "rate": sizes.targeted_rate,
            "seconds": sizes.targeted_s,
        },
        "rows": rows,
        "means": means,
        "ratios": {k: ratio(means["channels"][k], means["stream"][k]) for k in TARGETED_KEYS},
    }


def targeted_line(row: dict[str, Any]) -> str:
    """One targeted row in a line."""
    if "error" in row and "deliveries_per_s" not in row:
        return f"error {row['error']}"
    return (
        f"{row.get('deliveries_per_s', 0):,.0f} deliveries/s, cpu {row.get('server_cpu', 0):.3f}"
        f" s/s, p50 {row.get('p50_ms', 0):.1f} ms, p99 {row.get('p99_ms', 0):.1f} ms,"
        f" verdict {row.get('verdict')}"
    )


# --- the whole benchmark -----------------------------------------------------------------------


def bus_setups(single: RedisProcess, cluster: RedisCluster) -> dict[str, BusSetup]:
    """The runs' buses (`SETUPS`) by name: the stream bus and the channel bus on `single`, the
    channel bus on `cluster`."""
    return {
        STREAM: BusSetup(STREAM, "stream", single.url, "one Redis", (single.port,)),
        CHANNELS_SINGLE: BusSetup(
            CHANNELS_SINGLE, "channels", single.url, "one Redis", (single.port,)
        ),
        CHANNELS_CLUSTER: BusSetup(
            CHANNELS_CLUSTER,
            "channels",
            cluster.url,
            f"a Redis Cluster of {len(cluster.ports)}",
            tuple(cluster.ports),
        ),
    }


async def measure_fanout(pg: PgServer, options: Options) -> dict[str, Any]:
    """Claim 1 (module docstring): the setups of `options.setups`, alternating,
    `options.repeats` times each; the stream bus and the channel bus on one Redis share a Redis
    of their own (each run under its own prefix), the channel bus on a cluster has a cluster
    of `options.nodes` nodes. Returns the runs and their summary."""
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="userstream-fanout-"))
    runs: list[dict[str, Any]] = []
    single = RedisProcess()
    cluster = RedisCluster(options.nodes)
    try:
        if options.repeats > 0:
            await asyncio.to_thread(single.start)
        if options.repeats > 0 and CHANNELS_CLUSTER in options.setups:
            await asyncio.to_thread(cluster.start)
        every = bus_setups(single, cluster)
        for repeat in range(1, options.repeats + 1):
            for name in options.setups:
                run = await measure_run(pg, options, every[name], repeat, log_dir)
                print_run(run)
                runs.append(run)
    finally:
        await asyncio.to_thread(cluster.stop)
        await asyncio.to_thread(single.stop)
    return {"runs": runs, "summary": summarize(runs), "logs": str(log_dir)}


def redis_binary() -> str:
    """The Redis server binary of the runs' own Redis and cluster, with its version."""
    binary = _server_binary()  # the choice of tests.services and tests.redis_cluster
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return f"{Path(binary).name}: {done.stdout.strip()}"


async def measure(pg: PgServer, options: Options, redis_url: str | None) -> dict[str, Any]:
    """Both claims on the server `pg` (claim 2 on `redis_url` when `targeted_rounds` > 0);
    returns the report."""
    began = datetime.datetime.now(datetime.UTC)
    options_out = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}
    report: dict[str, Any] = {
        "started": began.isoformat(timespec="seconds"),
        "options": options_out,
        "machine": machine(),
        "server": await describe(pg),
        "redis": redis_binary(),
    }
    report["fanout"] = await measure_fanout(pg, options)
    if options.targeted_rounds > 0 and redis_url is not None:
        report["targeted"] = await compare_targeted(
            pg, redis_url, options.targeted_rounds, options.ingest, options.targeted_quick
        )
    report["seconds"] = round((datetime.datetime.now(datetime.UTC) - began).total_seconds())
    return report


# --- printing ----------------------------------------------------------------------------------


def number(value: float | None, digits: int = 3) -> str:
    """A figure for a table: '-' for None, else `digits` decimals below 100, else grouped."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"


def print_run(run: dict[str, Any]) -> None:
    """One run's table: a line per gateway."""
    published = run["published"]
    print(
        f"\n{run['bus']} bus on {run['redis']}, repeat {run['repeat']}:"
        f" {published['events']:,} events in {run['window_s']:.1f} s"
        f" ({published['per_s']:,.0f}/s); connect {run['connect_s']:.1f} s, settle"
        f" {run['settle_s']:.1f} s; relay {number(run['relay_cpu_per_s'])} s/s, Redis"
        f" {number(run['redis_cpu_per_s'])} s/s ({run['redis_processes']} processes)"
    )
    print(
        f"{'gateway':>10}{'cpu s/s':>10}{'deliv/s':>10}{'deliv/exp':>10}{'bus ev/s':>10}"
        f"{'recv ev/s':>10}{'topic B/s':>11}{'tick B/s':>10}{'topics':>8}{'gaps':>6}"
    )
    rows = [(str(r["quarter"]), r) for r in run["replicas"]] + [("no clients", run["idle"])]
    for label, row in rows:
        print(
            f"{label:>10}{number(row['cpu_per_s']):>10}{number(row['deliveries_per_s']):>10}"
            f"{number(row.get('delivered_per_expected')):>10}"
            f"{number(row['bus_events_per_s']):>10}{number(row['received_events_per_s']):>10}"
            f"{number(row['topic_bytes_per_s']):>11}{number(row['tick_bytes_per_s']):>10}"
            f"{row['topics']:>8.0f}{row['gap_fills']:>6.0f}"
        )
    for label, row in run["inputs"].items():
        print(
            f"  input reader {label}: {number(row['cpu_per_s'])} s/s,"
            f" {number(row['events_per_s'])} events/s in {number(row['batches_per_s'])}"
            f" batches/s, read / published {number(row['read_per_expected'])}, out of order"
            f" {row['disorder']}, gaps {row['gaps']}"
        )
    clients = run["clients"]
    if run["stream_bytes_per_s"] is not None:
        print(f"  stream entries read by each replica: {number(run['stream_bytes_per_s'])} B/s")
    print(
        f"  clients: {clients['ready']:,} ready, {clients['failed']} failed,"
        f" {clients['closed_by_server']} closed by the server; latency (whole client run, worst"
        f" gateway) p50 {number(clients['p50_ms_max'], 1)} ms, p99"
        f" {number(clients['p99_ms_max'], 1)} ms, max {number(clients['max_ms'], 1)} ms"
        + (f"; errors {clients['errors']}" if clients["errors"] else "")
        + (f"; EXITED {run['exited']}" if run["exited"] else "")
    )


def print_summary(report: dict[str, Any]) -> None:
    """The derived figures of both claims."""
    summary = report["fanout"]["summary"]
    stream = summary["stream"]
    print("\nclaim 1: replicas with disjoint users (CPU s/s per gateway process, mean [spread])")
    lines = [
        ("(a) stream bus, loaded", stream["cpu_per_s_loaded"]),
        ("(c) stream bus, no clients", stream["cpu_per_s_no_clients"]),
    ]
    for name, figures in summary["channels"].items():
        lines.append((f"(b) {name}, loaded", figures["cpu_per_s_loaded"]))
        lines.append((f"(d) {name}, no clients", figures["cpu_per_s_no_clients"]))
    for label, cpu in lines:
        low, high = cpu["spread"] or [None, None]
        print(f"  {label:<36}{number(cpu['mean']):>8}  [{number(low)}, {number(high)}]")
    print(
        f"  stream bus: {number(stream['received_events_per_s'])} events/s and"
        f" {number(stream['received_bytes_per_s'])} B/s into every replica, in"
        f" {number(stream['batches_per_s'])} batches/s; {number(stream['deliveries_per_cpu_s'])}"
        " deliveries per CPU-second; at rest (no events): loaded"
        f" {number(stream['rest_cpu_per_s_loaded'])} s/s, no clients"
        f" {number(stream['rest_cpu_per_s_no_clients'])} s/s"
    )
    for name, figures in summary["channels"].items():
        per_replica = figures["bus_input_share_per_replica"] or []
        print(
            f"  {name} ({figures['redis']}): bus input b - (a - c)"
            f" {number(figures['bus_input_cpu_per_s'])} s/s = {number(figures['bus_input_share'])}"
            f" of (c) (goal <= {GOAL_BUS_INPUT}); per repeat"
            f" {[number(v) for v in figures['bus_input_share_per_repeat']]}, per replica"
            f" {[number(v) for v in per_replica]}; (d) / (c) {number(figures['ticks_only_share'])}"
        )
        print(
            f"    received per replica: {number(figures['received_events_per_s'])} events/s"
            f" ({number(figures['received_events_ratio'])} of the stream bus's),"
            f" {number(figures['received_bytes_per_s'])} B/s, of which ticks"
            f" {number(figures['received_tick_bytes_per_s'])}"
            f" ({number(figures['received_bytes_ratio'])}); deliveries per CPU-second"
            f" {number(figures['deliveries_per_cpu_s'])}"
            f" ({number(figures['deliveries_per_cpu_s_ratio'])} of the stream bus's, goal >="
            f" {GOAL_DELIVERIES_PER_CORE:g});"
            f" gap fills {figures['gap_fills']:.0f}"
        )
        print(
            f"    less CPU at rest: bus input {number(figures['net_bus_input_cpu_per_s'])} s/s ="
            f" {number(figures['net_bus_input_share'])} of (c) less its rest; (d) / (c), both"
            f" less their rest: {number(figures['net_ticks_only_share'])}"
        )
        inputs = figures["input_readers"]
        print(
            f"    input readers: quarter 0's topics {number(inputs['quarter_cpu_per_s'])} s/s"
            f" against everything {number(inputs['everything_cpu_per_s'])} s/s ="
            f" {number(inputs['share'])} (goal <= {GOAL_BUS_INPUT}); per repeat"
            f" {[number(v) for v in inputs['share_per_repeat']]}; ticks only"
            f" {number(inputs['ticks_only_share'])}; read / published for quarter 0"
            f" {[number(v) for v in inputs['read_per_expected'] or []]}; out of order"
            f" {inputs['disorder']}, gaps {inputs['gaps']}"
        )
        if figures["loaded_degraded"]:
            print(
                f"    DEGRADED: {figures['loaded_degraded']} loaded replica readings ended the"
                " window in degraded mode (reading the outbox, not the bus); see the logs"
            )
    estimate = summary.get("cluster_estimate")
    if estimate:
        print(
            "  cluster estimate: one-Redis share + extra tick CPU"
            f" {number(estimate['extra_tick_cpu_per_s'])} s/s ="
            f" {number(estimate['bus_input_share'])} of (c)"
        )
    targeted = report.get("targeted")
    if targeted:
        print("\nclaim 2: targeted (suite scenario), channels / stream")
        for bus in ("stream", "channels"):
            print(f"  {bus:<9}" + ", ".join(
                f"{k} {number(v)}" for k, v in targeted["means"][bus].items()
            ))  # fmt: skip
        print("  ratio    " + ", ".join(f"{k} {number(v)}" for k, v in targeted["ratios"].items()))
    print(f"\nlogs in {report['fanout']['logs']}; {report['seconds']} s")


# --- command line ------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None = None) -> tuple[Options, Path]:
    """The options and the JSON output path from the command line (exit status 2 when the
    world does not split evenly)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8000)
    parser.add_argument("--gateways", type=int, default=4, help="loaded gateways (quarters)")
    parser.add_argument("--workspaces", type=int, default=20, help="workspaces per quarter")
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second")
    parser.add_argument(
        "--commit-ms",
        type=float,
        default=COMMIT_S * 1000,
        help="the publisher commits the events due every this many ms in one transaction",
    )
    parser.add_argument(
        "--workspace-share", type=float, default=0.1, help="share of workspace events"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before the window")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each bus")
    parser.add_argument("--nodes", type=int, default=3, help="Redis Cluster nodes")
    parser.add_argument(
        "--setups",
        default=",".join(SETUPS),
        help=f"comma-separated, in the order run: {', '.join(SETUPS)} ({STREAM} is needed)",
    )
    parser.add_argument("--ingest", choices=MODES, default="wal")
    parser.add_argument(
        "--targeted-rounds", type=int, default=2, help="rounds of the targeted comparison"
    )
    parser.add_argument(
        "--targeted-quick", action="store_true", help="the suite's quick sizes for it"
    )
    parser.add_argument("--seed", type=int, default=1, help="of the publisher's choices")
    parser.add_argument("--logs", type=Path, default=None, help="folder of the process logs")
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="BINARY",
        help="profile gateway 0 and the clientless gateway of each run with this py-spy"
        " (raw collapsed stacks in the logs folder; the sampler's work shows in the CPU figures)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        world = World(args.users, args.gateways, args.workspaces)
    except ValueError as exc:
        parser.error(str(exc))
    setups = tuple(name.strip() for name in args.setups.split(",") if name.strip())
    if STREAM not in setups or any(name not in SETUPS for name in setups):
        parser.error(f"--setups: {STREAM} and any of {', '.join(SETUPS[1:])}")
    options = Options(
        world=world,
        rate=args.rate,
        commit_s=args.commit_ms / 1000,
        workspace_share=args.workspace_share,
        warmup_s=args.warmup,
        window_s=args.window,
        repeats=args.repeats,
        nodes=args.nodes,
        ingest=args.ingest,
        setups=setups,
        targeted_rounds=args.targeted_rounds,
        targeted_quick=args.targeted_quick,
        seed=args.seed,
        log_dir=args.logs,
        py_spy=args.py_spy,
    )
    return options, args.out


def main(argv: Sequence[str] | None = None) -> int:
    """Raise the open-file limit to its hard limit (the processes started here inherit it),
    build the load client, run both claims, print and write the report; 1 when a process
    exited during a run or a stream was refused or dropped, else 0."""
    options, out = parse(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loadclient.build()
    with server_for((options.ingest,)) as pg, redis_server() as redis_url:
        report = asyncio.run(measure(pg, options, redis_url))
    print_summary(report)
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    broken = any(
        run["exited"] or run["clients"]["failed"] or run["clients"]["closed_by_server"]
        for run in report["fanout"]["runs"]
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
