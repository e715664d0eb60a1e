"""Relay failover between OS processes: two `userstream relay` commands, one killed with -9.

Both processes run against this test's database and a Redis key prefix of its own. The one
holding the leadership lock is found through `pg_locks` and `pg_stat_activity`: each relay
names its connection `userstream-relay-<OS pid>`. Every event published before, during and
after the takeover must reach a `RedisBus` reader once, in commit order.
"""

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from core.publish import publish
from sync.bus_redis import RedisBus
from sync.leader import holder_pid
from sync.relay import APPLICATION_NAME_PREFIX
from tests.bus_readers import Reader
from tests.factories import stream_message

Process = asyncio.subprocess.Process


class RelayProcesses:
    """Starts `userstream relay` processes with `env`; `stop_all` ends every one of them."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[Process] = []

    async def start(self) -> Process:
        """Run `python -m gateway.cli relay`; its log goes to the test's captured stderr."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "relay", env={**os.environ, **self.env}
        )
        self.started.append(process)
        return process

    async def stop_all(self) -> None:
        """SIGTERM whatever still runs, then SIGKILL what is left after 10 s."""
        for process in self.started:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()


@pytest.fixture
async def relay_processes(
    database_url: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[RelayProcesses]:
    processes = RelayProcesses(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "USERSTREAM_REDIS_PREFIX": redis_prefix,
            "USERSTREAM_RELAY_STANDBY_RETRY_S": "0.2",
            "USERSTREAM_RELAY_POLL_INTERVAL_S": "0.2",
            "USERSTREAM_LOG_LEVEL": "info",
        }
    )
    yield processes
    await processes.stop_all()


@pytest.fixture
async def reader(redis_url: str, redis_prefix: str) -> AsyncIterator[Reader]:
    """A `Reader` of the relays' Redis bus from position 0."""
    bus = RedisBus(redis_url, redis_prefix, block_ms=100)
    bus_reader = Reader(bus)
    yield bus_reader
    await bus_reader.stop()
    await bus.close()


async def commit(conn: asyncpg.Connection, entity_id: str) -> None:
    """Publish one `stream_event.created` in its own transaction."""
    async with conn.transaction():
        await publish(conn, stream_message(entity_id))


async def active_relay_os_pid(conn: asyncpg.Connection) -> int | None:
    """OS pid of the relay process holding the lock, from its connection's application_name."""
    pid = await holder_pid(conn)
    if pid is None:
        return None
    name = await conn.fetchval("SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid)
    if name is None or not name.startswith(APPLICATION_NAME_PREFIX):
        return None
    return int(name.removeprefix(APPLICATION_NAME_PREFIX))


async def relay_connections(conn: asyncpg.Connection) -> int:
    """Relay sessions connected to this test's database."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE $1",
            f"{APPLICATION_NAME_PREFIX}%",
        )
    )


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30
) -> None:
    """Poll `check` every 50 ms until it is true; fail naming `what` after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_killing_the_active_relay_process_hands_over_without_losing_events(
    db: asyncpg.Connection, relay_processes: RelayProcesses, reader: Reader
) -> None:
    first = await relay_processes.start()
    second = await relay_processes.start()
    by_pid = {first.pid: first, second.pid: second}

    async def both_connected_one_active() -> bool:
        for process in by_pid.values():
            assert process.returncode is None, f"relay {process.pid} exited"
        return await relay_connections(db) == 2 and await active_relay_os_pid(db) in by_pid

    await eventually(both_connected_one_active, "two relays, one active")
    await commit(db, "a")
    await commit(db, "b")

    async def delivered(expected: list[str]) -> bool:
        return reader.entity_ids() == expected

    await eventually(lambda: delivered(["a", "b"]), "a and b on the bus")

    active_pid = await active_relay_os_pid(db)
    assert active_pid is not None
    active = by_pid.pop(active_pid)
    [survivor] = by_pid.values()
    active.kill()
    assert await active.wait() == -signal.SIGKILL
    await commit(db, "c")

    async def survivor_active() -> bool:
        return await active_relay_os_pid(db) == survivor.pid

    await eventually(survivor_active, "the standby taking over")
    await commit(db, "d")

    await eventually(lambda: delivered(["a", "b", "c", "d"]), "c and d on the bus")
    committed = await db.fetch("SELECT entity_id FROM outbox ORDER BY seq")
    assert [r["entity_id"] for r in committed] == ["a", "b", "c", "d"]
    assert survivor.returncode is None

    survivor.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(survivor.wait(), timeout=10) == 0
    assert await holder_pid(db) is None
