"""`/healthz` answers while the process runs; `/readyz` checks Postgres and reports the bus,
the relay's lag, this gateway's dispatch position and whether it is degraded."""

import asyncio
import time

import httpx

from tests.e2e.harness import Processes
from tests.services import INGEST, RedisProcess


async def test_health_and_readiness(processes: Processes) -> None:
    gateway = processes.gateway()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready"
    assert body["postgres"] == "ok" and body["bus"] == "ok"
    # Wal ingest does not count rows before the relay positions them: it reports the slot.
    assert body["relay_lag"] == {"rows": None if INGEST == "wal" else 0, "seconds": 0.0}
    assert body["position"] == "0000000000000000"


async def test_readiness_reports_an_unreachable_bus_and_stays_ready(processes: Processes) -> None:
    with RedisProcess() as redis_server:
        gateway = processes.gateway(env={"REDIS_URL": redis_server.url})
        async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
            up = await client.get("/readyz")
            redis_server.stop()
            deadline = time.monotonic() + 10
            while not (down := await client.get("/readyz")).json()["degraded"]:
                assert time.monotonic() < deadline, f"never degraded: {down.text}"
                await asyncio.sleep(0.05)
            assert (await client.get("/healthz")).status_code == 200
    assert up.status_code == 200 and up.json()["degraded"] is False
    # The gateway serves from the outbox meanwhile: unready would only move reconnects.
    assert down.status_code == 200, down.text
    assert down.json()["bus"] == "unavailable" and down.json()["status"] == "ready"
