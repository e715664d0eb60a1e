"""`sync.shards` publishing on a Redis of the test's own: `Shards.publish` (`NodePublisher`,
commands written in one go, replies parsed by hiredis) delivers a batch in order to a
`NodeListener`, reuses its connection for the next batch, raises ConnectionError while the
server is down and reconnects once it is back, and turns a refused command into
ConnectionError; a `NodeListener` whose `AUTH` is refused keeps failing and hears nothing."""

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from sync.shards import Item, Listening, Lost, NodeListener, Shards
from tests.services import RedisProcess

CHANNEL = "ustest:shards:{t}"
WAIT_S = 10.0


@pytest.fixture
def server() -> Iterator[RedisProcess]:
    """A Redis server of this test's own, stopped at teardown."""
    with RedisProcess() as process:
        yield process


class Heard:
    """What a `NodeListener` on `CHANNEL` delivers: its payloads, in order, whether its whole
    set was confirmed and whether its connection was lost."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.subscribed = asyncio.Event()
        self.lost = asyncio.Event()
        self._changed = asyncio.Event()

    def deliver(self, node: int, items: list[Item]) -> None:
        for item in items:
            if isinstance(item, Listening) and item.whole:
                self.subscribed.set()
            elif isinstance(item, Lost):
                self.lost.set()
            elif isinstance(item, list):
                self.payloads.append(item[2])
        self._changed.set()

    async def reach(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.payloads) < count:
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def heard(server: RedisProcess) -> AsyncIterator[Heard]:
    heard, closed = Heard(), asyncio.Event()
    listener = NodeListener(0, server.url, heard.deliver, closed, (CHANNEL,))
    task = asyncio.create_task(listener.run())
    async with asyncio.timeout(WAIT_S):
        await heard.subscribed.wait()
    yield heard
    closed.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def numbered(first: int, count: int) -> list[tuple[str, bytes]]:
    return [(CHANNEL, str(n).encode()) for n in range(first, first + count)]


async def test_batches_arrive_in_order_over_one_connection(
    server: RedisProcess, heard: Heard
) -> None:
    shards = Shards((server.url,))
    try:
        # 5,000 replies of 4 bytes each take more than one read of the publisher's socket.
        await shards.publish([numbered(0, 5000)])
        await shards.publish([numbered(5000, 1)])
        await heard.reach(5001)
    finally:
        await shards.close()

    assert heard.payloads == [str(n).encode() for n in range(5001)]


async def test_a_publish_while_the_server_is_down_fails_and_the_next_reconnects(
    server: RedisProcess, heard: Heard
) -> None:
    shards = Shards((server.url,))
    try:
        await shards.publish([numbered(0, 1)])
        server.stop()
        with pytest.raises(ConnectionError, match="publishing to the bus"):
            await shards.publish([numbered(1, 1)])
        server.start()  # same port, empty; the listener subscribes again

        async with asyncio.timeout(WAIT_S):
            while True:  # until the listener is back: pub/sub keeps nothing for it
                await shards.publish([numbered(2, 1)])
                if len(heard.payloads) > 1:
                    break
                await asyncio.sleep(0.05)
    finally:
        await shards.close()

    assert heard.payloads[0] == b"0" and set(heard.payloads[1:]) == {b"2"}


async def test_a_refused_command_is_a_connection_error(server: RedisProcess) -> None:
    shards = Shards((f"redis://:wrong@127.0.0.1:{server.port}/0",))  # the server has none
    try:
        with pytest.raises(ConnectionError, match="refused a command"):
            await shards.publish([numbered(0, 1)])
    finally:
        await shards.close()


async def test_a_listener_whose_auth_is_refused_keeps_failing(server: RedisProcess) -> None:
    heard, closed = Heard(), asyncio.Event()
    url = f"redis://:wrong@127.0.0.1:{server.port}/0"  # the server has no password
    listener = NodeListener(0, url, heard.deliver, closed, (CHANNEL,))
    task = asyncio.create_task(listener.run())
    try:
        async with asyncio.timeout(WAIT_S):
            await heard.lost.wait()
        assert listener.failing and not heard.subscribed.is_set()
    finally:
        closed.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
