"""Graceful shutdown of a gateway (issue 4): SIGTERM drains its streams, clients resume elsewhere.

Two gateways and a relay share Redis. Clients stream from gateway A while a publisher commits
a numbered sequence (`tests.e2e.sequence`) the whole time. A gets SIGTERM: every stream must
end with a `retry:` and `event: close` `{"reason": "shutdown"}` (PROTOCOL.md §3), A must exit
with status 0, and each client, reconnecting to gateway B with `Last-Event-ID` set to the last
`id:` it saw, must end up with the sequence it may see exactly once, in order (PROTOCOL.md §4).
"""

import asyncio
import contextlib
import signal
import subprocess
from dataclasses import dataclass

import asyncpg
import httpx
import orjson
from httpx_sse import aconnect_sse

from tests.e2e.harness import Gateway, Processes, StreamClient, bearer
from tests.e2e.sequence import Publisher, expected_for, number_of, seed

DRAIN_S = 1.0
"""The drain window of gateway A (`USERSTREAM_DRAIN_S`), seconds."""

EXIT_WAIT_S = DRAIN_S + 10.0
"""How long A may take to exit after SIGTERM before the test fails (a deadline, not a timing
check): the drain window, then the close frames and the lifespan shutdown."""

USERS = ("alice", "alice", "alice", "bob", "bob", "bob")
"""One client per entry: alice may see all of the sequence, bob the part in `general`."""


@dataclass
class Resumed:
    """One client's two streams: `first` on the gateway that shuts down, `second` on the other,
    opened with `Last-Event-ID` = `last_event_id`, the last `id:` `first` received."""

    user_id: str
    first: StreamClient
    second: StreamClient | None = None
    last_event_id: str = ""

    def streams(self) -> list[StreamClient]:
        """The streams opened so far, in order."""
        return [self.first] if self.second is None else [self.first, self.second]

    def numbers(self) -> list[int]:
        """Sequence numbers of every change received on both streams, in arrival order."""
        return [number_of(c["entityId"]) for s in self.streams() for c in s.changes()]

    def cursors(self) -> list[str]:
        """Cursors of every change received on both streams, in arrival order."""
        return [c["cursor"] for s in self.streams() for c in s.changes()]

    def kinds(self) -> list[str]:
        """The `event` field of everything received on both streams, in order."""
        return [kind for s in self.streams() for kind in s.kinds()]

    async def wait_for_number(self, number: int) -> None:
        """Wait until the change numbered `number` arrived (AssertionError if the latest
        stream ends first, or after 10 s)."""
        await self.streams()[-1].wait_for(lambda: number in self.numbers())

    async def close(self) -> None:
        """Drop both streams."""
        for stream in self.streams():
            await stream.close()


async def resume_on(client: Resumed, url: str) -> None:
    """Wait for the `close` of the first stream, check it, then reconnect to `url` with
    `Last-Event-ID`, as an EventSource does after the `retry:` delay (WHATWG HTML §9.2.3)."""
    first = client.first
    await first.wait_for(lambda: "close" in first.kinds(), timeout_s=EXIT_WAIT_S)
    close = next(e for e in first.events if e.event == "close")
    assert orjson.loads(close.data) == {"reason": "shutdown"}
    assert first.retry is not None, "no `retry:` before the close frame"
    client.last_event_id = close.id  # an SSE client's last event ID outlives id-less events
    assert client.last_event_id, "the first stream gave no id"
    headers = {**bearer(client.user_id), "Last-Event-ID": client.last_event_id}
    client.second = await StreamClient(url, headers).connect()


async def request_during_drain(url: str) -> list[str] | None:
    """Ask a draining gateway for a stream: None when the connection fails (a network error,
    after which an EventSource reconnects), else the event kinds of the 200 stream to its end.
    Raises AssertionError for any other status (it would end an EventSource for good)."""
    try:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(5, read=None)) as http,
            aconnect_sse(http, "GET", f"{url}/me/stream", headers=bearer("bob")) as source,
        ):
            assert source.response.status_code == 200, source.response.status_code
            return [e.event async for e in source.aiter_sse() if e.data]
    except httpx.TransportError:
        return None


async def wait_exit(gateway: Gateway, timeout_s: float) -> int:
    """The exit status of `gateway`'s process; AssertionError if it runs `timeout_s` longer."""
    try:
        return await asyncio.to_thread(gateway.process.wait, timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"gateway still running {timeout_s} s after SIGTERM") from None


async def test_sigterm_closes_streams_with_shutdown_and_clients_resume_elsewhere_without_gap(
    processes: Processes, db: asyncpg.Connection, database_url: str
) -> None:
    await seed(db)
    processes.start("relay")
    draining = processes.gateway(env={"USERSTREAM_DRAIN_S": str(DRAIN_S)})
    other = processes.gateway(env={"USERSTREAM_DRAIN_S": str(DRAIN_S)})
    publisher = Publisher(database_url)
    clients = [Resumed(user, StreamClient(draining.url, bearer(user))) for user in USERS]
    late: asyncio.Task[list[str] | None] | None = None
    try:
        for client in clients:
            await client.first.connect()
            client.first.retry = None  # from here on, only a `retry:` sent with the close
        publisher.start()
        await publisher.wait_count(20)
        for client in clients:  # number 20 is in `general`: every client may see it
            await client.wait_for_number(20)

        draining.process.send_signal(signal.SIGTERM)
        late = asyncio.create_task(request_during_drain(draining.url))
        async with asyncio.TaskGroup() as group:
            for client in clients:
                group.create_task(resume_on(client, other.url))
        assert await wait_exit(draining, EXIT_WAIT_S) == 0
        late_kinds = await late  # refused, or a stream (maybe only the farewell) closed
        assert late_kinds is None or late_kinds[-1:] == ["close"], late_kinds

        resumed_at = publisher.count
        await publisher.wait_count(resumed_at + 20)
        log = await publisher.stop()
        last = log[-1].number  # in `general`: every client may see it
        for client in clients:
            assert client.second is not None
            await client.wait_for_number(last)
        for client in clients:
            assert client.first.kinds()[-1] == "close"
            assert "must-refetch" not in client.kinds()
            assert client.numbers() == expected_for(client.user_id, log), client.user_id
            cursors = client.cursors()
            assert cursors == sorted(set(cursors)), f"{client.user_id}: cursor order"
    finally:
        if late is not None and not late.done():
            late.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await late
        await publisher.close()
        for client in clients:
            await client.close()
