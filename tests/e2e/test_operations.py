"""The operational surface of a real gateway process (issue 6): `/metrics` after a known
workload, `/admin/status`, JSON log lines with connection ids and no token, and readiness
during a Postgres outage.

World (`tests.e2e.sequence.seed`): workspace `w1` with alice and bob active; `general`
public, `secret` private with alice only.
"""

import asyncio
from pathlib import Path

import asyncpg
import httpx
import orjson

from core.publish import OutboxEvent, publish, publish_many
from tests.e2e.harness import Processes, StreamClient, bearer, eventually, scrape, token
from tests.e2e.sequence import seed
from tests.factories import PUBLISHED, stream_message
from tests.services import BUS, INGEST, PgServer, free_port

ADMIN_TOKEN = "admin-secret-for-tests"


async def known_workload(db: asyncpg.Connection) -> None:
    """4 events: m1 in `secret` (alice only: bob's copy is withheld), m2 and m3 in `general`
    (both), n1 for bob only; and one malformed row (a dead letter)."""
    async with db.transaction():
        await publish(db, stream_message("m1", stream_id="secret"))
    async with db.transaction():
        await publish_many(
            db,
            [stream_message("m2", stream_id="general"), stream_message("m3", stream_id="general")],
        )
        await db.execute(
            "INSERT INTO outbox (type, resource_type, action, entity_id, workspace_id)"
            " VALUES ('membership.created', 'membership', 'create', 'bad', 'w1')"
        )
    async with db.transaction():
        await publish(
            db, OutboxEvent("notification.created", "notification", "create", "n1", user_id="bob")
        )


async def test_metrics_count_a_known_workload(processes: Processes, db: asyncpg.Connection) -> None:
    await seed(db)
    metrics_port = free_port()
    gateway = processes.gateway("--with-relay", env={"USERSTREAM_METRICS_PORT": str(metrics_port)})
    alice = await StreamClient(gateway.url, bearer("alice")).connect()
    bob = await StreamClient(gateway.url, bearer("bob")).connect()
    async with httpx.AsyncClient(timeout=5) as client:
        refused = await client.get(
            f"{gateway.url}/me/stream", headers={"Authorization": "Bearer x"}
        )
    assert refused.status_code == 401

    await known_workload(db)
    await alice.wait_for(lambda: len(alice.changes()) == 3)
    await bob.wait_for(lambda: len(bob.changes()) == 3)
    await bob.close()

    async def bob_counted_gone() -> bool:
        found = await scrape(f"{gateway.url}/metrics")
        return found.get(("userstream_connections", ()), -1) == 1

    await eventually(bob_counted_gone, "the gauge to count bob's stream as closed")
    found = await scrape(f"{gateway.url}/metrics")
    on_metrics_port = await scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    await alice.close()

    assert found[("userstream_connects_total", ())] == 2
    assert found[("userstream_disconnects_total", (("reason", "client"),))] == 1
    assert found[("userstream_rejected_connects_total", (("status", "401"),))] == 1
    # Wal ingest adds the gateway's own rows (barriers), each relayed, and read from the
    # stream bus too; the channel bus carries only its users' topics (a barrier names none).
    internal = await db.fetchval(f"SELECT count(*) FROM outbox WHERE NOT ({PUBLISHED})")
    read = 4 + (internal if BUS == "stream" else 0)
    assert found[("userstream_bus_events_total", ())] == read
    assert found[("userstream_deliveries_total", ())] == 6  # alice m1 m2 m3, bob m2 m3 n1
    assert found[("userstream_events_denied_total", ())] == 1  # bob's m1
    assert found[("userstream_relay_events_total", ())] == 4 + internal
    assert 3 <= found[("userstream_relay_batches_total", ())] <= 3 + internal
    assert found[("userstream_dead_letters_total", ())] == 1
    assert found[("userstream_relay_lag_rows", ())] == 0
    # One write per transaction at least; wal ingest may bring all three in one batch.
    writes = found[("userstream_commit_to_write_seconds_count", ())]
    assert writes >= (3 if INGEST == "trigger" else 1)
    assert found[("userstream_slow_consumer_disconnects_total", ())] == 0
    assert ("userstream_send_buffer_bytes", ()) in found
    assert on_metrics_port[("userstream_deliveries_total", ())] == 6


async def test_admin_status_shows_every_replica_and_the_relay(
    processes: Processes, db: asyncpg.Connection
) -> None:
    await seed(db)
    env = {"USERSTREAM_ADMIN_TOKEN": ADMIN_TOKEN, "USERSTREAM_STATUS_INTERVAL_S": "0.2"}
    first = processes.gateway("--with-relay", env=env)
    second = processes.gateway(env=env)
    alice = await StreamClient(first.url, bearer("alice")).connect()
    bob = await StreamClient(second.url, bearer("bob")).connect()
    await known_workload(db)
    await bob.wait_for(lambda: len(bob.changes()) == 3)

    async with httpx.AsyncClient(base_url=second.url, timeout=5) as client:
        assert (await client.get("/admin/status")).status_code == 401
        wrong = await client.get("/admin/status", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401

        async def both_replicas_report() -> bool:
            body = (await client.get("/admin/status", headers=bearer_admin())).json()
            return [r["connections"] for r in body["replicas"]] in ([1, 1],)

        await eventually(both_replicas_report, "both replicas to report one stream each")
        status = (await client.get("/admin/status", headers=bearer_admin())).json()
    await alice.close()
    await bob.close()

    assert status["bus"] == "ok"
    relay = status["relay"]
    assert relay["ingest"] == INGEST
    if INGEST == "wal":
        assert relay["slot"]["active"] and relay["slot"]["wal_status"] in ("reserved", "extended")
        assert relay["position"] >= bob.changes()[-1]["cursor"]  # barriers come later
    else:
        assert relay["lag_rows"] == 0
        assert relay["position"] == bob.changes()[-1]["cursor"]
    assert all(r["workspaces"] == {"w1": 1} for r in status["replicas"])
    assert status["replica"] in {r["replica"] for r in status["replicas"]}


def bearer_admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def test_admin_status_is_off_without_a_token(processes: Processes) -> None:
    gateway = processes.gateway()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        response = await client.get("/admin/status", headers=bearer_admin())
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_json_logs_carry_connection_ids_and_no_token(
    processes: Processes, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await seed(db)
    log_file = tmp_path / "gateway.log"
    env = {
        "USERSTREAM_LOG_FORMAT": "json",
        "USERSTREAM_LOG_LEVEL": "debug",
        "USERSTREAM_MAX_BUFFER_BYTES": "4096",
    }
    gateway = processes.gateway("--with-relay", env=env, log_file=log_file)
    query_token = token("alice")
    header_token = token("bob")
    alice = await StreamClient(gateway.url, {}, params={"access_token": query_token}).connect()
    bob = await StreamClient(gateway.url, {"Authorization": f"Bearer {header_token}"}).connect()
    await known_workload(db)
    await bob.wait_for(lambda: len(bob.changes()) == 3)
    await alice.close()
    await bob.close()
    await asyncio.sleep(0.5)  # let the gateway log the closes
    processes.stop_all()

    text = log_file.read_text()
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    opened = [line for line in lines if line["msg"].startswith("stream opened")]
    closed = [line for line in lines if line["msg"].startswith("stream closed")]
    assert {line["user"] for line in opened} == {"alice", "bob"}
    assert {line["conn"] for line in opened} == {line["conn"] for line in closed}
    assert len({line["conn"] for line in opened}) == 2
    assert any("access_token=[redacted]" in line["msg"] for line in lines)  # the access log
    assert query_token not in text and header_token not in text


async def test_readiness_fails_while_postgres_refuses_connections(
    processes: Processes, db: asyncpg.Connection, pg_server: PgServer
) -> None:
    """An outage of this test's database: new connections refused and every existing one
    terminated (the shared server itself is never stopped)."""
    gateway = processes.gateway()
    database = await db.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(pg_server.dsn("postgres"))
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            assert (await client.get("/readyz")).status_code == 200
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                database,
            )
            down = await client.get("/readyz")
            assert (await client.get("/healthz")).status_code == 200
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready, "readiness after Postgres accepts connections again")
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert down.status_code == 503
    assert down.json()["postgres"].startswith("unavailable")
    assert down.json()["status"] == "unavailable"
