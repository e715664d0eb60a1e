"""The plain baseline: an SSE fan-out app as a Python developer first writes one.

Starlette + sse-starlette's `EventSourceResponse`, fed by Redis pub/sub. One shared
`redis.asyncio` pub/sub connection per process, read by one task; each SSE client gets an
unbounded `asyncio.Queue` (the pattern of encode/broadcaster). A channel is SUBSCRIBEd when its
first client arrives and UNSUBSCRIBEd when its last one leaves. No replay, no cursor, no
backpressure: a slow consumer's queue grows without bound.

    GET /sub/{channel}   text/event-stream: `: connected` once the Redis subscription is
                         confirmed, then `event: change` / `data: <published message>` per
                         message; a `: ping` comment every 15 s (sse-starlette's default).
    GET /healthz         200 `ok`.

Environment: `PLAIN_REDIS_URL` (default `redis://127.0.0.1:6379/0`), `PLAIN_CHANNEL_PREFIX`
(prepended to the channel of the path to form the Redis channel; default `plain:`).

    uvicorn bench.targets.plain_app:app --loop uvloop --http httptools
"""

import asyncio
import contextlib
import os
import resource
from collections.abc import AsyncIterator

import anyio
import redis.asyncio as aioredis
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


def _raise_open_files_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: one descriptor per SSE client."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Hub:
    """Fans Redis pub/sub messages out to per-client queues."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self._redis_url = redis_url
        self._prefix = prefix
        self._queues: dict[str, set[asyncio.Queue[str]]] = {}
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._redis: aioredis.Redis | None = None
        self._pubsub: aioredis.client.PubSub | None = None

    async def start(self) -> None:
        """Open the pub/sub connection and start the reading task."""
        self._redis = aioredis.Redis.from_url(self._redis_url, decode_responses=True)
        self._pubsub = self._redis.pubsub()
        await self._pubsub.connect()  # type: ignore[no-untyped-call]
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        """Stop reading and close the connections."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        if self._redis is not None:
            await self._redis.aclose()

    async def _read(self) -> None:
        assert self._pubsub is not None
        while True:
            message = await self._pubsub.get_message(timeout=None)
            if message is None:
                continue
            channel = message["channel"]
            if message["type"] == "message":
                for queue in self._queues.get(channel, ()):
                    queue.put_nowait(message["data"])
            elif message["type"] == "subscribe":
                confirmed = self._subscribed.get(channel)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)

    @contextlib.asynccontextmanager
    async def subscription(self, channel: str) -> AsyncIterator[asyncio.Queue[str]]:
        """A queue receiving every message published to `channel` from the moment Redis
        confirms the subscription until the context exits."""
        assert self._pubsub is not None
        name = self._prefix + channel
        queue: asyncio.Queue[str] = asyncio.Queue()
        queues = self._queues.get(name)
        if queues is None:
            queues = self._queues[name] = set()
            self._subscribed[name] = asyncio.get_running_loop().create_future()
            await self._pubsub.subscribe(name)
        queues.add(queue)
        try:
            await asyncio.shield(self._subscribed[name])
            yield queue
        finally:
            queues.discard(queue)
            if not queues and self._queues.get(name) is queues:
                del self._queues[name]
                del self._subscribed[name]
                # A client leaves by cancellation (disconnect); shield the UNSUBSCRIBE from it.
                with anyio.CancelScope(shield=True):
                    await self._pubsub.unsubscribe(name)


hub = Hub(
    os.environ.get("PLAIN_REDIS_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("PLAIN_CHANNEL_PREFIX", "plain:"),
)


async def subscribe(request: Request) -> EventSourceResponse:
    """`GET /sub/{channel}`: the channel's messages as `change` events."""
    channel: str = request.path_params["channel"]

    async def events() -> AsyncIterator[dict[str, str]]:
        async with hub.subscription(channel) as queue:
            yield {"comment": "connected"}
            while True:
                data = await queue.get()
                yield {"event": "change", "data": data}

    return EventSourceResponse(events())


async def healthz(request: Request) -> PlainTextResponse:
    """`GET /healthz`: 200 once the app has started."""
    return PlainTextResponse("ok")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Start the hub with the app, stop it on shutdown."""
    _raise_open_files_limit()
    await hub.start()
    try:
        yield
    finally:
        await hub.stop()


app = Starlette(
    routes=[Route("/sub/{channel}", subscribe), Route("/healthz", healthz)],
    lifespan=lifespan,
)
