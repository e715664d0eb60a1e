"""Operator endpoints: `GET /metrics` (Prometheus) and `GET /admin/status` (behind a token).

`/metrics` serves the process's metrics (`sync.metrics`) in the Prometheus text format
(prometheus-client `generate_latest`); with `USERSTREAM_METRICS_PORT` set, `serve_metrics`
also serves them on that port, away from public traffic.

`/admin/status` answers `Authorization: Bearer <USERSTREAM_ADMIN_TOKEN>` (compared in constant
time by `gateway.auth.static_token_refusal`) with every replica's view as last reported to the bus
(`Runtime.report`: connections, users and connections per workspace), this replica's view now,
the relay's position and lag (from Postgres) and the bus's health. Without a configured token
the endpoint is off (404); a missing or wrong token gets 401. Both answers are RFC 9457
problems.
"""

import asyncio
import logging

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.auth import static_token_refusal
from gateway.runtime import Runtime
from sync.faults import SERVICE_FAULTS
from sync.relay import relay_status

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
"""Seconds `/admin/status` waits for Postgres and for the bus before reporting them down."""


async def metrics(request: Request) -> Response:
    """The Prometheus text exposition of this process's metrics."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def serve_metrics(port: int, host: str = "0.0.0.0") -> bool:
    """Serve `/metrics` on `port` from a daemon thread (prometheus-client's own HTTP server).
    Returns False, with a log line, when the port is taken (e.g. by another worker process
    of the same `serve --workers N`, which then share the first one's figures only)."""
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        logger.warning("metrics port %d not served by this process: %s", port, exc)
        return False
    logger.info("metrics on http://%s:%d/metrics", host, port)
    return True


async def admin_status(request: Request) -> Response:
    """200 `{"replica", "replicas": [...], "relay": {...}, "bus": "ok"|"unavailable"}`; 404
    when no admin token is configured; 401 without the right Bearer token."""
    runtime: Runtime = request.app.state.runtime
    refused = static_token_refusal(request, runtime.settings.admin_token, "admin")
    if refused is not None:
        return refused
    return JSONResponse(
        {
            "replica": runtime.replica,
            "replicas": await _replicas(runtime),
            "relay": await _relay(runtime),
            "bus": "ok" if await runtime.bus.ping() else "unavailable",
        }
    )


async def _replicas(runtime: Runtime) -> list[dict[str, object]]:
    """Every replica's last report, with this replica's view as of now."""
    reports: dict[str, dict[str, object]] = {}
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            for replica, body in (await runtime.bus.statuses()).items():
                reports[replica] = orjson.loads(body)
    except SERVICE_FAULTS as exc:
        logger.warning("replica reports unavailable: %r", exc)
    reports[runtime.replica] = runtime.status()
    return sorted(reports.values(), key=lambda r: str(r["replica"]))


async def _relay(runtime: Runtime) -> dict[str, object]:
    """`{"name", **sync.relay.relay_status}` from Postgres, or `{"name", "error"}` when it
    does not answer."""
    name = runtime.settings.relay_name
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S), runtime.pool.acquire() as conn:
            return {"name": name, **await relay_status(conn, name)}
    except SERVICE_FAULTS as exc:
        return {"name": name, "error": f"postgres unavailable: {type(exc).__name__}"}
