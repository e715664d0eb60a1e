"""Ephemeral messages over Redis pub/sub: the signal and presence halves of `RedisBus`.

Every replica subscribes to one channel per kind: `{prefix}signals` (`SIGNALS_CHANNEL_SUFFIX`),
where each signal is one `PUBLISH` of `Signal.encode()` (PROTOCOL.md §5), and `{prefix}presence`
(`PRESENCE_CHANNEL_SUFFIX`), where each presence announcement is one `PUBLISH` of
`sync.presence.PresenceUpdate.encode()`. Pub/sub is at most once: a message published while
Redis is down, or while a replica's subscription reconnects, is lost to it, which both allow
(they are not part of PROTOCOL.md §4's guarantees; presence heartbeats repair what a replica
missed). Batches stay in the stream (`sync.bus_redis`); nothing here is stored.

Each `signals()` and `presence()` iterator holds a `ChannelListener`, with the pitfalls of
FIELD-NOTES §4 in mind:
- a dedicated connection per subscription, one reader task, and no retries inside redis-py:
  on any error the listener drops the connection, logs, backs off with jitter and subscribes
  again (redis-py's own reconnection gives up silently after its retries, redis-py #2417);
- `get_message` with a finite wait (never the busy `timeout=0.0`, redis-py #3108), whose
  expiry is not an error: a quiet channel keeps its subscription however long it stays quiet;
- a watchdog against half-open sockets: after `WATCHDOG_IDLE_S` with nothing received it
  sends a `PING` on the subscription, and a subscription that receives nothing, not even the
  pong, for `PONG_TIMEOUT_S` after it is treated as dead and made again.
"""

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.signals import Signal
from sync.presence import PresenceUpdate
from sync.redis_retry import Outages

logger = logging.getLogger(__name__)

SIGNALS_CHANNEL_SUFFIX = "signals"
"""The pub/sub channel of signals is the configured prefix followed by this."""

PRESENCE_CHANNEL_SUFFIX = "presence"
"""The pub/sub channel of presence announcements is the configured prefix followed by this."""

PUBLISH_TIMEOUT_S = 1.0
"""Seconds one `PUBLISH` may take before the message is given up as lost."""

LISTEN_POLL_S = 1.0
"""Seconds one `get_message` waits for a message; its expiry only lets the watchdog look."""

WATCHDOG_IDLE_S = 15.0
"""Seconds a subscription may receive nothing before it is sent a `PING`."""

PONG_TIMEOUT_S = 5.0
"""Seconds after that `PING` within which something must arrive, or the subscription is made
again on a new connection."""

CONNECT_TIMEOUT_S = 2.0
"""Seconds to open the subscription's connection."""

SOCKET_TIMEOUT_S = 5.0
"""Seconds a write or a command reply (SUBSCRIBE, PING) may take on the subscription's
connection. Reads of messages use `LISTEN_POLL_S` instead, which ends quietly."""

_TRANSPORT_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


async def publish_signal(client: aioredis.Redis, channel: str, signal: Signal) -> None:
    """`PUBLISH channel Signal.encode()` (`publish_message`)."""
    await publish_message(client, channel, signal.encode(), "a signal")


async def publish_message(client: aioredis.Redis, channel: str, payload: bytes, what: str) -> None:
    """`PUBLISH channel payload`, within PUBLISH_TIMEOUT_S. Raises ConnectionError, naming
    `what` was published, when Redis is unreachable or slower than that: the message is lost."""
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT_S):
            await client.publish(channel, payload)
    except _TRANSPORT_ERRORS as exc:  # asyncio's TimeoutError is an OSError
        raise ConnectionError(f"publishing {what} to {channel}: {_describe(exc)}") from exc


class ChannelListener:
    """One subscription to `channel` on the Redis at `url`, kept alive across outages (see
    the module docstring) until `closed` is set. Must be created inside a running event loop.
    """

    def __init__(self, url: str, channel: str, closed: asyncio.Event) -> None:
        self.url = url
        self.channel = channel
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._outages = Outages(closed, logger)
        self._heard = 0.0
        self._pinged: float | None = None

    async def receive(self) -> bytes | None:
        """The payload of the next message on the channel, or None once closed. Transport
        errors and a silent connection are logged and retried with backoff."""
        while not self._outages.closed.is_set():
            try:
                payload = await self._receive_once()
            except (RedisError, OSError) as exc:
                await self._drop()
                await self._outages.back_off(f"subscription to {self.channel}", _describe(exc))
                continue
            if payload is not None:
                return payload
        return None

    async def aclose(self) -> None:
        """Stop watching for close and drop the connection."""
        self._outages.close()
        await self._drop()

    async def _receive_once(self) -> bytes | None:
        loop = asyncio.get_running_loop()
        pubsub = self._pubsub if self._pubsub is not None else await self._subscribe()
        message = await self._outages.until_closed(pubsub.get_message(timeout=LISTEN_POLL_S))
        now = loop.time()
        if message is not None:
            self._heard, self._pinged = now, None
            return _payload(message)
        if self._pinged is not None and now - self._pinged > PONG_TIMEOUT_S:
            raise RedisTimeoutError(f"no answer to PING within {PONG_TIMEOUT_S} s")
        if self._pinged is None and now - self._heard > WATCHDOG_IDLE_S:
            await self._outages.until_closed(pubsub.ping())
            self._pinged = now
        return None

    async def _subscribe(self) -> PubSub:
        client = self._client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        pubsub = self._pubsub = client.pubsub()
        await self._outages.until_closed(pubsub.subscribe(self.channel))
        self._heard, self._pinged = asyncio.get_running_loop().time(), None
        if failures := self._outages.recovered():
            logger.info(
                "subscribed to %s again after %d failures (messages meanwhile are lost)",
                self.channel,
                failures,
            )
        return pubsub

    async def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        client, self._client = self._client, None
        try:
            if pubsub is not None:
                await pubsub.aclose()
            if client is not None:
                await client.aclose()
        except (RedisError, OSError) as exc:
            logger.debug("closing a subscription to %s: %s", self.channel, _describe(exc))


def decode_signal(channel: str, payload: bytes) -> Signal | None:
    """The signal in one message, or None (logged) when it holds none."""
    try:
        return Signal.decode(payload)
    except ValueError as exc:
        logger.error("skipping a message on %s: not a signal: %s", channel, exc)
        return None


def decode_presence(channel: str, payload: bytes) -> PresenceUpdate | None:
    """The presence update in one message, or None (logged) when it holds none."""
    try:
        return PresenceUpdate.decode(payload)
    except ValueError as exc:
        logger.error("skipping a message on %s: not a presence update: %s", channel, exc)
        return None


def _payload(message: dict[str, Any]) -> bytes | None:
    """The data of a `message`; None for subscribe confirmations and pongs."""
    if message.get("type") != "message":
        return None
    data = message.get("data")
    return data.encode() if isinstance(data, str) else data


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
