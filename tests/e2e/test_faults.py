"""Survive every restart, lose nothing: the gapless guarantee (PROTOCOL.md §4) under real faults.

Each test runs real `userstream` processes (relays and gateways), real SSE clients that resume
with `Last-Event-ID` (`tests.e2e.sequence.ResumingClient`) and a publisher committing a numbered
sequence throughout (`tests.e2e.sequence.Publisher`), injects one kind of fault while events
flow, and ends with the same check: every client received the whole part of the sequence its
user may see, in order, each event once.

Faults, and how each is made to hit the path it tests rather than left to timing:
- Redis killed and restarted on its port, then FLUSHALL. One gateway is paused (SIGSTOP)
  meanwhile, so batches only Redis held never reach it and it must read them from Postgres
  (its log shows it: degraded mode while Redis is down, a gap fill after the FLUSHALL). While
  it is behind and Redis is still down, a client moves to it with a cursor past its position.
- The active relay killed with SIGKILL while a standby waits. A row lock on `outbox_relay`
  holds the relay after it published a batch and before it recorded its position, so the
  standby publishes those events again and the gateways must skip them (the bus shows it).
- A gateway killed with SIGKILL: its clients resume on the other one, one of them only once
  its cursor has left the survivor's window of recent events, so its catch-up pages Postgres.
- Redis down for `OUTAGE_S` while events flow: the gateways read the outbox instead (degraded
  mode), and every client keeps receiving throughout, then switches back to the bus with nothing
  missed or doubled; both gateways stay ready and report the mode.
- Every Postgres connection of the test's database terminated (`pg_terminate_backend`; the
  shared server itself is never restarted), three times, while clients keep reconnecting.
A notification lost to the relay is covered by its poll (`tests/integration/test_relay.py`,
and here whenever the relay's connection is terminated, which drops its LISTEN).
"""

import asyncio
import contextlib
import itertools
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from sync.bus import Batch
from sync.bus_redis import EVENTS_KEY_SUFFIX, PAYLOAD_FIELD
from sync.leader import holder_pid
from sync.relay import APPLICATION_NAME_PREFIX
from tests.e2e.harness import Gateway, Processes, scrape
from tests.e2e.sequence import (
    WAIT_S,
    Connect,
    Publisher,
    ResumingClient,
    expected_for,
    finish,
    seed,
)
from tests.services import BUS, INGEST, PgServer, RedisProcess

WINDOW_EVENTS = 50
"""Recent events a gateway keeps in these tests: small, so that a client resuming from a cursor
older than that pages its catch-up from Postgres."""

TAKEOVER_BOUND_S = 15.0
"""How long the standby relay may take to lead after the active one is killed (generous: the
design aims at well under 5 s with a 0.5 s standby retry)."""

OUTAGE_S = 20.0
"""How long Redis stays down in the degraded-mode test, seconds."""

TERMINATE_ALL = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A Redis server of this test's own, which it may kill, restart and flush."""
    with RedisProcess() as server:
        yield server


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> None:
    """Poll the async `check` every 20 ms; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def paused(gateway: Gateway) -> Iterator[None]:
    """Stop the gateway's process (SIGSTOP) for the block, and continue it (SIGCONT) after,
    whatever happens: a process frozen by a pause of its host or VM."""
    gateway.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        gateway.process.send_signal(signal.SIGCONT)


async def caught_up(clients: Sequence[ResumingClient], publisher: Publisher) -> None:
    """Wait until each client has the newest event committed so far that it may see."""
    log = list(publisher.log)
    for client in clients:
        visible = expected_for(client.user_id, log)
        if visible:
            await client.wait_for_number(visible[-1])


async def active_relay_pid(db: asyncpg.Connection) -> int | None:
    """OS pid of the relay holding the leadership lock, from its `application_name`."""
    backend = await holder_pid(db)
    if backend is None:
        return None
    name = await db.fetchval(
        "SELECT application_name FROM pg_stat_activity WHERE pid = $1", backend
    )
    if name is None or not name.startswith(APPLICATION_NAME_PREFIX):
        return None
    return int(name.removeprefix(APPLICATION_NAME_PREFIX))


async def relay_sessions(db: asyncpg.Connection) -> int:
    """Relay connections open to this test's database."""
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE $1",
            f"{APPLICATION_NAME_PREFIX}%",
        )
    )


@contextlib.asynccontextmanager
async def pinned_relay_position(dsn: str) -> AsyncIterator[None]:
    """Hold a row lock on the relay's `outbox_relay` row for the block: the active relay
    publishes its next batch, then waits to record its position (a stalled write)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM outbox_relay WHERE name = 'default' FOR UPDATE")
            yield
    finally:
        await conn.close()


async def waits_on_a_lock(db: asyncpg.Connection, os_pid: int | None) -> bool:
    """True while the relay process `os_pid` waits for a lock in Postgres."""
    return bool(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = $1 AND wait_event_type = 'Lock'",
            f"{APPLICATION_NAME_PREFIX}{os_pid}",
        )
    )


async def terminate_relay_session(db: asyncpg.Connection, os_pid: int) -> None:
    """Terminate the Postgres session of the relay process `os_pid`."""
    await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        f"{APPLICATION_NAME_PREFIX}{os_pid}",
    )


async def republished(redis_url: str, redis_prefix: str) -> bool:
    """True when some batch on the bus starts before the end of the batch ahead of it: a
    relay published events again, which readers must skip."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries = await client.xrange(f"{redis_prefix}{EVENTS_KEY_SUFFIX}")
    finally:
        await client.aclose()
    batches = [Batch.decode((fields or {})[PAYLOAD_FIELD]) for _, fields in entries or []]
    return any(later.prev < earlier.last for earlier, later in itertools.pairwise(batches))


async def readiness(url: str) -> tuple[int, dict[str, Any]]:
    """Status and body of the gateway's `/readyz`."""
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"{url}/readyz")
    return response.status_code, response.json()


async def test_gateways_outlive_a_redis_restart_and_a_flushall_filling_gaps_from_postgres(
    redis_server: RedisProcess,
    processes: Processes,
    db: asyncpg.Connection,
    publisher: Publisher,
    clients: Connect,
    tmp_path: Path,
) -> None:
    await seed(db)
    env = {"REDIS_URL": redis_server.url}
    processes.start("relay", env=env)
    steady = processes.gateway(env=env)
    log_file = tmp_path / "frozen-gateway.log"
    frozen = processes.gateway(env={**env, "USERSTREAM_LOG_LEVEL": "info"}, log_file=log_file)
    watcher = await clients("alice", [steady.url], name="alice@steady")
    mover = await clients("alice", [steady.url, frozen.url], name="alice-moving")
    everyone = [
        watcher,
        mover,
        await clients("bob", [steady.url], name="bob@steady"),
        await clients("alice", [frozen.url], name="alice@frozen"),
        await clients("bob", [frozen.url], name="bob@frozen"),
        await clients("bob", [steady.url, frozen.url], name="bob-churning", churn_s=0.4),
    ]
    publisher.start()
    await publisher.wait_count(40)

    # Redis dies holding batches that `frozen` never read; it comes back empty.
    with paused(frozen):
        target = publisher.count + 30
        await watcher.wait_for_number(target)
        await mover.wait_for_number(target)
        redis_server.stop()
    # `frozen` runs again, behind `steady` and stuck while Redis is down. A client moves to it
    # with a cursor past its position: it must get nothing twice when `frozen` catches up.
    mover.drop()
    await mover.wait_for(lambda: mover.opened_on[-1] == frozen.url, "its stream on `frozen`")
    await publisher.wait_count(publisher.count + 30)  # committed while Redis is down
    redis_server.start()
    await caught_up(everyone, publisher)

    # FLUSHALL drops batches that `frozen` never read, while the relay goes on publishing.
    with paused(frozen):
        await watcher.wait_for_number(publisher.count + 30)
        flusher = aioredis.Redis.from_url(redis_server.url)
        try:
            await flusher.flushall()
        finally:
            await flusher.aclose()
        await watcher.wait_for_number(publisher.count + 30)
    await caught_up(everyone, publisher)

    async def frozen_on_the_bus() -> bool:
        return (await readiness(frozen.url))[1]["degraded"] is False

    await eventually(frozen_on_the_bus, "the frozen gateway reading the bus again")
    await finish(db, publisher, everyone)
    # What Redis lost, the frozen gateway read from Postgres: in degraded mode while Redis was
    # down (and, if it was still degraded, after the FLUSHALL too), or as a gap fill. (The
    # channel bus keeps nothing for a FLUSHALL to take: its gaps are in test_channel_bus.)
    log = log_file.read_text()
    fills, degraded = log.count("filling events"), log.count("bus unreadable")
    assert BUS != "stream" or fills + degraded >= 1, "the frozen gateway never read Postgres"


@pytest.mark.wal_only  # trigger ingest: `bench/degraded.py --ingest trigger`, 30 s of outage
async def test_while_redis_is_down_the_outbox_serves_every_client_and_nothing_is_lost_or_doubled(
    redis_server: RedisProcess,
    processes: Processes,
    db: asyncpg.Connection,
    publisher: Publisher,
    clients: Connect,
) -> None:
    await seed(db)
    env = {"REDIS_URL": redis_server.url}
    processes.start("relay", env=env)
    first, second = processes.gateway(env=env), processes.gateway(env=env)
    everyone = [
        await clients("alice", [first.url], name="alice@first"),
        await clients("bob", [second.url], name="bob@second"),
        await clients("alice", [second.url, first.url], name="alice-churning", churn_s=0.5),
        await clients("bob", [first.url, second.url], name="bob-churning", churn_s=0.7),
    ]
    publisher.start()
    await publisher.wait_count(30)
    await caught_up(everyone, publisher)

    redis_server.stop()
    down_at = time.monotonic()
    rounds = 0
    while time.monotonic() - down_at < OUTAGE_S:
        await publisher.wait_count(publisher.count + 20)
        await caught_up(everyone, publisher)  # delivered while Redis is down
        rounds += 1
    for gateway in (first, second):
        status, body = await readiness(gateway.url)
        assert (status, body["bus"], body["degraded"]) == (200, "unavailable", True), body
        samples = await scrape(f"{gateway.url}/metrics")
        assert samples[("userstream_bus_degraded", ())] == 1.0
        assert samples[("userstream_degraded_events_total", ())] > 0
    redis_server.start()

    async def back_on_the_bus() -> bool:
        bodies = [(await readiness(g.url))[1] for g in (first, second)]
        return not any(body["degraded"] for body in bodies)

    await eventually(back_on_the_bus, "both gateways reading the bus again")
    await publisher.wait_count(publisher.count + 30)
    await caught_up(everyone, publisher)
    await finish(db, publisher, everyone)
    assert rounds >= 5, f"only {rounds} rounds of delivery while Redis was down"


async def test_the_standby_relay_takes_over_from_a_killed_one_and_nothing_arrives_twice(
    processes: Processes,
    db: asyncpg.Connection,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    publisher: Publisher,
    clients: Connect,
) -> None:
    await seed(db)
    relays = {p.pid: p for p in (processes.start("relay"), processes.start("relay"))}

    async def two_relays_one_active() -> bool:
        assert all(p.poll() is None for p in relays.values()), "a relay exited"
        return await relay_sessions(db) == 2 and await active_relay_pid(db) in relays

    await eventually(two_relays_one_active, "two relays, one of them active")
    first = processes.gateway()
    second = processes.gateway()
    everyone = [
        await clients("alice", [first.url], name="alice@first"),
        await clients("bob", [second.url], name="bob@second"),
        await clients("bob", [first.url], name="bob@first"),
        await clients("alice", [second.url, first.url], name="alice-churning", churn_s=0.3),
    ]
    publisher.start()
    await publisher.wait_count(60)

    active = await active_relay_pid(db)
    assert active is not None
    victim = relays.pop(active)
    [standby] = relays.values()
    # Kill the active relay where it hurts most. Trigger ingest: after it published a batch,
    # before it recorded its position; the standby then publishes those events again. Wal
    # ingest: while it gives positions, before it records them; the standby gives the same.
    async with pinned_relay_position(database_url):
        await eventually(lambda: waits_on_a_lock(db, victim.pid), "the relay to block")
        victim.kill()
        killed_at = time.monotonic()
        assert victim.wait() == -signal.SIGKILL
        # Its session, waiting for the row lock, does not notice the dead client and would
        # record the position once the lock is free: end it, as the server does once it sees
        # the connection gone (TCP keepalive, client_connection_check_interval).
        await terminate_relay_session(db, victim.pid)

    async def standby_leads() -> bool:
        return await active_relay_pid(db) == standby.pid

    await eventually(standby_leads, "the standby relay to take over", TAKEOVER_BOUND_S)
    print(f"standby relay took over {time.monotonic() - killed_at:.2f} s after the kill -9")
    await publisher.wait_count(publisher.count + 60)

    await finish(db, publisher, everyone)
    assert standby.poll() is None
    if INGEST == "trigger":
        assert await republished(redis_url, redis_prefix), "no batch overlapped an earlier one"


async def test_clients_of_a_killed_gateway_resume_elsewhere_with_exactly_what_they_missed(
    processes: Processes, db: asyncpg.Connection, publisher: Publisher, clients: Connect
) -> None:
    await seed(db)
    processes.start("relay")
    env = {"USERSTREAM_WINDOW_EVENTS": str(WINDOW_EVENTS)}
    doomed = processes.gateway(env=env)
    survivor = processes.gateway(env=env)
    both = [doomed.url, survivor.url]
    on_doomed = [
        await clients("alice", both, name="alice@doomed"),
        await clients("bob", both, name="bob@doomed"),
        await clients("alice", both, name="alice-late@doomed"),
    ]
    late = on_doomed[-1]
    late.may_resume.clear()
    watcher = await clients("alice", [survivor.url], name="alice@survivor")
    everyone = [*on_doomed, watcher, await clients("bob", [survivor.url], name="bob@survivor")]
    publisher.start()
    await publisher.wait_count(60)

    doomed.process.kill()
    assert doomed.process.wait() == -signal.SIGKILL
    # The late client's cursor falls behind the survivor's window: it catches up from Postgres.
    await watcher.wait_for_number(publisher.count + 2 * WINDOW_EVENTS)
    late.may_resume.set()
    await publisher.wait_count(publisher.count + 40)

    await finish(db, publisher, everyone)
    for client in on_doomed:
        assert client.opened_on[0] == doomed.url, client.name
        assert client.opened_on[-1] == survivor.url, client.name


async def test_relay_and_gateways_outlive_terminated_postgres_connections(
    processes: Processes, db: asyncpg.Connection, publisher: Publisher, clients: Connect
) -> None:
    await seed(db)
    relay = processes.start("relay")
    env = {"USERSTREAM_WINDOW_EVENTS": str(WINDOW_EVENTS)}
    first = processes.gateway(env=env)
    second = processes.gateway(env=env)
    everyone = [
        await clients("alice", [first.url], name="alice@first"),
        await clients("bob", [second.url], name="bob@second"),
        await clients("alice", [second.url, first.url], name="alice-churning", churn_s=0.3),
        await clients("bob", [first.url, second.url], name="bob-churning", churn_s=0.5),
    ]
    publisher.start()
    await publisher.wait_count(40)

    for attempt in range(3):
        terminated = sum(bool(row[0]) for row in await db.fetch(TERMINATE_ALL))
        if attempt == 0:  # the relay, both gateways' pools and the publisher at least
            assert terminated >= 4, f"only {terminated} sessions were terminated"
        await publisher.wait_count(publisher.count + 40)

    await finish(db, publisher, everyone)
    assert relay.poll() is None
    for gateway in (first, second):

        async def ready(url: str = gateway.url) -> bool:
            status, body = await readiness(url)
            return status == 200 and body["postgres"] == "ok"

        await eventually(ready, f"{gateway.url}/readyz to answer 200")


async def slot_behind_recorded(db: asyncpg.Connection) -> bool:
    """True when the slot's acknowledged LSN is behind the LSN the relay recorded with its
    positions (wal ingest): the server would send those transactions again."""
    return bool(
        await db.fetchval(
            "SELECT s.confirmed_flush_lsn < r.lsn FROM pg_replication_slots s, outbox_relay r"
            " WHERE s.database = current_database() AND r.name = 'default'"
        )
    )


@pytest.mark.wal_only
async def test_a_relay_killed_between_publishing_and_acknowledging_the_slot_doubles_nothing(
    processes: Processes, db: asyncpg.Connection, publisher: Publisher, clients: Connect
) -> None:
    await seed(db)
    relay = processes.start("relay")
    gateway = processes.gateway()
    everyone = [
        await clients("alice", [gateway.url], name="alice"),
        await clients("bob", [gateway.url], name="bob", churn_s=0.4),
    ]
    publisher.start()
    await publisher.wait_count(40)
    # Freeze the relay until it is caught where the slot lags what it recorded and
    # published (it acknowledges once a second), then kill it there.
    for _ in range(200):
        relay.send_signal(signal.SIGSTOP)
        if await slot_behind_recorded(db):
            break
        relay.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.013)
    else:
        raise AssertionError("never caught the relay between publishing and acknowledging")
    relay.kill()
    assert relay.wait() == -signal.SIGKILL
    await publisher.wait_count(publisher.count + 20)  # committed while no relay runs
    successor = processes.start("relay")
    await publisher.wait_count(publisher.count + 40)

    await finish(db, publisher, everyone)
    assert successor.poll() is None


@pytest.mark.wal_only
async def test_wal_ingest_outlives_a_postgres_restart(
    processes: Processes,
    pg_server: PgServer,
    database_url: str,
    db: asyncpg.Connection,
    publisher: Publisher,
    clients: Connect,
) -> None:
    if pg_server.data_dir is None:
        pytest.skip("restarts only a Postgres these tests started (USERSTREAM_TEST_PG_WAL set)")
    await seed(db)
    relay = processes.start("relay")
    first = processes.gateway()
    second = processes.gateway()
    everyone = [
        await clients("alice", [first.url], name="alice@first"),
        await clients("bob", [second.url, first.url], name="bob-churning", churn_s=0.5),
    ]
    publisher.start()
    await publisher.wait_count(40)
    await asyncio.to_thread(pg_server.restart)
    await publisher.wait_count(publisher.count + 60)

    check = await asyncpg.connect(database_url)
    try:
        await finish(check, publisher, everyone)
    finally:
        await check.close()
    assert relay.poll() is None
