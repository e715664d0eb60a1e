"""The Redis bus: batches in one Redis Stream that every gateway replica reads.

Layout: the stream `{prefix}events` (`EVENTS_KEY_SUFFIX`); each batch is one entry with ID
`{batch.last}-0` and one field, `b`, holding `Batch.encode()`. Redis refuses an ID that is not
past the stream's top entry, which makes `publish` idempotent by position: a relay that takes
over and publishes a batch again gets False. `XADD MAXLEN ~ max_batches` trims whole macro
nodes only, so the stream may hold somewhat more than `max_batches` entries (redis.io XADD,
"Capped streams").

Each `read` iterator owns one connection and loops `XREAD BLOCK` from its last entry ID. It
outlives Redis restarts and FLUSHALL: on a connection error or timeout it logs, backs off
with jitter and tries again from the same ID, so batches published afterwards arrive and their
`prev` shows what the bus lost. The reading socket's timeout is above the block time, since a
BLOCK longer than `socket_timeout` raises TimeoutError (FIELD-NOTES §4, redis-py #2807).

Modelled on centrifuge's `broker_redis.go` (history in a stream whose IDs are offsets).
Departures: no Lua script, no pub/sub channel and no epoch: the stream itself carries the
batches, the entry ID is the position, and lost history shows as a gap in `prev`, which the
reader fills from Postgres (DESIGN.md "Decisions").

Ephemeral signals (PROTOCOL.md §5) use pub/sub on `{prefix}signals` instead, at most once and
never stored: `sync.signals_redis`; so do presence announcements, on `{prefix}presence`.

Keys with an expiry hold each replica's latest report of one kind: its status at
`{prefix}replicas:{replica}` (`/admin/status`) and its presence heartbeat, the full set of pairs
it vouches for, at `{prefix}presence:{replica}`. Reading them all is a SCAN and an MGET, each
bounded by `REPORT_TIMEOUT_S`.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import StreamEntry

from core.signals import Signal
from core.types import ChannelKey
from sync.bus import Batch
from sync.presence import PresenceUpdate
from sync.redis_retry import Outages
from sync.signals_redis import (
    PRESENCE_CHANNEL_SUFFIX,
    SIGNALS_CHANNEL_SUFFIX,
    ChannelListener,
    decode_presence,
    decode_signal,
    publish_message,
    publish_signal,
)

logger = logging.getLogger(__name__)

EVENTS_KEY_SUFFIX = "events"
"""The stream's key is the configured prefix followed by this."""

REPLICAS_KEY_SUFFIX = "replicas:"
"""Replica status reports live at `{prefix}replicas:{replica}`, each with its own expiry."""

PRESENCE_KEY_SUFFIX = "presence:"
"""Presence heartbeats live at `{prefix}presence:{replica}`, each with its own expiry."""

REPORT_TIMEOUT_S = 2.0
"""Seconds one write or one read of every replica's reports (status or heartbeat) may take
before it fails with ConnectionError (a hung server must not stall the caller's loop)."""

PAYLOAD_FIELD = b"b"
"""The one field of each stream entry; its value is `Batch.encode()`."""

READ_COUNT = 100
"""Entries asked for per XREAD."""

PING_TIMEOUT_S = 1.0
"""Seconds `ping` waits for PONG before answering False."""

CONNECT_TIMEOUT_S = 2.0
"""Seconds to open a connection to Redis."""

SOCKET_TIMEOUT_MARGIN_S = 2.0
"""Seconds a reading socket waits past `block_ms` before it calls the connection dead."""

_DUPLICATE_ID = "equal or smaller than the target stream top item"
_TRANSPORT_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisBus:
    """A `sync.bus.Bus` over one Redis Stream at `f"{prefix}events"`.

    `url` is a redis-py URL (`redis://[[user]:password@]host:port/db`); `max_batches` (>= 1)
    is the stream's approximate length cap; `block_ms` (>= 1) is how long one XREAD waits
    for entries, in ms. Raises ValueError for a bound below 1. Connects lazily, on first use.
    """

    def __init__(
        self, url: str, prefix: str, *, max_batches: int = 10_000, block_ms: int = 1000
    ) -> None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, got {max_batches}")
        if block_ms < 1:
            raise ValueError(f"block_ms must be >= 1, got {block_ms}")
        self.key = f"{prefix}{EVENTS_KEY_SUFFIX}"
        self.signals_channel = f"{prefix}{SIGNALS_CHANNEL_SUFFIX}"
        self.presence_channel = f"{prefix}{PRESENCE_CHANNEL_SUFFIX}"
        self._replicas = f"{prefix}{REPLICAS_KEY_SUFFIX}"
        self._heartbeats = f"{prefix}{PRESENCE_KEY_SUFFIX}"
        self.max_batches = max_batches
        self.block_ms = block_ms
        self.url = url
        self._client = aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S)
        self._closed = asyncio.Event()
        self._readers: set[_StreamReader] = set()

    async def publish(self, batch: Batch) -> bool:
        """XADD the batch as entry `{batch.last}-0`; False (nothing added) when Redis holds
        an entry at or past that position. Raises ConnectionError when Redis is unreachable
        or after close() (the batch may or may not have been added: publish it again), and
        redis-py's ResponseError for any other refusal."""
        self._check_open()
        try:
            await self._client.xadd(
                self.key,
                {PAYLOAD_FIELD: batch.encode()},
                id=f"{batch.last}-0",
                maxlen=self.max_batches,
                approximate=True,
            )
        except ResponseError as exc:
            if _DUPLICATE_ID in str(exc):
                return False
            raise
        except _TRANSPORT_ERRORS as exc:
            raise ConnectionError(f"publishing batch up to {batch.last}: {_describe(exc)}") from exc
        return True

    async def read(self, after: int) -> AsyncIterator[Batch]:
        """Every batch in the stream after position `after`, in order, then each new one,
        until close(). Survives Redis outages (see the module docstring); an entry that does
        not decode is logged and skipped."""
        reader = _StreamReader(
            self.key, self.block_ms, self._reading_client, self._closed, f"{max(after, 0)}-0"
        )
        self._readers.add(reader)
        try:
            while (entries := await reader.fetch()) is not None:
                for entry_id, fields in entries:
                    if reader.closed:
                        return
                    batch = _decode(self.key, entry_id, fields)
                    if batch is not None:
                        yield batch
        finally:
            self._readers.discard(reader)
            await reader.aclose()

    async def last_position(self) -> int:
        """Position of the stream's last entry (0 when it holds none). Raises ConnectionError
        when Redis is unreachable or after close()."""
        self._check_open()
        try:
            entries = await self._client.xrevrange(self.key, "+", "-", count=1)
        except _TRANSPORT_ERRORS as exc:
            problem = _describe(exc)
            raise ConnectionError(f"reading the last position of {self.key}: {problem}") from exc
        entry_id = entries[0][0] if entries else None
        return 0 if entry_id is None else _position(entry_id)

    def subscribe(self, topics: Collection[ChannelKey], after: int) -> int:
        """0: every event is read anyway."""
        return 0

    def unsubscribe(self, topics: Collection[ChannelKey]) -> None:
        """Nothing to do: every event is read anyway."""

    def readable(self) -> bool:
        """False after close() and while some `read` iterator fails to reach Redis (from
        its first failure in a row until its next successful XREAD)."""
        return not self._closed.is_set() and not any(r.failing for r in self._readers)

    async def publish_signal(self, signal: Signal) -> None:
        """`PUBLISH {prefix}signals` the signal (`sync.signals_redis`). Raises ConnectionError
        when Redis is unreachable or slow (the signal is lost) or after close()."""
        self._check_open()
        await publish_signal(self._client, self.signals_channel, signal)

    async def signals(self) -> AsyncIterator[Signal]:
        """Every signal published on `{prefix}signals` while subscribed, until close(), on a
        connection of its own that survives Redis outages (`sync.signals_redis`); a message
        that is not a signal is logged and skipped."""
        if self._closed.is_set():
            return
        listener = ChannelListener(self.url, self.signals_channel, self._closed)
        try:
            while (payload := await listener.receive()) is not None:
                signal = decode_signal(self.signals_channel, payload)
                if signal is not None:
                    yield signal
        finally:
            await listener.aclose()

    async def ping(self) -> bool:
        """True when Redis answers PING within PING_TIMEOUT_S; never raises."""
        if self._closed.is_set():
            return False
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                return bool(await self._client.ping())
        except (RedisError, OSError):  # asyncio's TimeoutError is an OSError
            return False

    async def publish_presence(self, update: PresenceUpdate) -> None:
        """`PUBLISH {prefix}presence` the update. Raises ConnectionError when Redis is
        unreachable or slow (the update is lost) or after close()."""
        self._check_open()
        await publish_message(
            self._client, self.presence_channel, update.encode(), "a presence update"
        )

    async def presence(self) -> AsyncIterator[PresenceUpdate]:
        """Every update published on `{prefix}presence` while subscribed, until close(), on a
        connection of its own that survives Redis outages (`sync.signals_redis`); a message
        that is not an update is logged and skipped."""
        if self._closed.is_set():
            return
        listener = ChannelListener(self.url, self.presence_channel, self._closed)
        try:
            while (payload := await listener.receive()) is not None:
                update = decode_presence(self.presence_channel, payload)
                if update is not None:
                    yield update
        finally:
            await listener.aclose()

    async def put_presence(self, update: PresenceUpdate, ttl_s: float) -> None:
        """`SET {prefix}presence:{replica} update PX ttl`. Raises ConnectionError when Redis
        is unreachable or slower than REPORT_TIMEOUT_S, or after close()."""
        await self._put_report(self._heartbeats, update.replica, update.encode(), ttl_s)

    async def presences(self) -> dict[str, PresenceUpdate]:
        """Every unexpired heartbeat (`_reports`); one that does not decode is logged and
        left out. Raises ConnectionError like `put_presence`."""
        heartbeats = {}
        for replica, body in (await self._reports(self._heartbeats)).items():
            update = decode_presence(f"{self._heartbeats}{replica}", body)
            if update is not None:
                heartbeats[replica] = update
        return heartbeats

    async def put_status(self, replica: str, report: bytes, ttl_s: float) -> None:
        """`SET {prefix}replicas:{replica} report PX ttl`. Raises ConnectionError when Redis is
        unreachable or slower than REPORT_TIMEOUT_S, or after close()."""
        await self._put_report(self._replicas, replica, report, ttl_s)

    async def statuses(self) -> dict[str, bytes]:
        """Every unexpired report (`_reports`). Raises ConnectionError like `put_status`."""
        return await self._reports(self._replicas)

    async def _put_report(self, prefix: str, replica: str, body: bytes, ttl_s: float) -> None:
        """`SET {prefix}{replica} body PX ttl`, within REPORT_TIMEOUT_S."""
        self._check_open()
        try:
            async with asyncio.timeout(REPORT_TIMEOUT_S):
                await self._client.set(f"{prefix}{replica}", body, px=max(1, int(ttl_s * 1000)))
        except _TRANSPORT_ERRORS as exc:  # asyncio's TimeoutError is an OSError
            raise ConnectionError(f"writing {prefix}{replica}: {_describe(exc)}") from exc

    async def _reports(self, prefix: str) -> dict[str, bytes]:
        """Every unexpired value at `{prefix}*`, by the rest of its key (SCAN, then MGET),
        within REPORT_TIMEOUT_S."""
        self._check_open()
        try:
            async with asyncio.timeout(REPORT_TIMEOUT_S):
                keys = [k async for k in self._client.scan_iter(match=f"{prefix}*")]
                values = await self._client.mget(keys) if keys else []
        except _TRANSPORT_ERRORS as exc:
            raise ConnectionError(f"reading {prefix}*: {_describe(exc)}") from exc
        start = len(prefix)
        return {
            _text(k)[start:]: _bytes(v) for k, v in zip(keys, values, strict=True) if v is not None
        }

    async def close(self) -> None:
        """Close the publishing connection and end every reader promptly. Idempotent."""
        self._closed.set()
        await self._client.aclose()

    def _reading_client(self) -> aioredis.Redis:
        """A one-connection client for one reader. No retries inside redis-py: the reader
        retries with its own backoff, and logs."""
        return aioredis.Redis.from_url(
            self.url,
            single_connection_client=True,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=self.block_ms / 1000 + SOCKET_TIMEOUT_MARGIN_S,
            retry=Retry(NoBackoff(), 0),
        )

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ConnectionError(f"the Redis bus for {self.key} is closed")


class _StreamReader:
    """The state of one `RedisBus.read` iterator: its connection (made by `connect`), last
    entry ID and failures in a row (`sync.redis_retry.Outages`). Must be created inside a
    running event loop."""

    def __init__(
        self,
        key: str,
        block_ms: int,
        connect: Callable[[], aioredis.Redis],
        closed: asyncio.Event,
        last_id: bytes | str,
    ) -> None:
        self.key = key
        self.block_ms = block_ms
        self.last_id: bytes | str = last_id
        self._connect = connect
        self._client: aioredis.Redis | None = None
        self._outages = Outages(closed, logger)

    @property
    def closed(self) -> bool:
        """True once the bus is closed."""
        return self._outages.closed.is_set()

    @property
    def failing(self) -> bool:
        """True from a failed XREAD until the next one that succeeds."""
        return self._outages.failures > 0

    async def fetch(self) -> list[StreamEntry] | None:
        """The entries after `last_id` (an empty list when none came within block_ms), or
        None once the bus is closed. Transport errors are logged and retried with backoff."""
        while not self.closed:
            try:
                entries = await self._xread()
            except (RedisError, OSError) as exc:
                await self._drop_client()
                await self._outages.back_off(f"reading {self.key}", _describe(exc))
                continue
            if failures := self._outages.recovered():
                logger.info("reading %s again after %d failures", self.key, failures)
            last_id = entries[-1][0] if entries else None
            if last_id is not None:
                self.last_id = last_id
            return entries
        return None

    async def aclose(self) -> None:
        """Stop watching the bus and close the connection."""
        self._outages.close()
        await self._drop_client()

    async def _xread(self) -> list[StreamEntry]:
        if self._client is None:
            self._client = self._connect()
        read = self._client.xread({self.key: self.last_id}, count=READ_COUNT, block=self.block_ms)
        response = await self._outages.until_closed(read)
        return [] if response is None else _entries(response)

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except (RedisError, OSError) as exc:
                logger.debug("closing a reading connection to %s: %s", self.key, _describe(exc))


def _entries(response: Any) -> list[StreamEntry]:
    """The entries of an XREAD reply for one stream: `[[key, [(id, fields), ...]]]`, or an
    empty reply when BLOCK timed out."""
    if not response:
        return []
    return list(response[0][1])


def _decode(
    key: str, entry_id: bytes | str | None, fields: dict[bytes | str, bytes | str] | None
) -> Batch | None:
    """The batch in one stream entry, or None (logged) when the entry holds none."""
    payload = (fields or {}).get(PAYLOAD_FIELD)
    if payload is None:
        logger.error("skipping entry %r of %s: it has no %r field", entry_id, key, PAYLOAD_FIELD)
        return None
    try:
        return Batch.decode(payload)
    except ValueError as exc:
        logger.error("skipping entry %r of %s: not a batch: %s", entry_id, key, exc)
        return None


def _describe(exc: BaseException) -> str:
    """`ErrorType: message`, since redis-py's exception repr() omits the message."""
    return f"{type(exc).__name__}: {exc}"


def _position(entry_id: bytes | str) -> int:
    """The position in a stream entry ID `b"<position>-0"`."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def _text(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value
