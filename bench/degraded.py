"""Delivery through a Redis outage: degraded mode (`sync.dispatcher`), in the end-to-end setup.

Claim measured: Redis stopped for 30 s under 100 events/s, delivery continues with a p99 within
twice the gateways' outbox poll interval (`USERSTREAM_DEGRADED_POLL_S`, 0.5 s by default), and
nothing is lost or duplicated after Redis returns.

Setup: a fresh database (migrated, then `set_ingest_mode`; `--ingest wal` by default), a Redis
of the run's own (`tests.services.RedisProcess`, so it can be killed and started again on its
port), one `userstream relay` and `--gateways` `userstream serve` processes on it, `--clients`
SSE clients (httpx-sse, all in this process) spread round-robin over the gateways as members
u0..u{n-1} of one workspace, each resuming with `Last-Event-ID` if its stream ends. Once the
relay leads (in wal mode: once its slot streams) a publisher commits one event per transaction
through the SDK at `--rate` per second, on a schedule, for the whole run: `--before` seconds
with Redis up, `--outage` seconds with Redis killed (SIGKILL, `RedisProcess.stop`), `--after`
seconds from the moment the restarted Redis answers PING (it comes back empty).

Latency = arrival at the client minus the return of the publisher's COMMIT, both on this
process's monotonic clock (the definition of `bench.latency`). Each event belongs to the phase
its COMMIT returned in: before (Redis up), outage (from the kill until the new Redis answers),
after. Per phase: events, deliveries, p50 / p99 / max in ms. Goals: outage p99 at most twice
the poll interval; outage p50 is set against the before-phase p50 of the same invocation.
Per client: events missing, duplicated (by the number in the entity id), out of order; its
streams and `must-refetch` events.

The gateways' own view: each one's `/readyz` is polled every 0.1 s from the kill until it
reports `"degraded": true` (time to enter degraded mode) and from the restart until it reports
false again (time back on the bus). Halfway through the outage `/readyz` (expect 200) and the
`userstream_bus_degraded` gauge of `/metrics` (expect 1) are read from each gateway; once every
gateway is back on the bus and the after phase is over, the gauge again (expect 0). The
processes' logs (JSON lines) stay in `--logs` (default: a new temporary folder), named in the
report.

Prints a table and writes JSON to `--out` (default `bench/results-degraded.json`), which also
holds the latency of each second of each phase (by commit time) and every client's count. Exit
status 1 if any client lost, doubled or reordered an event, or a gateway or the relay exited.
Every process, the Redis and the database are stopped or dropped whatever happens.

    .venv/bin/python -m bench.degraded [--ingest wal|trigger] [--clients 20] [--gateways 2]
                                       [--rate 100] [--before 10] [--outage 30] [--after 10]
                                       [--poll 0.5] [--out bench/results-degraded.json]
"""

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx
import nanoid
import orjson
from httpx_sse import ServerSentEvent, aconnect_sse

from bench.database import wait_leading
from bench.latency import describe, percentiles, seed, server_for
from core.publish import OutboxEvent, publish
from core.schema.ingest import MODES, Mode, set_ingest_mode
from core.schema.migrations import migrate
from sync.dispatcher import DEGRADED_POLL_S
from tests.e2e.harness import JWT_SECRET, Gateway, Processes, bearer, scrape
from tests.services import PgServer, RedisProcess

DEFAULT_OUT: Final = Path(__file__).parent / "results-degraded.json"

PHASES: Final = ("before", "outage", "after")
"""The phases of a run, in order; an event belongs to the one its COMMIT returned in."""

GOAL_P99_POLLS: Final = 2.0
"""Goal: outage p99 at most this many poll intervals."""

MODE_POLL_S: Final = 0.1
"""Interval of the `/readyz` reads that time each gateway's switch into and out of degraded
mode, seconds."""

SWITCH_TIMEOUT_S: Final = 30.0
"""Longest wait for every gateway to switch into or out of degraded mode, seconds."""

DRAIN_TIMEOUT_S: Final = 30.0
"""Longest wait, after the publisher stopped, for every client to hold every event, seconds."""

RECONNECT_DELAY_S: Final = 0.05
"""A client's pause before it resumes an ended stream, seconds."""

METRIC: Final = ("userstream_bus_degraded", ())
DEGRADED_EVENTS: Final = ("userstream_degraded_events_total", ())


@dataclass(frozen=True, slots=True)
class Options:
    """The command line: clients, gateways, events per second, phase lengths (s), ingest mode,
    gateways' degraded poll interval (s), and where process logs go (None: a new temporary
    folder, kept)."""

    clients: int = 20
    gateways: int = 2
    rate: float = 100.0
    before_s: float = 10.0
    outage_s: float = 30.0
    after_s: float = 10.0
    ingest: Mode = "wal"
    poll_s: float = DEGRADED_POLL_S
    log_dir: Path | None = None


class Receiver:
    """One `/me/stream` client of `user_id` on the gateway at `url` that records when each
    change arrives and, when its stream ends, resumes with `Last-Event-ID` after
    `RECONNECT_DELAY_S` (as `tests.e2e.sequence.ResumingClient`, on one gateway).

    Records `arrivals` ((event number, monotonic s) in arrival order, duplicates included),
    `streams` (streams that reached their `offset` event), `refetches` (`must-refetch` events)
    and `endings` (why each stream ended).
    """

    def __init__(self, user_id: str, url: str) -> None:
        self.user_id = user_id
        self.url = url
        self.arrivals: list[tuple[int, float]] = []
        self.streams = 0
        self.refetches = 0
        self.endings: list[str] = []
        self._numbers: set[int] = set()
        self._last_event_id = ""
        self._opened = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def connect(self, timeout_s: float = 10.0) -> "Receiver":
        """Start the client and wait for its first `offset` event; TimeoutError after
        `timeout_s` seconds."""
        self._task = asyncio.create_task(self._run(), name=f"receiver-{self.user_id}")
        async with asyncio.timeout(timeout_s):
            await self._opened.wait()
        return self

    def has(self, number: int) -> bool:
        """True once the event numbered `number` arrived."""
        return number in self._numbers

    async def close(self) -> None:
        """Stop reconnecting and drop the stream. Idempotent."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            self.endings.append(await self._stream())
            await asyncio.sleep(RECONNECT_DELAY_S)

    async def _stream(self) -> str:
        """Hold one stream until it ends; return why it ended."""
        headers = bearer(self.user_id)
        if self._last_event_id:
            headers["Last-Event-ID"] = self._last_event_id
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(5, read=None)) as http,
                aconnect_sse(http, "GET", f"{self.url}/me/stream", headers=headers) as source,
            ):
                if source.response.status_code != 200:
                    return f"status {source.response.status_code}"
                async for event in source.aiter_sse():
                    self._take(event, time.monotonic())
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ended by the server"

    def _take(self, event: ServerSentEvent, arrived: float) -> None:
        if event.id:
            self._last_event_id = event.id
        if event.event == "change":
            entity: str = orjson.loads(event.data)["entityId"]
            number = int(entity.removeprefix("e"))
            self.arrivals.append((number, arrived))
            self._numbers.add(number)
        elif event.event == "offset":
            self.streams += 1
            self._opened.set()
        elif event.event == "must-refetch":
            self.refetches += 1


class PacedPublisher:
    """Commits event number 0, 1, 2, ... (entity `e<n>`, data `{"i": n}`, public stream `s1`
    of workspace `w1`), one per transaction, at `rate` per second on a schedule (a slow commit
    does not lower the rate), until `stop` is set. `commits[n]` is the monotonic time (s) at
    which the COMMIT of number n returned. Raises what asyncpg raises."""

    def __init__(self, dsn: str, rate: float) -> None:
        self.dsn = dsn
        self.interval_s = 1 / rate
        self.commits: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set (see the class docstring)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            next_at = time.monotonic()
            while not stop.is_set():
                number = len(self.commits)
                async with conn.transaction():
                    await publish(
                        conn,
                        OutboxEvent("stream_event.created", "stream_event", "create",
                                    f"e{number}", workspace_id="w1", stream_id="s1",
                                    data={"i": number}),
                    )  # fmt: skip
                self.commits.append(time.monotonic())
                next_at += self.interval_s
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            await conn.close()


@dataclass(slots=True)
class Marks:
    """Monotonic times (s) of the run: publisher started, Redis killed (the kill returned),
    Redis answering PING again."""

    started: float = 0.0
    killed: float = 0.0
    restarted: float = 0.0

    def phase(self, committed: float) -> str:
        """The phase (`PHASES`) of an event whose COMMIT returned at `committed`."""
        if committed < self.killed:
            return "before"
        return "outage" if committed < self.restarted else "after"

    def into_phase(self, committed: float) -> tuple[str, float]:
        """The phase of an event whose COMMIT returned at `committed`, and seconds since the
        phase began."""
        phase = self.phase(committed)
        began = {"before": self.started, "outage": self.killed, "after": self.restarted}[phase]
        return phase, committed - began


@dataclass(slots=True)
class GatewayView:
    """What one gateway reported: seconds from the kill until `/readyz` said degraded
    (`entered_s`) and from the restart until it said not degraded (`left_s`), None if never
    within SWITCH_TIMEOUT_S; halfway through the outage its `/readyz` status, `bus` and
    `degraded`, the `userstream_bus_degraded` gauge and `userstream_degraded_events_total`;
    after the after phase the gauge again."""

    url: str
    entered_s: float | None = None
    left_s: float | None = None
    outage_readyz: int | None = None
    outage_bus: str | None = None
    outage_degraded: bool | None = None
    outage_gauge: float | None = None
    outage_degraded_events: float | None = None
    after_gauge: float | None = None


@dataclass(slots=True)
class Run:
    """Everything one run gathered: options, the publisher, the clients, marks, gateways."""

    options: Options
    publisher: PacedPublisher
    receivers: list[Receiver]
    gateways: list[GatewayView]
    marks: Marks = field(default_factory=Marks)
    exited: list[str] = field(default_factory=list)


async def readiness(url: str) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of the gateway's `/readyz` (an empty body if it is not JSON)."""
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"{url}/readyz")
    try:
        body = response.json()
    except ValueError:
        body = {}
    return response.status_code, body


async def time_switch(
    view: GatewayView, degraded: bool, since: float, timeout_s: float = SWITCH_TIMEOUT_S
) -> float | None:
    """Seconds from `since` (monotonic) until the gateway's `/readyz` reports `degraded`,
    polled every MODE_POLL_S; None after `timeout_s`."""
    while time.monotonic() - since < timeout_s:
        with contextlib.suppress(httpx.HTTPError):
            _, body = await readiness(view.url)
            if body.get("degraded") is degraded:
                return time.monotonic() - since
        await asyncio.sleep(MODE_POLL_S)
    return None


async def probe_outage(view: GatewayView) -> None:
    """Record the gateway's `/readyz` and degraded-mode metrics (GatewayView, "halfway")."""
    status, body = await readiness(view.url)
    view.outage_readyz, view.outage_bus = status, body.get("bus")
    view.outage_degraded = body.get("degraded")
    samples = await scrape(f"{view.url}/metrics")
    view.outage_gauge = samples.get(METRIC)
    view.outage_degraded_events = samples.get(DEGRADED_EVENTS)


async def sleep_until(at: float) -> None:
    """Sleep until the monotonic time `at` (no sleep if it is past)."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))


async def outage(run: Run, redis: RedisProcess) -> None:
    """Kill Redis, time each gateway's switch into degraded mode, probe every gateway halfway
    through, start Redis again at the end of the outage."""
    marks, views = run.marks, run.gateways
    await asyncio.to_thread(redis.stop)
    marks.killed = time.monotonic()
    entering = asyncio.gather(
        *(time_switch(v, True, marks.killed, run.options.outage_s) for v in views)
    )
    try:
        await sleep_until(marks.killed + run.options.outage_s / 2)
        await asyncio.gather(*(probe_outage(v) for v in views))
        for view, seconds in zip(views, await entering, strict=True):
            view.entered_s = seconds
    finally:
        entering.cancel()
    await sleep_until(marks.killed + run.options.outage_s)
    await asyncio.to_thread(redis.start)
    marks.restarted = time.monotonic()


async def after(run: Run) -> None:
    """Time each gateway's return to the bus; once every one returned (or gave up) and the
    after phase is over, read each one's gauge."""
    views, since = run.gateways, run.marks.restarted
    for view, seconds in zip(
        views, await asyncio.gather(*(time_switch(v, False, since) for v in views)), strict=True
    ):
        view.left_s = seconds
    await sleep_until(since + run.options.after_s)
    for view in views:
        view.after_gauge = (await scrape(f"{view.url}/metrics")).get(METRIC)


async def drive(run: Run, redis: RedisProcess) -> None:
    """Publish throughout the three phases, with the outage between, then wait (at most
    DRAIN_TIMEOUT_S) until every client holds the last event."""
    stop = asyncio.Event()
    run.marks.started = time.monotonic()
    publishing = asyncio.create_task(run.publisher.run(stop), name="publisher")
    try:
        await sleep_until(run.marks.started + run.options.before_s)
        await outage(run, redis)
        await after(run)
    finally:
        stop.set()
        await publishing
    last = len(run.publisher.commits) - 1
    deadline = time.monotonic() + DRAIN_TIMEOUT_S

    def waiting() -> bool:
        return time.monotonic() < deadline and not all(r.has(last) for r in run.receivers)

    while waiting():  # noqa: ASYNC110 (polling the clients' records)
        await asyncio.sleep(0.05)


async def prepare(dsn: str, mode: Mode, users: int) -> None:
    """Migrate the database, set its ingest `mode`, seed `users` members (`bench.latency`)."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await set_ingest_mode(conn, mode)
        await seed(conn, users)
    finally:
        await conn.close()


async def start_services(
    processes: Processes, dsn: str, options: Options, log_dir: Path
) -> list[Gateway]:
    """The relay (waited for until it leads) and the gateways (started together), their logs
    in `log_dir`."""
    processes.start("relay", log_file=log_dir / "relay.log")
    await wait_leading(dsn, options.ingest)
    return list(
        await asyncio.gather(
            *(
                asyncio.to_thread(processes.gateway, log_file=log_dir / f"gateway{i}.log")
                for i in range(options.gateways)
            )
        )
    )


def exited(processes: Processes) -> list[str]:
    """The processes that exited on their own, as "pid: code"."""
    return [f"{p.pid}: {p.returncode}" for p in processes.started if p.poll() is not None]


async def measure(pg: PgServer, options: Options) -> dict[str, Any]:
    """One run on the server `pg` (module docstring); returns the report (`report`). Raises
    TimeoutError when the relay does not lead or a client does not connect in time, what
    asyncpg raises, RuntimeError when a process fails to start."""
    name = f"usdegraded_{nanoid.generate('abcdefghijklmnopqrstuvwxyz', 8)}"
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="userstream-degraded-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    redis = RedisProcess()
    dsn = await pg.create_database(name)
    processes = Processes(
        {
            "DATABASE_URL": dsn,
            "REDIS_URL": redis.url,
            "USERSTREAM_REDIS_PREFIX": f"{name}:",
            "USERSTREAM_JWT_SECRET": JWT_SECRET,
            "USERSTREAM_DEGRADED_POLL_S": str(options.poll_s),
            "USERSTREAM_LOG_LEVEL": "info",
            "USERSTREAM_LOG_FORMAT": "json",
        }
    )
    receivers: list[Receiver] = []
    try:
        await asyncio.to_thread(redis.start)
        await prepare(dsn, options.ingest, options.clients)
        gateways = await start_services(processes, dsn, options, log_dir)
        for i in range(options.clients):
            url = gateways[i % len(gateways)].url
            receivers.append(await Receiver(f"u{i}", url).connect())
        views = [GatewayView(g.url) for g in gateways]
        run = Run(options, PacedPublisher(dsn, options.rate), receivers, views)
        await drive(run, redis)
        run.exited = exited(processes)
    finally:
        for receiver in receivers:
            await receiver.close()
        await asyncio.to_thread(processes.stop_all)
        await asyncio.to_thread(redis.stop)
        await pg.drop_database(name)
    return report(run, await describe(pg), log_dir)


def phase_row(samples_s: Sequence[float], events: int) -> dict[str, Any]:
    """One phase: its events, deliveries and latency percentiles (ms; None without 2 samples)."""
    row: dict[str, Any] = {"events": events, "deliveries": len(samples_s)}
    figures = percentiles(samples_s) if len(samples_s) >= 2 else {}
    for key in ("p50", "p99", "max"):
        value = figures.get(key)
        row[f"{key}_ms"] = None if value is None else round(value, 2)
    return row


def first_latencies(run: Run) -> list[list[float]]:
    """For each published event (by number), the latency (s) of its first arrival at each
    client that received it."""
    commits = run.publisher.commits
    samples: list[list[float]] = [[] for _ in commits]
    for receiver in run.receivers:
        seen: set[int] = set()
        for number, arrived in receiver.arrivals:
            if number < len(commits) and number not in seen:
                seen.add(number)
                samples[number].append(arrived - commits[number])
    return samples


def latency_rows(run: Run, samples: Sequence[Sequence[float]]) -> dict[str, dict[str, Any]]:
    """Per phase (`PHASES`): `phase_row` of the events committed in it (`samples` as
    `first_latencies`)."""
    phases = [run.marks.phase(c) for c in run.publisher.commits]
    by_phase: dict[str, list[float]] = {p: [] for p in PHASES}
    for phase, latencies in zip(phases, samples, strict=True):
        by_phase[phase].extend(latencies)
    counts = Counter(phases)
    return {p: phase_row(by_phase[p], counts[p]) for p in PHASES}


def timeline(run: Run, samples: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """Per phase and whole second into it (by commit time): `phase_row` of the events
    committed then (`samples` as `first_latencies`), in the order of the run."""
    seconds: dict[tuple[str, int], list[int]] = {}
    for number, committed in enumerate(run.publisher.commits):
        phase, into = run.marks.into_phase(committed)
        seconds.setdefault((phase, int(into)), []).append(number)
    return [
        {
            "phase": phase,
            "second": second,
            **phase_row([s for n in numbers for s in samples[n]], len(numbers)),
        }
        for (phase, second), numbers in seconds.items()
    ]


def tally(receiver: Receiver, published: int) -> dict[str, Any]:
    """One client's count: events missing, duplicated, out of order (a number below the one
    before it), unknown (never published); its streams, `must-refetch` events, last endings."""
    numbers = [n for n, _ in receiver.arrivals]
    counts = Counter(numbers)
    return {
        "user": receiver.user_id,
        "gateway": receiver.url,
        "received": len(numbers),
        "missing": sum(1 for n in range(published) if n not in counts),
        "duplicated": sum(c - 1 for c in counts.values()),
        "out_of_order": sum(1 for a, b in itertools.pairwise(numbers) if b < a),
        "unknown": sum(1 for n in counts if n >= published),
        "streams": receiver.streams,
        "must_refetch": receiver.refetches,
        "endings": receiver.endings[-3:],
    }


def goals(phases: dict[str, dict[str, Any]], poll_s: float) -> dict[str, Any]:
    """The outage p99 against GOAL_P99_POLLS poll intervals, the outage p50 against the
    before-phase p50 (ratios, None when a figure is missing)."""
    p99, p50 = phases["outage"]["p99_ms"], phases["outage"]["p50_ms"]
    base = phases["before"]["p50_ms"]
    return {
        "poll_ms": poll_s * 1e3,
        "outage_p99_per_poll": None if p99 is None else round(p99 / (poll_s * 1e3), 3),
        "outage_p99_within_goal": p99 is not None and p99 <= GOAL_P99_POLLS * poll_s * 1e3,
        "outage_p50_per_before_p50": None if p50 is None or not base else round(p50 / base, 1),
    }


def report(run: Run, server: str, log_dir: Path) -> dict[str, Any]:
    """The run's JSON report: setup, per-phase latency, goals, latency per second of the run,
    gateways, clients, totals."""
    published = len(run.publisher.commits)
    clients = [tally(r, published) for r in run.receivers]
    totals = {
        key: sum(c[key] for c in clients)
        for key in ("missing", "duplicated", "out_of_order", "unknown", "must_refetch")
    }
    samples = first_latencies(run)
    phases = latency_rows(run, samples)
    options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run.options).items()}
    return {
        "options": options,
        "cpus": os.cpu_count(),
        "server": server,
        "definition": "latency = arrival at the client - return of the publisher's COMMIT",
        "published": published,
        "phases": phases,
        "goals": goals(phases, run.options.poll_s),
        "timeline": timeline(run, samples),
        "gateways": [asdict(v) for v in run.gateways],
        "exited": run.exited,
        "totals": totals,
        "clients": clients,
        "ok": not any(totals.values()) and not run.exited,
        "logs": str(log_dir),
    }


def seconds(values: Sequence[float | None]) -> str:
    """Seconds as "0.31 / 0.45" ("never" for None)."""
    return " / ".join("never" if v is None else f"{v:.2f}" for v in values)


def print_report(result: dict[str, Any]) -> None:
    """The report as a readable table."""
    options, phases, goal = result["options"], result["phases"], result["goals"]
    lengths = {"before": "before_s", "outage": "outage_s", "after": "after_s"}
    print(
        f"Redis down {options['outage_s']:g} s under {options['rate']:g} events/s:"
        f" {options['clients']} clients on {options['gateways']} gateways, ingest"
        f" {options['ingest']}, degraded poll {options['poll_s']:g} s, cpus {result['cpus']}"
    )
    print(result["server"])
    print(result["definition"])
    print(f"{'phase (by commit)':<22}{'events':>8}{'deliveries':>12}"
          f"{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")  # fmt: skip
    for phase in PHASES:
        row = phases[phase]
        label = f"{phase} ({options[lengths[phase]]:g} s)"
        cells = "".join(
            f"{'-' if row[k] is None else format(row[k], '.1f'):>10}"
            for k in ("p50_ms", "p99_ms", "max_ms")
        )
        print(f"{label:<22}{row['events']:>8}{row['deliveries']:>12}{cells}")
    print(
        f"outage p99 / poll interval: {goal['outage_p99_per_poll']} (goal <= {GOAL_P99_POLLS:g}:"
        f" {'met' if goal['outage_p99_within_goal'] else 'MISSED'}); outage p50 / before p50:"
        f" {goal['outage_p50_per_before_p50']}"
    )
    print_gateways(result["gateways"])
    totals = result["totals"]
    streams = sum(c["streams"] for c in result["clients"])
    print(
        f"clients: {len(result['clients'])}, {result['published']} events published; missing"
        f" {totals['missing']}, duplicated {totals['duplicated']}, out of order"
        f" {totals['out_of_order']}, unknown {totals['unknown']}, must-refetch"
        f" {totals['must_refetch']}, streams opened {streams}"
    )
    if result["exited"]:
        print(f"processes that exited: {result['exited']}")
    print(f"logs in {result['logs']}")
    print("RESULT: OK" if result["ok"] else "RESULT: LOST, DOUBLED OR REORDERED EVENTS")


def print_gateways(views: Sequence[dict[str, Any]]) -> None:
    """The gateways' lines of the table."""
    print(
        f"gateways: degraded {seconds([v['entered_s'] for v in views])} s after the kill,"
        f" back on the bus {seconds([v['left_s'] for v in views])} s after the restart"
    )
    print(
        f"  halfway through the outage: /readyz {[v['outage_readyz'] for v in views]}, bus"
        f" {[v['outage_bus'] for v in views]}, degraded {[v['outage_degraded'] for v in views]},"
        f" userstream_bus_degraded {[v['outage_gauge'] for v in views]}, events read from the"
        f" outbox so far {[v['outage_degraded_events'] for v in views]}"
    )
    print(f"  after the after phase: userstream_bus_degraded {[v['after_gauge'] for v in views]}")


def parse(argv: Sequence[str] | None = None) -> tuple[Options, Path]:
    """The options and the JSON output path from the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument("--before", type=float, default=10.0, help="seconds on the bus first")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds with Redis down")
    parser.add_argument("--after", type=float, default=10.0, help="seconds after Redis returns")
    parser.add_argument("--ingest", choices=MODES, default="wal")
    parser.add_argument(
        "--poll", type=float, default=DEGRADED_POLL_S, help="USERSTREAM_DEGRADED_POLL_S, s"
    )
    parser.add_argument("--logs", type=Path, default=None, help="folder of the process logs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    options = Options(
        clients=args.clients,
        gateways=args.gateways,
        rate=args.rate,
        before_s=args.before,
        outage_s=args.outage,
        after_s=args.after,
        ingest=args.ingest,
        poll_s=args.poll,
        log_dir=args.logs,
    )
    return options, args.out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print and write its report; 0 when nothing was lost, doubled or
    reordered and no process exited, else 1."""
    options, out = parse(argv)
    with server_for((options.ingest,)) as pg:
        result = asyncio.run(measure(pg, options))
    print_report(result)
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
