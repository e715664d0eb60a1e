"""The ASGI application: `create_app(settings)` builds everything; nothing runs at import.

Routes: `GET /me/stream` (PROTOCOL.md §3), `GET /healthz`, `GET /readyz`, `GET /metrics`,
`GET /admin/status` (`gateway.admin`), `POST /publish` (`gateway.publish`),
`POST /me/ephemeral` and `GET /me/presence` (PROTOCOL.md §5, `gateway.ephemeral`,
`gateway.presence`),
`GET /client/userstream.js` (PROTOCOL.md §6, `gateway.client_script`), and in demo mode
`/demo` with its helpers.
`app_from_env()` is the factory uvicorn imports in worker processes.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.admin import admin_status, metrics, serve_metrics
from gateway.client_script import client_script_routes
from gateway.demo_page import demo_routes
from gateway.ephemeral import PATH as EPHEMERAL_PATH
from gateway.ephemeral import send_ephemeral
from gateway.health import healthz, readyz
from gateway.logs import configure_logging
from gateway.presence import PATH as PRESENCE_PATH
from gateway.presence import get_presence
from gateway.publish import publish_events
from gateway.runtime import Runtime
from gateway.settings import Settings
from gateway.stream import PATH as STREAM_PATH
from gateway.stream import stream_endpoint


def create_app(settings: Settings) -> "Gateway":
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
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/admin/status", admin_status),
        Route("/publish", publish_events, methods=["POST"]),
        Route(EPHEMERAL_PATH, send_ephemeral, methods=["POST"]),
        Route(PRESENCE_PATH, get_presence),
        *client_script_routes(),
    ]
    if settings.demo:
        routes += demo_routes()
    middleware = cors(settings)
    stream: ASGIApp = stream_endpoint
    for layer in reversed(middleware):
        stream = layer.cls(stream, *layer.args, **layer.kwargs)
    return Gateway(stream=stream, routes=routes, middleware=middleware, lifespan=lifespan)


class Gateway(Starlette):
    """The Starlette app, except `/me/stream`, which goes straight to `stream` (the bare
    endpoint, CORS-wrapped when configured) rather than through the middleware stack and the
    router (`gateway.stream` explains why)."""

    def __init__(self, *, stream: ASGIApp, **options: Any) -> None:
        super().__init__(**options)
        self.stream = stream

    def paths(self) -> frozenset[str]:
        """Every path served: the stream's and the router's."""
        routed = (route.path for route in self.routes if isinstance(route, Route))
        return frozenset((STREAM_PATH, *routed))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == STREAM_PATH:
            scope["app"] = self
            await self.stream(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def cors(settings: Settings) -> list[Middleware]:
    """CORS for the configured origins only, with credentials (cookies) allowed for them, so
    `new EventSource(url, {withCredentials: true})`, `GET /me/presence` and a JSON
    `POST /me/ephemeral` work from those origins and no other (Fetch standard CORS protocol;
    Starlette refuses `*` with credentials)."""
    if not settings.cors_origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=True,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Last-Event-ID", "Cache-Control", "Content-Type"],
            max_age=600,
        )
    ]


def app_from_env() -> "Gateway":
    """`create_app(Settings())`: the factory for `uvicorn --factory` and worker processes."""
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    return create_app(settings)
