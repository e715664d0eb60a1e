"""The benchmark plumbing end to end: the userstream target and the C load client `sseload`.

`UserstreamTarget` starts a real gateway and relay on a fresh database; `sseload` (built here)
opens one `/me/stream` connection per user and waits for each one's `event: offset`. Once the
client reports its measure phase (every connection ready), events are published through the
target, broadcast then targeted, in a separate client run each; the client must count every
event on every connection exactly once, each carrying a latency sample (`"ts"` parsed from the
jsonb-formatted payload), and no connection may be dropped.
"""

import asyncio
import os
import shutil

import pytest

from bench import loadclient
from bench.loadclient import LoadResult
from bench.scenarios import EVENT_STREAM_HEADERS, wait_measuring, watch_phase
from bench.targets import Scope, payload
from bench.targets.userstream import UserstreamTarget
from tests.services import PgServer

CPUS = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
USERS = 20
RUN_S = 6.0
"""Length of each client run's measure phase: the events are published at its start, so this
only bounds how long delivery may take (a failure guard, not a measurement)."""

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


def batches(scope: Scope) -> list[list[tuple[int, bytes]]]:
    """What to publish, one transaction per inner list: 5 broadcast events in two
    transactions, or 3 events for every user in three transactions."""
    if scope == "broadcast":
        return [[(0, payload(200))] * 3, [(0, payload(200))] * 2]
    return [[(user, payload(200)) for user in range(USERS)] for _ in range(3)]


async def run(target: UserstreamTarget, scope: Scope) -> LoadResult:
    """One client run: connect every user, publish `batches(scope)` once all are ready."""
    host, port = target.host_port()
    with watch_phase() as watch:
        load = asyncio.create_task(
            loadclient.run_load(
                host,
                port,
                target.paths(USERS, scope),
                connections=USERS,
                cpu=None,
                ready_marker=target.ready_marker,
                duration_s=RUN_S,
                connect_timeout_s=20,
                headers=EVENT_STREAM_HEADERS,
            )
        )
        assert await wait_measuring(watch, load), "the client ended before its measure phase"
        for bodies in batches(scope):
            await target.publish(scope, bodies)
        return await load


@pytest.mark.timeout(60)
async def test_every_connection_counts_every_event(pg_server: PgServer, redis_url: str) -> None:
    await asyncio.to_thread(loadclient.build)
    target = UserstreamTarget(pg_server, redis_url)
    await target.start(cpu=CPUS, users=USERS, scope="broadcast")
    try:
        assert target.server_pids(), "the gateway process is not running"
        broadcast = await run(target, "broadcast")
        targeted = await run(target, "targeted")
    finally:
        await target.stop()
    assert target.server_pids() == []

    for result, expected in ((broadcast, USERS * 5), (targeted, USERS * 3)):
        assert (result.connections, result.ready, result.failed) == (USERS, USERS, 0)
        assert result.errors == {}
        assert result.events == expected
        assert result.latency_ms.count == expected
        assert result.closed_by_server.healthy == 0
        assert result.close_events == 0
