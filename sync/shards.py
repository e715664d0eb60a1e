"""The nodes of a Redis Cluster (or one Redis) for sharded pub/sub: where a channel lives,
publishing to each node in order, and one listener per node.

`Shards.discover(url)` asks the server at `url`: with `cluster_enabled` it reads `CLUSTER
SLOTS` (the primaries and the hash slots each serves), else the one server serves every slot.
A channel lives on the node serving its hash slot (redis.io "Cluster specification", key hash
tags; redis-py's `key_slot`), so `SPUBLISH` and `SSUBSCRIBE` of it go to that node (redis.io
"Sharded Pub/Sub"; a single Redis 7 takes them as plain pub/sub). Publishing sends each node
its messages in one write on a connection of its own (`NodePublisher`), in the order given: a
node delivers them to each subscriber in that order. The slot map is read once; a cluster
whose slots move needs the gateways restarted (see the README).

`NodeListener` holds one subscription connection to one node, with a set of shard channels
that may grow and shrink (`want` and `drop` send SSUBSCRIBE and SUNSUBSCRIBE at once); on a
failure it reconnects with backoff and jitter and subscribes its whole set again (FIELD-NOTES
§4: its own connection, no retries inside a client library). What it hears goes to a callback
with the node's number, one list of items per socket read, in the node's order: each message
as hiredis parsed it (`Heard`), a `Listening` item per confirmed SSUBSCRIBE (`whole` once a
(re)connection's whole set is confirmed) and `Lost` when the connection drops.
"""

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sync.redis_retry import Outages

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
"""Seconds to open a connection to a node."""

COMMAND_TIMEOUT_S = 2.0
"""Seconds a publish pipeline, or a command on a subscription, may take."""

WATCHDOG_IDLE_S = 15.0
"""Seconds a subscription connection may receive nothing before it is sent a `PING`."""

PONG_TIMEOUT_S = 5.0
"""Seconds after that `PING` within which something must arrive, or the connection is made
again."""

READ_BYTES = 65_536
"""Bytes asked of a publishing connection's socket per read of replies."""

SUBSCRIBE_CHUNK = 1000
"""Channels named by one SSUBSCRIBE or SUNSUBSCRIBE command at most."""

_TRANSPORT_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
_LISTEN_ERRORS = (OSError, EOFError, ValueError, hiredis.HiredisError)
"""What ends a subscription connection in the normal course: the network, the node, a refusal."""


Heard = list[bytes]
"""A message as hiredis parses it: `[b"smessage", channel, data]` (the channel's name as sent).
Handed on as parsed: nothing is built per message on the hot path."""


@dataclass(frozen=True, slots=True)
class Listening:
    """Node `node` confirmed SSUBSCRIBE of `channels`; `whole` after a (re)connection."""

    node: int
    channels: frozenset[str]
    whole: bool


@dataclass(frozen=True, slots=True)
class Lost:
    """The subscription connection to node `node` dropped (what it sent meanwhile is lost)."""

    node: int


Item = Heard | Listening | Lost


@dataclass(frozen=True, slots=True)
class Shards:
    """The primaries of a cluster (`urls`, one per node) and the first slot of each slot
    range with its node (`starts`, `owners`); a single Redis is one node owning every slot."""

    urls: tuple[str, ...]
    starts: tuple[int, ...] = (0,)
    owners: tuple[int, ...] = (0,)
    cluster: bool = False
    _publishers: dict[int, "NodePublisher"] = field(default_factory=dict, compare=False)

    @classmethod
    async def discover(cls, url: str) -> "Shards":
        """The nodes behind `url` (a redis-py URL). Raises ConnectionError when it does not
        answer within CONNECT_TIMEOUT_S + COMMAND_TIMEOUT_S."""
        client = aioredis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S
        )
        try:
            info = await client.info("cluster")
            if not info.get("cluster_enabled"):
                return cls((url,))
            ranges = await client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
        except _TRANSPORT_ERRORS as exc:
            raise ConnectionError(f"discovering the Redis nodes at {url}: {exc}") from exc
        finally:
            await client.aclose()
        return cls.from_slots(url, ranges)

    @classmethod
    def from_slots(cls, url: str, ranges: Any) -> "Shards":
        """The nodes of a `CLUSTER SLOTS` reply (`[[start, end, [host, port, ...], ...]]`
        for each range), reached with `url`'s scheme and credentials."""
        nodes: dict[tuple[str, int], int] = {}
        spans = []
        for entry in sorted(ranges, key=lambda r: int(r[0])):
            host = entry[2][0].decode() if isinstance(entry[2][0], bytes) else entry[2][0]
            address = (host, int(entry[2][1]))
            spans.append((int(entry[0]), nodes.setdefault(address, len(nodes))))
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        urls = tuple(
            urlunsplit(
                (
                    parts.scheme,
                    f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}",
                    "/0",
                    "",
                    "",
                )
            )
            for (host, port) in nodes
        )
        return cls(urls, tuple(s for s, _ in spans), tuple(n for _, n in spans), cluster=True)

    @property
    def size(self) -> int:
        """Number of nodes."""
        return len(self.urls)

    def node_of(self, channel: str) -> int:
        """The node serving `channel`'s hash slot."""
        if len(self.urls) == 1:
            return 0
        slot = key_slot(channel.encode())
        low, high = 0, len(self.starts) - 1
        while low < high:  # the last range starting at or before the slot
            middle = (low + high + 1) // 2
            if self.starts[middle] <= slot:
                low = middle
            else:
                high = middle - 1
        return self.owners[low]

    def tag_on(self, node: int) -> str:
        """A hash tag (`{...}` content) whose slot `node` serves."""
        for number in range(REDIS_CLUSTER_HASH_SLOTS * 4):
            tag = f"n{number}"
            if self.node_of(f"{{{tag}}}") == node:
                return tag
        raise ValueError(f"node {node} serves no slot")

    async def publish(self, messages: Sequence[Sequence[tuple[str, bytes]]]) -> None:
        """`SPUBLISH` `messages[node]` (channel, payload) to each node, in order, one write
        per node (`NodePublisher`), the nodes in parallel. Raises ConnectionError when a node
        is unreachable, refuses a command or is slower than COMMAND_TIMEOUT_S (some messages
        may have gone out)."""
        sends = [self._publisher(n).publish(batch) for n, batch in enumerate(messages) if batch]
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                await asyncio.gather(*sends)
        except (ConnectionError, OSError, EOFError) as exc:  # asyncio's TimeoutError too
            raise ConnectionError(f"publishing to the bus: {type(exc).__name__}: {exc}") from exc

    def _publisher(self, node: int) -> "NodePublisher":
        publisher = self._publishers.get(node)
        if publisher is None:
            publisher = self._publishers[node] = NodePublisher(self.urls[node])
        return publisher

    async def close(self) -> None:
        """Close the publishing connections."""
        publishers = list(self._publishers.values())
        self._publishers.clear()
        for publisher in publishers:
            publisher.close()


class NodePublisher:
    """One connection to the node at `url` for `SPUBLISH`, made on first use and again after
    a failure. A batch's commands go out in one write (with `AUTH` first on a new connection
    when the URL holds a password), and their replies, one integer each (the subscribers
    reached), are parsed by hiredis's `Reader`: redis-py's pipeline spends several µs of
    Python per command packing it and parsing its reply, on the relay's hot path. One batch
    at a time. Raises ConnectionError when the node cannot be reached, closes the connection
    or refuses a command; the connection is then made anew on the next use.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def publish(self, batch: Sequence[tuple[str, bytes]]) -> None:
        """`SPUBLISH` each (channel, payload) of `batch`, in order, and wait until the node
        answered every one. A failure or a cancellation (a timeout) closes the connection:
        how much of the batch went out is then unknown."""
        async with self._lock:
            try:
                fresh = self._stream is None
                reader, writer = await self._connection()
                preamble = _auth(self.url) if fresh else b""
                writer.write(preamble + b"".join(command("SPUBLISH", c, p) for c, p in batch))
                await writer.drain()
                parser, left = hiredis.Reader(), len(batch) + (1 if preamble else 0)
                while left:
                    data = await reader.read(READ_BYTES)
                    if not data:
                        raise ConnectionError(f"node {self.url} closed the connection")
                    parser.feed(data)
                    while left and (reply := parser.gets()) is not False:
                        if isinstance(reply, hiredis.ReplyError):
                            raise ConnectionError(f"node {self.url} refused a command: {reply}")
                        left -= 1
            except BaseException:
                self.close()
                raise

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._stream is None:
            host, port, context = _address(self.url)
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                self._stream = await asyncio.open_connection(host, port, ssl=context)
        return self._stream

    def close(self) -> None:
        """Close the connection (a new one is made on the next use)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream[1].close()


Deliver = Callable[[int, list[Item]], None]
"""Where a `NodeListener` hands what it hears, with its node's number: one call per read from
its socket."""


class NodeListener:
    """One subscription connection to node `node` at `url`, for a changing set of shard
    channels (see the module docstring), handing what it hears to `deliver` until `closed`:
    one list of items per read from the socket, called from the event loop's read callback.
    `always` names channels it always holds (the node's tick channel). Create it inside a
    running event loop, then `run()` it.

    The connection is its own (an `asyncio.Protocol`, replies parsed by hiredis's `Reader`,
    several per read): redis-py's pub/sub client costs tens of µs per message and must poll to
    send a new subscription, and a stream reader adds a task switch per read (bench/RESULTS.md,
    "Interest-based fan-out"). `want` and `drop` write their SSUBSCRIBE/SUNSUBSCRIBE at once.
    A watchdog sends PING after `WATCHDOG_IDLE_S` of silence and drops a connection that
    answers nothing within `PONG_TIMEOUT_S`.
    """

    def __init__(
        self,
        node: int,
        url: str,
        deliver: Deliver,
        closed: asyncio.Event,
        always: Iterable[str] = (),
    ) -> None:
        self.node = node
        self.url = url
        self._deliver = deliver
        self._always = set(always)
        self._wanted: set[str] = set(self._always)
        self._held: set[str] = set()
        self._confirmed: set[str] = set()
        """Channels whose SSUBSCRIBE this connection confirmed and that are still held."""
        self._opening: set[str] | None = None
        """While a new connection's SSUBSCRIBE of its whole set is not all confirmed: what is
        left; what arrives meanwhile waits in `_early`."""
        self._early: list[Item] = []
        self._transport: asyncio.Transport | None = None
        self._parser = hiredis.Reader()
        self._heard = 0.0
        """Monotonic time of the last read from the connection."""
        self._outages = Outages(closed, logger)

    @property
    def failing(self) -> bool:
        """True from a failure of the connection until it is subscribed again."""
        return self._outages.failures > 0

    def want(self, channels: Iterable[str]) -> None:
        """Subscribe `channels`. A channel still subscribed on this connection (dropped and
        wanted again) is confirmed again at once."""
        channels = set(channels)
        self._wanted.update(channels)
        if held := frozenset(channels & self._confirmed):
            self._deliver(self.node, [Listening(self.node, held, whole=False)])
        self._send("SSUBSCRIBE", channels - self._held)

    def drop(self, channels: Iterable[str]) -> None:
        """Unsubscribe `channels`; `always` channels stay."""
        channels = set(channels) - self._always
        self._wanted.difference_update(channels)
        self._send("SUNSUBSCRIBE", channels & self._held)

    async def run(self) -> None:
        """Listen until closed; failures are logged and retried with backoff."""
        try:
            while not self._outages.closed.is_set():
                try:
                    await self._outages.until_closed(self._listen())
                except Exception as exc:  # a bug too: the node must be heard again
                    if not isinstance(exc, _LISTEN_ERRORS):
                        logger.exception("listening to node %s failed", self.url)
                    self._disconnect()
                    self._deliver(self.node, [Lost(self.node)])
                    await self._outages.back_off(
                        f"listening to node {self.url}", f"{type(exc).__name__}: {exc}"
                    )
        finally:
            self._outages.close()
            self._disconnect()

    async def _listen(self) -> None:
        """Connect, subscribe the whole set, and hear it until the connection ends; raises
        what ended it."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[BaseException] = loop.create_future()
        host, port, context = _address(self.url)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            transport, _ = await loop.create_connection(
                lambda: _Subscription(self._received, ended), host, port, ssl=context
            )
        self._transport, self._parser = transport, hiredis.Reader()
        self._heard = time.monotonic()
        self._held, self._confirmed = set(), set()
        self._opening = set(self._wanted)
        if auth := _auth(self.url):  # its OK is read as any other reply; a refusal ends it
            self._write(auth)
        self._send("SSUBSCRIBE", self._wanted)
        watchdog = asyncio.ensure_future(self._watch())
        try:
            raise await ended
        finally:
            watchdog.cancel()

    def _received(self, data: bytes) -> None:
        """One read from the socket: parse every whole reply and deliver what they say.
        Raises ValueError for a refused command, hiredis.HiredisError for a broken reply."""
        self._heard = time.monotonic()
        parser = self._parser
        parser.feed(data)
        items: list[Item] = []
        while (reply := parser.gets()) is not False:
            if type(reply) is list and len(reply) == 3 and reply[0] == b"smessage":
                (items if self._opening is None else self._early).append(reply)
            else:
                self._take(reply, items)
        if items:
            self._deliver(self.node, items)

    async def _watch(self) -> None:
        """Send PING after `WATCHDOG_IDLE_S` of silence; abort the connection (ending it with
        an error) when nothing comes within `PONG_TIMEOUT_S` after it."""
        pinged: float | None = None
        while True:
            await asyncio.sleep(WATCHDOG_IDLE_S / 3)
            now = time.monotonic()
            if now - self._heard < WATCHDOG_IDLE_S:
                pinged = None
            elif pinged is None:
                self._write(command("PING"))
                pinged = now
            elif now - pinged > PONG_TIMEOUT_S and self._transport is not None:
                logger.warning("node %s answered no PING within %s s", self.url, PONG_TIMEOUT_S)
                self._transport.abort()

    def _take(self, reply: Any, items: list[Item]) -> None:
        """A reply other than a message: a refusal, a (un)subscription's confirmation, PONG."""
        if isinstance(reply, hiredis.ReplyError):
            raise ValueError(f"node {self.url} refused a command: {reply}")
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG, OK
        kind, channel = reply[0], reply[1].decode()
        if kind == b"ssubscribe":
            self._confirmed.add(channel)
            if self._opening is None:
                items.append(Listening(self.node, frozenset((channel,)), whole=False))
                return
            self._opening.discard(channel)
            if not self._opening:
                self._opening = None
                items.append(Listening(self.node, frozenset(self._confirmed), whole=True))
                items += self._early
                self._early = []
                if failures := self._outages.recovered():
                    logger.info("listening to node %s again after %d failures", self.url, failures)
        elif kind == b"sunsubscribe":
            self._confirmed.discard(channel)

    def _send(self, verb: str, channels: set[str]) -> None:
        """`verb` (SSUBSCRIBE or SUNSUBSCRIBE) for `channels`, one command per hash slot:
        a cluster node refuses channels of several slots in one (CROSSSLOT)."""
        if not channels or self._transport is None:
            return
        by_slot: dict[int, list[str]] = {}
        for channel in sorted(channels):
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        for group in by_slot.values():
            for start in range(0, len(group), SUBSCRIBE_CHUNK):
                self._write(command(verb, *group[start : start + SUBSCRIBE_CHUNK]))
        if verb == "SSUBSCRIBE":
            self._held.update(channels)
        else:
            self._held.difference_update(channels)
            self._confirmed.difference_update(channels)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _disconnect(self) -> None:
        self._held, self._confirmed, self._opening, self._early = set(), set(), None, []
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()


class _Subscription(asyncio.Protocol):
    """The protocol of a `NodeListener`'s connection: each read goes to `received`; the
    connection's end (or a reply that `received` refuses, which aborts it) sets `ended` to
    its cause."""

    def __init__(
        self, received: Callable[[bytes], None], ended: "asyncio.Future[BaseException]"
    ) -> None:
        self._received = received
        self._ended = ended
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's derive from neither

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except (ValueError, hiredis.HiredisError) as exc:
            self._end(exc)
            if self._transport is not None:
                self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc if exc is not None else EOFError("the connection to the node ended"))

    def _end(self, cause: BaseException) -> None:
        if not self._ended.done():
            self._ended.set_result(cause)


def _address(url: str) -> tuple[str, int, ssl.SSLContext | None]:
    """Host, port and TLS context (for `rediss://`) of a redis-py URL."""
    parts = urlsplit(url)
    context = ssl.create_default_context() if parts.scheme == "rediss" else None
    return parts.hostname or "127.0.0.1", parts.port or 6379, context


def _auth(url: str) -> bytes:
    """The `AUTH` command of a redis-py URL's credentials; empty when it holds no password."""
    parts = urlsplit(url)
    if not parts.password:
        return b""
    user = unquote(parts.username) if parts.username else None
    return command("AUTH", *(u for u in (user,) if u), unquote(parts.password))


def command(*parts: str | bytes) -> bytes:
    """A command in RESP (redis.io "Redis serialization protocol"): an array of bulk strings."""
    chunks = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        chunks.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(chunks)
