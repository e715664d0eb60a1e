"""What the outbox costs its writers, per ingest mode, and what one relay carries.

    .venv/bin/python -m bench.writers [--seconds 10] [--writers 1,8,32,64] [--out PATH]
    .venv/bin/python -m bench.writers --relay-ceiling [--rows 200000] [--out PATH]

(`--out` defaults to bench/writers.json, and to bench/writers-relay.json with
`--relay-ceiling`; `--warmup 2` and `--writer-procs 1` apply to both.)

Server. Every mode runs on one Postgres 16 from the `pgserver` wheel with logical decoding
and durable commits (`bench.database.durable_logical_server`: fsync, synchronous_commit and
full_page_writes on, so that each COMMIT waits for its WAL flush, PostgreSQL docs 20.5.1),
stopped and deleted at the end.
`USERSTREAM_TEST_PG_WAL` ("host:port" or "/socket/dir:port") names a running server instead;
its settings are reported, never changed. The bus is Redis (`sync.bus_redis.RedisBus`, a key
prefix per database; `tests.services.redis_server`).

Writers (the default). For each concurrency of `--writers`, the modes in turn (plain, wal,
trigger, so that drift touches all alike), each on a fresh database (migrated, then
`set_ingest_mode`): N writers, each its own asyncpg connection, loop one autocommit
single-row INSERT of a ~300-byte chat message (`insert_sql`, `chat_message`), in
`--writer-procs` spawned asyncio processes. After `--warmup` seconds the next `--seconds`
count: transactions that complete in the window, and each one's latency (the INSERT call,
COMMIT included). A CHECKPOINT precedes every run.

- `plain`: the INSERT into `outbox_plain`, a copy of the outbox's columns, defaults and CHECK
  constraints with its own bigserial-like primary key, and nothing else (no trigger, no
  publication, no relay): the baseline.
- `wal`: into `outbox` of a database in wal ingest mode, with `sync.relay.OutboxRelay` in its
  own process (`RelayProcess`) reading the slot and publishing to Redis meanwhile.
- `trigger`: into `outbox` in trigger ingest mode (commit trigger: advisory lock, UPDATE,
  NOTIFY), with the relay likewise.

Reported per run: tx/s and its ratio to plain at the same concurrency, p50/p99/max latency,
the CPU of the writer processes, of the relay process and of the whole machine over the
window (100 % = every core busy), the events/s the relay published in the window, the rows
committed but not yet on the bus when the writers stopped, and how long the relay then took
until every row had a position and was on the bus (`catch_up`, at most `CATCH_UP_LIMIT_S`).

Relay ceiling (`--relay-ceiling`). For wal and trigger mode and for transactions of 1 and of 50
rows: `--rows` rows are committed while the relay is stopped (8 connections with
`synchronous_commit = off` for speed; in wal mode after the relay has made its slot, so that
the rows wait in the slot, not for a bootstrap), then the relay starts and is timed from its
process being ready until every row is on the bus: events/s = rows / time. Then the writers'
cost while a relay runs flat out: 8 writers, plain (no relay) against wal while the relay
drains a backlog of 1.5 x (warmup + seconds) x the measured wal 1-row ceiling, and plain into
`outbox_plain` of that same draining database (the relay's load on the server alone).
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import platform
import signal
import sys
import time
from array import array
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any, Final, Literal

import asyncpg
import psutil
import redis.asyncio as aioredis

from bench.database import durable_logical_server, wait_leading
from bench.latency import percentiles
from bench.suite import cpu_model
from core.schema.ingest import set_ingest_mode
from core.schema.migrations import migrate
from sync.bus_redis import RedisBus
from sync.relay import OutboxRelay
from tests.services import PgServer, redis_server

Mode = Literal["plain", "wal", "trigger"]
MODES: Final[tuple[Mode, ...]] = ("plain", "wal", "trigger")
RELAYED: Final[tuple[Mode, ...]] = ("wal", "trigger")

REPORTED_SETTINGS: Final = (
    "server_version",
    "wal_level",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "max_connections",
)

CATCH_UP_LIMIT_S: Final = 30.0
"""Longest wait, after the writers stop, for every row to be positioned and on the bus."""

CEILING_LIMIT_S: Final = 900.0
"""Longest wait for the relay to carry a pre-loaded backlog to the bus."""

PRELOAD_CONNECTIONS: Final = 8
"""Connections committing a backlog while the relay is stopped."""

DRAIN_WRITERS: Final = 8
"""Writers of the runs that measure the writers' cost while the relay drains a backlog."""

DRAIN_BACKLOG_FACTOR: Final = 1.5
"""Backlog of those runs, in (warmup + seconds) x the measured wal 1-row relay ceiling."""

_READY_TIMEOUT_S: Final = 120.0
_STOP_TIMEOUT_S: Final = 15.0
_POLL_S: Final = 0.01
_COLUMNS = "type, resource_type, action, entity_id, workspace_id, stream_id, actor_id, data"
_VALUES = "'stream_event.created', 'stream_event', 'create'"
_INSERT_MANY = (
    f"INSERT INTO outbox ({_COLUMNS}) SELECT {_VALUES}, e, 'w1', 's1', 'u1', d::jsonb"
    " FROM unnest($1::text[], $2::text[]) AS t(e, d)"
)
_CREATE_PLAIN = """
CREATE TABLE outbox_plain (LIKE outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
CREATE SEQUENCE outbox_plain_id_seq AS bigint OWNED BY outbox_plain.id;
ALTER TABLE outbox_plain ALTER COLUMN id SET DEFAULT nextval('outbox_plain_id_seq');
ALTER TABLE outbox_plain ADD PRIMARY KEY (id);
"""
_TEXT = (
    "Pushed the retry fix for the relay; could someone review it before the standup? The "
    "flaky test was the Redis reconnect and is covered now. Demo moves to Thursday, 3 pm."
)
_names = itertools.count(1)
logger = logging.getLogger(__name__)


def insert_sql(table: str) -> str:
    """The writers' statement: one `stream_event.created` row into `table`; parameters
    `$1` entity_id (text) and `$2` data (JSON text)."""
    return f"INSERT INTO {table} ({_COLUMNS}) VALUES ({_VALUES}, $1, 'w1', 's1', 'u1', $2)"


def chat_message(entity_id: str) -> str:
    """The `data` of one row: a chat message as JSON text, about 300 bytes."""
    return (
        f'{{"id":"{entity_id}","workspace_id":"w1","stream_id":"s1","author_id":"u1",'
        f'"text":"{_TEXT}","mentions":["u2"],"attachments":[],"edited":false}}'
    )


@contextlib.asynccontextmanager
async def bench_database(server: PgServer, mode: Mode) -> AsyncIterator[str]:
    """A fresh database on `server`, migrated, in ingest `mode` (`plain`: left as migrated),
    with the empty table `outbox_plain`; yields its DSN and drops it (and its slot) on exit."""
    name = f"bench_writers_{os.getpid()}_{next(_names)}"
    dsn = await server.create_database(name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
            if mode != "plain":
                await set_ingest_mode(conn, mode)
            await conn.execute(_CREATE_PLAIN)
        finally:
            await conn.close()
        yield dsn
    finally:
        await server.drop_database(name)


@contextlib.asynccontextmanager
async def redis_bus(url: str, prefix: str) -> AsyncIterator[RedisBus]:
    """A `RedisBus` at `prefix` for reading positions; its stream is deleted on exit."""
    bus = RedisBus(url, prefix)
    try:
        yield bus
    finally:
        await bus.close()
        client = aioredis.Redis.from_url(url)
        try:
            await client.delete(bus.key)
        finally:
            await client.aclose()


async def checkpoint(dsn: str) -> None:
    """CHECKPOINT, so that no run pays for an earlier run's dirty pages."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


# --- the relay, in its own process -------------------------------------------------------


def _relay_main(dsn: str, redis_url: str, prefix: str, ready: Any) -> None:
    """Entry point of the relay process: `OutboxRelay(dsn, RedisBus(...)).run` until SIGTERM;
    sets `ready` (a multiprocessing Event) just before the relay starts."""
    logging.basicConfig(level=logging.WARNING, format="relay %(levelname)s %(name)s: %(message)s")
    asyncio.run(_relay(dsn, redis_url, prefix, ready))


async def _relay(dsn: str, redis_url: str, prefix: str, ready: Any) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    bus = RedisBus(redis_url, prefix)
    try:
        ready.set()
        await OutboxRelay(dsn, bus).run(stop)
    finally:
        await bus.close()


class RelayProcess:
    """`sync.relay.OutboxRelay` with a `RedisBus(redis_url, prefix)` in a spawned process.

    `start()` spawns it; `ready()` waits until it is about to relay and returns that wall-clock
    time (s); `cpu_s()` is its CPU time so far (user + system, s); `stop()` sends SIGTERM (the
    relay finishes its step and releases its lock) and kills it after 15 s.
    """

    def __init__(self, dsn: str, redis_url: str, prefix: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._ready = context.Event()
        self._process = context.Process(
            target=_relay_main, args=(dsn, redis_url, prefix, self._ready), daemon=True
        )
        self._ps: psutil.Process | None = None

    def start(self) -> None:
        """Spawn the process."""
        self._process.start()
        self._ps = psutil.Process(self._process.pid)

    async def ready(self) -> float:
        """Wait until the relay starts; its wall-clock time. Raises RuntimeError after 120 s
        or if the process died."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not await asyncio.to_thread(self._ready.wait, 0.1):
            if not self._process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"relay process not ready (exit code {self._process.exitcode})")
        return time.time()

    def cpu_s(self) -> float:
        """CPU seconds the process used so far (0 once it is gone)."""
        try:
            times = self._ps.cpu_times() if self._ps else None
        except psutil.NoSuchProcess:
            return 0.0
        return times.user + times.system if times else 0.0

    async def stop(self) -> None:
        """SIGTERM, wait up to 15 s, then SIGKILL."""
        if self._process.pid is None:
            return
        self._process.terminate()
        await asyncio.to_thread(self._process.join, _STOP_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("relay process did not stop in %.0f s: killed", _STOP_TIMEOUT_S)
            self._process.kill()
            await asyncio.to_thread(self._process.join)


@contextlib.asynccontextmanager
async def running_relay(dsn: str, redis_url: str, prefix: str) -> AsyncIterator[RelayProcess]:
    """A started `RelayProcess`, ready to relay; stopped on exit."""
    relay = RelayProcess(dsn, redis_url, prefix)
    relay.start()
    try:
        await relay.ready()
        yield relay
    finally:
        await relay.stop()


async def make_slot(dsn: str, redis_url: str, prefix: str) -> None:
    """Run a relay on a wal-mode database until its slot streams, then stop it: the slot
    stays and keeps every later commit for the next relay."""
    async with running_relay(dsn, redis_url, prefix):
        await wait_leading(dsn, "wal")


# --- writers -------------------------------------------------------------------------------


def _writer_main(
    dsn: str, table: str, connections: int, ident: int, warmup_s: float, seconds: float, pipe: Pipe
) -> None:
    """Entry point of a writer process (spawned): see `_write`."""
    asyncio.run(_write(dsn, table, connections, ident, (warmup_s, seconds), pipe))


async def _write(
    dsn: str,
    table: str,
    connections: int,
    ident: int,
    timing: tuple[float, float],
    pipe: Pipe,
) -> None:
    """Open `connections` connections, send "ready", receive the start (wall-clock s), write
    for warmup + seconds (`timing`), then send `{"committed", "latencies", "cpu_s"}`: rows
    committed in all, the latencies (s) of the transactions completed in the window, and this
    process's CPU seconds over the window."""
    warmup_s, seconds = timing
    sql = insert_sql(table)
    conns = list(await asyncio.gather(*(asyncpg.connect(dsn) for _ in range(connections))))
    try:
        pipe.send("ready")
        start_at = float(await asyncio.to_thread(pipe.recv))
        begin = start_at + time.perf_counter() - time.time()
        window = (begin + warmup_s, begin + warmup_s + seconds)
        await asyncio.sleep(max(0.0, begin - time.perf_counter()))
        samples: array[float] = array("d")
        cpu = asyncio.create_task(_cpu_between(*window))
        counts = await asyncio.gather(
            *(
                _insert_loop(conn, sql, f"{ident}-{i}", window, samples)
                for i, conn in enumerate(conns)
            )
        )
        pipe.send({"committed": sum(counts), "latencies": samples, "cpu_s": await cpu})
    finally:
        await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)


async def _insert_loop(
    conn: "asyncpg.Connection[Any]",
    sql: str,
    tag: str,
    window: tuple[float, float],
    samples: "array[float]",
) -> int:
    """INSERT until the window's end (perf_counter s); record the latency of each INSERT
    that completes inside the window; return the rows committed."""
    start, end = window
    committed = 0
    while (began := time.perf_counter()) < end:
        entity_id = f"m{tag}-{committed}"
        await conn.execute(sql, entity_id, chat_message(entity_id))
        finished = time.perf_counter()
        committed += 1
        if start <= finished < end:
            samples.append(finished - began)
    return committed


async def _cpu_between(start: float, end: float) -> float:
    """This process's CPU seconds between two perf_counter instants."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    first = time.process_time()
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    return time.process_time() - first


@dataclass(frozen=True)
class Sample:
    """What the parent sees at one instant: wall-clock time (s), the machine's busy and total
    CPU jiffies (/proc/stat), the relay's CPU seconds, the bus's last position."""

    at: float
    busy: int
    total: int
    relay_cpu_s: float
    position: int


@dataclass
class Probe:
    """Takes `Sample`s; without a relay or bus those read 0."""

    relay: RelayProcess | None = None
    bus: RedisBus | None = None

    async def sample(self) -> Sample:
        """One sample, now."""
        busy, total = cpu_jiffies()
        position = await self.bus.last_position() if self.bus else 0
        relay_cpu = self.relay.cpu_s() if self.relay else 0.0
        return Sample(time.time(), busy, total, relay_cpu, position)


def cpu_jiffies() -> tuple[int, int]:
    """The machine's busy and total CPU time since boot, in jiffies: the first line of
    /proc/stat (user nice system idle iowait irq softirq steal; idle and iowait not busy)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


@dataclass(frozen=True)
class Options:
    """Timing of every writer run: warm-up and measured seconds; writer processes."""

    warmup_s: float
    seconds: float
    writer_procs: int


@dataclass(frozen=True)
class Case:
    """One writer run: the database's ingest `mode` (plain: no relay), `writers`, the `table`
    written, and `backlog` rows committed beforehand for the relay to drain (wal only)."""

    mode: Mode
    writers: int
    table: str = "outbox"
    backlog: int = 0

    @property
    def label(self) -> str:
        """`plain`, `wal` or `trigger`, with `+drain` when a backlog is drained meanwhile."""
        name = "plain" if self.table == "outbox_plain" else self.mode
        return f"{name}+drain" if self.backlog else name


@dataclass(frozen=True)
class Writers:
    """What the writer processes reported, with the parent's samples at the window's ends."""

    before: Sample
    after: Sample
    committed: int
    latencies: list[float]
    cpu_s: float


def _shares(writers: int, procs: int) -> list[int]:
    """`writers` split as evenly as possible over at most `procs` processes."""
    procs = max(1, min(procs, writers))
    return [writers // procs + (1 if i < writers % procs else 0) for i in range(procs)]


def _receive(pipe: Pipe, timeout_s: float) -> Any:
    """The next message from a writer process; RuntimeError if it died or fell silent."""
    if not pipe.poll(timeout_s):
        raise RuntimeError(f"writer process silent for {timeout_s:.0f} s")
    try:
        return pipe.recv()
    except EOFError:
        raise RuntimeError("writer process died (see its traceback above)") from None


async def _sleep_until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.time()))


@contextlib.asynccontextmanager
async def writer_run(dsn: str, case: Case, opts: Options, probe: Probe) -> AsyncIterator[Writers]:
    """Run `case.writers` writers on `dsn` in up to `opts.writer_procs` spawned processes
    (started together 0.2 s after all are connected), sampling `probe` at the window's ends;
    yield their report as soon as it arrives, and wait for the processes to exit afterwards
    (so that their exit does not delay what the caller times next)."""
    context = multiprocessing.get_context("spawn")
    pipes: list[Pipe] = []
    processes = []
    try:
        for ident, share in enumerate(_shares(case.writers, opts.writer_procs)):
            mine, theirs = context.Pipe()
            args = (dsn, case.table, share, ident, opts.warmup_s, opts.seconds, theirs)
            process = context.Process(target=_writer_main, args=args, daemon=True)
            process.start()
            theirs.close()
            pipes.append(mine)
            processes.append(process)
        for pipe in pipes:
            await asyncio.to_thread(_receive, pipe, _READY_TIMEOUT_S)
        start_at = time.time() + 0.2
        for pipe in pipes:
            pipe.send(start_at)
        await _sleep_until(start_at + opts.warmup_s)
        before = await probe.sample()
        await _sleep_until(start_at + opts.warmup_s + opts.seconds)
        after = await probe.sample()
        results = [await asyncio.to_thread(_receive, pipe, _READY_TIMEOUT_S) for pipe in pipes]
        latencies = [s for result in results for s in result["latencies"]]
        committed = sum(int(result["committed"]) for result in results)
        yield Writers(before, after, committed, latencies, sum(r["cpu_s"] for r in results))
    finally:
        for process in processes:
            await asyncio.to_thread(process.join, _STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()


# --- relay catch-up ------------------------------------------------------------------------


@dataclass(frozen=True)
class CatchUp:
    """The relay's catch-up: `rows` expected on the bus, `seconds` from the writers' stop (or
    the relay's start) until the bus held them all (or the limit passed), `caught_up` when it
    did and every outbox row had a position, `unpositioned` outbox rows without one at the end.
    """

    rows: int
    seconds: float
    caught_up: bool
    unpositioned: int


async def catch_up(dsn: str, bus: RedisBus, rows: int, since: float, limit_s: float) -> CatchUp:
    """Poll the bus every 10 ms until its last position reaches `rows` (positions are given
    from 1 without gaps here) or `limit_s` after `since` (wall-clock s) passed; then check
    the outbox: no row without a position, and the highest one on the bus."""
    deadline = since + limit_s
    while (position := await bus.last_position()) < rows and time.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(_POLL_S)
    reached = time.time()
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE seq IS NULL) AS unpositioned,"
            " coalesce(max(seq), 0) AS top FROM outbox"
        )
    finally:
        await conn.close()
    assert row is not None  # an aggregate returns one row
    ok = position >= rows and row["unpositioned"] == 0 and row["top"] == position
    return CatchUp(rows, reached - since, ok, int(row["unpositioned"]))


# --- one writer run ------------------------------------------------------------------------


@dataclass
class WriterRun:
    """The figures of one writer run (JSON-ready); relay fields are None without a relay.

    Rates per second of the window; latencies in ms; CPU in % (writers and relay: of one
    core; machine: of all cores); `backlog_at_stop`: rows committed but not yet on the bus
    when the window ended; `backlog_left`: rows of the pre-loaded backlog not yet on the bus
    then (still draining when > 0).
    """

    label: str
    mode: str
    table: str
    writers: int
    seconds: float
    committed: int
    tx_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    writer_cpu_pct: float
    machine_cpu_pct: float
    relay_cpu_pct: float | None = None
    relay_events_per_s: float | None = None
    backlog: int = 0
    backlog_at_stop: int | None = None
    backlog_left: int | None = None
    catch_up_s: float | None = None
    caught_up: bool | None = None
    unpositioned: int | None = None
    vs_plain: float | None = None


def summarise(case: Case, opts: Options, writers: Writers, caught: CatchUp | None) -> WriterRun:
    """A `WriterRun` from the writers' report and, with a relay, its catch-up."""
    before, after = writers.before, writers.after
    span = after.at - before.at
    cuts = percentiles(writers.latencies) if len(writers.latencies) >= 2 else {}
    p50, p99, worst = cuts.get("p50"), cuts.get("p99"), cuts.get("max")
    run = WriterRun(
        label=case.label,
        mode=case.mode,
        table=case.table,
        writers=case.writers,
        seconds=opts.seconds,
        committed=writers.committed,
        tx_per_s=len(writers.latencies) / opts.seconds,
        p50_ms=p50,
        p99_ms=p99,
        max_ms=worst,
        writer_cpu_pct=100 * writers.cpu_s / opts.seconds,
        machine_cpu_pct=100 * (after.busy - before.busy) / max(1, after.total - before.total),
        backlog=case.backlog,
    )
    if caught is not None:
        run.relay_cpu_pct = 100 * (after.relay_cpu_s - before.relay_cpu_s) / span
        run.relay_events_per_s = (after.position - before.position) / span
        written = writers.committed if case.table == "outbox" else 0
        run.backlog_at_stop = case.backlog + written - after.position
        run.backlog_left = max(0, case.backlog - after.position) if case.backlog else None
        run.catch_up_s = caught.seconds
        run.caught_up = caught.caught_up
        run.unpositioned = caught.unpositioned
    return run


async def preload(dsn: str, rows: int, per_txn: int) -> float:
    """Commit `rows` outbox rows in transactions of `per_txn` rows (a remainder is dropped)
    from `PRELOAD_CONNECTIONS` connections with `synchronous_commit = off` (the WAL and what
    the slot decodes are the same; only the flush wait goes). Returns the seconds taken."""
    txns = rows // per_txn
    numbers = iter(range(txns))
    began = time.perf_counter()

    async def load() -> None:
        conn = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "off"})
        try:
            for n in numbers:
                ids = [f"p{n}-{i}" for i in range(per_txn)]
                if per_txn == 1:
                    await conn.execute(insert_sql("outbox"), ids[0], chat_message(ids[0]))
                else:
                    await conn.execute(_INSERT_MANY, ids, [chat_message(i) for i in ids])
        finally:
            await conn.close()

    await asyncio.gather(*(load() for _ in range(PRELOAD_CONNECTIONS)))
    return time.perf_counter() - began


async def run_case(server: PgServer, redis_url: str, case: Case, opts: Options) -> WriterRun:
    """One writer run on a fresh database (module docstring): with a relay process unless
    plain, after pre-loading `case.backlog` rows behind a stopped relay if any."""
    async with bench_database(server, case.mode) as dsn:
        if case.mode == "plain":
            await checkpoint(dsn)
            async with writer_run(dsn, case, opts, Probe()) as writers:
                return summarise(case, opts, writers, None)
        prefix = f"bench-writers:{os.getpid()}:{next(_names)}:"
        async with redis_bus(redis_url, prefix) as bus:
            if case.backlog:
                await make_slot(dsn, redis_url, prefix)
                await preload(dsn, case.backlog, 1)
            await checkpoint(dsn)
            async with running_relay(dsn, redis_url, prefix) as relay:
                await wait_leading(dsn, case.mode)
                async with writer_run(dsn, case, opts, Probe(relay, bus)) as writers:
                    rows = case.backlog + (writers.committed if case.table == "outbox" else 0)
                    caught = await catch_up(dsn, bus, rows, writers.after.at, CATCH_UP_LIMIT_S)
            return summarise(case, opts, writers, caught)


def with_ratios(runs: list[WriterRun]) -> list[WriterRun]:
    """Set `vs_plain` (tx/s over the plain run's at the same concurrency) on every run."""
    plain = {r.writers: r.tx_per_s for r in runs if r.label == "plain"}
    for run in runs:
        if plain.get(run.writers):
            run.vs_plain = run.tx_per_s / plain[run.writers]
    return runs


# --- relay ceiling -------------------------------------------------------------------------


@dataclass
class CeilingRun:
    """One relay-ceiling run: `rows` in `txns` transactions of `rows_per_txn`, committed in
    `preload_s`; the relay carried them to the bus in `drain_s` (from its process being
    ready): `events_per_s`, `txns_per_s`; CPU % of the relay (one core) and the machine (all
    cores) meanwhile, and the CPU time each spent per event (µs: the machine's is every
    process's, Postgres' backends and WAL sender and Redis included); `caught_up` and
    `unpositioned` as in `CatchUp`."""

    mode: str
    rows_per_txn: int
    rows: int
    txns: int
    preload_s: float
    drain_s: float
    events_per_s: float
    txns_per_s: float
    relay_cpu_pct: float
    machine_cpu_pct: float
    relay_cpu_us_per_event: float
    machine_cpu_us_per_event: float
    caught_up: bool
    unpositioned: int


async def ceiling_case(
    server: PgServer, redis_url: str, mode: Mode, per_txn: int, rows: int
) -> CeilingRun:
    """Commit `rows` with the relay stopped, then time one relay carrying them to the bus."""
    rows -= rows % per_txn
    async with bench_database(server, mode) as dsn:
        prefix = f"bench-writers:{os.getpid()}:{next(_names)}:"
        async with redis_bus(redis_url, prefix) as bus:
            if mode == "wal":
                await make_slot(dsn, redis_url, prefix)
            loaded_s = await preload(dsn, rows, per_txn)
            await checkpoint(dsn)
            async with running_relay(dsn, redis_url, prefix) as relay:
                probe = Probe(relay, bus)
                before = await probe.sample()
                caught = await catch_up(dsn, bus, rows, before.at, CEILING_LIMIT_S)
                after = await probe.sample()
    span = caught.seconds
    relay_cpu_s = after.relay_cpu_s - before.relay_cpu_s
    machine_cpu_s = (after.busy - before.busy) / os.sysconf("SC_CLK_TCK")
    return CeilingRun(
        mode=mode,
        rows_per_txn=per_txn,
        rows=rows,
        txns=rows // per_txn,
        preload_s=loaded_s,
        drain_s=span,
        events_per_s=rows / span,
        txns_per_s=rows / per_txn / span,
        relay_cpu_pct=100 * relay_cpu_s / (after.at - before.at),
        machine_cpu_pct=100 * (after.busy - before.busy) / max(1, after.total - before.total),
        relay_cpu_us_per_event=1e6 * relay_cpu_s / rows,
        machine_cpu_us_per_event=1e6 * machine_cpu_s / rows,
        caught_up=caught.caught_up,
        unpositioned=caught.unpositioned,
    )


# --- reporting -----------------------------------------------------------------------------


def _cell(value: float | int | bool | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:,.{digits}f}{unit}"


def writer_table(runs: Sequence[WriterRun]) -> str:
    """The writer runs as a fixed-width text table."""
    head = (
        f"{'writers':>7} {'mode':<11} {'tx/s':>8} {'vs plain':>8} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'max ms':>7} {'client cpu':>10} {'relay cpu':>9} {'relay ev/s':>10}"
        f" {'machine cpu':>11} {'behind at stop':>14} {'catch-up s':>10} {'all on bus':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r.writers:>7} {r.label:<11} {_cell(r.tx_per_s):>8} {_cell(r.vs_plain, 2):>8}"
            f" {_cell(r.p50_ms, 2):>7} {_cell(r.p99_ms, 2):>7} {_cell(r.max_ms, 1):>7}"
            f" {_cell(r.writer_cpu_pct, 0, ' %'):>10} {_cell(r.relay_cpu_pct, 0, ' %'):>9}"
            f" {_cell(r.relay_events_per_s):>10} {_cell(r.machine_cpu_pct, 0, ' %'):>11}"
            f" {_cell(r.backlog_at_stop):>14} {_cell(r.catch_up_s, 2):>10}"
            f" {_on_bus(r.caught_up, r.unpositioned):>15}"
        )
    return "\n".join(lines)


def _on_bus(caught_up: bool | None, unpositioned: int | None) -> str:
    """`yes`, or `NO` with the rows left without a position (rows the relay skipped)."""
    if caught_up is None or caught_up:
        return _cell(caught_up)
    return f"NO, {unpositioned} no seq" if unpositioned else "NO"


def ceiling_table(runs: Sequence[CeilingRun]) -> str:
    """The relay-ceiling runs as a fixed-width text table."""
    head = (
        f"{'mode':<8} {'rows/txn':>8} {'rows':>9} {'txns':>9} {'preload s':>9} {'drain s':>8}"
        f" {'events/s':>9} {'txns/s':>8} {'relay cpu':>9} {'machine cpu':>11}"
        f" {'cpu µs/event: relay / all':>26} {'all on bus':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r.mode:<8} {r.rows_per_txn:>8} {r.rows:>9,} {r.txns:>9,} {r.preload_s:>9.1f}"
            f" {r.drain_s:>8.2f} {r.events_per_s:>9,.0f} {r.txns_per_s:>8,.0f}"
            f" {_cell(r.relay_cpu_pct, 0, ' %'):>9} {_cell(r.machine_cpu_pct, 0, ' %'):>11}"
            f" {f'{r.relay_cpu_us_per_event:.1f} / {r.machine_cpu_us_per_event:.1f}':>26}"
            f" {_on_bus(r.caught_up, r.unpositioned):>15}"
        )
    return "\n".join(lines)


async def environment(server: PgServer, redis_url: str) -> dict[str, Any]:
    """The machine (with its CPU use over one second before the runs: any other load skews
    every figure), the Postgres settings that matter here, and the Redis version."""
    conn = await asyncpg.connect(server.dsn("postgres"))
    try:
        settings = {name: str(await conn.fetchval(f"SHOW {name}")) for name in REPORTED_SETTINGS}
    finally:
        await conn.close()
    busy, total = cpu_jiffies()
    await asyncio.sleep(1.0)
    busy_after, total_after = cpu_jiffies()
    client = aioredis.Redis.from_url(redis_url)
    try:
        redis_version = (await client.info("server")).get("redis_version")
    finally:
        await client.aclose()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "busy_before_pct": round(100 * (busy_after - busy) / max(1, total_after - total), 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgres": settings,
        "postgres_source": "USERSTREAM_TEST_PG_WAL"
        if os.environ.get("USERSTREAM_TEST_PG_WAL")
        else "pgserver, temporary folder, DURABLE_SETTINGS",
        "bus": f"redis {redis_version} (sync.bus_redis.RedisBus)",
    }


def _describe(env: Mapping[str, Any]) -> str:
    pg = env["postgres"]
    return (
        f"machine: {env['cpus']} CPUs ({env['cpu_model']}), {env['memory_gib']} GiB,"
        f" {env['platform']}; busy before the runs {env['busy_before_pct']} %\n"
        f"postgres {pg['server_version']}: wal_level={pg['wal_level']} fsync={pg['fsync']}"
        f" synchronous_commit={pg['synchronous_commit']}"
        f" full_page_writes={pg['full_page_writes']} wal_sync_method={pg['wal_sync_method']}"
        f" shared_buffers={pg['shared_buffers']} ({env['postgres_source']})\n"
        f"bus: {env['bus']}"
    )


async def measure_writers(
    server: PgServer, redis_url: str, writers: Sequence[int], opts: Options
) -> dict[str, Any]:
    """The writer runs (module docstring), each printed to stderr as it ends."""
    runs = []
    for count in writers:
        for mode in MODES:
            case = Case(mode, count, "outbox_plain" if mode == "plain" else "outbox")
            run = await run_case(server, redis_url, case, opts)
            print(f"  {count:>3} writers, {run.label}: {run.tx_per_s:,.0f} tx/s", file=sys.stderr)
            runs.append(run)
    with_ratios(runs)
    print(writer_table(runs))
    return {"runs": [asdict(r) for r in runs]}


async def measure_ceiling(
    server: PgServer, redis_url: str, rows: int, opts: Options
) -> dict[str, Any]:
    """The relay-ceiling runs, then the writers' cost while the relay drains (docstring)."""
    ceilings = []
    for mode in RELAYED:
        for per_txn in (1, 50):
            ceiling = await ceiling_case(server, redis_url, mode, per_txn, rows)
            print(
                f"  relay {mode} {per_txn}/txn: {ceiling.events_per_s:,.0f} ev/s", file=sys.stderr
            )
            ceilings.append(ceiling)
    print(ceiling_table(ceilings))
    wal_rate = next(c.events_per_s for c in ceilings if c.mode == "wal" and c.rows_per_txn == 1)
    backlog = int(DRAIN_BACKLOG_FACTOR * (opts.warmup_s + opts.seconds) * wal_rate)
    cases = (
        Case("plain", DRAIN_WRITERS, "outbox_plain"),
        Case("wal", DRAIN_WRITERS, "outbox", backlog),
        Case("wal", DRAIN_WRITERS, "outbox_plain", backlog),
    )
    drain = []
    for case in cases:
        run = await run_case(server, redis_url, case, opts)
        print(f"  {case.label}: {run.tx_per_s:,.0f} tx/s", file=sys.stderr)
        drain.append(run)
    with_ratios(drain)
    print(f"\nwriters while the relay drains a backlog of {backlog:,} rows (wal):")
    print(writer_table(drain))
    left = ", ".join(f"{r.label} {r.backlog_left:,}" for r in drain if r.backlog_left is not None)
    print(
        f"backlog rows not yet on the bus when the window ended (> 0: drained throughout): {left}"
    )
    return {
        "ceiling": [asdict(c) for c in ceilings],
        "drain_backlog": backlog,
        "drain": [asdict(r) for r in drain],
    }


async def measure(args: argparse.Namespace, server: PgServer, redis_url: str) -> dict[str, Any]:
    """Describe the environment, run the chosen measurement, return the JSON report."""
    opts = Options(args.warmup, args.seconds, args.writer_procs)
    env = await environment(server, redis_url)
    print(_describe(env))
    print(
        f"writers: {opts.writer_procs} asyncio process(es); warm-up {opts.warmup_s:g} s,"
        f" measured {opts.seconds:g} s per run\n"
    )
    report: dict[str, Any] = {
        "command": " ".join(["python -m bench.writers", *sys.argv[1:]]),
        "environment": env,
        "options": asdict(opts),
    }
    if args.relay_ceiling:
        report |= await measure_ceiling(server, redis_url, args.rows, opts)
    else:
        report |= await measure_writers(server, redis_url, args.writers, opts)
    return report


def _concurrencies(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def main() -> None:
    """Parse the options, start the server, measure, print and write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured s per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up s per run")
    parser.add_argument("--writers", type=_concurrencies, default=[1, 8, 32, 64])
    parser.add_argument("--writer-procs", type=int, default=1, help="writer processes")
    parser.add_argument("--relay-ceiling", action="store_true", help="measure the relay instead")
    parser.add_argument("--rows", type=int, default=200_000, help="relay-ceiling backlog rows")
    parser.add_argument("--out", type=Path, default=None, help="JSON report path")
    args = parser.parse_args()
    out = args.out or Path(
        "bench/writers-relay.json" if args.relay_ceiling else "bench/writers.json"
    )
    logging.basicConfig(level=logging.WARNING)
    with durable_logical_server() as server, redis_server() as redis_url:
        report = asyncio.run(measure(args, server, redis_url))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
