"""A long chaos run for the gapless guarantee (PROTOCOL.md §4): random faults, one final check.

Setup, all of the run's own: a fresh database (created, migrated, put in ingest mode `--ingest`
(core/schema/ingest.py, default wal), seeded with the world of `tests.e2e.sequence.seed`;
dropped at the end), a Redis server (`tests.services.RedisProcess`) carrying the bus `--bus`
(`USERSTREAM_BUS`: the stream bus by default, or the channel bus),
two `userstream relay` processes (one active, one standby) and `--gateways` `userstream serve`
processes with a short drain (`USERSTREAM_DRAIN_S=1`) and a small window of recent events
(`USERSTREAM_WINDOW_EVENTS=200`), so that catch-ups after an outage page Postgres.
`--clients` `ResumingClient`s resume by `Last-Event-ID` across the gateways' URLs: alice and
bob in turn, each pair starting on the next gateway, every other group of four churning (it
ends its own stream after 0.2 to 0.6 s, again and again), so each user has steady and
churning clients on each gateway. Meanwhile a `Publisher` commits the numbered sequence on a
schedule of `--rate` events per second (`PacedPublisher`).

Until `--minutes` are over, every 2 to 6 s (seeded) one fault, chosen at random (seeded):
- `redis-restart`: Redis killed (SIGKILL), down 0.5 to 3 s, restarted empty on its port;
- `redis-flushall`: FLUSHALL;
- `redis-outage`: Redis killed and kept down 5 to 10 s while events flow: the gateways read
  the outbox (degraded mode, `sync.dispatcher`); the time until every client holds the newest
  event it may see committed 1 s into the outage is measured while Redis is still down (a
  note if some client does not get it before Redis returns), then Redis starts again, empty;
- `relay-kill`: the active relay killed with SIGKILL; the time until the standby leads is
  the takeover time; then a new standby is started in its place;
- `gateway-kill`: a gateway killed with SIGKILL, down 0 to 2 s, restarted on a new port; each
  client's URL list has the old URL replaced (`ResumingClient` reads its list on every turn);
- `gateway-term`: a gateway sent SIGTERM (graceful drain; exit status 0 expected), restarted;
- `pg-terminate`: every other Postgres session of the database ended (`pg_terminate_backend`);
- `gateway-pause`: a gateway stopped (SIGSTOP) for 1 to 2 s, then continued (SIGCONT);
- `redis-loss-while-paused`: a gateway stopped for 0.5 to 1.5 s, then the bus loses what it
  has not read (FLUSHALL, or Redis killed and restarted, the gateway continued while Redis
  is down): it must fill the gap from Postgres (counted from its `filling` lines).
In wal mode, also (`WAL_FAULT_KINDS`):
- `pg-restart`: the run's own Postgres restarted (`PgServer.restart`, `pg_ctl restart -m
  fast`: every session ends, the slot stays); the time until a relay leads and streams the
  slot again is reported;
- `relay-kill-unacked`: the active relay stopped (SIGSTOP) at a moment when its slot's
  acknowledged LSN is behind the LSN it recorded with its positions
  (`tests.e2e.test_faults.slot_behind_recorded`: it positioned and published transactions
  the server will send again), then killed (SIGKILL); the standby must skip what is positioned
  and double nothing; a new standby is started;
- `slot-takeover`: the active relay killed (SIGKILL) while the standby runs; the standby must
  take the slot: the time until the slot streams to another walsender and positions advance
  is the slot takeover time; a new standby is started.
Wal mode runs on a Postgres 16 with logical decoding and durable commits started here
(`bench.database.durable_logical_server`); trigger mode runs on the tests' server
(`tests.services.postgres_server`) with the nine faults listed first, as it always did.
One progress line per fault. After each fault a probe measures the recovery: the time until
every client holds the newest event, committed when the fault ended, that it may see.

At the end the publisher stops (its last event goes to `general`, which everyone may see),
every client must receive that last event (120 s at most), and each must have received its
whole part of the sequence exactly once, in cursor order, without `must-refetch`
(`assert_exactly_once_in_order`); once every published row has a position (in wal mode the
relay gives them after commit; 120 s at most), the outbox must hold the sequence once each,
in position order (`assert_outbox_holds`). A violation prints the client and the numbers
missing or doubled, and writes evidence (the client's connections around each anomaly, the
events' outbox positions) to `violations.txt` in the run's folder, which also keeps every
process log (JSON lines). Exit status 0 on success, 1 on
any violation (also: a gateway not exiting 0 after SIGTERM, a process dying by itself, a
client or the publisher failing). Every process and the database are cleaned up whatever
happens.

    .venv/bin/python -m bench.chaos [--minutes 10] [--seed N] [--gateways 2] [--clients 8]
                                    [--rate 50] [--ingest wal|trigger] [--bus stream|channels]
"""

import argparse
import asyncio
import contextlib
import itertools
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import nanoid
import orjson
import redis.asyncio as aioredis
from httpx_sse import ServerSentEvent

from bench.database import durable_logical_server
from core.schema.ingest import MODES, Mode, set_ingest_mode, slot_name
from core.schema.migrations import migrate
from tests.e2e.harness import JWT_SECRET, Gateway, Processes
from tests.e2e.sequence import (
    Published,
    Publisher,
    ResumingClient,
    assert_exactly_once_in_order,
    assert_outbox_holds,
    entity_of,
    expected_for,
    seed,
    stream_of,
)
from tests.e2e.test_faults import TERMINATE_ALL, active_relay_pid, slot_behind_recorded
from tests.factories import PUBLISHED
from tests.services import PgServer, RedisProcess, postgres_server

FAULT_KINDS = (
    "redis-restart",
    "redis-flushall",
    "redis-outage",
    "relay-kill",
    "gateway-kill",
    "gateway-term",
    "pg-terminate",
    "gateway-pause",
    "redis-loss-while-paused",
)
"""Every kind of fault a trigger-mode run injects, each equally likely."""

WAL_FAULT_KINDS = (*FAULT_KINDS, "pg-restart", "relay-kill-unacked", "slot-takeover")
"""Every kind of fault a wal-mode run injects, each equally likely (`pg-restart` only on a
Postgres this run started)."""

UNACKED_ATTEMPTS = 200
"""Stops of the active relay (SIGSTOP, then SIGCONT if the slot is not behind) before a
`relay-kill-unacked` gives up waiting for the slot to lag and kills it anyway."""

UNACKED_RETRY_S = 0.013
"""Pause between two such stops, seconds (not a divisor of the relay's 1 s acknowledgement
interval, so the attempts fall at different points of it)."""

FAULT_GAP_S = (2.0, 6.0)
"""Bounds of the random pause between two faults, seconds."""

FINAL_WAIT_S = 120.0
"""How long every client may take to receive the last event once the publisher stopped, s."""

SLOW_RECOVERY_S = 15.0
"""A recovery longer than this is logged as slow when it passes this mark, seconds."""

TAKEOVER_WAIT_S = 60.0
"""How long a relay takeover may take before it is reported as missing, seconds."""

EXIT_WAIT_S = 30.0
"""How long a gateway may take to exit after SIGTERM (drain 1 s, send timeout 10 s), s."""

WINDOW_EVENTS = 200
"""Recent events each gateway keeps: small, so that catch-ups also page Postgres."""

GATEWAY_ATTEMPTS = 5
"""Starts of a gateway on a fresh free port before its restart is given up."""

EVIDENCE_ANOMALIES = 10
"""Anomalies per client written with their context to `violations.txt`."""

MAX_LAG_S = 1.0
"""How far behind its schedule the publisher may fall and still make up for it, seconds."""


def elapsed_since(start: float) -> float:
    """Seconds since the monotonic instant `start`."""
    return time.monotonic() - start


def latest(client: ResumingClient) -> int:
    """Sequence number of the newest change `client` received (-1 before any). Changes come
    in commit order, and the publisher commits its numbers in order, so this is also the
    highest number received unless the order is violated (which the final check reports)."""
    return client.changes[-1].number if client.changes else -1


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of a client's journal: wall-clock time (s), gateway URL, what happened
    (`connect`, `end` or an SSE event name), its detail (Last-Event-ID sent, why the stream
    ended, or the event's id) and, for a change, its sequence number."""

    at: float
    url: str
    what: str
    detail: str
    number: int | None = None

    def show(self) -> str:
        """The entry as one line of evidence."""
        clock = (
            time.strftime("%H:%M:%S", time.localtime(self.at)) + f".{int(self.at % 1 * 1e3):03d}"
        )
        number = "" if self.number is None else f" n={self.number}"
        return f"{clock} {self.url} {self.what} {self.detail}{number}"


class JournalingClient(ResumingClient):
    """A `ResumingClient` that also keeps a journal (`Entry`s) of its connections and of every
    event it received, for the evidence of a violation."""

    def __init__(self, user_id: str, urls: Sequence[str], **options: object) -> None:
        super().__init__(user_id, urls, **options)  # type: ignore[arg-type]
        self.journal: list[Entry] = []

    async def _stream(self, url: str) -> str:
        self.journal.append(
            Entry(time.time(), url, "connect", f"Last-Event-ID={self.last_event_id}")
        )
        reason = "dropped by the client"
        try:
            reason = await super()._stream(url)
            return reason
        finally:
            self.journal.append(Entry(time.time(), url, "end", reason))

    def _take(self, event: ServerSentEvent, url: str) -> None:
        super()._take(event, url)
        if event.event == "message" and not event.data:
            return
        number = None
        if event.event == "change":
            number = self.changes[-1].number
        self.journal.append(Entry(time.time(), url, event.event, event.id, number))


class PacedPublisher(Publisher):
    """A `Publisher` that keeps to its rate (1 / `interval_s` events per second) by a
    schedule rather than by a pause after each commit, so slow commits do not lower the
    rate; after an outage it runs at most `MAX_LAG_S` of the schedule late, rather than
    bursting to make up the whole of it."""

    async def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            await self._commit(Published(self.count, stream_of(self.count)))
            next_at = max(next_at + self.interval_s, time.monotonic() - MAX_LAG_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - time.monotonic()))


@dataclass(frozen=True, slots=True)
class Options:
    """The command line: run length (minutes), seed, gateways, clients, events per second,
    ingest mode, bus (`USERSTREAM_BUS`: `stream` or `channels`, on the run's one Redis)."""

    minutes: float
    seed: int
    gateways: int
    clients: int
    rate: float
    ingest: Mode = "wal"
    bus: str = "stream"


@dataclass(frozen=True, slots=True)
class Recovery:
    """Seconds from the end of fault number `fault` (of kind `kind`) until every client held
    the newest event it may see that was committed when the fault ended."""

    fault: int
    kind: str
    seconds: float


class Chaos:
    """One chaos run against the database `dsn` on the server `pg` and the Redis `redis` (see
    module docstring).

    `setup()` starts processes and clients, `inject_until(deadline)` injects faults,
    `finish()` stops the publisher and checks every client (violations in `violations`),
    `summary()` prints the figures, `close()` stops what runs (idempotent)."""

    def __init__(
        self, options: Options, pg: PgServer, dsn: str, redis: RedisProcess, run_dir: Path
    ) -> None:
        self.options = options
        self.pg = pg
        self.dsn = dsn
        self.redis = redis
        self.run_dir = run_dir
        self.rng = random.Random(options.seed)
        self.processes = Processes(
            {
                "DATABASE_URL": dsn,
                "REDIS_URL": redis.url,
                "USERSTREAM_BUS": options.bus,
                "USERSTREAM_REDIS_PREFIX": f"chaos{options.seed}:",
                "USERSTREAM_JWT_SECRET": JWT_SECRET,
                "USERSTREAM_RELAY_POLL_INTERVAL_S": "0.5",
                "USERSTREAM_RELAY_STANDBY_RETRY_S": "0.5",
                "USERSTREAM_DRAIN_S": "1",
                "USERSTREAM_WINDOW_EVENTS": str(WINDOW_EVENTS),
                "USERSTREAM_LOG_LEVEL": "info",
                "USERSTREAM_LOG_FORMAT": "json",
            }
        )
        self.publisher = PacedPublisher(dsn, interval_s=1 / options.rate)
        self.gateways: list[Gateway] = []
        self.relays: list[subprocess.Popen[bytes]] = []
        self.clients: list[JournalingClient] = []
        self.faults: Counter[str] = Counter()
        self.takeovers: list[float] = []
        self.slot_takeovers: list[float] = []
        self.unacked: Counter[str] = Counter()
        self.pg_restarts: list[float] = []
        self.kinds = fault_kinds(options.ingest, pg)
        self.slot = ""
        self.recoveries: list[Recovery] = []
        self.catch_up_s: dict[str, float] = {}
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.log: list[Published] = []
        self.started = time.monotonic()
        self.ended = self.started
        self._db: asyncpg.Connection | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._logs = itertools.count()

    # -- setup ---------------------------------------------------------------------------

    async def setup(self) -> None:
        """Start relays, gateways, clients and the publisher."""
        db = await self.db()
        self.slot = slot_name(str(await db.fetchval("SELECT current_database()")))
        self.relays = [self._relay(), self._relay()]
        await self._until(
            lambda: self._relay_leads(db), "a relay to lead", TAKEOVER_WAIT_S, self._no_deaths
        )
        if self.options.ingest == "wal":
            await self._until(lambda: self._slot_streams(db), "the slot to stream", TAKEOVER_WAIT_S)
        for slot in range(self.options.gateways):
            self.gateways.append(await self._gateway(slot))
        urls = [g.url for g in self.gateways]
        for index in range(self.options.clients):
            user = ("alice", "bob")[index % 2]
            home = index // 2 % len(urls)
            churn_s = self.rng.uniform(0.2, 0.6) if index // 4 % 2 else None
            client = JournalingClient(
                user,
                urls[home:] + urls[:home],
                name=f"{user}-{index}@{home}" + ("-churning" if churn_s else ""),
                churn_s=churn_s,
            )
            self.clients.append(client)
            await client.connect()
        self.started = time.monotonic()
        self.publisher.start()

    async def db(self) -> asyncpg.Connection:
        """The run's own monitoring connection (reopened if it was lost)."""
        if self._db is None or self._db.is_closed():
            self._db = await asyncpg.connect(self.dsn)
        return self._db

    def _drop_db(self) -> None:
        """Close the monitoring connection at once (before Postgres restarts)."""
        db, self._db = self._db, None
        if db is not None:
            db.terminate()

    def _relay(self) -> subprocess.Popen[bytes]:
        return self.processes.start("relay", log_file=self._log_file("relay"))

    async def _gateway(self, slot: int) -> Gateway:
        """Start gateway `slot` on a free port. A port found free may be taken before the
        gateway binds it (by an outgoing connection of a client, which draws from the same
        ephemeral range): the gateway then exits, and is started again on another port."""
        for attempt in range(1, GATEWAY_ATTEMPTS + 1):
            log_file = self._log_file(f"gateway{slot}")
            try:
                return await asyncio.to_thread(self.processes.gateway, log_file=log_file)
            except RuntimeError as exc:
                stray = self.processes.started[-1]  # exited, or never became healthy
                if stray.poll() is None:
                    stray.kill()
                if attempt == GATEWAY_ATTEMPTS:
                    raise
                self.notes.append(f"gateway {slot} did not start ({exc}), started again")
        raise AssertionError("unreachable")

    def _log_file(self, name: str) -> Path:
        return self.run_dir / f"{next(self._logs):03d}-{name}.log"

    async def _relay_leads(self, db: asyncpg.Connection) -> bool:
        return await active_relay_pid(db) in {p.pid for p in self.relays}

    async def _walsender(self, db: asyncpg.Connection) -> int | None:
        """Backend pid of the walsender streaming the run's slot (None: the slot is idle)."""
        pid = await db.fetchval(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", self.slot
        )
        return None if pid is None else int(pid)

    async def _slot_streams(self, db: asyncpg.Connection) -> bool:
        """True when one of the run's relays leads and the slot streams to a walsender."""
        return await self._relay_leads(db) and await self._walsender(db) is not None

    async def _assigned(self, db: asyncpg.Connection) -> int:
        """The last position the relay gave (wal ingest), 0 before any."""
        value = await db.fetchval(
            "SELECT coalesce(assigned, 0) FROM outbox_relay WHERE name = 'default'"
        )
        return int(value or 0)

    # -- faults --------------------------------------------------------------------------

    async def inject_until(self, deadline: float) -> None:
        """Inject one random fault every 2 to 6 s until the monotonic `deadline`."""
        faults: dict[str, Callable[[], Awaitable[str]]] = {
            "redis-restart": self.redis_restart,
            "redis-flushall": self.redis_flushall,
            "redis-outage": self.redis_outage,
            "relay-kill": self.relay_kill,
            "gateway-kill": self.gateway_kill,
            "gateway-term": self.gateway_term,
            "pg-terminate": self.pg_terminate,
            "gateway-pause": self.gateway_pause,
            "redis-loss-while-paused": self.redis_loss_while_paused,
            "pg-restart": self.pg_restart,
            "relay-kill-unacked": self.relay_kill_unacked,
            "slot-takeover": self.slot_takeover,
        }
        for number in itertools.count(1):
            pause = self.rng.uniform(*FAULT_GAP_S)
            if time.monotonic() + pause >= deadline:
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                return
            await asyncio.sleep(pause)
            await self.check_health()
            kind = self.rng.choice(self.kinds)
            detail = await faults[kind]()
            self.faults[kind] += 1
            self._progress(number, kind, detail)
            probe = asyncio.create_task(self._probe(number, kind, time.monotonic()))
            self._probes.add(probe)
            probe.add_done_callback(self._probes.discard)

    def _progress(self, number: int, kind: str, detail: str) -> None:
        delivered = sum(len(c.changes) for c in self.clients)
        reconnects = sum(len(c.endings) for c in self.clients)
        last = self.recoveries[-1].seconds if self.recoveries else float("nan")
        print(
            f"[{elapsed_since(self.started):7.1f} s] fault {number:3d} {kind:<18} {detail}"
            f" | published {self.publisher.count}, delivered {delivered},"
            f" reconnects {reconnects}, last recovery {last:.2f} s,"
            f" recovering {len(self._probes)}",
            flush=True,
        )

    async def redis_restart(self) -> str:
        """Kill Redis (SIGKILL), keep it down 0.5 to 3 s, start it again, empty."""
        down_s = self.rng.uniform(0.5, 3.0)
        self.redis.stop()
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.redis.start)
        return f"down {down_s:.1f} s"

    async def redis_flushall(self) -> str:
        """FLUSHALL: the bus loses every batch it held."""
        client = aioredis.Redis.from_url(self.redis.url)
        try:
            await client.flushall()
        finally:
            await client.aclose()
        return "flushed"

    async def redis_outage(self) -> str:
        """Kill Redis, keep it down 5 to 10 s, start it again, empty; meanwhile time the
        delivery, through the outbox, of what was committed 1 s into the outage."""
        down_s = self.rng.uniform(5.0, 10.0)
        self.redis.stop()
        started = time.monotonic()
        await asyncio.sleep(1.0)
        log = list(self.publisher.log)
        visible = [(c, expected_for(c.user_id, log)) for c in self.clients]
        targets = [(c, numbers[-1]) for c, numbers in visible if numbers]
        while any(latest(c) < n for c, n in targets) and elapsed_since(started) < down_s:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        behind = [c.name for c, n in targets if latest(c) < n]
        delivered_s = elapsed_since(started) - 1.0
        await asyncio.sleep(max(0.0, down_s - elapsed_since(started)))
        await asyncio.to_thread(self.redis.start)
        if behind:
            self.notes.append(
                f"redis-outage of {down_s:.1f} s: {behind} lacked events committed 1 s into it"
                " when Redis returned"
            )
            return f"down {down_s:.1f} s; behind while down: {behind}"
        return f"down {down_s:.1f} s; delivered while down {delivered_s:.2f} s after commit"

    async def relay_kill(self) -> str:
        """SIGKILL the active relay, time the standby's takeover, start a new standby."""
        db = await self.db()
        victim = await self._active_relay(db)
        victim.kill()
        return await self._replace_killed(db, victim, time.monotonic())

    async def _active_relay(self, db: asyncpg.Connection) -> subprocess.Popen[bytes]:
        """The process of the relay that leads (waiting for one, `TAKEOVER_WAIT_S` at most)."""
        await self._until(lambda: self._relay_leads(db), "a relay to lead", TAKEOVER_WAIT_S)
        active = await active_relay_pid(db)
        [victim] = [p for p in self.relays if p.pid == active]
        return victim

    async def _replace_killed(
        self, db: asyncpg.Connection, victim: subprocess.Popen[bytes], killed_at: float
    ) -> str:
        """After `victim` (the active relay) was sent SIGKILL at the monotonic `killed_at`:
        reap it, time the standby's takeover of the leadership, start a new standby."""
        self.relays.remove(victim)
        status = await asyncio.to_thread(victim.wait)
        takeover_s = await self._timed(
            lambda: self._relay_leads(db), "the standby", killed_at, self.takeovers
        )
        if takeover_s is not None:
            taken = f"standby {await active_relay_pid(db)} led after {takeover_s:.2f} s"
        else:
            taken = f"NO takeover within {TAKEOVER_WAIT_S:.0f} s"
            self.notes.append(f"relay kill of {victim.pid}: {taken}")
        self.relays.append(self._relay())
        return f"relay {victim.pid} killed (status {status}), {taken}"

    async def relay_kill_unacked(self) -> str:
        """Stop the active relay (SIGSTOP) until its slot's acknowledged LSN is behind the
        LSN it recorded (`slot_behind_recorded`: positioned and published, not yet
        acknowledged), SIGCONT and try again 13 ms later if not, up to `UNACKED_ATTEMPTS`
        times; then SIGKILL it, time the takeover and start a new standby."""
        db = await self.db()
        victim = await self._active_relay(db)
        caught = 0
        try:
            for attempt in range(1, UNACKED_ATTEMPTS + 1):
                victim.send_signal(signal.SIGSTOP)
                if await slot_behind_recorded(db):
                    caught = attempt
                    break
                victim.send_signal(signal.SIGCONT)
                await asyncio.sleep(UNACKED_RETRY_S)
        finally:
            victim.kill()  # SIGKILL ends a stopped process too
        killed_at = time.monotonic()
        self.unacked["caught" if caught else "missed"] += 1
        where = (
            f"stopped behind the slot at attempt {caught}"
            if caught
            else f"NOT caught behind the slot in {UNACKED_ATTEMPTS} attempts"
        )
        return f"{where}; " + await self._replace_killed(db, victim, killed_at)

    async def slot_takeover(self) -> str:
        """SIGKILL the active relay while the standby runs; time until the standby leads and
        then until the slot streams to another walsender and the positions given advance
        (the standby took the slot); start a new standby."""
        db = await self.db()
        await self._until(lambda: self._slot_streams(db), "the slot to stream", TAKEOVER_WAIT_S)
        victim = await self._active_relay(db)
        walsender = await self._walsender(db)
        assigned = await self._assigned(db)
        victim.kill()
        killed_at = time.monotonic()
        detail = await self._replace_killed(db, victim, killed_at)

        async def taken() -> bool:
            now = await self._walsender(db)
            return now is not None and now != walsender and await self._assigned(db) > assigned

        slot_s = await self._timed(
            taken, "the standby to stream the slot", killed_at, self.slot_takeovers
        )
        if slot_s is not None:
            slot = f"slot streamed by walsender {await self._walsender(db)} after {slot_s:.2f} s"
        else:
            slot = f"slot NOT taken over within {TAKEOVER_WAIT_S:.0f} s"
            self.notes.append(f"slot takeover after killing {victim.pid}: {slot}")
        return f"{detail}, {slot} (walsender {walsender} before)"

    async def pg_restart(self) -> str:
        """Restart the run's Postgres (`PgServer.restart` in a thread: fast shutdown, every
        session ends, the slot stays), then time until a relay leads and streams the slot."""
        self._drop_db()
        began = time.monotonic()
        await asyncio.to_thread(self.pg.restart)
        restart_s = elapsed_since(began)
        db = await self.db()
        back_s = await self._timed(
            lambda: self._slot_streams(db), "the slot again", began, self.pg_restarts
        )
        if back_s is not None:
            back = f"a relay streamed the slot again {back_s:.2f} s after the restart began"
        else:
            back = f"the slot did NOT stream again within {TAKEOVER_WAIT_S:.0f} s"
            self.notes.append(f"pg-restart: {back}")
        return f"Postgres restarted in {restart_s:.2f} s, {back}"

    async def gateway_kill(self) -> str:
        """SIGKILL a gateway, keep it down 0 to 2 s, restart it on a new port."""
        slot = self.rng.randrange(len(self.gateways))
        down_s = self.rng.uniform(0.0, 2.0)
        old = self.gateways[slot]
        old.process.kill()
        status = await asyncio.to_thread(old.process.wait)
        await asyncio.sleep(down_s)
        new = await self._replace(slot)
        return f"gateway {slot} {old.url} killed (status {status}), down {down_s:.1f} s, on {new}"

    async def gateway_term(self) -> str:
        """SIGTERM a gateway (graceful drain, exit 0 expected), then restart it."""
        slot = self.rng.randrange(len(self.gateways))
        old = self.gateways[slot]
        old.process.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        try:
            status: int | None = await asyncio.to_thread(old.process.wait, EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            status = None
            old.process.kill()
            await asyncio.to_thread(old.process.wait)
        exit_s = elapsed_since(sent_at)
        if status != 0:
            self.violations.append(
                f"gateway {slot} {old.url}: exit status {status} after SIGTERM (0 expected)"
                f" after {exit_s:.1f} s"
            )
        new = await self._replace(slot)
        return f"gateway {slot} {old.url} exited {status} after {exit_s:.1f} s, on {new}"

    async def _replace(self, slot: int) -> str:
        """Start gateway `slot` again (new port) and swap its URL in every client's list."""
        old = self.gateways[slot].url
        self.gateways[slot] = await self._gateway(slot)
        new = self.gateways[slot].url
        for client in self.clients:
            client.urls = [new if url == old else url for url in client.urls]
        return new

    async def pg_terminate(self) -> str:
        """End every other Postgres session of the run's database."""
        db = await self.db()
        ended = sum(bool(row[0]) for row in await db.fetch(TERMINATE_ALL))
        return f"{ended} sessions terminated"

    async def gateway_pause(self) -> str:
        """SIGSTOP a gateway for 1 to 2 s, then SIGCONT."""
        slot = self.rng.randrange(len(self.gateways))
        pause_s = self.rng.uniform(1.0, 2.0)
        process = self.gateways[slot].process
        process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(pause_s)
        finally:
            process.send_signal(signal.SIGCONT)
        return f"gateway {slot} {self.gateways[slot].url} paused {pause_s:.1f} s"

    async def redis_loss_while_paused(self) -> str:
        """SIGSTOP a gateway, let 0.5 to 1.5 s of batches reach the bus unread by it, then lose
        them: FLUSHALL, then SIGCONT; or Redis killed, SIGCONT while it is down (the gateway
        is behind and cannot read; clients may move to it), then Redis restarted. Either way
        the gateway must fill the gap from Postgres (its `filling` log lines)."""
        slot = self.rng.randrange(len(self.gateways))
        lag_s = self.rng.uniform(0.5, 1.5)
        process = self.gateways[slot].process
        process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(lag_s)
            if self.rng.random() < 0.5:
                how = await self.redis_flushall()
            else:
                self.redis.stop()
                process.send_signal(signal.SIGCONT)
                down_s = self.rng.uniform(0.5, 3.0)
                await asyncio.sleep(down_s)
                await asyncio.to_thread(self.redis.start)
                how = f"Redis killed, down {down_s:.1f} s"
        finally:
            process.send_signal(signal.SIGCONT)
        return f"gateway {slot} paused {lag_s:.1f} s, then {how}"

    # -- watching ------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Raise if the publisher or a client failed; record a process that died by itself."""
        await self.publisher.wait_count(0)
        for client in self.clients:
            await client.wait_for(lambda: True, "its task to be running")
        self._no_deaths()

    def _no_deaths(self) -> None:
        running = [("relay", p) for p in self.relays]
        running += [(f"gateway {g.url}", g.process) for g in self.gateways]
        for name, process in running:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} (pid {process.pid}) exited by itself: {process.returncode}"
                )

    async def _probe(self, fault: int, kind: str, start: float) -> None:
        """Record how long until every client holds what it may see of the current log."""
        log = list(self.publisher.log)
        visible = [(c, expected_for(c.user_id, log)) for c in self.clients]
        targets = [(c, numbers[-1]) for c, numbers in visible if numbers]
        warned = False
        while any(latest(c) < n for c, n in targets):
            if not warned and elapsed_since(start) > SLOW_RECOVERY_S:
                warned = True
                behind = [c.name for c, n in targets if latest(c) < n]
                print(
                    f"    slow recovery after fault {fault} ({kind}): behind {behind}", flush=True
                )
            await asyncio.sleep(0.05)
        self.recoveries.append(Recovery(fault, kind, elapsed_since(start)))
        if warned:
            self.notes.append(
                f"fault {fault} ({kind}): recovery took {self.recoveries[-1].seconds:.1f} s"
            )

    async def _timed(
        self, check: Callable[[], Awaitable[bool]], what: str, since: float, samples: list[float]
    ) -> float | None:
        """Seconds from `since` until `check` holds (polled by `_until`), also appended to
        `samples`; None when it did not hold within TAKEOVER_WAIT_S."""
        try:
            await self._until(check, what, TAKEOVER_WAIT_S)
        except TimeoutError:
            return None
        seconds = elapsed_since(since)
        samples.append(seconds)
        return seconds

    async def _until(
        self,
        check: Callable[[], Awaitable[bool]],
        what: str,
        timeout_s: float,
        also: Callable[[], None] | None = None,
    ) -> None:
        """Poll the async `check` every 50 ms (calling `also` each time); TimeoutError naming
        `what` after `timeout_s` seconds."""
        deadline = time.monotonic() + timeout_s
        while not await check():
            if also is not None:
                also()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            await asyncio.sleep(0.05)

    # -- the end -------------------------------------------------------------------------

    async def finish(self) -> None:
        """Stop the publisher, wait for its last event everywhere, check every client."""
        await self.check_health()
        self.log = await self.publisher.stop()
        self.ended = time.monotonic()
        last = self.log[-1].number
        deadline = self.ended + FINAL_WAIT_S
        pending = list(self.clients)
        while pending and time.monotonic() < deadline:
            for client in [c for c in pending if latest(c) >= last]:
                self.catch_up_s[client.name] = elapsed_since(self.ended)
                pending.remove(client)
            await asyncio.sleep(0.01)
        for client in pending:
            self.violations.append(
                f"{client.name}: no event n{last} within {FINAL_WAIT_S:.0f} s (newest received"
                f" n{latest(client)}; last stream endings {client.endings[-3:]})"
            )
        for probe in list(self._probes):
            probe.cancel()
        db = await self.db()
        try:
            await self._until(lambda: self._all_positioned(db), "positions", FINAL_WAIT_S)
        except TimeoutError:
            left = await db.fetchval(
                f"SELECT count(*) FROM outbox WHERE {PUBLISHED} AND seq IS NULL"
            )
            self.violations.append(
                f"outbox: {left} published rows still without a position {FINAL_WAIT_S:.0f} s"
                " after the publisher stopped"
            )
        try:
            await assert_outbox_holds(db, self.log)
        except AssertionError as exc:
            self.violations.append(
                f"outbox: the sequence is not held once each in commit order ({exc})"
            )
        for client in self.clients:
            await self._check(client)

    async def _all_positioned(self, db: asyncpg.Connection) -> bool:
        """True when every row a publisher wrote has a position (`seq`)."""
        return not await db.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM outbox WHERE {PUBLISHED} AND seq IS NULL)"
        )

    async def _check(self, client: JournalingClient) -> None:
        expected = expected_for(client.user_id, self.log)
        try:
            assert_exactly_once_in_order(client, expected)
        except AssertionError as exc:
            numbers = client.numbers()
            counts = Counter(numbers)
            missing = sorted(set(expected) - set(numbers))
            doubled = sorted(n for n, k in counts.items() if k > 1)
            self.violations.append(
                f"{str(exc)[:300]}... -- {len(missing)} missing {missing[:50]},"
                f" {len(doubled)} doubled {doubled[:50]}"
            )
            await self._evidence(client, missing, doubled)

    async def _evidence(
        self, client: JournalingClient, missing: Sequence[int], doubled: Sequence[int]
    ) -> None:
        """Append to violations.txt, for the first anomalies of `client`, the journal lines
        around them and the outbox position of each event concerned."""
        db = await self.db()
        lines = [f"== {client.name} ({client.user_id}), urls {client.urls}"]
        for label, number in [("missing", n) for n in missing[:EVIDENCE_ANOMALIES]] + [
            ("doubled", n) for n in doubled[:EVIDENCE_ANOMALIES]
        ]:
            seq = await db.fetchval(
                "SELECT seq FROM outbox WHERE entity_id = $1", entity_of(number)
            )
            lines.append(f"-- {label} n{number}: outbox seq {seq}")
            lines += [f"   {e.show()}" for e in around(client.journal, number)]
        append_lines(self.run_dir / "violations.txt", lines)

    def summary(self) -> None:
        """Print the run's figures."""
        duration = self.ended - self.started
        published = len(self.log) or self.publisher.count
        print(
            f"\nduration {duration:.0f} s, seed {self.options.seed}, ingest {self.options.ingest},"
            f" logs in {self.run_dir}"
        )
        print(f"faults {sum(self.faults.values())}: {dict(sorted(self.faults.items()))}")
        print(
            f"events published {published} ({published / max(duration, 1e-9):.1f}/s),"
            f" publisher retries {self.publisher.faults}"
        )
        checked = sum(len(expected_for(c.user_id, self.log)) for c in self.clients)
        checked_text = f"{checked}" if self.log else "none (the run was aborted)"
        print(
            f"deliveries checked {checked_text} over {len(self.clients)} clients,"
            f" reconnects {sum(len(c.endings) for c in self.clients)}"
        )
        print(f"relay takeovers (s): {spread(self.takeovers)}")
        if self.options.ingest == "wal":
            print(f"slot takeovers (s): {spread(self.slot_takeovers)}")
            print(
                f"relay kills between publish and acknowledgement: {self.unacked['caught']}"
                f" caught behind the slot, {self.unacked['missed']} not caught"
            )
            print(f"slot streamed again after a Postgres restart (s): {spread(self.pg_restarts)}")
        print(f"recovery after a fault (s): {spread([r.seconds for r in self.recoveries])}")
        for kind in self.kinds:
            seconds = [r.seconds for r in self.recoveries if r.kind == kind]
            if seconds:
                print(f"  {kind:<18} {spread(seconds)}")
        if self.catch_up_s:
            slowest = max(self.catch_up_s, key=self.catch_up_s.__getitem__)
            print(
                f"catch-up after the final event: max {self.catch_up_s[slowest]:.2f} s ({slowest})"
            )
        fills = count_messages(self.run_dir, "filling ")  # events (dispatcher) or topics (bus)
        print(f"gaps in the bus filled from Postgres by gateways: {fills}")
        print("log lines at warning or above:")
        for line, count in log_warnings(self.run_dir).items():
            print(f"  {count:5d} {line}")
        for note in self.notes:
            print(f"note: {note}")
        for violation in self.violations:
            print(f"VIOLATION: {violation}")
        print("RESULT:", "FAIL" if self.violations else "OK")

    async def close(self) -> None:
        """Stop clients, publisher and processes. Idempotent."""
        for probe in list(self._probes):
            probe.cancel()
        for client in self.clients:
            await client.close()
        await self.publisher.close()
        for gateway in self.gateways:
            with contextlib.suppress(ProcessLookupError):
                gateway.process.send_signal(signal.SIGCONT)
        await asyncio.to_thread(self.processes.stop_all)
        if self._db is not None:
            self._db.terminate()


def around(journal: Sequence[Entry], number: int, context: int = 4) -> list[Entry]:
    """The journal entries an anomaly of event `number` lies in, with `context` entries either
    side: for an event received (once or more), from its first to its last receipt; for a
    missing one, from the last change received below it to the first above it. A span longer
    than 40 entries is shown as its two ends."""
    hits = [i for i, e in enumerate(journal) if e.number == number]
    if hits:
        start, end = hits[0], hits[-1]
    else:
        below = [i for i, e in enumerate(journal) if e.number is not None and e.number < number]
        above = [i for i, e in enumerate(journal) if e.number is not None and e.number > number]
        start = below[-1] if below else 0
        end = above[0] if above else len(journal) - 1
        start, end = min(start, end), max(start, end)
    lo, hi = max(0, start - context), end + context + 1
    if end - start <= 40:
        return list(journal[lo:hi])
    return [*journal[lo : start + context + 1], *journal[end - context : hi]]


def append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append `lines` to the text file `path`."""
    with open(path, "a") as out:
        out.write("\n".join(lines) + "\n")


def spread(samples: Sequence[float]) -> str:
    """`n, median, p95 and max` of `samples` (seconds), or `none`."""
    if not samples:
        return "none"
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (
        f"n={len(ordered)} median {statistics.median(ordered):.2f}, p95 {p95:.2f},"
        f" max {ordered[-1]:.2f}"
    )


def log_warnings(run_dir: Path) -> dict[str, int]:
    """Lines at level warning or above in the run's process logs (JSON lines), counted by
    level, logger and message with digits folded to `#`."""
    counts: Counter[str] = Counter()
    for path in sorted(run_dir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                if "Traceback" in line:
                    counts[f"{path.name}: traceback"] += 1
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if entry.get("level") in ("warning", "error", "critical"):
                    message = re.sub(r"\d+", "#", str(entry.get("msg", "")))[:120]
                    counts[f"{entry['level']} {entry.get('logger')}: {message}"] += 1
    return dict(counts.most_common())


def count_messages(run_dir: Path, prefix: str) -> int:
    """Log lines (JSON) of the run's processes whose message starts with `prefix`."""
    return sum(
        f'"msg":"{prefix}' in line
        for path in run_dir.glob("*.log")
        for line in path.read_text(errors="replace").splitlines()
    )


def fault_kinds(ingest: Mode, pg: PgServer) -> tuple[str, ...]:
    """The kinds of fault a run injects: `FAULT_KINDS` in trigger mode, `WAL_FAULT_KINDS` in
    wal mode, without `pg-restart` when `pg` is a server this run did not start."""
    if ingest == "trigger":
        return FAULT_KINDS
    return tuple(k for k in WAL_FAULT_KINDS if k != "pg-restart" or pg.data_dir is not None)


async def create_database(pg: PgServer, name: str, ingest: Mode) -> str:
    """Create and migrate the database `name`, set its ingest mode, seed it; return its DSN."""
    conn = await asyncpg.connect(await pg.create_database(name))
    try:
        await migrate(conn)
        await set_ingest_mode(conn, ingest)
        await seed(conn)
    finally:
        await conn.close()
    return pg.dsn(name)


async def run(options: Options, pg: PgServer) -> bool:
    """The whole run (module docstring); True when no violation was found."""
    name = f"uschaos_{nanoid.generate('abcdefghijklmnopqrstuvwxyz', 8)}"
    run_dir = Path(tempfile.mkdtemp(prefix=f"userstream-chaos-{options.seed}-"))
    print(f"chaos: {options}, database {name}, logs in {run_dir}", flush=True)
    print(f"faults drawn from: {', '.join(fault_kinds(options.ingest, pg))}", flush=True)
    chaos: Chaos | None = None
    try:
        dsn = await create_database(pg, name, options.ingest)
        with RedisProcess() as redis:
            chaos = Chaos(options, pg, dsn, redis, run_dir)
            try:
                await chaos.setup()
                await chaos.inject_until(chaos.started + options.minutes * 60)
                await chaos.finish()
            except Exception as exc:  # report it with the figures so far, then clean up
                traceback.print_exc()
                chaos.violations.append(f"run aborted: {type(exc).__name__}: {exc}")
                chaos.ended = time.monotonic()
            finally:
                await chaos.close()
    finally:
        await pg.drop_database(name)
    assert chaos is not None
    chaos.summary()
    return not chaos.violations


def main() -> None:
    """Parse options, run, exit 0 on success and 1 on any violation."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="time to inject faults")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", type=float, default=50.0, help="events per second")
    parser.add_argument("--ingest", choices=MODES, default="wal", help="ingest mode")
    parser.add_argument("--bus", choices=("stream", "channels"), default="stream")
    args = parser.parse_args()
    if args.gateways < 1 or args.clients < 1 or args.rate <= 0:
        parser.error("--gateways and --clients need at least 1, --rate more than 0")
    options = Options(
        minutes=args.minutes,
        seed=args.seed if args.seed is not None else int(time.time()),
        gateways=args.gateways,
        clients=args.clients,
        rate=args.rate,
        ingest=args.ingest,
        bus=args.bus,
    )
    with durable_logical_server() if args.ingest == "wal" else postgres_server() as pg:
        ok = asyncio.run(run(options, pg))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
