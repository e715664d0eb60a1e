"""Routes of demo mode only: the `/demo` page, its user list, a token helper and a prefetch.

`/demo/token` signs a token for any user without a password: it exists only when the
`demo` setting is on (`userstream demo` sets it) and must never be enabled in production.
"""

from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core.cursors import current_cursor
from gateway.problems import problem
from gateway.runtime import Runtime

DEMO_TOKEN_TTL_S = 12 * 3600

_USERS = """
SELECT u.id, u.name, min(wm.status) AS status,
       coalesce(array_agg(DISTINCT s.name) FILTER (
           WHERE s.visibility = 'private' AND s.stream_type <> 'dm'), '{}') AS private_streams
  FROM users u
  LEFT JOIN workspace_members wm ON wm.user_id = u.id
  LEFT JOIN stream_members sm ON sm.user_id = u.id AND sm.left_at IS NULL
  LEFT JOIN streams s ON s.id = sm.stream_id
 GROUP BY u.id, u.name
 ORDER BY u.name
"""


def _note(status: str | None, private_streams: list[str]) -> str:
    if status != "active":
        return "invited, not active: sees only events addressed to them"
    if private_streams:
        return "also sees private " + ", ".join(f"#{name}" for name in sorted(private_streams))
    return "public channels, threads and own DMs only"


async def demo_page(request: Request) -> Response:
    """The self-contained demo page (gateway/static/demo.html)."""
    html = resources.files("gateway").joinpath("static/demo.html").read_text()
    return HTMLResponse(html)


async def demo_users(request: Request) -> Response:
    """`[{"id", "name", "note"}]`: every user, with what they may see."""
    runtime: Runtime = request.app.state.runtime
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(_USERS)
    return JSONResponse(
        [
            {"id": r["id"], "name": r["name"], "note": _note(r["status"], r["private_streams"])}
            for r in rows
        ]
    )


async def demo_token(request: Request) -> Response:
    """`{"token": ...}` for `?user=<id>`, valid 12 h; 400 without a user."""
    user_id = request.query_params.get("user", "").strip()
    if not user_id:
        return problem(400, "query parameter 'user' is required")
    runtime: Runtime = request.app.state.runtime
    return JSONResponse({"token": runtime.auth.mint(user_id, DEMO_TOKEN_TTL_S)})


async def demo_prefetch(request: Request) -> Response:
    """`{"cursor": ..., "data": null}`: the `bootstrap()` of the page's `UserStream`
    (PROTOCOL.md §6). The page shows only changes from now on, so it loads no data: the cursor
    is `current_cursor`, read in a REPEATABLE READ transaction as a real prefetch would."""
    runtime: Runtime = request.app.state.runtime
    async with (
        runtime.pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        cursor = await current_cursor(conn)
    return JSONResponse({"cursor": cursor, "data": None})


def demo_routes() -> list[BaseRoute]:
    """The demo routes, to add to the app only in demo mode."""
    return [
        Route("/demo", demo_page),
        Route("/demo/users", demo_users),
        Route("/demo/token", demo_token),
        Route("/demo/prefetch", demo_prefetch),
    ]
