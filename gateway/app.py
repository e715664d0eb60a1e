"""The ASGI application: `create_app(settings)` builds everything; nothing runs at import.

Routes: `GET /me/stream` (PROTOCOL.md §3), `GET /healthz`, `GET /readyz`, `GET /metrics`,
`GET /admin/status` (`gateway.admin`), and in demo mode `/demo` with its helpers.
`app_from_env()` is the factory uvicorn imports in worker processes.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Route

from gateway.admin import admin_status, metrics, serve_metrics
from gateway.demo_page import demo_routes
from gateway.health import healthz, readyz
from gateway.logs import configure_logging
from gateway.runtime import Runtime
from gateway.settings import Settings
from gateway.stream import me_stream


def create_app(settings: Settings) -> Starlette:
    """The gateway app; its lifespan starts and stops a `Runtime` built from `settings`."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings)
        app.state.runtime = runtime
        if settings.metrics_port is not None:
            serve_metrics(settings.metrics_port, settings.host)
        try:
            yield
        finally:
            await runtime.close()

    routes: list[BaseRoute] = [
        Route("/me/stream", me_stream),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/admin/status", admin_status),
    ]
    if settings.demo:
        routes += demo_routes()
    return Starlette(routes=routes, middleware=cors(settings), lifespan=lifespan)


def cors(settings: Settings) -> list[Middleware]:
    """CORS for the configured origins only, with credentials (cookies) allowed for them, so
    `new EventSource(url, {withCredentials: true})` works from those origins and no other
    (Fetch standard CORS protocol; Starlette refuses `*` with credentials)."""
    if not settings.cors_origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=True,
            allow_methods=["GET"],
            allow_headers=["Authorization", "Last-Event-ID", "Cache-Control"],
            max_age=600,
        )
    ]


def app_from_env() -> Starlette:
    """`create_app(Settings())`: the factory for `uvicorn --factory` and worker processes."""
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    return create_app(settings)
