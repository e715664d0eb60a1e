"""The scenarios of the benchmark suite (`bench.suite`), one async function each.

Every scenario runs each target in turn with the same load client (`bench/client/sseload`,
through `bench.loadclient`), the same pinning (server `taskset -c <server cpu>`, client and
publisher on the client cpu) and returns a `Report`: rows of figures plus notes. A target that
fails to start or breaks during a run gives an error row; the scenario goes on with the next.

Readings come from `/proc` (proc(5)): RSS is `statm` resident pages x page size, summed over
`Target.server_pids()`; CPU is `stat` utime + stime (clock ticks / `SC_CLK_TCK`), summed the
same way. Latency is the client's receive time minus the event's `ts` (`bench.targets.payload`),
set just before the publish call (userstream: before the outbox transaction commits).
"""

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench import loadclient
from bench.loadclient import LoadResult
from bench.targets import Scope, Target, payload

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
BODY_BYTES = 200
"""Size of every event body (`bench.targets.payload(200)`), bytes."""
TICK_S = 0.01
"""The rate driver publishes the events due every 10 ms."""
BEHIND_RATIO = 0.95
"""A step is sustained when deliveries/s >= 95 % of the expected deliveries/s ..."""
P99_LIMIT_MS = 1000.0
"""... its p99 latency is at most 1 s, and no healthy connection was dropped."""
QUIET_CPU = 0.10
"""Server CPU (s/s) below which the server counts as at rest after connecting."""

Row = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """Connections, rates (events/s) and durations (s) of every scenario.

    `warmup_s` must exceed 1 s: the publisher starts at the client's first progress line of its
    measure phase (one a second), and that must come before counting starts. `quiet_s`: how long
    at most to wait before a step for the server to go quiet (the previous step's backlog);
    `connect_timeout_s`: per connection, after which the client counts it failed.
    """

    ceiling_connections: int
    ceiling_rates: tuple[int, ...]
    warmup_s: float
    step_s: float
    idle_connections: tuple[int, ...]
    idle_window_s: float
    idle_settle_s: float
    broadcast_connections: int
    broadcast_rates: tuple[int, ...]
    targeted_connections: int
    targeted_rate: int
    targeted_s: float
    storm_connections: int
    storm_concurrency: int
    slow_connections: int
    slow_rate: int
    slow_fraction: float
    slow_body_bytes: int
    slow_base_s: float
    slow_s: float
    scale_rates: tuple[int, ...]
    quiet_s: float
    connect_timeout_s: float
    storm_rounds: int
    signals_users: int
    signals_readers: int
    signals_rates: tuple[int, ...]
    signals_warmup_s: float
    signals_s: float
    signals_body_bytes: int
    reconnect_users: int
    presence_interval_s: float
    presence_grace_s: float
    presence_window_s: float


FULL = Sizes(
    ceiling_connections=2000,
    ceiling_rates=(800, 1600, 3200),
    warmup_s=2.0,
    step_s=5.0,
    idle_connections=(10_000, 19_000),
    idle_window_s=6.0,
    idle_settle_s=4.0,
    broadcast_connections=2000,
    broadcast_rates=(10, 25, 50, 100, 200, 400, 800, 1600),
    targeted_connections=10_000,
    targeted_rate=5000,
    targeted_s=10.0,
    storm_connections=10_000,
    storm_concurrency=500,
    slow_connections=500,
    slow_rate=40,
    slow_fraction=0.05,
    slow_body_bytes=16_384,
    slow_base_s=6.0,
    slow_s=10.0,
    scale_rates=(25, 50, 100, 200, 400),
    quiet_s=10.0,
    connect_timeout_s=20.0,
    storm_rounds=2,
    signals_users=10_000,
    signals_readers=2000,
    signals_rates=(1000, 100, 20),
    signals_warmup_s=4.0,
    signals_s=10.0,
    signals_body_bytes=64,
    reconnect_users=1000,
    presence_interval_s=1.0,
    presence_grace_s=10.0,
    presence_window_s=6.0,
)
QUICK = Sizes(
    ceiling_connections=200,
    ceiling_rates=(400,),
    warmup_s=1.2,
    step_s=1.0,
    idle_connections=(500,),
    idle_window_s=1.0,
    idle_settle_s=1.0,
    broadcast_connections=200,
    broadcast_rates=(50,),
    targeted_connections=500,
    targeted_rate=500,
    targeted_s=1.0,
    storm_connections=500,
    storm_concurrency=100,
    slow_connections=100,
    slow_rate=40,
    slow_fraction=0.05,
    slow_body_bytes=16_384,
    slow_base_s=1.0,
    slow_s=1.0,
    scale_rates=(100,),
    quiet_s=2.0,
    connect_timeout_s=10.0,
    storm_rounds=2,
    signals_users=500,
    signals_readers=100,
    signals_rates=(200, 50),
    signals_warmup_s=2.5,
    signals_s=2.0,
    signals_body_bytes=64,
    reconnect_users=50,
    presence_interval_s=1.0,
    presence_grace_s=2.0,
    presence_window_s=3.0,
)


class MakeTarget(Protocol):
    """`make_target(name, env=..., private_readers=...)`: a new, not started target (raises
    on an unknown or unavailable one, and on options the target does not take). `env`: further
    environment of the target's processes (userstream settings, e.g. `USERSTREAM_PRESENCE`);
    `private_readers`: members of userstream's private stream `s2`."""

    def __call__(
        self, name: str, *, env: Mapping[str, str] | None = None, private_readers: int = 0
    ) -> Target:
        """The target `name`, not started."""
        ...


@dataclass
class Context:
    """What every scenario shares: sizes, pinning, the target factory and earlier findings.

    `make_target(name, ...)` builds a not yet started target (`MakeTarget`); `ceiling_per_s`
    is the client's max sustained deliveries/s once `ceiling` ran.
    `idle_workers`/`client_processes`/`source_ips` serve large idle runs (50k connections).
    """

    sizes: Sizes
    server_cpu: str
    client_cpu: str
    targets: list[str]
    make_target: MakeTarget
    idle_connections: tuple[int, ...]
    idle_workers: int = 1
    client_processes: int = 1
    source_ips: tuple[str, ...] = ()
    ceiling_per_s: float | None = None


@dataclass
class Report:
    """One scenario's result: `rows` (one per target and step), `columns` to print as
    `(key, header)`, `notes` (setup, findings, caveats) and a `summary` mapping."""

    columns: list[tuple[str, str]]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def parse_cpus(text: str) -> set[int]:
    """A `taskset -c` list (`1`, `0,1`, `0-1`) as a set of cpu numbers; ValueError if bad."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


# --- /proc readings ---------------------------------------------------------------------------


def rss_bytes(pids: Sequence[int]) -> int:
    """Sum of the resident set sizes of `pids` (bytes); vanished processes count 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """Sum of user + system CPU time of `pids` (s), from `/proc/<pid>/stat` fields 14-15."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # fields 14, 15 counted from `pid` = 1
    return ticks / CLK_TCK


def on_cpu_seconds(pids: Sequence[int]) -> float:
    """Time `pids`' threads have spent on a cpu (s), from `/proc/<pid>/task/*/schedstat`
    (nanoseconds, not clock ticks: for a process using a few ms a second). Threads that
    ended are not counted."""
    nanoseconds = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    nanoseconds += int((task / "schedstat").read_text().split()[0])
    return nanoseconds / 1e9


class PhaseWatch(logging.Handler):
    """Watches sseload's progress lines (logged by `bench.loadclient` at INFO, one a second)
    and sets `measuring` at the first `phase=warmup` or `phase=measure`: every connection is
    then ready or failed (bench/client/sseload.c `update_phase`)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.measuring = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        """Set `measuring` on a progress line of the measure phase."""
        message = record.getMessage()
        if "phase=warmup" in message or "phase=measure" in message:
            self.measuring.set()


@contextlib.contextmanager
def watch_phase() -> Iterator[PhaseWatch]:
    """A `PhaseWatch` attached to the `bench.loadclient` logger (set to INFO) while in use."""
    logger = logging.getLogger(loadclient.__name__)
    watch, level = PhaseWatch(), logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.INFO)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


async def wait_measuring(watch: PhaseWatch, load: "asyncio.Task[LoadResult]") -> bool:
    """Wait until the client reports its measure phase (True) or the run ends (False)."""
    waiter = asyncio.create_task(watch.measuring.wait())
    await asyncio.wait({waiter, load}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    return watch.measuring.is_set()


def established(port: int) -> int:
    """Established TCP connections whose local port is `port`: the server's side of its
    connections (`ss -Htn state established`, iproute2)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        check=False,
    ).stdout
    return out.count(b"\n")


@dataclass
class ServerWatch:
    """Samples the target while a step runs: peak summed RSS (bytes) every 0.5 s and, with
    `port`, the server's established connections every 1 s (`counts`: monotonic time, count).

    `server_closed(until)` = first count - lowest count before `until`: connections the server
    ended during the run. A client that stops reading never sees a graceful close (the FIN
    waits behind data its full receive window refuses, RFC 9293 §3.8.6), so slow consumers
    cut off by the server show up here, not in the client's `closed_by_server.slow`.
    """

    target: Target
    port: int | None = None
    peak_rss: int = 0
    counts: list[tuple[float, int]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event, every_s: float = 0.5) -> None:
        """Sample until `stop` is set (RSS once more after it)."""
        tick = 0
        while True:
            self.peak_rss = max(self.peak_rss, rss_bytes(self.target.server_pids()))
            if stop.is_set():
                return
            if self.port is not None and tick % 2 == 0:
                count = await asyncio.to_thread(established, self.port)
                self.counts.append((time.monotonic(), count))
            tick += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    def server_closed(self, until: float) -> int | None:
        """Connections the server ended between the first sample and `until` (monotonic s);
        None without samples."""
        counts = [count for at, count in self.counts if at < until]
        return counts[0] - min(counts) if counts else None


# --- load client and rate driver --------------------------------------------------------------


EVENT_STREAM_HEADERS = ("Accept: text/event-stream",)
"""Sent on every connection, as an EventSource does (WHATWG HTML §9.2.2); Nchan requires it."""


async def run_client(
    ctx: Context,
    host: str,
    port: int,
    paths: list[str],
    ready_marker: bytes,
    **options: Any,
) -> LoadResult:
    """Run `sseload` pinned to the client cpu (several processes when `processes` > 1)."""
    common: dict[str, Any] = {
        "connections": len(paths),
        "cpu": ctx.client_cpu,
        "ready_marker": ready_marker,
        "headers": EVENT_STREAM_HEADERS,
        "connect_timeout_s": ctx.sizes.connect_timeout_s,
        **options,
    }
    return await loadclient.run_load(host, port, paths, **common)


@dataclass
class RateDriver:
    """Publishes `rate` events/s through `target.publish`, the events due every 10 ms in one
    call, each body `payload(200)` with `ts` taken just before the call. Targeted events go to
    users 0, 1, 2, ... in turn. `send`, when given, is called with the tick's `(user, body)`
    pairs instead of `target.publish` (e.g. userstream's `send_signals`). `sent`, `elapsed_s`,
    `max_call_ms` and `error` describe the run."""

    target: Target
    scope: Scope
    rate: float
    users: int
    body_bytes: int = BODY_BYTES
    send: Callable[[list[tuple[int, bytes]]], Awaitable[None]] | None = None
    sent: int = 0
    elapsed_s: float = 0.0
    max_call_ms: float = 0.0
    error: str | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set or a publish call raises (recorded in `error`)."""
        start = time.monotonic()
        next_tick = start
        while not stop.is_set():
            due = int(self.rate * (time.monotonic() - start)) - self.sent
            if due > 0:
                first = self.sent
                called = time.monotonic()
                body = payload(self.body_bytes, time.time_ns())
                bodies = [((first + k) % self.users, body) for k in range(due)]
                try:
                    if self.send is not None:
                        await self.send(bodies)
                    else:
                        await self.target.publish(self.scope, bodies)
                except Exception as exc:
                    self.error = f"publish: {type(exc).__name__}: {exc}"
                    break
                self.sent += due
                self.max_call_ms = max(self.max_call_ms, (time.monotonic() - called) * 1e3)
            next_tick += TICK_S
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        self.elapsed_s = time.monotonic() - start


@dataclass(frozen=True)
class Step:
    """One measured run: `connections` paths, `rate` events/s of `scope`, after `warmup_s`
    measured over `duration_s`, with `slow_fraction` of the connections slow consumers and
    event bodies of `body_bytes`."""

    scope: Scope
    rate: float
    users: int
    warmup_s: float
    duration_s: float
    slow_fraction: float = 0.0
    body_bytes: int = BODY_BYTES


async def publish_run(ctx: Context, target: Target, paths: list[str], step: Step) -> Row:
    """Connect `paths`, publish at `step.rate` from the moment they are connected until the
    client returns, sampling server RSS; return the figures as a row."""
    host, port = target.host_port()
    await wait_quiet(target, None, ctx.sizes.quiet_s)
    with watch_phase() as phase:
        load = asyncio.create_task(
            run_client(
                ctx, host, port, paths, target.ready_marker,
                warmup_s=step.warmup_s, duration_s=step.warmup_s + step.duration_s,
                slow_fraction=step.slow_fraction,
            )
        )  # fmt: skip
        await wait_measuring(phase, load)
    driver = RateDriver(target, step.scope, step.rate, step.users, step.body_bytes)
    counting_ends = time.monotonic() + step.warmup_s + step.duration_s - 1.0
    result, server, figures = await drive(target, driver, load, ServerWatch(target, port))
    row = load_row(result)
    row.update(figures, rate=step.rate, server_closed=server.server_closed(counting_ends))
    if driver.error:
        row["error"] = driver.error
    return row


async def drive(
    target: Target,
    driver: "RateDriver",
    load: "asyncio.Task[LoadResult]",
    server: ServerWatch,
) -> tuple[LoadResult, ServerWatch, Row]:
    """Publish with `driver` and sample the server with `server` until the load client `load`
    returns; then the client's result, the watch, and the sending and server figures:
    `published_per_s`, `publish_max_ms` (the slowest publish call), `server_cpu` (CPU s/s
    meanwhile), `peak_rss_mib`."""
    stop = asyncio.Event()
    cpu_before, started = cpu_seconds(target.server_pids()), time.monotonic()
    publisher = asyncio.create_task(driver.run(stop))
    sampler = asyncio.create_task(server.run(stop))
    try:
        result = await load
    finally:
        stop.set()
        await publisher
        await sampler
    cpu = (cpu_seconds(target.server_pids()) - cpu_before) / (time.monotonic() - started)
    figures: Row = {
        "published_per_s": driver.sent / driver.elapsed_s if driver.elapsed_s else 0.0,
        "publish_max_ms": driver.max_call_ms,
        "server_cpu": cpu,
        "peak_rss_mib": server.peak_rss / MIB,
    }
    return result, server, figures


def load_row(result: LoadResult) -> Row:
    """The load client's figures flattened into one row (`errors`: failures by kind)."""
    return {
        "connections": result.connections,
        "ready": result.ready,
        "failed": result.failed,
        "connects_per_s": result.connect.per_s,
        "connect_p50_ms": result.connect.p50_ms,
        "connect_p99_ms": result.connect.p99_ms,
        "connect_max_ms": result.connect.max_ms,
        "measure_s": result.measure_s,
        "events": result.events,
        "deliveries_per_s": result.deliveries_per_s,
        "latency_count": result.latency_ms.count,
        "p50_ms": result.latency_ms.p50,
        "p99_ms": result.latency_ms.p99,
        "max_ms": result.latency_ms.max,
        "closed_healthy": result.closed_by_server.healthy,
        "closed_slow": result.closed_by_server.slow,
        "close_events": result.close_events,
        "client_errors": dict(result.errors),
    }


def judge(row: Row, expected_per_s: float) -> str:
    """`ok` (sustained), `dropped` (connections lost or never ready), `behind` (deliveries/s
    under 95 % of `expected_per_s`) or `p99>1s`; `error` when the run broke."""
    if row.get("error"):
        return "error"
    if row["ready"] < row["connections"] or row["failed"] or row["closed_healthy"]:
        return "dropped"
    if row["deliveries_per_s"] < BEHIND_RATIO * expected_per_s:
        return "behind"
    if (row["p99_ms"] or 0.0) > P99_LIMIT_MS:
        return "p99>1s"
    return "ok"


# --- running one target ------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """How to start a target for a scenario: `users` and `scope` as `Target.start` takes them,
    `workers` gateway processes pinned to `cpu` (None: the server cpu); `env` and
    `private_readers` go to `make_target` (userstream only: further settings of its processes,
    members of its private stream `s2`)."""

    users: int
    scope: Scope
    workers: int = 1
    cpu: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    private_readers: int = 0


async def on_target(
    ctx: Context,
    name: str,
    setup: Setup,
    body: Callable[[Target], Awaitable[list[Row]]],
) -> list[Row]:
    """Start target `name`, run `body` on it, stop it; any failure becomes an error row."""
    try:
        if setup.env or setup.private_readers:
            target = ctx.make_target(name, env=setup.env, private_readers=setup.private_readers)
        else:
            target = ctx.make_target(name)
        await target.start(
            cpu=setup.cpu or ctx.server_cpu,
            users=setup.users,
            scope=setup.scope,
            workers=setup.workers,
        )
    except Exception as exc:
        return [{"target": name, "error": f"start: {type(exc).__name__}: {exc}"}]
    try:
        rows = await body(target)
    except Exception as exc:
        rows = [{"error": f"{type(exc).__name__}: {exc}"}]
    finally:
        with contextlib.suppress(Exception):
            await target.stop()
    return [{"target": name, **row} for row in rows]


# --- scenarios ---------------------------------------------------------------------------------

LADDER_COLUMNS = [
    ("target", "target"),
    ("rate", "events/s"),
    ("connections", "conns"),
    ("expected_per_s", "expected/s"),
    ("deliveries_per_s", "deliveries/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("server_cpu", "srv cpu s/s"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("verdict", "verdict"),
]


async def ceiling(ctx: Context) -> Report:
    """The load client's own ceiling: `sseload` against the reference server `sseserve`
    (pinned to the server cpu), at rising per-connection rates; max sustained deliveries/s."""
    report = Report(LADDER_COLUMNS)
    sizes = ctx.sizes
    for rate in sizes.ceiling_rates:
        row = await ceiling_step(ctx, rate)
        report.rows.append(row)
        if row["verdict"] != "ok":
            break
    sustained = [float(r["deliveries_per_s"]) for r in report.rows if r["verdict"] == "ok"]
    observed = [float(r.get("deliveries_per_s") or 0.0) for r in report.rows]
    best = max(sustained, default=0.0)
    ctx.ceiling_per_s = best or None
    bound = "at least " if report.rows[-1]["verdict"] == "ok" else ""
    report.summary.update(
        client_max_sustained_per_s=best, client_max_observed_per_s=max(observed, default=0.0)
    )
    report.notes.append(
        f"client ceiling: {bound}{best:,.0f} deliveries/s sustained, {max(observed):,.0f}"
        f" observed ({sizes.ceiling_connections} connections, {BODY_BYTES}-byte events, sseload"
        f" on cpu {ctx.client_cpu}, sseserve on cpu {ctx.server_cpu}); broadcast steps expecting"
        " more are not run (client-bound)"
    )
    return report


async def ceiling_step(ctx: Context, rate: int) -> Row:
    """One `sseserve` run at `rate` events/s per connection."""
    sizes = ctx.sizes
    server = ReferenceServer(rate, BODY_BYTES)
    try:
        server.start(ctx.server_cpu)
        paths = ["/"] * sizes.ceiling_connections
        result = await run_client(
            ctx, "127.0.0.1", server.port, paths, server.ready_marker,
            warmup_s=sizes.warmup_s, duration_s=sizes.warmup_s + sizes.step_s,
        )  # fmt: skip
        row = {"target": "sseserve", **load_row(result), "rate": rate}
        row["server_cpu"] = server.cpu_per_s()
        row["peak_rss_mib"] = rss_bytes([server.pid]) / MIB
    except Exception as exc:
        row = {"target": "sseserve", "rate": rate, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        server.stop()
    row["expected_per_s"] = rate * sizes.ceiling_connections
    row["verdict"] = judge(row, row["expected_per_s"]) if "ready" in row else "error"
    return row


class ReferenceServer:
    """`bench/client/sseserve --port P --rate R --size B`: a trivial C SSE server sending every
    connection R events/s of B bytes, used only to measure the client's ceiling."""

    ready_marker = b"event: offset"

    def __init__(self, rate: int, size: int) -> None:
        self.rate = rate
        self.size = size
        self.port = 0
        self.pid = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._cpu0 = 0.0

    def start(self, cpu: str, attempts: int = 3) -> None:
        """Start it pinned to `cpu` on a free port and wait (5 s at most) until it accepts
        connections; a port taken meanwhile is retried on another. Raises RuntimeError."""
        from tests.services import free_port

        binary = Path(__file__).parent / "client" / "sseserve"
        for _ in range(attempts):
            self.port = free_port()
            self._process = subprocess.Popen(
                ["taskset", "-c", cpu, str(binary), "--port", str(self.port),
                 "--rate", str(self.rate), "--size", str(self.size)],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            self.pid = self._process.pid
            deadline = time.monotonic() + 5
            while self._process.poll() is None and time.monotonic() < deadline:
                if listening(self.port):
                    time.sleep(0.05)  # a port taken by another server: ours exits meanwhile
                    if self._process.poll() is None:
                        self._started, self._cpu0 = time.monotonic(), cpu_seconds([self.pid])
                        return
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"sseserve did not start listening ({attempts} ports tried)")

    def cpu_per_s(self) -> float:
        """CPU seconds per second used since `start`."""
        return (cpu_seconds([self.pid]) - self._cpu0) / (time.monotonic() - self._started)

    def stop(self) -> None:
        """Kill it."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def listening(port: int) -> bool:
    """Whether a TCP connect to 127.0.0.1:`port` succeeds (the connection is closed at once)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def broadcast_ladder(
    ctx: Context,
    name: str,
    rates: Sequence[int],
    connections: int,
    setup: Setup,
    overload: bool = False,
) -> list[Row]:
    """Rising broadcast rates on one target until a step is not sustained, one row per step;
    with `overload`, one more step at twice the failing rate (verdict `overload: ...`) shows
    whether server memory stays bounded past saturation."""

    async def body(target: Target) -> list[Row]:
        rows: list[Row] = []
        paths = target.paths(connections, "broadcast")
        ladder = list(rates)
        for index, rate in enumerate(ladder):
            expected = float(rate * connections)
            if ctx.ceiling_per_s and expected > ctx.ceiling_per_s:
                rows.append({"rate": rate, "expected_per_s": expected, "verdict": "client-bound"})
                break
            step = Step("broadcast", rate, connections, ctx.sizes.warmup_s, ctx.sizes.step_s)
            row = await publish_run(ctx, target, paths, step)
            row.update(expected_per_s=expected, verdict=judge(row, expected))
            past = any(r["verdict"] != "ok" for r in rows)
            if past:
                row["verdict"] = f"overload: {row['verdict']}"
            rows.append(row)
            if past or row["verdict"] in ("error", "dropped"):
                break
            if row["verdict"] != "ok":
                if not overload:
                    break
                ladder[index + 1 :] = [rate * 2]
        return rows

    return await on_target(ctx, name, setup, body)


def max_sustained(rows: list[Row]) -> dict[str, float]:
    """Highest rate with verdict `ok` below the first step that was not, per target
    (`target xN` for N workers); 0 when none was sustained."""
    best: dict[str, float] = {}
    failed: set[str] = set()
    for row in rows:
        name = row["target"] if "workers" not in row else f"{row['target']} x{row['workers']}"
        best.setdefault(name, 0.0)
        if row.get("verdict") != "ok":
            failed.add(name)
        elif name not in failed:
            best[name] = max(best[name], float(row["rate"]))
    return best


async def broadcast(ctx: Context) -> Report:
    """`broadcast_connections` connections on one channel; rising event rates per target until
    it falls behind; deliveries/s, latency, server CPU and peak RSS per step."""
    report = Report(LADDER_COLUMNS)
    n = ctx.sizes.broadcast_connections
    for name in ctx.targets:
        report.rows += await broadcast_ladder(
            ctx, name, ctx.sizes.broadcast_rates, n, Setup(n, "broadcast"), overload=True
        )
    report.summary["max_sustained_rate"] = max_sustained(report.rows)
    report.notes.append(
        f"sustained = deliveries/s >= {BEHIND_RATIO:.0%} of rate x connections, p99 <= 1 s, no"
        " connection dropped; peak RSS sampled every 0.5 s during the step; after the first"
        " step not sustained, one `overload` step at twice its rate (memory past saturation)"
    )
    return report


IDLE_COLUMNS = [
    ("target", "target"),
    ("connections", "conns"),
    ("ready", "ready"),
    ("rss_before_mib", "RSS before MiB"),
    ("rss_after_mib", "RSS after MiB"),
    ("rss_per_conn_kib", "KiB/conn"),
    ("cpu_s_per_s", "cpu s/s at rest"),
    ("window_s", "window s"),
]


async def idle_one(ctx: Context, target: Target, n: int) -> Row:
    """Hold `n` connections: RSS before and after connecting, then CPU over the idle window."""
    host, port = target.host_port()
    before = rss_bytes(target.server_pids())
    window = ctx.sizes.idle_window_s
    options: dict[str, Any] = {
        "warmup_s": ctx.sizes.idle_settle_s,
        "duration_s": ctx.sizes.idle_settle_s + window + 1,
    }
    if ctx.client_processes > 1:
        options.update(processes=ctx.client_processes, source_ips=list(ctx.source_ips) or None)
    with watch_phase() as watch:
        load = asyncio.create_task(
            run_client(
                ctx, host, port, target.paths(n, "broadcast"), target.ready_marker, **options
            )
        )
        await wait_measuring(watch, load)
    await wait_quiet(target, load, ctx.sizes.idle_settle_s)
    after = rss_bytes(target.server_pids())
    cpu0, t0 = cpu_seconds(target.server_pids()), time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(load), window)
    cpu1, elapsed = cpu_seconds(target.server_pids()), time.monotonic() - t0
    result = await load
    return {
        "connections": n,
        "ready": result.ready,
        "failed": result.failed,
        "rss_before_mib": before / MIB,
        "rss_after_mib": after / MIB,
        "rss_per_conn_kib": (after - before) / n / 1024,
        "cpu_s_per_s": (cpu1 - cpu0) / elapsed,
        "window_s": elapsed,
        "closed_healthy": result.closed_by_server.healthy,
    }


async def wait_quiet(
    target: Target, load: "asyncio.Task[LoadResult] | None", limit_s: float
) -> None:
    """Wait until the server uses under 10 % of a core over 0.5 s (connect work done, or the
    previous step's backlog drained), at most about `limit_s` or until `load` ends."""
    deadline = time.monotonic() + limit_s - 0.5
    while time.monotonic() < deadline and not (load is not None and load.done()):
        cpu0 = cpu_seconds(target.server_pids())
        await asyncio.sleep(0.5)
        if (cpu_seconds(target.server_pids()) - cpu0) / 0.5 < QUIET_CPU:
            return


async def idle(ctx: Context) -> Report:
    """N idle connections per target: server RSS per connection and CPU s/s at rest
    (keep-alives included)."""
    report = Report(IDLE_COLUMNS)
    for n in ctx.idle_connections:
        for name in ctx.targets:

            async def body(target: Target, n: int = n) -> list[Row]:
                return [await idle_one(ctx, target, n)]

            setup = Setup(n, "broadcast", workers=ctx.idle_workers)
            report.rows += await on_target(ctx, name, setup, body)
    report.notes.append(
        "RSS per connection = (summed RSS of the server processes once connected and at rest"
        " - before connecting) / N; CPU over the window after connect work settled"
        f" ({ctx.sizes.idle_window_s:g} s); keep-alive 15 s on every target (the defaults:"
        " userstream USERSTREAM_KEEPALIVE_S, plain app, nchan_eventsource_ping_interval)"
    )
    if ctx.idle_workers > 1:
        report.notes.append(f"server workers: {ctx.idle_workers}")
    return report


TARGETED_COLUMNS = [
    ("target", "target"),
    ("connections", "conns"),
    ("rate", "events/s"),
    ("published_per_s", "published/s"),
    ("deliveries_per_s", "deliveries/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("own_p50_ms", "own p50 ms"),
    ("own_p99_ms", "own p99 ms"),
    ("server_cpu", "srv cpu s/s"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("verdict", "verdict"),
]


async def targeted(ctx: Context) -> Report:
    """One connection per user; user-scoped events at `targeted_rate`/s spread over the users
    in turn; deliveries/s and latency."""
    report = Report(TARGETED_COLUMNS)
    sizes = ctx.sizes
    n = sizes.targeted_connections
    for name in ctx.targets:

        async def body(target: Target) -> list[Row]:
            step = Step("targeted", sizes.targeted_rate, n, sizes.warmup_s, sizes.targeted_s)
            row = await publish_run(ctx, target, target.paths(n, "targeted"), step)
            row["verdict"] = judge(row, float(sizes.targeted_rate))
            samples = await own_samples(target)
            row["own_p50_ms"] = own_latency_ms(samples, 0.5)
            row["own_p99_ms"] = own_latency_ms(samples, 0.99)
            return [row]

        report.rows += await on_target(ctx, name, Setup(n, "targeted"), body)
    report.notes.append(
        "each event names one user; expected deliveries/s = events/s; `own p50/p99` = bucket"
        " bound of the gateway's own commit-to-write histogram (userstream only: outbox commit"
        " to socket write, without the client's side)"
    )
    return report


STORM_COLUMNS = [
    ("target", "target"),
    ("connections", "conns"),
    ("ready", "ready"),
    ("failed", "failed"),
    ("connects_per_s", "connects/s"),
    ("connect_p50_ms", "ready p50 ms"),
    ("connect_p99_ms", "ready p99 ms"),
    ("connect_max_ms", "ready max ms"),
    ("server_cpu_ms_per_conn", "srv cpu ms/conn"),
    ("peak_rss_mib", "peak RSS MiB"),
]


async def storm_run(ctx: Context, target: Target, n: int, concurrency: int) -> Row:
    """`n` connects to a started `target` as fast as they come (`concurrency` in flight),
    held 0.5 s once all are ready: the load client's figures (`load_row`), server CPU per
    connect (`server_cpu_ms_per_conn`, ms), peak RSS (MiB) and the `event: presence` frames
    the client received over the whole run (`presence_frames`, their data in `presence_mib`)."""
    host, port = target.host_port()
    paths = target.paths(n, "broadcast")
    cpu0 = cpu_seconds(target.server_pids())
    stop = asyncio.Event()
    watch = ServerWatch(target)
    sampler = asyncio.create_task(watch.run(stop))
    try:
        result = await run_client(
            ctx, host, port, paths, target.ready_marker, concurrency=concurrency, duration_s=0.5
        )
    finally:
        stop.set()
        await sampler
    row = load_row(result)
    row["server_cpu_ms_per_conn"] = (cpu_seconds(target.server_pids()) - cpu0) / n * 1e3
    row["peak_rss_mib"] = watch.peak_rss / MIB
    row["presence_frames"] = result.presence.run_events
    row["presence_mib"] = result.presence.run_data_bytes / MIB
    return row


def mean_of(rows: Sequence[Row], key: str) -> float | None:
    """The mean of `key` over the rows that have it (not None); None when none has."""
    values = [float(row[key]) for row in rows if row.get(key) is not None]
    return sum(values) / len(values) if values else None


def ratio_of(value: float | None, baseline: float | None) -> float | None:
    """`value / baseline`; None when either is unknown or the baseline is 0."""
    return value / baseline if value is not None and baseline else None


def storm_note(concurrency: int) -> str:
    """What a connect storm's figures mean (both storm scenarios print it)."""
    return (
        f"concurrency {concurrency}: connects in flight; ready = the target's"
        " ready marker arrived (userstream `event: offset`; others their first frame); server"
        " CPU per connection includes the TLS-free HTTP request, auth and subscription"
    )


async def connect_storm(ctx: Context) -> Report:
    """`storm_connections` connects as fast as they come (`storm_concurrency` in flight):
    connects/s and time to ready (userstream: `event: offset`, the user's access loaded)."""
    report = Report(STORM_COLUMNS)
    sizes = ctx.sizes
    n = sizes.storm_connections
    for name in ctx.targets:

        async def body(target: Target) -> list[Row]:
            return [await storm_run(ctx, target, n, sizes.storm_concurrency)]

        report.rows += await on_target(ctx, name, Setup(n, "broadcast"), body)
    report.notes.append(storm_note(sizes.storm_concurrency))
    return report


SLOW_COLUMNS = [
    ("target", "target"),
    ("slow", "slow conns"),
    ("connections", "conns"),
    ("rate", "events/s"),
    ("measure_s", "run s"),
    ("deliveries_per_s", "healthy deliv/s"),
    ("p50_ms", "healthy p50 ms"),
    ("p99_ms", "healthy p99 ms"),
    ("max_ms", "healthy max ms"),
    ("server_closed", "srv closed"),
    ("own_slow_cut", "own slow count"),
    ("closed_healthy", "healthy cut"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("verdict", "verdict"),
]


Samples = dict[str, float]
"""Prometheus samples by name with labels, e.g. `userstream_connections`."""


async def own_samples(target: Target) -> Samples | None:
    """What the target reports about itself (`server_counters()`: userstream's `/metrics`);
    None for targets without it."""
    counters: Callable[[], Awaitable[Samples]] | None = getattr(target, "server_counters", None)
    return None if counters is None else await counters()


def own_count(samples: Samples | None, suffix: str) -> float | None:
    """The sum of the samples whose name ends in `suffix`; None without samples."""
    if samples is None:
        return None
    return sum(v for k, v in samples.items() if k.split("{")[0].endswith(suffix))


def own_latency_ms(samples: Samples | None, quantile: float) -> float | None:
    """The upper bound (ms) of the bucket holding `quantile` of the target's own
    commit-to-write histogram (userstream `userstream_commit_to_write_seconds`: outbox commit
    to the socket write, measured in the gateway); None without samples or observations.
    Bucket bounds make it coarse: 1, 2.5, 5, 10, 25 ms, ..."""
    prefix = 'userstream_commit_to_write_seconds_bucket{le="'
    buckets = sorted(
        (float(name[len(prefix) : -2]), count)
        for name, count in (samples or {}).items()
        if name.startswith(prefix)
    )
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return None
    return next(bound * 1e3 for bound, count in buckets if count >= quantile * total)


async def slow(ctx: Context) -> Report:
    """Broadcast at `slow_rate` of `slow_body_bytes` events, without and then with
    `slow_fraction` slow consumers (connections that stop reading once ready), each on a fresh
    server: healthy deliveries and latency, connections the server closed, peak RSS."""
    report = Report(SLOW_COLUMNS)
    sizes = ctx.sizes
    n = sizes.slow_connections
    for name in ctx.targets:
        for fraction, seconds in ((0.0, sizes.slow_base_s), (sizes.slow_fraction, sizes.slow_s)):

            async def body(
                target: Target, fraction: float = fraction, seconds: float = seconds
            ) -> list[Row]:
                step = Step(
                    "broadcast", sizes.slow_rate, n, sizes.warmup_s, seconds, fraction,
                    sizes.slow_body_bytes,
                )  # fmt: skip
                row = await publish_run(ctx, target, target.paths(n, "broadcast"), step)
                samples = await own_samples(target)
                row["own_slow_cut"] = own_count(samples, "slow_consumer_disconnects_total")
                slow_count = n // round(1 / fraction) if fraction else 0
                row["slow"] = slow_count
                row["verdict"] = judge(row, float(sizes.slow_rate * (n - slow_count)))
                return [row]

            report.rows += await on_target(ctx, name, Setup(n, "broadcast"), body)
    per_slow = sizes.slow_rate * sizes.slow_body_bytes / 1024
    report.notes.append(
        f"{sizes.slow_body_bytes // 1024} KiB events so that each slow consumer is owed"
        f" {per_slow:,.0f} KiB/s: loopback TCP buffers absorb about 4 MiB per connection"
        " (net.ipv4.tcp_wmem autotuning) before a server sees a slow consumer at all;"
        f" {sizes.slow_base_s:g} s without, {sizes.slow_s:g} s with slow consumers, each on a"
        " fresh server; `srv closed` = drop in the server's established connections during the"
        " run (a non-reading client cannot see a graceful close, so the client's own count of"
        " slow consumers cut off is not used); `own slow count` = the server's own count of"
        " slow consumers it cut off (userstream `userstream_slow_consumer_disconnects_total`);"
        " `healthy cut` = full-speed readers the server closed (client side)"
    )
    return report


async def scale(ctx: Context) -> Report:
    """userstream broadcast with `--workers 2` against 1, both pinned to the server cpus when
    `--server-cpu` names two or more, else to every cpu (sharing them with the client)."""
    report = Report([("workers", "workers"), *LADDER_COLUMNS])
    n = ctx.sizes.broadcast_connections
    if len(parse_cpus(ctx.server_cpu)) >= 2:
        cpus = ctx.server_cpu
    else:
        cpus = ",".join(str(c) for c in range(os.cpu_count() or 1))
    for workers in (1, 2):
        setup = Setup(n, "broadcast", workers=workers, cpu=cpus)
        rows = await broadcast_ladder(ctx, "userstream", ctx.sizes.scale_rates, n, setup)
        report.rows += [{**row, "workers": workers} for row in rows]
    report.summary["max_sustained_rate"] = max_sustained(report.rows)
    shared = parse_cpus(cpus) & parse_cpus(ctx.client_cpu)
    report.notes.append(
        f"server pinned to cpus {cpus} in both runs (the machine has {os.cpu_count()}), so the"
        " only difference is the worker count"
        + (
            f"; the load client, the publisher and the relay share cpu {ctx.client_cpu} with"
            " the server, so this measures contention more than a second worker (give"
            " --server-cpu two cpus of its own)"
            if shared
            else ""
        )
    )
    return report


SCENARIOS: dict[str, Callable[[Context], Awaitable[Report]]] = {
    "ceiling": ceiling,
    "idle": idle,
    "broadcast": broadcast,
    "targeted": targeted,
    "connect-storm": connect_storm,
    "slow": slow,
    "scale": scale,
}
"""Every scenario by name, in the default order (`ceiling` first: the others use its figure)."""
