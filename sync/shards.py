"""The nodes of a Redis Cluster (or one Redis) for sharded pub/sub: where a channel lives,
publishing to each node in order, and one listener per node.

`Shards.discover(url)` asks the server at `url`: with `cluster_enabled` it reads `CLUSTER
SLOTS` (the primaries and the hash slots each serves), else the one server serves every slot.
A channel lives on the node serving its hash slot (redis.io "Cluster specification", key hash
tags; redis-py's `key_slot`), so `SPUBLISH` and `SSUBSCRIBE` of it go to that node (redis.io
"Sharded Pub/Sub"; a single Redis 7 takes them as plain pub/sub). Publishing sends each node
its messages in one pipeline, in the order given: a node delivers them to each subscriber in
that order. The slot map is read once; a cluster whose slots move needs the gateways
restarted (see the README).

`NodeListener` holds one subscription connection to one node, as `sync.signals_redis`'s
listener does (FIELD-NOTES §4: its own connection, no retries inside redis-py, backoff with
jitter, a finite `get_message` wait), with a set of shard channels that may grow and shrink:
changes are sent between two waits, so `LISTEN_POLL_S` bounds how long a new channel waits for
its SSUBSCRIBE. What it hears goes to one queue as `Heard` items, in the node's order, with a
`Listening` item per confirmed SSUBSCRIBE command (`whole` after a (re)connection, whose one
command names every channel) and `Lost` when the connection drops.
"""

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sync.redis_retry import Outages

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
"""Seconds to open a connection to a node."""

COMMAND_TIMEOUT_S = 2.0
"""Seconds a publish pipeline, or a command on a subscription, may take."""

LISTEN_POLL_S = 0.05
"""Seconds one `get_message` of a listener waits: also the longest a new channel waits for
its SSUBSCRIBE to be sent."""

SUBSCRIBE_CHUNK = 1000
"""Channels named by one SSUBSCRIBE or SUNSUBSCRIBE command at most."""

_TRANSPORT_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class Heard:
    """A message published on `channel`, heard from node `node`."""

    node: int
    channel: str
    data: bytes


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
    _clients: dict[int, aioredis.Redis] = field(default_factory=dict, compare=False)

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
        """`SPUBLISH` `messages[node]` (channel, payload) to each node, in order, one
        pipeline per node, the nodes in parallel. Raises ConnectionError when a node is
        unreachable or slower than COMMAND_TIMEOUT_S (some messages may have gone out)."""
        sends = [self._send(node, batch) for node, batch in enumerate(messages) if batch]
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                await asyncio.gather(*sends)
        except _TRANSPORT_ERRORS as exc:  # asyncio's TimeoutError is an OSError
            raise ConnectionError(f"publishing to the bus: {type(exc).__name__}: {exc}") from exc

    async def _send(self, node: int, batch: Sequence[tuple[str, bytes]]) -> None:
        client = self._clients.get(node)
        if client is None:
            client = self._clients[node] = aioredis.Redis.from_url(
                self.urls[node], socket_connect_timeout=CONNECT_TIMEOUT_S
            )
        async with client.pipeline(transaction=False) as pipe:
            for channel, payload in batch:
                pipe.spublish(channel, payload)
            await pipe.execute()

    async def close(self) -> None:
        """Close the publishing connections."""
        clients = list(self._clients.values())
        self._clients.clear()
        for client in clients:
            await client.aclose()


class NodeListener:
    """One subscription connection to node `node` at `url`, for a changing set of shard
    channels (see the module docstring), putting what it hears on `queue` until `closed`.
    `always` names channels it always holds (the node's tick channel). Create it inside a
    running event loop, then `run()` it as a task."""

    def __init__(
        self,
        node: int,
        url: str,
        queue: "asyncio.Queue[Item | None]",
        closed: asyncio.Event,
        always: Iterable[str] = (),
    ) -> None:
        self.node = node
        self.url = url
        self.queue = queue
        self.connected = False
        self._always = set(always)
        self._wanted: set[str] = set(self._always)
        self._held: set[str] = set()
        self._confirmed: set[str] = set()
        """Channels whose SSUBSCRIBE this connection confirmed and that are still held."""
        self._outages = Outages(closed, logger)
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._early: list[dict[str, Any]] = []
        """Messages read with a new connection's confirmations, taken at the next turn."""

    @property
    def failing(self) -> bool:
        """True from a failure of the connection until it is subscribed again."""
        return self._outages.failures > 0

    def want(self, channels: Iterable[str]) -> None:
        """Subscribe `channels` (sent at the next turn). A channel still subscribed on this
        connection (dropped and wanted again within one turn) is confirmed again at once."""
        channels = set(channels)
        self._wanted.update(channels)
        if held := frozenset(channels & self._confirmed):
            self.queue.put_nowait(Listening(self.node, held, whole=False))

    def drop(self, channels: Iterable[str]) -> None:
        """Unsubscribe `channels` (sent at the next turn); `always` channels stay."""
        self._wanted.difference_update(set(channels) - self._always)

    async def run(self) -> None:
        """Listen until closed; failures are logged and retried with backoff."""
        try:
            while not self._outages.closed.is_set():
                try:
                    await self._turn()
                except (RedisError, OSError) as exc:
                    await self._drop_connection()
                    self.queue.put_nowait(Lost(self.node))
                    await self._outages.back_off(
                        f"listening to node {self.url}", f"{type(exc).__name__}: {exc}"
                    )
        finally:
            self._outages.close()
            await self._drop_connection()

    async def _turn(self) -> None:
        pubsub = self._pubsub if self._pubsub is not None else await self._connect()
        await self._apply(pubsub)
        message = await self._outages.until_closed(pubsub.get_message(timeout=LISTEN_POLL_S))
        while message is not None:
            self._take(message)
            message = await pubsub.get_message(timeout=0.0)

    def _take(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = _text(message.get("channel"))
        data = message.get("data")
        if kind == "smessage" and channel is not None and isinstance(data, bytes | str):
            self.queue.put_nowait(
                Heard(self.node, channel, data.encode() if isinstance(data, str) else data)
            )
        elif kind == "ssubscribe" and channel is not None:
            self._confirmed.add(channel)
            self.queue.put_nowait(Listening(self.node, frozenset((channel,)), whole=False))
        elif kind == "sunsubscribe" and channel is not None:
            self._confirmed.discard(channel)

    async def _connect(self) -> PubSub:
        self._client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        pubsub = self._pubsub = self._client.pubsub()
        channels = sorted(self._wanted)
        for start in range(0, len(channels), SUBSCRIBE_CHUNK):
            await pubsub.execute_command("SSUBSCRIBE", *channels[start : start + SUBSCRIBE_CHUNK])
        confirmed = await self._confirmations(pubsub, set(channels))
        self._held = set(channels)
        self._confirmed = set(confirmed)
        self.connected = True
        self.queue.put_nowait(Listening(self.node, frozenset(confirmed), whole=True))
        if failures := self._outages.recovered():
            logger.info("listening to node %s again after %d failures", self.url, failures)
        return pubsub

    async def _confirmations(self, pubsub: PubSub, channels: set[str]) -> set[str]:
        """Read the SSUBSCRIBE confirmations of a new connection; messages that come with
        them are queued after the `Listening` item (they were published after it)."""
        confirmed: set[str] = set()
        early: list[dict[str, Any]] = []
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            while confirmed != channels:
                message = await pubsub.get_message(timeout=COMMAND_TIMEOUT_S)
                if message is None:
                    continue
                if message.get("type") == "ssubscribe":
                    confirmed.add(_text(message.get("channel")) or "")
                else:
                    early.append(message)
        self._early = early
        return confirmed

    async def _apply(self, pubsub: PubSub) -> None:
        early, self._early = self._early, []
        for message in early:
            self._take(message)
        added = sorted(self._wanted - self._held)
        removed = sorted(self._held - self._wanted)
        for start in range(0, len(added), SUBSCRIBE_CHUNK):
            await pubsub.execute_command("SSUBSCRIBE", *added[start : start + SUBSCRIBE_CHUNK])
        for start in range(0, len(removed), SUBSCRIBE_CHUNK):
            chunk = removed[start : start + SUBSCRIBE_CHUNK]
            await pubsub.execute_command("SUNSUBSCRIBE", *chunk)
        self._held.update(added)
        self._held.difference_update(removed)
        self._confirmed.difference_update(removed)

    async def _drop_connection(self) -> None:
        self.connected = False
        self._held = set()
        self._confirmed = set()
        pubsub, self._pubsub = self._pubsub, None
        client, self._client = self._client, None
        try:
            if pubsub is not None:
                await pubsub.aclose()
            if client is not None:
                await client.aclose()
        except (RedisError, OSError) as exc:
            logger.debug("closing a subscription to %s: %s", self.url, exc)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else None


def channels_by_node(shards: Shards, channels: Iterable[str]) -> dict[int, list[str]]:
    """`channels` grouped by the node serving each."""
    grouped: dict[int, list[str]] = {}
    for channel in channels:
        grouped.setdefault(shards.node_of(channel), []).append(channel)
    return grouped
