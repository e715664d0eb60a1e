"""A numbered sequence through real faults: its publisher, resuming clients, and the final check.

The gapless guarantee (PROTOCOL.md §4) says a client that resumes with the last cursor it saw
gets every event routed to it exactly once, in cursor order. The fault tests check it so:

- `Publisher` commits `stream_event.created` events numbered 0, 1, 2, ... (entity `n000042`),
  one per transaction, from a connection of its own, until stopped. Every `SECRET_EVERY`-th
  goes to the private stream `secret` (alice only), the rest to the public `general`, so each
  user may see a different part of the sequence. It outlives terminated connections: after a
  failure it reconnects and looks the event up before committing it again, since a COMMIT
  whose answer was lost may have succeeded; the sequence never holds a number twice.
- `ResumingClient` holds one `/me/stream` connection at a time. When the stream ends (the
  server closed it, its process died, or the client's own `churn_s` cut it), it reconnects to
  the next URL of its list with `Last-Event-ID` set to the last `id:` it received, as a
  browser's EventSource does (WHATWG HTML §9.2.3), only sooner: `reconnect_delay_s` instead
  of the server's `retry:`.
- `assert_exactly_once_in_order` compares what a client received with what it may see.

World (`seed`): workspace `w1` with alice and bob active; `general` public, `secret` private
with alice as its only member.
"""

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import orjson
from httpx_sse import ServerSentEvent, aconnect_sse

from core.publish import publish
from tests.e2e.harness import bearer
from tests.factories import PUBLISHED, stream_message

SECRET_EVERY = 4
"""Number n goes to `secret` when n % SECRET_EVERY == SECRET_EVERY - 1, else to `general`."""

VISIBLE = {"alice": frozenset({"general", "secret"}), "bob": frozenset({"general"})}
"""The streams each user of `seed`'s world may read (PROTOCOL.md §2)."""

WAIT_S = 20.0
"""How long a wait for an event or a count may take before the test fails (not a timing check)."""

PUBLISH_RETRY_S = 0.05
"""Pause of the publisher between a failed commit and its next attempt, in seconds."""

PUBLISH_ATTEMPTS = 200
"""Failed attempts in a row after which the publisher gives up (10 s of outage)."""

_FAULTS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
"""What a terminated or unreachable Postgres raises (TimeoutError is an OSError). A connection
whose backend was terminated while idle has read the FATAL message but may not yet know it is
closed; a query in that moment raises InternalClientError ("cannot switch to state 15; another
operation (2) is in progress", MagicStack/asyncpg#784 and #1069)."""

_EXISTS = "SELECT EXISTS (SELECT 1 FROM outbox WHERE entity_id = $1)"


async def seed(db: asyncpg.Connection) -> None:
    """Create the world of the module docstring."""
    await db.execute(
        """
        INSERT INTO workspaces (id, name) VALUES ('w1', 'One');
        INSERT INTO users (id, name) VALUES ('alice', 'Alice'), ('bob', 'Bob');
        INSERT INTO workspace_members (workspace_id, user_id, status)
            VALUES ('w1', 'alice', 'active'), ('w1', 'bob', 'active');
        INSERT INTO streams (id, workspace_id, name, visibility)
            VALUES ('general', 'w1', 'general', 'public'), ('secret', 'w1', 'secret', 'private');
        INSERT INTO stream_members (stream_id, user_id) VALUES ('secret', 'alice');
        """
    )


def entity_of(number: int) -> str:
    """The entity id of sequence number `number`: `n` and six digits."""
    return f"n{number:06d}"


def number_of(entity_id: str) -> int:
    """Inverse of `entity_of`. Raises ValueError for an id of another form."""
    if not entity_id.startswith("n"):
        raise ValueError(f"{entity_id!r} is not a sequence entity id")
    return int(entity_id[1:])


def stream_of(number: int) -> str:
    """The stream sequence number `number` is published to (see SECRET_EVERY)."""
    return "secret" if number % SECRET_EVERY == SECRET_EVERY - 1 else "general"


@dataclass(frozen=True, slots=True)
class Published:
    """One committed event of the sequence."""

    number: int
    stream_id: str


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll `condition` every 10 ms; raise AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


class Publisher:
    """Commits the numbered sequence every `interval_s` seconds (see the module docstring).

    `log` holds what was committed, in commit order; `faults` counts failed attempts.
    `start()` begins, `stop()` ends the flow and commits one last event to `general`, which
    every user may see (so a client that has it has everything before it). `close()` (in
    teardown) cancels whatever runs and closes the connection.
    """

    def __init__(self, dsn: str, *, interval_s: float = 0.01) -> None:
        self.dsn = dsn
        self.interval_s = interval_s
        self.log: list[Published] = []
        self.faults = 0
        self._conn: asyncpg.Connection | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        """Events committed so far."""
        return len(self.log)

    def start(self) -> None:
        """Start committing in a task of its own."""
        self._task = asyncio.create_task(self._run(), name="publisher")

    async def wait_count(self, count: int) -> None:
        """Wait until `count` events are committed; AssertionError after WAIT_S, or the
        publisher's own error if it gave up."""

        def reached() -> bool:
            if self._task is not None and self._task.done():
                self._task.result()
            return self.count >= count

        await wait_until(reached, f"the publisher to commit {count} events")

    async def stop(self) -> list[Published]:
        """End the flow, commit the last event (to `general`) and return the whole log."""
        self._stop.set()
        if self._task is not None:
            await self._task
        await self._commit(Published(self.count, "general"))
        return list(self.log)

    async def close(self) -> None:
        """Cancel the flow if it still runs and close the connection. Idempotent."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._drop()

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self._commit(Published(self.count, stream_of(self.count)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    async def _commit(self, event: Published) -> None:
        """Commit `event` once, whatever fails on the way; raises the last fault after
        PUBLISH_ATTEMPTS failures in a row."""
        entity_id = entity_of(event.number)
        message = stream_message(entity_id, stream_id=event.stream_id, data={"n": event.number})
        for attempt in itertools.count(1):
            try:
                async with asyncio.timeout(5):
                    conn = await self._connection()
                    # After a failure the last COMMIT may have succeeded unseen: look first.
                    if attempt == 1 or not await conn.fetchval(_EXISTS, entity_id):
                        async with conn.transaction():
                            await publish(conn, message)
                self.log.append(event)
                return
            except _FAULTS:
                self.faults += 1
                self._drop()
                if attempt >= PUBLISH_ATTEMPTS:
                    raise
                await asyncio.sleep(PUBLISH_RETRY_S)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn)
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


def expected_for(user_id: str, log: Sequence[Published]) -> list[int]:
    """The numbers of `log` that `user_id` may see, in commit order."""
    return [p.number for p in log if p.stream_id in VISIBLE[user_id]]


@dataclass(frozen=True, slots=True)
class Change:
    """One `change` event a client received: its cursor and sequence number."""

    cursor: str
    number: int


class ResumingClient:
    """A `/me/stream` client of `user_id` that resumes by `Last-Event-ID` (module docstring).

    `urls`: gateway base URLs, tried in turn, starting with the first: every reconnect moves
    to the next one, as a load balancer might. `reconnect_delay_s`: pause before each
    reconnect. `churn_s`: if set, the client itself ends each stream after that many seconds.
    `may_resume`: reconnects wait until it is set (it starts set). `drop()` ends the current
    stream from the client's side.

    Records: `changes` (every change, in arrival order), `kinds` (the `event` field of every
    event), `last_event_id`, `opened_on` (the URL of each stream that reached its `offset`
    event) and `endings` (why each stream ended).
    """

    def __init__(
        self,
        user_id: str,
        urls: Sequence[str],
        *,
        name: str | None = None,
        reconnect_delay_s: float = 0.05,
        churn_s: float | None = None,
    ) -> None:
        if not urls:
            raise ValueError("a client needs at least one gateway URL")
        self.user_id = user_id
        self.name = name or user_id
        self.urls = list(urls)
        self.reconnect_delay_s = reconnect_delay_s
        self.churn_s = churn_s
        self.may_resume = asyncio.Event()
        self.may_resume.set()
        self.changes: list[Change] = []
        self.kinds: list[str] = []
        self.last_event_id = ""
        self.opened_on: list[str] = []
        self.endings: list[str] = []
        self._numbers: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._stream_task: asyncio.Task[str] | None = None

    async def connect(self) -> "ResumingClient":
        """Start the client and wait until its first stream is live (its `offset` event)."""
        self._task = asyncio.create_task(self._run(), name=f"client-{self.name}")
        await self.wait_for(lambda: bool(self.opened_on), "its first offset event")
        return self

    def numbers(self) -> list[int]:
        """Sequence numbers of every change received, in arrival order."""
        return [c.number for c in self.changes]

    async def wait_for_number(self, number: int) -> None:
        """Wait until the change numbered `number` arrived (AssertionError after WAIT_S)."""
        await self.wait_for(lambda: number in self._numbers, f"event n{number}")

    async def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Poll `condition`; AssertionError naming the client and its endings after WAIT_S."""

        def met() -> bool:
            if self._task is not None and self._task.done():
                self._task.result()
            return condition()

        try:
            await wait_until(met, f"{self.name}: {what}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; stream endings: {self.endings[-5:]}") from None

    async def close(self) -> None:
        """Stop reconnecting and drop the current stream. Idempotent."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def drop(self) -> None:
        """End the current stream at once, as a lost network would; the client then resumes
        on the next URL of its list."""
        if self._stream_task is not None:
            self._stream_task.cancel()

    async def _run(self) -> None:
        for turn in itertools.count():
            if turn:
                await self.may_resume.wait()
                await asyncio.sleep(self.reconnect_delay_s)
            stream = asyncio.create_task(self._stream(self.urls[turn % len(self.urls)]))
            self._stream_task = stream
            try:
                await asyncio.wait({stream})
            finally:
                if not stream.done():  # close(): end the stream with the client
                    stream.cancel()
                    await asyncio.wait({stream})
            self.endings.append("dropped by the client" if stream.cancelled() else stream.result())

    async def _stream(self, url: str) -> str:
        """Hold one stream until it ends; return why it ended."""
        headers = bearer(self.user_id)
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        try:
            async with (
                asyncio.timeout(self.churn_s),
                httpx.AsyncClient(timeout=httpx.Timeout(5, read=None)) as http,
                aconnect_sse(http, "GET", f"{url}/me/stream", headers=headers) as source,
            ):
                if source.response.status_code != 200:
                    return f"{url}: status {source.response.status_code}"
                async for event in source.aiter_sse():
                    self._take(event, url)
        except TimeoutError:
            return f"{url}: cut by the client after {self.churn_s} s"
        except httpx.HTTPError as exc:
            return f"{url}: {type(exc).__name__}: {exc}"
        return f"{url}: ended by the server"

    def _take(self, event: ServerSentEvent, url: str) -> None:
        if event.id:  # the last event ID outlives events without an id (WHATWG HTML §9.2.6)
            self.last_event_id = event.id
        if event.event == "message" and not event.data:
            return  # a `retry:`-only block is not an event
        self.kinds.append(event.event)
        if event.event == "offset":
            self.opened_on.append(url)
        elif event.event == "change":
            body: dict[str, Any] = orjson.loads(event.data)
            number = number_of(body["entityId"])
            self.changes.append(Change(event.id, number))
            self._numbers.add(number)


def assert_exactly_once_in_order(client: ResumingClient, expected: Sequence[int]) -> None:
    """Assert that `client` received exactly `expected`, in that order, with cursors strictly
    increasing and no `must-refetch`; the message names what is missing, doubled or extra."""
    numbers = client.numbers()
    if numbers != list(expected):
        doubled = sorted(n for n, k in Counter(numbers).items() if k > 1)
        missing = sorted(set(expected) - set(numbers))
        extra = sorted(set(numbers) - set(expected))
        first_wrong = next(
            (i for i, (a, b) in enumerate(zip(numbers, expected, strict=False)) if a != b),
            min(len(numbers), len(expected)),
        )
        raise AssertionError(
            f"{client.name}: received {len(numbers)} of {len(expected)} events; "
            f"missing {missing[:20]}, doubled {doubled[:20]}, not allowed {extra[:20]}; "
            f"first difference at index {first_wrong}; stream endings {client.endings}"
        )
    cursors = [c.cursor for c in client.changes]
    assert all(a < b for a, b in itertools.pairwise(cursors)), f"{client.name}: cursor order"
    assert "must-refetch" not in client.kinds, f"{client.name}: must-refetch for a good cursor"


async def assert_outbox_holds(db: asyncpg.Connection, log: Sequence[Published]) -> None:
    """Assert that the outbox holds the sequence of `log` once each, in commit (`seq`) order:
    the publisher's retries doubled nothing. Call it once the relay has positioned them all
    (in wal ingest mode it does so after commit)."""
    rows = await db.fetch(f"SELECT entity_id FROM outbox WHERE {PUBLISHED} ORDER BY seq")
    got, want = [r["entity_id"] for r in rows], [entity_of(p.number) for p in log]
    assert got == want, f"outbox {len(got)} rows, log {len(want)}: first difference at " + str(
        next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    )


Connect = Callable[..., Awaitable[ResumingClient]]
"""The `clients` fixture (tests/e2e/conftest.py): `await clients(user_id, urls, **options)`."""


async def finish(
    db: asyncpg.Connection,
    publisher: Publisher,
    clients: Sequence[ResumingClient],
    *,
    outbox: bool = True,
) -> None:
    """Stop the publisher, wait for its last event everywhere, check every client (and that
    the outbox holds the sequence alone, unless `outbox` is False: others published too)."""
    log = await publisher.stop()
    for client in clients:
        await client.wait_for_number(log[-1].number)
    if outbox:
        await assert_outbox_holds(db, log)
    for client in clients:
        assert_exactly_once_in_order(client, expected_for(client.user_id, log))
