"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: it can serve).

Readiness checks Postgres (`SELECT 1`), the bus (`ping`) and reports the relay's lag (rows
committed but not yet relayed, and the age of the oldest; in wal ingest mode the slot's flush
lag, and the slot itself: `sync.relay.relay_status`), this gateway's dispatch position and
whether it is degraded (reading the outbox because the bus is unreadable, `sync.dispatcher`).
It answers 503 when Postgres is unreachable, or while the authenticator cannot verify any
token yet (a JWKS never loaded: `Authenticator.readiness`, reported as `auth`); an unreachable
bus, a lagging relay, a slot holding WAL or a failing JWKS refresh (known keys still verify)
is reported, not refused: the gateway itself can serve (without the bus, from the outbox),
and turning every replica unready would only move the clients' reconnects onto nothing.
"""

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse

from core.cursors import format_cursor
from gateway.runtime import Runtime
from sync.relay import relay_status

CHECK_TIMEOUT_S = 2.0


async def healthz(request: Request) -> JSONResponse:
    """200 `{"status": "ok"}` while the event loop runs."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """200 with the checks when Postgres answers within 2 s and the authenticator is ready,
    else 503; `bus` and `degraded` are reported either way."""
    runtime: Runtime = request.app.state.runtime
    body: dict[str, object] = {
        "position": format_cursor(runtime.dispatcher.position),
        "degraded": runtime.dispatcher.degraded,
    }
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            async with runtime.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
                relay = await relay_status(conn, runtime.settings.relay_name)
        body["postgres"] = "ok"
        body["relay_lag"] = {"rows": relay["lag_rows"], "seconds": relay["lag_seconds"]}
        if "slot" in relay:
            body["slot"] = relay["slot"]
    except (TimeoutError, OSError, Exception) as exc:  # any failure means "not ready"
        body["postgres"] = f"unavailable: {type(exc).__name__}"
    body["bus"] = "ok" if await runtime.bus.ping() else "unavailable"
    auth_ready, auth_report = runtime.auth.readiness()
    if auth_report is not None:
        body["auth"] = auth_report
    ready = body["postgres"] == "ok" and auth_ready
    body["status"] = "ready" if ready else "unavailable"
    return JSONResponse(body, status_code=200 if ready else 503)
