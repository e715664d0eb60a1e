"""Per-event access check cost in the gateway at 1 k and at 100 k stream memberships.

Two gateway states of the same shape are built in memory, through the same calls the gateway
uses (`AccessCache.install` of one `Snapshot` per connected user, `StreamSubscriberManager`,
`Dispatcher`): `--subscribers` connected users in workspace `w0`, one connection each on its
workspace channel, plus 500 other connected users in 10 other workspaces. Only the number of
stream memberships held in the `AccessState` differs (`--small` vs `--large`): the memberships
beyond a fixed core are spread round-robin, 20 members per private stream, half over the `w0`
users (with the defaults, their own sets grow from 1.4 to 100 memberships on average) and half
over the other users, which also adds streams to every workspace.

The event mix is the same in both states, four kinds in turn, all routed to `w0`'s channel:
a message in a public stream, a message in a private stream (40 % of the users are members),
a message in an `inherit` thread three levels below a private stream (40 % members: the check
climbs three parents), and a workspace-only event. Measured for both states:

- (a) `core.access.can_receive` per (event, connected `w0` user) pair, in ns;
- (b) `Dispatcher.dispatch` of a batch, per delivered frame, in ns (routing, access checks,
  encoding once per event, `Subscriber.queue`; the flush after it is not timed);
- the memory allocated to build the access state (`tracemalloc`), in MiB.

The baseline is the `--small` state measured in the same invocation: the runs alternate between
the two states and each figure is the best (lowest) of `--runs` runs of `--repeat` batches,
after one warm-up run, with the garbage collector paused while timing (as `timeit` does).
Subscribers have buffers that never fill and are drained between batches, outside the timing.

    .venv/bin/python -m bench.access_check [--subscribers 500] [--small 1000] [--large 100000]
"""

import argparse
import asyncio
import contextlib
import gc
import os
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import asyncpg

from core.access import AccessState, StreamInfo, UserAccess, can_receive
from core.channels import user_channel, workspace_channel
from core.events import Event
from sync.access_cache import AccessCache, Snapshot
from sync.bus_memory import InProcessBus
from sync.dispatcher import Dispatcher
from sync.subscribers import StreamSubscriberManager, Subscriber

WORKSPACE = "w0"
PUBLIC_STREAM = "w0-public"
PRIVATE_STREAM = "w0-private"
ROOM_STREAM = "w0-room"
THREAD_STREAM = "w0-room-t3"
"""An `inherit` stream three levels below `ROOM_STREAM` (t3 -> t2 -> t1 -> room)."""

OTHER_WORKSPACES = 10
OTHER_USERS_PER_WORKSPACE = 50
MEMBERS_PER_STREAM = 20
MAX_BUFFER_BYTES = 1 << 40
"""Per-subscriber buffer limit in bytes: never reached, so no subscriber is cut off."""

KINDS: dict[str, str | None] = {
    "public stream": PUBLIC_STREAM,
    "private stream": PRIVATE_STREAM,
    "inherit thread, depth 3": THREAD_STREAM,
    "workspace only": None,
}
"""The event mix: kind -> the `stream_id` its events carry (None: workspace-scoped only)."""


@dataclass(slots=True)
class Gateway:
    """One gateway's in-memory state: access cache, subscribers and dispatcher.

    `users` are the ids of the connected `w0` users (the fan-out targets); `memberships` and
    `streams` count what the access state holds; `state_bytes` is the memory allocated to
    build it (tracemalloc, bytes); `samples` collects one `Sample` per timed run.
    """

    label: str
    cache: AccessCache
    manager: StreamSubscriberManager
    dispatcher: Dispatcher
    subscribers: list[Subscriber]
    users: list[str]
    memberships: int
    streams: int
    state_bytes: int
    samples: list["Sample"] = field(default_factory=list)


@dataclass(slots=True)
class Sample:
    """One run over one gateway: elapsed ns and counts, per event kind and for dispatch."""

    check_ns: dict[str, int]
    check_pairs: dict[str, int]
    allowed: int
    dispatch_ns: int
    delivered: int


def _private(stream_id: str, workspace_id: str) -> StreamInfo:
    return StreamInfo(stream_id, workspace_id, "private", None)


def _core_streams(users: dict[str, UserAccess], w0_users: Sequence[str]) -> dict[str, StreamInfo]:
    """`w0`'s event streams, and their memberships: 40 % of the users in the private stream
    and 40 % (overlapping by half) in the room the thread inherits from."""
    streams = {
        PUBLIC_STREAM: StreamInfo(PUBLIC_STREAM, WORKSPACE, "public", None),
        PRIVATE_STREAM: _private(PRIVATE_STREAM, WORKSPACE),
        ROOM_STREAM: _private(ROOM_STREAM, WORKSPACE),
    }
    parent = ROOM_STREAM
    for depth in (1, 2, 3):
        stream_id = f"{ROOM_STREAM}-t{depth}"
        streams[stream_id] = StreamInfo(stream_id, WORKSPACE, "inherit", parent)
        parent = stream_id
    for index, user_id in enumerate(w0_users):
        if index % 5 in (0, 1):
            users[user_id].streams.add(PRIVATE_STREAM)
        if index % 5 in (1, 2):
            users[user_id].streams.add(ROOM_STREAM)
    return streams


def _spread(
    users: dict[str, UserAccess],
    members: Sequence[str],
    streams: dict[str, StreamInfo],
    workspace_id: str,
    count: int,
) -> None:
    """Add `count` memberships of `members` in new private streams of `workspace_id`:
    membership j goes to member j mod len(members) in stream j // MEMBERS_PER_STREAM."""
    for j in range(count):
        stream_id = f"{workspace_id}-s{j // MEMBERS_PER_STREAM}"
        if stream_id not in streams:
            streams[stream_id] = _private(stream_id, workspace_id)
        users[members[j % len(members)]].streams.add(stream_id)


def layout(
    memberships: int, subscribers: int
) -> tuple[dict[str, UserAccess], dict[str, dict[str, StreamInfo]]]:
    """Users (id -> access) and streams (workspace id -> stream id -> stream) holding exactly
    `memberships` stream memberships. Raises ValueError when `memberships` is below the fixed
    core (the event streams' members) or `subscribers` is below `MEMBERS_PER_STREAM`."""
    if subscribers < MEMBERS_PER_STREAM:
        raise ValueError(f"need at least {MEMBERS_PER_STREAM} subscribers, got {subscribers}")
    w0_users = [f"u{i}" for i in range(subscribers)]
    users = {u: UserAccess(u, workspaces={WORKSPACE: "active"}) for u in w0_users}
    streams = {WORKSPACE: _core_streams(users, w0_users)}
    filler = memberships - sum(len(users[u].streams) for u in w0_users)
    if filler < 0:
        raise ValueError(f"memberships must be >= {memberships - filler}, got {memberships}")
    _spread(users, w0_users, streams[WORKSPACE], WORKSPACE, filler // 2)
    others = filler - filler // 2
    for k in range(OTHER_WORKSPACES):
        ws = f"w{k + 1}"
        members = [f"{ws}-u{i}" for i in range(OTHER_USERS_PER_WORKSPACE)]
        users.update({u: UserAccess(u, workspaces={ws: "active"}) for u in members})
        streams[ws] = {}
        share = others // OTHER_WORKSPACES + (1 if k < others % OTHER_WORKSPACES else 0)
        _spread(users, members, streams[ws], ws, share)
    return users, streams


def build_cache(memberships: int, subscribers: int) -> tuple[AccessCache, int]:
    """An access cache holding `layout(...)`, installed one connected user at a time as the
    gateway does, and the memory allocated to build it (bytes, tracemalloc).
    Raises RuntimeError if an install is refused."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = AccessCache()
    users, streams = layout(memberships, subscribers)
    for user in users.values():
        held = {ws: streams[ws] for ws in user.active_workspaces()}
        if not cache.install(Snapshot(0, user, held), ()):
            raise RuntimeError(f"install of user {user.user_id} was refused")
    del users, streams
    gc.collect()
    held_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return cache, held_bytes


def build_gateway(label: str, memberships: int, subscribers: int) -> Gateway:
    """A gateway with one connection per tracked user on its user and workspace channels.

    `Dispatcher.dispatch` never touches the pool (only `start`, `fill` and `process` read
    Postgres), so none is given."""
    cache, state_bytes = build_cache(memberships, subscribers)
    manager = StreamSubscriberManager()
    connections = []
    for user_id in cache.state.users:
        subscriber = Subscriber(f"c-{user_id}", user_id, max_buffer_bytes=MAX_BUFFER_BYTES)
        channels = [user_channel(user_id), *map(workspace_channel, cache.channels_of(user_id))]
        manager.register(subscriber, channels)
        connections.append(subscriber)
    no_pool = cast(asyncpg.Pool, None)
    dispatcher = Dispatcher(InProcessBus(), no_pool, manager, cache)
    state = cache.state
    return Gateway(
        label=label,
        cache=cache,
        manager=manager,
        dispatcher=dispatcher,
        subscribers=connections,
        users=[f"u{i}" for i in range(subscribers)],
        memberships=sum(len(user.streams) for user in state.users.values()),
        streams=sum(len(streams) for streams in state.streams.values()),
        state_bytes=state_bytes,
    )


def make_batch(size: int, first_seq: int) -> list[Event]:
    """`size` events, one transaction each, from `first_seq` on, cycling through `KINDS`."""
    kinds = list(KINDS.values())
    batch = []
    for i in range(size):
        stream_id = kinds[i % len(kinds)]
        seq = first_seq + i
        resource = "stream_event" if stream_id is not None else "label"
        batch.append(
            Event(
                seq=seq,
                xid=seq,
                type=f"{resource}.created",
                resource_type=resource,
                action="create",
                entity_id=f"e{seq}",
                workspace_id=WORKSPACE,
                stream_id=stream_id,
                user_id=None,
                actor_id="u0",
                data=f'{{"text":"benchmark message","n":{seq}}}',
                tx=None,
                access=None,
                created_at="2026-11-22T10:00:00.000000Z",
                committed_at=0.0,
            )
        )
    return batch


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the garbage collector off for the block (as `timeit` does)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def time_checks(state: AccessState, users: Sequence[str], events: Sequence[Event]) -> Sample:
    """`can_receive` over every (event, user) pair, timed per event kind."""
    sample = Sample({}, {}, 0, 0, 0)
    for kind, stream_id in KINDS.items():
        of_kind = [e for e in events if e.stream_id == stream_id]
        allowed = 0
        start = time.perf_counter_ns()
        for event in of_kind:
            for user_id in users:
                if can_receive(state, user_id, event):
                    allowed += 1
        sample.check_ns[kind] = time.perf_counter_ns() - start
        sample.check_pairs[kind] = len(of_kind) * len(users)
        sample.allowed += allowed
    return sample


async def drained(subscribers: Sequence[Subscriber], max_rounds: int = 1_000) -> None:
    """Yield to the loop until every subscriber's buffer has been taken by its reader.
    Raises RuntimeError if that takes more than `max_rounds` passes of the loop."""
    for _ in range(max_rounds):
        if not any(s.buffered_bytes for s in subscribers):
            return
        await asyncio.sleep(0)
    raise RuntimeError(f"subscribers not drained after {max_rounds} loop passes")


async def measure(gateway: Gateway, batch_size: int, repeat: int) -> Sample:
    """One run of `repeat` fresh batches (positions past the dispatcher's): for each, time the
    access checks of every (event, `w0` user) pair, then time its dispatch, then drain the
    subscribers (untimed)."""
    dispatcher = gateway.dispatcher
    sample = Sample({kind: 0 for kind in KINDS}, {kind: 0 for kind in KINDS}, 0, 0, 0)
    for _ in range(repeat):
        batch = make_batch(batch_size, dispatcher.position + 1)
        with gc_paused():
            checks = time_checks(gateway.cache.state, gateway.users, batch)
        for kind in KINDS:
            sample.check_ns[kind] += checks.check_ns[kind]
            sample.check_pairs[kind] += checks.check_pairs[kind]
        sample.allowed += checks.allowed
        delivered = dispatcher.delivered
        with gc_paused():
            start = time.perf_counter_ns()
            dispatcher.dispatch(batch)
            sample.dispatch_ns += time.perf_counter_ns() - start
        sample.delivered += dispatcher.delivered - delivered
        await drained(gateway.subscribers)
    return sample


async def _read_frames(subscriber: Subscriber) -> None:
    async for _ in subscriber.frames():
        pass


def _per_pair(sample: Sample, kinds: Sequence[str]) -> float:
    return sum(sample.check_ns[k] for k in kinds) / sum(sample.check_pairs[k] for k in kinds)


def _best(samples: Sequence[Sample], kinds: Sequence[str]) -> float:
    return min(_per_pair(s, kinds) for s in samples)


def _best_dispatch(samples: Sequence[Sample]) -> float:
    return min(s.dispatch_ns / s.delivered for s in samples)


def _same_work(gateways: Sequence[Gateway]) -> None:
    """Both states must allow and deliver exactly the same: the shapes are the same.
    Raises RuntimeError otherwise."""
    work = {(s.allowed, s.delivered) for g in gateways for s in g.samples}
    if len(work) != 1:
        raise RuntimeError(f"the states did different work (allowed, delivered): {work}")


def report(gateways: Sequence[Gateway], args: argparse.Namespace) -> None:
    """Print the summary table, the ratio row and the per-kind check costs."""
    small, large = gateways
    every = list(KINDS)
    print(
        f"access check cost, {len(small.users)} subscribers on one workspace channel, "
        f"batches of {args.batch} events, best of {args.runs} runs x {args.repeat} batches, "
        f"cpus {os.cpu_count()}"
    )
    print(f"{'state':<18}{'memberships':>12}{'streams':>9}{'users':>7}{'state MiB':>11}"
          f"{'check ns':>10}{'dispatch ns/frame':>19}")  # fmt: skip
    for g in gateways:
        runs = g.samples
        print(f"{g.label:<18}{g.memberships:>12,}{g.streams:>9,}{len(g.cache.state.users):>7,}"
              f"{g.state_bytes / 2**20:>11.2f}{_best(runs, every):>10.1f}"
              f"{_best_dispatch(runs):>19.1f}")  # fmt: skip
    ratio_check = _best(large.samples, every) / _best(small.samples, every)
    ratio_dispatch = _best_dispatch(large.samples) / _best_dispatch(small.samples)
    print(f"{'ratio large/small':<18}{large.memberships / small.memberships:>12.1f}"
          f"{large.streams / small.streams:>9.1f}{'':>7}"
          f"{large.state_bytes / small.state_bytes:>11.1f}{ratio_check:>10.2f}"
          f"{ratio_dispatch:>19.2f}")  # fmt: skip
    print()
    print(f"{'check ns by event kind':<26}{small.label:>15}{large.label:>15}{'ratio':>8}")
    for kind in KINDS:
        low, high = _best(small.samples, [kind]), _best(large.samples, [kind])
        print(f"{kind:<26}{low:>15.1f}{high:>15.1f}{high / low:>8.2f}")
    first = small.samples[0]
    pairs = sum(first.check_pairs.values())
    print(f"per run: {pairs:,} (event, subscriber) pairs checked, {first.allowed:,} allowed; "
          f"{first.delivered:,} frames delivered")  # fmt: skip


async def run(args: argparse.Namespace) -> None:
    """Build both gateways, warm up, alternate timed runs between them, print the results."""
    gateways = [
        build_gateway(f"{args.small:,} memb.", args.small, args.subscribers),
        build_gateway(f"{args.large:,} memb.", args.large, args.subscribers),
    ]
    readers = [asyncio.create_task(_read_frames(s)) for g in gateways for s in g.subscribers]
    try:
        for g in gateways:
            await measure(g, args.batch, 1)
        for index in range(args.runs):
            order = gateways if index % 2 == 0 else gateways[::-1]
            for g in order:
                g.samples.append(await measure(g, args.batch, args.repeat))
    finally:
        for g in gateways:
            for subscriber in g.subscribers:
                subscriber.close("shutdown")
        await asyncio.gather(*readers)
    _same_work(gateways)
    report(gateways, args)


def main() -> None:
    """Parse options and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=500, help="connected users in w0")
    parser.add_argument("--small", type=int, default=1_000, help="memberships, baseline")
    parser.add_argument("--large", type=int, default=100_000, help="memberships, compared")
    parser.add_argument("--batch", type=int, default=100, help="events per dispatched batch")
    parser.add_argument("--repeat", type=int, default=10, help="batches per run")
    parser.add_argument("--runs", type=int, default=7, help="runs per state (best is kept)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
