"""Subscribers' bounded send buffers (PROTOCOL.md §4 Isolation) and the index of them."""

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from core.cursors import PrefetchSnapshot
from core.frames import encode_change, encode_close, encode_retry
from sync.subscribers import StreamSubscriberManager, Subscriber, SubscriberClosed
from tests.factories import make_event

FRAME = b"event: change\nid: 000000000000002a\ndata: {}\n\n"  # 45 bytes


@contextlib.asynccontextmanager
async def frames_of(subscriber: Subscriber) -> AsyncIterator[AsyncGenerator[bytes, None]]:
    """`subscriber.frames()`, closed on exit however far it was iterated."""
    frames = cast(AsyncGenerator[bytes, None], subscriber.frames())
    try:
        yield frames
    finally:
        await frames.aclose()


def offer(subscriber: Subscriber, frame: bytes, committed_at: float = 0.0) -> bool:
    """What the dispatcher does with one frame: `queue`, then `flush` if it was queued."""
    if not subscriber.queue(frame, committed_at):
        return False
    subscriber.flush()
    return True


async def next_chunk(frames: AsyncGenerator[bytes, None]) -> bytes:
    """The next chunk; fails the test rather than hang if none comes."""
    return await asyncio.wait_for(frames.__anext__(), timeout=10)


# Subscriber: buffer bound


@pytest.mark.parametrize("max_buffer_bytes", [0, -1])
def test_subscriber_needs_a_positive_buffer_bound(max_buffer_bytes: int) -> None:
    with pytest.raises(ValueError, match=f"max_buffer_bytes must be > 0, got {max_buffer_bytes}"):
        Subscriber("s1", "u1", max_buffer_bytes=max_buffer_bytes)


def test_offer_accepts_up_to_exactly_max_buffer_bytes() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=3 * len(FRAME))

    assert [offer(subscriber, FRAME) for _ in range(3)] == [True, True, True]
    assert subscriber.buffered_bytes == 3 * len(FRAME)


def test_offer_refuses_one_byte_past_max_buffer_bytes_and_queues_nothing() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=2 * len(FRAME) + 1)
    assert offer(subscriber, FRAME)
    assert offer(subscriber, FRAME)

    assert offer(subscriber, FRAME) is False
    assert subscriber.buffered_bytes == 2 * len(FRAME)
    assert offer(subscriber, b"\n") is True  # the one byte left still fits
    assert offer(subscriber, b"\n") is False


def test_offer_refuses_a_frame_larger_than_the_whole_buffer() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=len(FRAME) - 1)

    assert offer(subscriber, FRAME) is False
    assert subscriber.buffered_bytes == 0


async def test_bytes_being_written_count_until_the_writer_asks_for_more() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=3 * len(FRAME))
    offer(subscriber, FRAME)
    offer(subscriber, FRAME)

    async with frames_of(subscriber) as frames:
        assert await next_chunk(frames) == FRAME + FRAME
        # The chunk is in the socket's hands: it still counts against the bound.
        assert subscriber.buffered_bytes == 2 * len(FRAME)
        assert offer(subscriber, FRAME) is True
        assert offer(subscriber, FRAME) is False
        assert subscriber.buffered_bytes == 3 * len(FRAME)

        # Asking for the next chunk means the previous one was accepted.
        assert await next_chunk(frames) == FRAME
        assert subscriber.buffered_bytes == len(FRAME)
        assert offer(subscriber, FRAME) is True
        assert offer(subscriber, FRAME) is True
        assert offer(subscriber, FRAME) is False


# Subscriber: batching


async def test_frames_joins_everything_queued_into_one_chunk() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=1 << 20)
    parts = [b"event: change\nid: %016x\ndata: {}\n\n" % i for i in range(1, 6)]
    for part in parts:
        offer(subscriber, part)

    async with frames_of(subscriber) as frames:
        assert await next_chunk(frames) == b"".join(parts)
        assert subscriber.buffered_bytes == sum(map(len, parts))


async def test_frames_waits_for_an_offer() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=1 << 20)

    async with frames_of(subscriber) as frames:
        waiting = asyncio.ensure_future(frames.__anext__())
        await asyncio.sleep(0)  # let it reach the wait
        assert not waiting.done()

        offer(subscriber, FRAME)

        assert await asyncio.wait_for(waiting, timeout=10) == FRAME


# Subscriber: close


async def test_close_drops_queued_frames_and_sends_farewell_then_close_frame() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=1 << 20)
    offer(subscriber, FRAME)
    offer(subscriber, FRAME)

    subscriber.close("shutdown", farewell=encode_retry(4000))

    assert subscriber.closed
    assert subscriber.close_reason == "shutdown"
    async with frames_of(subscriber) as frames:
        assert await next_chunk(frames) == b"retry: 4000\n\n" + encode_close("shutdown")
        with pytest.raises(StopAsyncIteration):
            await next_chunk(frames)


async def test_close_without_farewell_sends_only_the_close_frame() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=1 << 20)

    subscriber.close("slow_consumer")

    assert subscriber.buffered_bytes == len(encode_close("slow_consumer"))
    assert [chunk async for chunk in subscriber.frames()] == [encode_close("slow_consumer")]


async def test_close_while_a_chunk_is_being_written_ends_after_the_close_frame() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=1 << 20)
    offer(subscriber, FRAME)

    async with frames_of(subscriber) as frames:
        assert await next_chunk(frames) == FRAME
        subscriber.close("token_expired")

        assert await next_chunk(frames) == encode_close("token_expired")
        with pytest.raises(StopAsyncIteration):
            await next_chunk(frames)


async def test_close_wakes_a_waiting_writer() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=1 << 20)

    async with frames_of(subscriber) as frames:
        waiting = asyncio.ensure_future(frames.__anext__())
        await asyncio.sleep(0)
        assert not waiting.done()

        subscriber.close("shutdown")

        assert await asyncio.wait_for(waiting, timeout=10) == encode_close("shutdown")


def test_close_frame_is_sent_even_past_the_buffer_bound() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=len(FRAME))
    offer(subscriber, FRAME)

    subscriber.close("slow_consumer", farewell=encode_retry(5000))

    assert subscriber.buffered_bytes == len(encode_retry(5000) + encode_close("slow_consumer"))


def test_offer_after_close_raises_subscriber_closed() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=1 << 20)
    subscriber.close("shutdown")

    with pytest.raises(SubscriberClosed, match=r"subscriber s1 is closed \(shutdown\)"):
        offer(subscriber, FRAME)


async def test_close_twice_keeps_the_first_reason_and_one_close_frame() -> None:
    subscriber = Subscriber("s1", "u1", max_buffer_bytes=1 << 20)

    subscriber.close("slow_consumer")
    subscriber.close("shutdown", farewell=encode_retry(1))

    assert subscriber.close_reason == "slow_consumer"
    assert [chunk async for chunk in subscriber.frames()] == [encode_close("slow_consumer")]


def test_subscriber_closed_is_a_runtime_error() -> None:
    assert issubclass(SubscriberClosed, RuntimeError)


# StreamSubscriberManager


def make_subscriber(subscriber_id: str, user_id: str) -> Subscriber:
    return Subscriber(subscriber_id, user_id, max_buffer_bytes=1024)


def assert_empty(manager: StreamSubscriberManager) -> None:
    """Nothing registered and no empty entry left in any index."""
    assert len(manager) == 0
    assert manager.channel_counts() == {}
    assert manager._by_id == {}
    assert manager._channels == {}
    assert manager._by_channel == {}
    assert manager._by_user == {}


def test_register_indexes_by_id_user_and_channel() -> None:
    manager = StreamSubscriberManager()
    a = make_subscriber("a", "u1")

    manager.register(a, ["user:u1", "workspace:w1"])

    assert len(manager) == 1
    assert manager.get("a") is a
    assert list(manager.get_by_user("u1")) == [a]
    assert list(manager.get_by_channel("user:u1")) == [a]
    assert list(manager.get_by_channel("workspace:w1")) == [a]
    assert manager.channels_of("a") == {"user:u1", "workspace:w1"}
    assert manager.count("workspace:w1") == 1
    assert manager.channel_counts() == {"user:u1": 1, "workspace:w1": 1}


def test_lookups_of_unknown_keys_are_empty() -> None:
    manager = StreamSubscriberManager()

    assert manager.get("nope") is None
    assert list(manager.get_by_user("nope")) == []
    assert list(manager.get_by_channel("workspace:nope")) == []
    assert manager.channels_of("nope") == frozenset()
    assert manager.count("workspace:nope") == 0
    assert_empty(manager)


def test_register_with_duplicate_channels_counts_each_once() -> None:
    manager = StreamSubscriberManager()

    manager.register(make_subscriber("a", "u1"), ["workspace:w1", "workspace:w1"])

    assert manager.count("workspace:w1") == 1


def test_register_twice_raises_and_changes_nothing() -> None:
    manager = StreamSubscriberManager()
    a = make_subscriber("a", "u1")
    manager.register(a, ["user:u1"])

    with pytest.raises(ValueError, match="subscriber a is already registered"):
        manager.register(make_subscriber("a", "u2"), ["user:u2", "workspace:w1"])

    assert manager.get("a") is a
    assert manager.channel_counts() == {"user:u1": 1}
    assert list(manager.get_by_user("u2")) == []


def test_several_subscribers_share_users_and_channels() -> None:
    manager = StreamSubscriberManager()
    a, b, c = make_subscriber("a", "u1"), make_subscriber("b", "u1"), make_subscriber("c", "u2")
    manager.register(a, ["user:u1", "workspace:w1"])
    manager.register(b, ["user:u1", "workspace:w1"])
    manager.register(c, ["user:u2", "workspace:w1", "workspace:w2"])

    assert {s.id for s in manager.get_by_user("u1")} == {"a", "b"}
    assert {s.id for s in manager.get_by_channel("workspace:w1")} == {"a", "b", "c"}
    assert manager.channel_counts() == {
        "user:u1": 2,
        "workspace:w1": 3,
        "user:u2": 1,
        "workspace:w2": 1,
    }


def test_unregister_removes_every_index_entry() -> None:
    manager = StreamSubscriberManager()
    a, b = make_subscriber("a", "u1"), make_subscriber("b", "u1")
    manager.register(a, ["user:u1", "workspace:w1"])
    manager.register(b, ["user:u1", "workspace:w2"])

    assert manager.unregister("a") is a

    assert manager.get("a") is None
    assert list(manager.get_by_user("u1")) == [b]
    assert manager.channel_counts() == {"user:u1": 1, "workspace:w2": 1}
    assert "workspace:w1" not in manager._by_channel

    assert manager.unregister("b") is b
    assert_empty(manager)


def test_unregister_unknown_returns_none() -> None:
    manager = StreamSubscriberManager()
    manager.register(make_subscriber("a", "u1"), ["user:u1"])

    assert manager.unregister("nope") is None
    assert len(manager) == 1


def test_unregister_twice_returns_none_the_second_time() -> None:
    manager = StreamSubscriberManager()
    manager.register(make_subscriber("a", "u1"), ["user:u1"])
    manager.unregister("a")

    assert manager.unregister("a") is None
    assert_empty(manager)


def test_add_channels_while_registered() -> None:
    manager = StreamSubscriberManager()
    a = make_subscriber("a", "u1")
    manager.register(a, ["user:u1"])

    manager.add_channels("a", ["workspace:w1", "user:u1"])

    assert manager.channels_of("a") == {"user:u1", "workspace:w1"}
    assert list(manager.get_by_channel("workspace:w1")) == [a]
    assert manager.count("user:u1") == 1


def test_add_channels_to_an_unknown_subscriber_raises_key_error() -> None:
    manager = StreamSubscriberManager()

    with pytest.raises(KeyError, match="nope"):
        manager.add_channels("nope", ["workspace:w1"])
    assert_empty(manager)


def test_remove_channels_drops_empty_channel_entries() -> None:
    manager = StreamSubscriberManager()
    manager.register(make_subscriber("a", "u1"), ["user:u1", "workspace:w1"])
    manager.register(make_subscriber("b", "u2"), ["user:u2", "workspace:w1"])

    manager.remove_channels("a", ["workspace:w1"])
    assert manager.count("workspace:w1") == 1
    manager.remove_channels("b", ["workspace:w1"])

    assert manager.channel_counts() == {"user:u1": 1, "user:u2": 1}
    assert "workspace:w1" not in manager._by_channel
    assert manager.channels_of("a") == {"user:u1"}


def test_remove_channels_ignores_unknown_subscribers_and_channels() -> None:
    manager = StreamSubscriberManager()
    manager.register(make_subscriber("a", "u1"), ["user:u1"])

    manager.remove_channels("nope", ["user:u1"])
    manager.remove_channels("a", ["workspace:w9"])

    assert manager.channel_counts() == {"user:u1": 1}


def test_subscriber_with_no_channels_is_still_found_by_user() -> None:
    manager = StreamSubscriberManager()
    a = make_subscriber("a", "u1")
    manager.register(a, [])

    assert list(manager.get_by_user("u1")) == [a]
    assert manager.channel_counts() == {}
    manager.unregister("a")
    assert_empty(manager)


# StreamSubscriberManager against a model

IDS = st.sampled_from(["a", "b", "c", "d"])
USERS = st.sampled_from(["u1", "u2", "u3"])
CHANNELS = st.lists(
    st.sampled_from(["user:u1", "user:u2", "workspace:w1", "workspace:w2", "workspace:w3"]),
    max_size=4,
)


class ManagerMachine(RuleBasedStateMachine):
    """Random register/unregister/add/remove sequences checked against a plain model."""

    def __init__(self) -> None:
        super().__init__()
        self.manager = StreamSubscriberManager()
        self.subscribers: dict[str, Subscriber] = {}
        self.channels: dict[str, set[str]] = {}

    @rule(subscriber_id=IDS, user_id=USERS, channels=CHANNELS)
    def register(self, subscriber_id: str, user_id: str, channels: list[str]) -> None:
        subscriber = make_subscriber(subscriber_id, user_id)
        if subscriber_id in self.subscribers:
            with pytest.raises(ValueError, match="already registered"):
                self.manager.register(subscriber, channels)
            return
        self.manager.register(subscriber, channels)
        self.subscribers[subscriber_id] = subscriber
        self.channels[subscriber_id] = set(channels)

    @rule(subscriber_id=IDS)
    def unregister(self, subscriber_id: str) -> None:
        removed = self.manager.unregister(subscriber_id)
        assert removed is self.subscribers.pop(subscriber_id, None)
        self.channels.pop(subscriber_id, None)

    @rule(subscriber_id=IDS, channels=CHANNELS)
    def add_channels(self, subscriber_id: str, channels: list[str]) -> None:
        if subscriber_id not in self.subscribers:
            with pytest.raises(KeyError):
                self.manager.add_channels(subscriber_id, channels)
            return
        self.manager.add_channels(subscriber_id, channels)
        self.channels[subscriber_id].update(channels)

    @rule(subscriber_id=IDS, channels=CHANNELS)
    def remove_channels(self, subscriber_id: str, channels: list[str]) -> None:
        self.manager.remove_channels(subscriber_id, channels)
        if subscriber_id in self.channels:
            self.channels[subscriber_id].difference_update(channels)

    @invariant()
    def indexes_match_the_model(self) -> None:
        manager = self.manager
        assert len(manager) == len(self.subscribers)
        expected_by_channel: dict[str, set[str]] = {}
        for subscriber_id, channels in self.channels.items():
            assert manager.get(subscriber_id) is self.subscribers[subscriber_id]
            assert manager.channels_of(subscriber_id) == channels
            for channel in channels:
                expected_by_channel.setdefault(channel, set()).add(subscriber_id)
        assert manager.channel_counts() == {c: len(s) for c, s in expected_by_channel.items()}
        for channel, ids in expected_by_channel.items():
            assert {s.id for s in manager.get_by_channel(channel)} == ids
            assert manager.count(channel) == len(ids)
        expected_by_user: dict[str, set[str]] = {}
        for subscriber in self.subscribers.values():
            expected_by_user.setdefault(subscriber.user_id, set()).add(subscriber.id)
        assert {u: {s.id for s in subs.values()} for u, subs in manager._by_user.items()} == (
            expected_by_user
        )
        assert all(manager._by_channel.values())
        assert all(manager._by_user.values())

    def teardown(self) -> None:
        for subscriber_id in list(self.subscribers):
            assert self.manager.unregister(subscriber_id) is self.subscribers.pop(subscriber_id)
        assert_empty(self.manager)


TestManagerAgainstModel = ManagerMachine.TestCase
TestManagerAgainstModel.settings = settings(max_examples=200, stateful_step_count=40)


# Subscriber: keep-alive and commit times


PING = b": ping\n\n"


async def test_ping_is_queued_only_to_a_subscriber_idle_since_the_last_ping() -> None:
    subscriber = Subscriber("s1", "alice", max_buffer_bytes=1024)
    async with frames_of(subscriber) as frames:
        assert offer(subscriber, FRAME)
        assert subscriber.ping(PING)  # busy since the last ping: nothing queued
        assert await next_chunk(frames) == FRAME
        assert subscriber.ping(PING)  # idle since the last call
        assert await next_chunk(frames) == PING
        assert subscriber.ping(PING)  # the keep-alive itself counts as sent: nothing queued
        assert subscriber.ping(PING)
        assert await next_chunk(frames) == PING


def test_ping_into_a_full_buffer_reports_a_slow_consumer() -> None:
    subscriber = Subscriber("s1", "alice", max_buffer_bytes=len(FRAME) + 3)
    assert offer(subscriber, FRAME)
    assert subscriber.ping(PING)  # clears the busy mark
    assert not subscriber.ping(PING)
    assert subscriber.buffered_bytes == len(FRAME)


async def test_a_chunk_carries_the_commit_time_of_its_oldest_event() -> None:
    subscriber = Subscriber("s1", "alice", max_buffer_bytes=1024)
    async with frames_of(subscriber) as frames:
        offer(subscriber, FRAME, committed_at=100.0)
        offer(subscriber, FRAME, committed_at=101.0)
        await next_chunk(frames)
        assert subscriber.chunk_committed_at == 100.0
        subscriber.ping(PING)
        subscriber.ping(PING)
        await next_chunk(frames)
        assert subscriber.chunk_committed_at == 0.0  # a keep-alive carries no event


# Subscriber: direct writes to an idle writer


async def settle() -> None:
    """Let the tasks started so far run until they wait (a few loop turns)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_frame_for_an_idle_writer_goes_straight_to_write_now_in_order() -> None:
    subscriber = Subscriber("s1", "alice", max_buffer_bytes=1024)
    written: list[tuple[bytes, float]] = []
    subscriber.write_now = lambda frame, committed_at: written.append((frame, committed_at))
    async with frames_of(subscriber) as frames:
        assert offer(subscriber, b"a\n\n", 1.0)  # the writer has not started: queued
        assert await next_chunk(frames) == b"a\n\n"
        waiting = asyncio.ensure_future(next_chunk(frames))
        await settle()  # the writer parks, nothing queued
        assert offer(subscriber, b"b\n\n", 2.0)
        assert offer(subscriber, b"c\n\n", 3.0)
        assert written == [(b"b\n\n", 2.0), (b"c\n\n", 3.0)]
        assert subscriber.buffered_bytes == 0 and not waiting.done()
        subscriber.write_now = None  # the socket is full: queue again
        assert offer(subscriber, b"d\n\n", 4.0)
        assert await waiting == b"d\n\n"
        assert subscriber.chunk_committed_at == 4.0
    assert subscriber.sent_since_ping


async def test_frames_queued_before_a_direct_write_keep_their_order() -> None:
    subscriber = Subscriber("s1", "alice", max_buffer_bytes=1024)
    written: list[bytes] = []
    subscriber.write_now = lambda frame, committed_at: written.append(frame)
    async with frames_of(subscriber) as frames:
        waiting = asyncio.ensure_future(next_chunk(frames))
        await settle()
        subscriber.close("shutdown")  # queues the close frame and wakes the writer
        assert await waiting == encode_close("shutdown")
    assert written == []


async def test_a_full_buffer_is_first_handed_to_an_idle_writer() -> None:
    subscriber = Subscriber("s1", "alice", max_buffer_bytes=2 * len(FRAME))
    written: list[bytes] = []
    subscriber.write_now = lambda frame, committed_at: written.append(frame)
    async with frames_of(subscriber) as frames:
        waiting = asyncio.ensure_future(next_chunk(frames))
        await settle()
        assert subscriber.queue(FRAME) and subscriber.queue(FRAME)  # queued, not yet flushed
        assert written == []
        assert subscriber.queue(FRAME)  # full: the two queued go to the socket first
        assert written == [FRAME + FRAME] and subscriber.buffered_bytes == len(FRAME)
        subscriber.write_now = None  # a busy writer: a full buffer is a slow consumer
        assert subscriber.queue(FRAME)
        assert not subscriber.queue(FRAME)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting


def test_a_stream_from_a_prefetch_cursor_skips_what_the_prefetch_saw_until_past_its_horizon() -> (
    None
):
    subscriber = Subscriber("c1", "u1", max_buffer_bytes=1024)
    subscriber.after = 10
    subscriber.snapshot = PrefetchSnapshot(100, 110, frozenset({103}))
    seen = make_event(seq=11, xid=105)
    unseen = make_event(seq=12, xid=103)
    shared = encode_change(unseen)

    assert subscriber.frame_for(seen, encode_change(seen)) is None
    own = subscriber.frame_for(unseen, shared)
    assert own is not None and b"id: 000000000000000c-100:110:103\n" in own
    subscriber.after = 12
    assert subscriber.cursor == "000000000000000c-100:110:103"

    later = make_event(seq=13, xid=110)  # began after the snapshot: nothing later was seen by it
    assert subscriber.frame_for(later, encode_change(later)) == encode_change(later)
    assert subscriber.snapshot is None
    assert subscriber.cursor == "000000000000000c"
