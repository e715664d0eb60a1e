"""Everything a gateway process runs, built from settings and passed explicitly (no globals).

`Runtime.start(settings)` opens the Postgres pool and the bus, starts the dispatcher, the
signal fan-out (PROTOCOL.md §5, `sync.signals`) with its sweep of senders' access holds and
rate buckets, the keep-alive pass, the deadline sweep (`gateway.deadlines`), the replica
status report, presence (PROTOCOL.md §5, `sync.presence_feed`, unless `presence` is off), the
shutdown drain (`gateway.shutdown`) and, in one-process mode or with `with_relay`, an outbox
relay as tasks; `close()` stops them in reverse order: tasks, bus, authenticator, pool (arq's
`close()`).
"""

import asyncio
import contextlib
import inspect
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nanoid
import orjson

from core.channels import workspace_channel
from core.cursors import format_cursor
from core.frames import encode_retry
from core.schema.ingest import ingest_mode
from core.types import Frame
from gateway.auth import Authenticator, JwksAuthenticator, JwtAuthenticator
from gateway.deadlines import SWEEP_INTERVAL_S, Deadlines
from gateway.forward_auth import ForwardAuthenticator
from gateway.limits import ConnectionLimiter, TokenBuckets
from gateway.settings import Settings
from gateway.shutdown import Drain
from sync import metrics
from sync.access_cache import AccessCache
from sync.bus import Bus
from sync.bus_channels import ChannelBus
from sync.bus_memory import InProcessBus
from sync.bus_redis import RedisBus
from sync.dispatcher import Dispatcher
from sync.presence_feed import PresenceFeed
from sync.relay import OutboxRelay
from sync.retention import Pruner
from sync.senders import SenderAccess
from sync.signals import SignalFanOut
from sync.subscribers import StreamSubscriberManager

SIGNAL_SWEEP_S = 5.0
"""How often senders' expired access holds and full rate buckets are dropped, seconds."""

TOPIC_SWEEP_S = 5.0
"""How often the dispatcher lets the bus drop the topics nothing needs any more, seconds."""

logger = logging.getLogger(__name__)


def make_bus(settings: Settings, pool: asyncpg.Pool | None = None) -> Bus:
    """With `REDIS_URL`: a ChannelBus (`USERSTREAM_BUS=channels`; `pool` for its reads) or a
    RedisBus; else the in-process bus (one process only)."""
    if settings.redis_url and settings.bus == "channels":
        return ChannelBus(
            settings.redis_url,
            settings.redis_prefix,
            pool=pool,
            drop_every=settings.bus_drop_every,
        )
    if settings.redis_url:
        return RedisBus(
            settings.redis_url, settings.redis_prefix, max_batches=settings.bus_max_batches
        )
    return InProcessBus(max_batches=settings.bus_max_batches)


def make_authenticator(settings: Settings) -> Authenticator:
    """The authenticator the settings configure: `ForwardAuthenticator` with
    `USERSTREAM_AUTH_URL`, `JwksAuthenticator` with `USERSTREAM_JWT_JWKS_URL`, else
    `JwtAuthenticator`. Raises ValueError when no key source is configured."""
    if settings.auth_url is not None:
        return ForwardAuthenticator(settings)
    if settings.jwt_jwks_url is not None:
        return JwksAuthenticator(settings)
    return JwtAuthenticator(settings)


def retry_frame(settings: Settings) -> Frame:
    """A `retry:` frame of `retry_ms` plus up to `retry_jitter_ms` at random, so that clients
    cut off together do not reconnect together (FIELD-NOTES §6, WHATWG HTML §9.2.3)."""
    return encode_retry(settings.retry_ms + random.randint(0, settings.retry_jitter_ms))


def make_relay(settings: Settings, bus: Bus) -> OutboxRelay:
    """An outbox relay configured from settings, pruning the outbox past `retention_s`.
    Raises ValueError without DATABASE_URL."""
    if not settings.database_url:
        raise ValueError("DATABASE_URL is not set")
    return OutboxRelay(
        settings.database_url,
        bus,
        name=settings.relay_name,
        batch_size=settings.relay_batch_size,
        poll_interval_s=settings.relay_poll_interval_s,
        standby_retry_s=settings.relay_standby_retry_s,
        pruner=Pruner(
            retention_s=settings.retention_s,
            batch_size=settings.prune_batch_size,
            interval_s=settings.prune_interval_s,
        ),
    )


@dataclass
class Runtime:
    """The live parts of one gateway process."""

    settings: Settings
    pool: asyncpg.Pool
    bus: Bus
    dispatcher: Dispatcher
    auth: Authenticator
    limiter: ConnectionLimiter
    drain: Drain
    deadlines: Deadlines
    signals: SignalFanOut
    senders: SenderAccess
    signal_limiter: TokenBuckets
    relay: OutboxRelay | None = None
    presence: PresenceFeed | None = None
    ingest: str = "trigger"
    replica: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    started_at: float = field(default_factory=time.time)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, settings: Settings) -> "Runtime":
        """Connect and start background work. Raises ValueError on unusable settings (no
        database, no JWT key, or several processes without Redis), OSError or asyncpg errors
        when Postgres is unreachable."""
        if not settings.database_url:
            raise ValueError("DATABASE_URL is not set")
        auth = make_authenticator(settings)
        pool = await asyncpg.create_pool(
            settings.database_url, min_size=1, max_size=settings.pool_max_size
        )
        bus = make_bus(settings, pool)
        dispatcher = Dispatcher(
            bus,
            pool,
            StreamSubscriberManager(),
            AccessCache(),
            window_events=settings.window_events,
            page_size=settings.catchup_page_size,
            retry_frame=lambda: retry_frame(settings),
            degraded_poll_s=settings.degraded_poll_s,
        )
        limiter = ConnectionLimiter(settings.max_connections_per_user)
        drain = Drain(dispatcher, settings.drain_s)
        deadlines = Deadlines(settings.send_timeout_s)
        runtime = cls(
            settings,
            pool,
            bus,
            dispatcher,
            auth,
            limiter,
            drain,
            deadlines,
            SignalFanOut(bus, dispatcher),
            SenderAccess(dispatcher),
            TokenBuckets(settings.ephemeral_rate, settings.ephemeral_burst),
        )
        async with pool.acquire() as conn:
            runtime.ingest = await ingest_mode(conn)
        await auth.start()
        runtime.spawn(auth.run(runtime.stop), "auth")
        if auth.recheck_every_s is not None:
            runtime.spawn(runtime.every(auth.recheck_every_s, runtime.recheck), "auth-recheck")
        await dispatcher.start()
        drain.install_signal_handlers()
        metrics.SEND_BUFFER_BYTES.set_function(
            lambda: sum(s.buffered_bytes for s in dispatcher.manager.all())
        )
        runtime.spawn(dispatcher.run(runtime.stop), "dispatcher")
        runtime.spawn(runtime.signals.run(runtime.stop), "signals")
        runtime.spawn(runtime.every(SIGNAL_SWEEP_S, runtime.sweep_signal_state), "signal-sweep")
        runtime.spawn(drain.run(runtime.stop), "drain")
        runtime.spawn(runtime.every(settings.keepalive_s / 2, dispatcher.ping_idle), "keep-alive")
        runtime.spawn(runtime.every(SWEEP_INTERVAL_S, deadlines.sweep), "deadlines")
        runtime.spawn(runtime.every(TOPIC_SWEEP_S, dispatcher.sweep_topics), "topic-sweep")
        runtime.spawn(runtime.every(settings.status_interval_s, runtime.report), "status")
        if settings.presence:
            await runtime.start_presence()
        if settings.with_relay or not settings.redis_url:
            runtime.relay = make_relay(settings, bus)
            runtime.spawn(runtime.relay.run(runtime.stop), "relay")
        logger.info(
            "gateway started at position %d (%s ingest, bus: %s, relay: %s)",
            dispatcher.position,
            runtime.ingest,
            type(bus).__name__,
            "in process" if runtime.relay else "separate",
        )
        return runtime

    async def start_presence(self) -> None:
        """Start presence (`sync.presence_feed`) under an id of this process lifetime (the
        replica id and a random suffix: a restarted process with the same pid is another
        replica to the others), with its first heartbeat written before any stream opens."""
        settings = self.settings
        feed = self.presence = PresenceFeed(
            self.bus,
            self.dispatcher,
            f"{self.replica}-{nanoid.generate(size=6)}",
            grace_s=settings.presence_grace_s,
            interval_s=settings.presence_interval_s,
            ttl_s=settings.presence_ttl_s,
        )
        await feed.start()
        metrics.PRESENCE_ONLINE_USERS.set_function(feed.book.connected_users)
        metrics.PRESENCE_ONLINE_PAIRS.set_function(feed.book.pair_count)
        self.spawn(feed.run(self.stop), "presence")

    async def recheck(self) -> None:
        """Re-check the credentials of the open streams (`Authenticator.recheck`): a revoked
        one ends its streams with `event: close` `unauthorized`, a renewed one moves their
        expiry."""
        verdicts = await self.auth.recheck(self.deadlines.credentials())
        if verdicts:
            self.deadlines.apply(verdicts)

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` as a task until `close()`."""
        self.tasks.append(asyncio.create_task(work, name=name))

    async def every(self, interval_s: float, step: Callable[[], object]) -> None:
        """Call `step` every `interval_s` seconds until `stop`, awaiting what it returns if
        that is awaitable; a failing step is logged and the next one runs on time."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), interval_s)
                return
            try:
                result = step()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                logger.warning("%s failed: %r", getattr(step, "__name__", step), exc)

    def sweep_signal_state(self) -> None:
        """Release senders' access holds that ended and forget rate buckets full again."""
        self.senders.sweep()
        self.signal_limiter.prune()

    def status(self) -> dict[str, Any]:
        """This replica's view: `{"replica", "started_at" (epoch s), "position" (cursor),
        "degraded" (reading the outbox, the bus being unreadable), "connections", "users",
        "draining", "workspaces": {workspace_id: connections}}`."""
        manager = self.dispatcher.manager
        prefix = workspace_channel("")
        return {
            "replica": self.replica,
            "started_at": round(self.started_at, 3),
            "position": format_cursor(self.dispatcher.position),
            "degraded": self.dispatcher.degraded,
            "connections": len(self.drain),
            "users": self.dispatcher.cache.user_count,
            "draining": self.drain.draining,
            "workspaces": {
                channel.removeprefix(prefix): count
                for channel, count in manager.channel_counts().items()
                if channel.startswith(prefix)
            },
        }

    async def report(self) -> None:
        """Publish `status()` to the bus for `/admin/status`, kept for 3 report intervals."""
        body = orjson.dumps({**self.status(), "reported_at": round(time.time(), 3)})
        await self.bus.put_status(self.replica, body, 3 * self.settings.status_interval_s)

    async def close(self) -> None:
        """Stop the tasks (5 s grace, then cancel), close the bus, the authenticator's
        connections, then the pool."""
        self.stop.set()
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.bus.close()
        await self.auth.close()
        await self.pool.close()
