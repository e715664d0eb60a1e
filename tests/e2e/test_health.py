"""`/healthz` answers while the process runs; `/readyz` checks Postgres and the bus and
reports the relay's lag and this gateway's dispatch position."""

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


async def test_readiness_reports_an_unreachable_bus(processes: Processes) -> None:
    with RedisProcess() as redis_server:
        gateway = processes.gateway(env={"REDIS_URL": redis_server.url})
        async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
            assert (await client.get("/readyz")).status_code == 200
            redis_server.stop()
            down = await client.get("/readyz")
            assert (await client.get("/healthz")).status_code == 200
    assert down.status_code == 503
    assert down.json()["bus"] == "unavailable" and down.json()["status"] == "unavailable"
