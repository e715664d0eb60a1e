"""A browser app against real `userstream` processes, for the client's browser tests.

`App` runs one gateway on a fixed address (so that a restarted gateway keeps the page's origin,
its localStorage, Web Locks and BroadcastChannel), a relay, and a Chromium context whose pages
load `tests/browser/app.html`. The page, its prefetch and its token endpoint live on the
gateway's origin but are answered by the test through Playwright routing (`BrowserContext.route`):
`/app/page.html`, `/app/prefetch` (a REPEATABLE READ snapshot of this test's database, the
README's "Prefetch, then stream") and `/app/token`. Everything else (`/client/userstream.js`,
`/me/stream`, `/metrics`) goes to the real gateway. Same origin, as behind the deploy/ proxy:
no CORS, and `http://127.0.0.1` is a secure context, which Web Locks require.

The world: workspace `w1`, alice an active member, the public stream `general`, and an app
table `messages` that each published change also inserts into, in the same transaction as its
outbox row (the app's data, which retention never prunes). Changes are published one
transaction at a time by one `Publisher`, so their insertion order (`messages.n`) is their
commit order and their cursor order.
"""

import asyncio
import contextlib
import itertools
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

import asyncpg
import httpx
import orjson
from playwright.async_api import BrowserContext, Page, Request, Route

from core.cursors import current_cursor
from core.publish import publish_many
from tests.e2e.harness import Processes, scrape, token
from tests.factories import stream_message
from tests.services import free_port

PAGE = Path(__file__).with_name("app.html")

FAST = {
    "USERSTREAM_RETRY_MS": "100",  # the `retry:` of close frames: reconnect within 0.1-0.3 s
    "USERSTREAM_RETRY_JITTER_MS": "200",
    "USERSTREAM_DRAIN_S": "0.5",
}
"""Gateway settings that keep reconnects after a `close` frame and a shutdown short."""

SEED = """
INSERT INTO workspaces (id, name) VALUES ('w1', 'One');
INSERT INTO users (id, name) VALUES ('alice', 'Alice');
INSERT INTO workspace_members (workspace_id, user_id, status) VALUES ('w1', 'alice', 'active');
INSERT INTO streams (id, workspace_id, name, visibility)
    VALUES ('general', 'w1', 'general', 'public');
CREATE TABLE messages (
    n bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    stream_id text NOT NULL REFERENCES streams (id)
);
"""

VISIBLE = """
SELECT m.id FROM messages m
  JOIN streams s ON s.id = m.stream_id AND s.visibility = 'public'
  JOIN workspace_members wm ON wm.workspace_id = s.workspace_id
       AND wm.user_id = $1 AND wm.status = 'active'
 ORDER BY m.n
"""
"""The messages a user may read (public streams of their active workspaces), oldest first."""


async def seed(db: asyncpg.Connection) -> None:
    """The world of the module docstring."""
    await db.execute(SEED)


async def commit_message(conn: asyncpg.Connection, entity_id: str) -> None:
    """One message in `general`: its `messages` row and its outbox event, in one transaction."""
    async with conn.transaction():
        await conn.execute("INSERT INTO messages (id, stream_id) VALUES ($1, 'general')", entity_id)
        await publish_many(conn, [stream_message(entity_id, stream_id="general")])


async def all_messages(db: asyncpg.Connection, user_id: str = "alice") -> list[str]:
    """Ids of every message `user_id` may read, in commit order."""
    return [r["id"] for r in await db.fetch(VISIBLE, user_id)]


@dataclass
class Publisher:
    """Commits messages `<prefix>-0001`, `<prefix>-0002`, ... one transaction each, every
    `interval_s` seconds in a background task, over its own connection; `ids` are the
    committed ones, in commit order."""

    dsn: str
    prefix: str = "m"
    interval_s: float = 0.03
    ids: list[str] = field(default_factory=list)
    _conn: asyncpg.Connection | None = None
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def commit(self, count: int = 1) -> list[str]:
        """Commit `count` messages now, one transaction each; their ids."""
        if self._conn is None:
            self._conn = await asyncpg.connect(self.dsn)
        new = []
        for _ in range(count):
            entity_id = f"{self.prefix}-{len(self.ids) + 1:04d}"
            await commit_message(self._conn, entity_id)
            self.ids.append(entity_id)
            new.append(entity_id)
        return new

    def start(self) -> None:
        """Publish continuously until `stop`."""
        self._stop.clear()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.commit()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    async def stop(self) -> str:
        """Stop publishing; the id of the last committed message."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        assert self.ids, "nothing was published"
        return self.ids[-1]

    async def close(self) -> None:
        """Stop and drop the connection."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            await self._conn.close()


@dataclass
class Tokens:
    """What `/app/token` answers: the queued tokens first (e.g. a bad one), then a fresh
    HS256 token for the requested user valid `ttl_s` seconds. `issued` counts answers."""

    ttl_s: float = 600
    queued: list[str] = field(default_factory=list)
    issued: int = 0

    def next(self, user_id: str) -> str:
        """The next token for `user_id`."""
        self.issued += 1
        return self.queued.pop(0) if self.queued else token(user_id, ttl_s=self.ttl_s)


@dataclass
class Tab:
    """One page of the app; `load` is what the page recorded since it last loaded."""

    page: Page
    name: str
    requests: list[tuple[float, str]] = field(default_factory=list)
    """(`time.monotonic()`, resource type) of each request to `/me/stream` since the page
    opened: "eventsource" for connections, "fetch" for the client's status probes."""

    def eventsource_times(self) -> list[float]:
        """When each EventSource connection was requested."""
        return [t for t, kind in self.requests if kind == "eventsource"]

    async def live(self, timeout_s: float = 15) -> None:
        """Wait until `start()` resolved (raises on timeout with what the page recorded)."""
        await self.wait("window.live === true", None, timeout_s, "start() to resolve")

    async def wait(self, expression: str, arg: Any, timeout_s: float, what: str) -> None:
        """Wait until the page function `expression` (of `arg`) is true; on timeout an
        AssertionError naming `what` and showing the page's record."""
        try:
            await self.page.wait_for_function(
                f"(arg) => {expression}", arg=arg, timeout=timeout_s * 1000
            )
        except Exception as exc:  # playwright's TimeoutError, or the page went away
            raise AssertionError(f"timed out waiting for {what}: {await self.summary()}") from exc

    async def has_applied(self, entity_id: str, timeout_s: float = 15) -> None:
        """Wait until this load applied `entity_id`."""
        await self.wait(
            "window.load.applied.includes(arg)", entity_id, timeout_s, f"{entity_id} applied"
        )

    async def load(self) -> dict[str, Any]:
        """What the page recorded since it last loaded (`window.load` in app.html)."""
        result: dict[str, Any] = await self.page.evaluate("window.load")
        return result

    async def loads(self) -> list[dict[str, Any]]:
        """What the page recorded in each load of this tab name, oldest first."""
        result: list[dict[str, Any]] = await self.page.evaluate("window.record.loads")
        return result

    async def recorded(self, name: str) -> list[dict[str, Any]]:
        """The loads recorded under the tab name `name` (by any page of the context, closed
        ones too), read from this page's localStorage."""
        text = await self.page.evaluate("(key) => localStorage.getItem(key)", f"record:{name}")
        assert text is not None, f"nothing recorded under {name!r}"
        loads: list[dict[str, Any]] = orjson.loads(text)["loads"]
        return loads

    async def role(self) -> str:
        """`stream.role`: "leader", "follower" or "alone"."""
        return str(await self.page.evaluate("window.stream.role"))

    async def summary(self) -> str:
        """The record, shortened, for failure messages."""
        with contextlib.suppress(Exception):
            load = await self.load()
            applied = load["applied"]
            return (
                f"statuses={[s for s, _ in load['statuses']]} applied={len(applied)}"
                f" (last {applied[-3:]}) bootstraps={len(load['bootstraps'])}"
                f" resets={len(load['resets'])} tokens={load['tokens']} error={load['error']}"
            )
        return "(the page's record is unreadable)"


class GatewayExited(RuntimeError):
    """The gateway process ended while it was awaited healthy."""


@dataclass
class App:
    """The gateway at `origin`, a relay, and the browser `context` the pages open in."""

    processes: Processes
    context: BrowserContext
    dsn: str
    tokens: Tokens = field(default_factory=Tokens)
    port: int = field(default_factory=free_port)
    gateway: subprocess.Popen[bytes] | None = None
    served: bool = False
    page_errors: list[str] = field(default_factory=list)
    publishers: list[Publisher] = field(default_factory=list)

    def publisher(self, interval_s: float = 0.03) -> Publisher:
        """A `Publisher` on this test's database, closed by `close`."""
        self.publishers.append(Publisher(self.dsn, interval_s=interval_s))
        return self.publishers[-1]

    async def close(self) -> None:
        """Close the publishers and the browser context."""
        for publisher in self.publishers:
            await publisher.close()
        await self.context.close()

    @property
    def origin(self) -> str:
        """The gateway's (and the app's) origin."""
        return f"http://127.0.0.1:{self.port}"

    async def route(self) -> None:
        """Answer `/app/*` on the origin from the test (module docstring)."""
        await self.context.route(f"{self.origin}/app/**", self._answer)

    async def _answer(self, route: Route) -> None:
        url = urlparse(route.request.url)
        user_id = parse_qs(url.query).get("user", ["alice"])[0]
        if url.path == "/app/page.html":
            await route.fulfill(
                status=200, content_type="text/html; charset=utf-8", body=PAGE.read_text()
            )
        elif url.path == "/app/prefetch":
            body = await self.prefetch(user_id)
            await route.fulfill(status=200, content_type="application/json", body=body)
        elif url.path == "/app/token":
            body = orjson.dumps({"token": self.tokens.next(user_id)})
            await route.fulfill(status=200, content_type="application/json", body=body)
        else:
            await route.fulfill(status=404, body="not found")

    async def prefetch(self, user_id: str) -> bytes:
        """`{"cursor", "data": {"messages": [...]}}`: the messages `user_id` may read and the
        cursor, in one REPEATABLE READ snapshot (README "Prefetch, then stream")."""
        conn = await asyncpg.connect(self.dsn)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                messages = await all_messages(conn, user_id)
                cursor = await current_cursor(conn)
        finally:
            await conn.close()
        return orjson.dumps({"cursor": cursor, "data": {"messages": messages}})

    def start_relay(self, **env: str) -> None:
        """Start a relay (`userstream relay`) with `env` added to the test's environment."""
        self.processes.start("relay", env=env)

    async def serve(self, **env: str) -> None:
        """Start a gateway on `port` (FAST settings, then `env`) and wait for `/healthz`.

        A first start whose free port was taken meanwhile by another process (the gateway
        exits at once) moves the origin to another free port; later starts keep the origin,
        which the page's storage, locks and channels belong to."""
        for attempt in range(3):
            try:
                await self._start_gateway(env)
                self.served = True
                return
            except GatewayExited:
                if self.served or attempt == 2:
                    raise
                await self.context.unroute(f"{self.origin}/app/**")
                self.port = free_port()
                await self.route()

    async def _start_gateway(self, env: dict[str, str]) -> None:
        assert self.gateway is None or self.gateway.poll() is not None, "a gateway runs"
        self.gateway = self.processes.start("serve", "--port", str(self.port), env={**FAST, **env})
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(timeout=1) as client:
            while True:
                if self.gateway.poll() is not None:
                    raise GatewayExited(f"gateway exited with {self.gateway.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.origin}/healthz")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway on port {self.port} did not become healthy")
                await asyncio.sleep(0.05)

    async def stop_gateway(self) -> None:
        """SIGTERM the gateway (it drains: `close` `shutdown` to every stream) and wait for
        it to exit."""
        assert self.gateway is not None
        self.gateway.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(self.gateway.wait, 20)
        assert returncode == 0, f"gateway exited with {returncode}"

    async def open(self, tab: str = "main", **options: Any) -> Tab:
        """A new page of the app, recording under `tab`, with UserStream `options`."""
        page = await self.context.new_page()
        page.on("pageerror", lambda error: self.page_errors.append(f"{tab}: {error}"))
        opened = Tab(page, tab, stream_requests(page))
        query = f"tab={quote(tab)}&options={quote(orjson.dumps(options).decode())}"
        await page.goto(f"{self.origin}/app/page.html?{query}")
        return opened

    async def metric(self, name: str, **labels: str) -> float:
        """The gateway's current value of the sample `name` with `labels` (0 when absent)."""
        samples = await scrape(f"{self.origin}/metrics")
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    async def connections(self) -> float:
        """Open `/me/stream` connections of the gateway (the `userstream_connections` gauge)."""
        return await self.metric("userstream_connections")


def stream_requests(page: Page) -> list[tuple[float, str]]:
    """A list that fills with (`time.monotonic()`, resource type) of every request `page`
    sends to `/me/stream` from now on (EventSource connections and status probes)."""
    seen: list[tuple[float, str]] = []

    def on_request(request: Request) -> None:
        if urlparse(request.url).path == "/me/stream":
            seen.append((time.monotonic(), request.resource_type))

    page.on("request", on_request)
    return seen


def assert_exactly_once(applied: list[str], expected: list[str]) -> None:
    """`applied` is `expected`, in order: nothing twice, nothing missing, nothing else."""
    twice = sorted(i for i, n in Counter(applied).items() if n > 1)
    assert not twice, f"applied more than once: {twice}"
    missing = [i for i in expected if i not in set(applied)]
    assert not missing, f"never applied ({len(missing)} of {len(expected)}): {missing}"
    extra = [i for i in applied if i not in set(expected)]
    assert not extra, f"applied but not expected: {extra}"
    assert applied == expected, "applied out of commit order"


def without(ids: list[str], known: list[str]) -> list[str]:
    """`ids` minus those in `known` (what a prefetch already held), order kept."""
    held = set(known)
    return [i for i in ids if i not in held]


async def wait_for_positions(db: asyncpg.Connection, timeout_s: float = 20) -> None:
    """Poll until the relay has given every outbox row its position (wal ingest gives them
    after commit)."""
    deadline = time.monotonic() + timeout_s
    while await db.fetchval("SELECT count(*) FROM outbox WHERE seq IS NULL"):
        assert time.monotonic() < deadline, "the relay did not position every row"
        await asyncio.sleep(0.05)


async def wait_for_pruning(db: asyncpg.Connection, through: int, timeout_s: float = 20) -> None:
    """Poll until the relay's retention pruned the outbox through position `through`."""
    deadline = time.monotonic() + timeout_s
    while await db.fetchval("SELECT pruned_through FROM outbox_retention") < through:
        assert time.monotonic() < deadline, f"the relay did not prune through {through}"
        await asyncio.sleep(0.05)


def gaps(times: list[float]) -> list[float]:
    """Seconds between consecutive `times`."""
    return [b - a for a, b in itertools.pairwise(times)]
