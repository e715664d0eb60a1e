"""Servers the benchmark suite measures side by side, behind one interface.

Each target is one SSE server under test: userstream itself, Nchan, and a plain
starlette + sse-starlette + Redis pub/sub app. The suite starts a target pinned to the server
core, connects the C load client (`bench/client/sseload`) to the request paths the target gives,
publishes events through the target's own publishing path (outbox INSERT, Nchan's HTTP publisher,
Redis PUBLISH) and reads the server's RSS and CPU from `/proc/<pid>` of `server_pids()`.

Every published event's payload is the JSON object `bench.targets.payload(ts_ns, size)` gives:
`{"ts": <time.time_ns() just before the commit/publish>, "pad": "xxx..."}`, about `size` bytes.
The client computes latency as its receive time (CLOCK_REALTIME, same machine) minus `ts`.
"""

import time
from typing import Literal, Protocol

import orjson

Scope = Literal["broadcast", "targeted"]
"""`broadcast`: every connection listens on one shared channel (a workspace); `targeted`:
connection i listens on its own channel (user i) and events name one user."""


def payload(size: int = 200, ts_ns: int | None = None) -> bytes:
    """A JSON event body of about `size` bytes carrying `ts` (ns since the epoch)."""
    ts = time.time_ns() if ts_ns is None else ts_ns
    head = orjson.dumps({"ts": ts, "pad": ""})
    return orjson.dumps({"ts": ts, "pad": "x" * max(0, size - len(head))})


class Target(Protocol):
    """One server under test. Methods raise RuntimeError when the server cannot start."""

    name: str
    ready_marker: bytes
    """Bytes in the response after which a connection counts as subscribed (the client's
    connect time ends there): userstream `b"event: offset"`; the others their first frame."""

    async def start(self, *, cpu: str, users: int, scope: Scope, workers: int = 1) -> None:
        """Start the server pinned with `taskset -c cpu`, ready for `users` connections of
        `scope` (userstream seeds its database: one workspace, `users` active members)."""
        ...

    def host_port(self) -> tuple[str, int]:
        """Where the client connects."""
        ...

    def paths(self, users: int, scope: Scope) -> list[str]:
        """One request path (query string included, with any credentials) per connection."""
        ...

    async def publish(self, scope: Scope, bodies: list[tuple[int, bytes]]) -> None:
        """Publish events: each `(user_index, body)`; `user_index` is ignored for broadcast.
        Called at most every 10 ms by the rate driver with the events due in that tick;
        userstream commits them in one transaction."""
        ...

    def server_pids(self) -> list[int]:
        """The server's processes (workers included), for RSS and CPU readings."""
        ...

    async def stop(self) -> None:
        """Stop the server and everything `start` started."""
        ...


class ChannelServer:
    """What the two baselines share: a listener on 127.0.0.1 (`_port` set by `start`) and one
    subscribe path per channel, `/sub/ws1` for every connection of a broadcast and `/sub/u<i>`
    for connection i of a targeted run."""

    _host = "127.0.0.1"
    _port = 0

    def host_port(self) -> tuple[str, int]:
        """`("127.0.0.1", port)` of the listener."""
        return self._host, self._port

    def paths(self, users: int, scope: Scope) -> list[str]:
        """`/sub/ws1` for every connection (broadcast) or `/sub/u<i>` (targeted)."""
        if scope == "broadcast":
            return ["/sub/ws1"] * users
        return [f"/sub/u{i}" for i in range(users)]
