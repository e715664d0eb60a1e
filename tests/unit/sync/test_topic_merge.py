"""`TopicMerge` (sync/topic_merge.py): a reader's topics merged back into position order.

`Simulation` plays every side of the channel bus around one merge: Postgres (the outbox, its
head and its retention watermark), the relay (`sync.bus_channels.ChannelBus.publish`: one
message per topic naming the topic's previous position, then a tick per node) and the
reader's connection to each node (what it hears, SSUBSCRIBE confirmations, drops and
reconnections). Messages and ticks can be lost on the way; the merge is driven exactly as
`ChannelBus._take` and `ChannelBus._step` drive it. The guarantee checked: the released
events are exactly those of the subscribed topics past each topic's `since`, each once, in
position order, whatever was lost.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.channels import user_channel, workspace_channel
from core.events import Event
from core.types import ChannelKey
from sync.topic_merge import Release, TopicMerge
from sync.topics import topics_of
from tests.factories import event_at

U1, U2 = user_channel("u1"), user_channel("u2")
W1, W2 = workspace_channel("w1"), workspace_channel("w2")


def in_workspace(seq: int, workspace: str = "w1") -> Event:
    """A `stream_event` of `workspace`: on its topic only."""
    return event_at(seq, workspace_id=workspace)


def for_user(seq: int, user: str = "u1", workspace: str = "w1") -> Event:
    """A `membership` event naming `user`: on the user's topic only."""
    return event_at(
        seq,
        type="membership.updated",
        resource_type="membership",
        action="update",
        workspace_id=workspace,
        stream_id=None,
        user_id=user,
    )


def naming_user(seq: int, user: str = "u1", workspace: str = "w1") -> Event:
    """A `stream` event naming `user`: on the user's topic and the workspace's."""
    return event_at(
        seq,
        type="stream.updated",
        resource_type="stream",
        action="update",
        entity_id=f"s-{seq}",
        workspace_id=workspace,
        stream_id=f"s-{seq}",
        user_id=user,
    )


# -- the simulation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A topic message as `ChannelBus._take` decodes it."""

    topic: ChannelKey
    prev: int | None
    events: tuple[Event, ...]


@dataclass(frozen=True)
class Tick:
    """A node's tick: the batch covers `(start, upto]`; `last` per topic of the node."""

    node: int
    start: int
    upto: int
    last: Mapping[ChannelKey, int]


@dataclass(frozen=True)
class Listen:
    """`sync.shards.Listening`: the node confirmed SSUBSCRIBE of `topics`."""

    node: int
    topics: frozenset[ChannelKey]
    whole: bool


@dataclass(frozen=True)
class Drop:
    """`sync.shards.Lost`: the connection to the node dropped."""

    node: int


Item = Message | Tick | Listen | Drop


@dataclass(frozen=True)
class Read:
    """One Postgres read of the reader: `topics` over `(low, high]`, at release `released`."""

    kind: str
    topics: tuple[ChannelKey, ...]
    low: int
    high: int
    released: int


@dataclass
class Connection:
    """The reader's subscription connection to one node."""

    up: bool = True
    wanted: set[ChannelKey] = field(default_factory=set)
    held: set[ChannelKey] = field(default_factory=set)
    """Channels whose SSUBSCRIBE the node confirmed: it sends their messages."""
    asked: set[ChannelKey] = field(default_factory=set)
    """Channels whose SSUBSCRIBE is sent, not yet confirmed."""


class Simulation:
    """Postgres, a relay and one reader of `nodes` nodes around a `TopicMerge` after 0.

    `outbox`: every event that will ever be committed, in increasing position order;
    `node_of`: the node of each topic. Nothing is committed or published at first; each node
    is connected with no topic (its first `Listening`, whole, is queued).
    """

    def __init__(
        self, outbox: Sequence[Event], node_of: Mapping[ChannelKey, int], nodes: int = 1
    ) -> None:
        self.outbox = list(outbox)
        self.node_of = dict(node_of)
        self.head = 0
        self.pruned = 0
        self.published = 0
        self.relay_prev: dict[ChannelKey, int] = {}
        self.merge = TopicMerge(0, nodes)
        self.nodes = [Connection() for _ in range(nodes)]
        self.queue: list[Item] = [Listen(n, frozenset(), True) for n in range(nodes)]
        self.since: dict[ChannelKey, int] = {}
        self.released: list[Event] = []
        self.upto = 0
        """Where the last release ended."""
        self.reads: list[Read] = []
        self.losses: list[tuple[int, int]] = []
        self.during_read: Callable[[], None] | None = None
        """Run once during the next Postgres read: what other tasks do while the reader
        awaits it (`ChannelBus.subscribe` and `unsubscribe` are called from them)."""

    # Postgres and the relay

    def commit(self, upto: int) -> None:
        """Commit every event up to position `upto` (the outbox head moves there)."""
        self.head = max(self.head, upto)

    def publish(
        self,
        upto: int | None = None,
        lose: Iterable[ChannelKey] = (),
        lose_ticks: Iterable[int] = (),
    ) -> None:
        """Publish the committed events past the relay's position (up to `upto`) as one
        batch, as `ChannelBus.publish` does; the messages of `lose` and the ticks of the
        nodes `lose_ticks` are lost, and a node whose connection is down hears nothing."""
        limit = self.head if upto is None else min(upto, self.head)
        events = [e for e in self.outbox if self.published < e.seq <= limit]
        if not events:
            return
        by_topic: dict[ChannelKey, list[Event]] = {}
        for event in events:
            for topic in topics_of(event):
                by_topic.setdefault(topic, []).append(event)
        lost, ticks_lost = set(lose), set(lose_ticks)
        for node, connection in enumerate(self.nodes):
            mine = {t: es for t, es in by_topic.items() if self.node_of[t] == node}
            for topic, topic_events in mine.items():
                if connection.up and topic in connection.held and topic not in lost:
                    prev = self.relay_prev.get(topic)
                    self.queue.append(Message(topic, prev, tuple(topic_events)))
            if connection.up and node not in ticks_lost:
                last = {t: es[-1].seq for t, es in mine.items()}
                self.queue.append(Tick(node, self.published, events[-1].seq, last))
        for topic, topic_events in by_topic.items():
            self.relay_prev[topic] = topic_events[-1].seq
        self.published = events[-1].seq

    def take_over(self, start: int) -> None:
        """A new relay takes over from position `start` (maybe before what was published):
        it republishes from there, and knows no topic's previous position."""
        self.relay_prev.clear()
        self.published = start

    # the reader's subscriptions and connections

    def subscribe(self, topic: ChannelKey, after: int | None = None) -> int:
        """`ChannelBus.subscribe` of one topic from `after` (the release position by default,
        as the dispatcher's position is); its SSUBSCRIBE is sent if the node is up."""
        known = topic in self.merge
        node = self.node_of[topic]
        since = self.merge.subscribe(topic, node, self.merge.released if after is None else after)
        if not known:
            self.since[topic] = since
            connection = self.nodes[node]
            connection.wanted.add(topic)
            if connection.up:
                connection.asked.add(topic)
        return since

    def unsubscribe(self, topic: ChannelKey) -> None:
        """`ChannelBus.unsubscribe` of one topic (its SUNSUBSCRIBE takes effect at once)."""
        self.merge.unsubscribe(topic)
        self.since.pop(topic, None)
        connection = self.nodes[self.node_of[topic]]
        for channels in (connection.wanted, connection.held, connection.asked):
            channels.discard(topic)

    def confirm(self, topic: ChannelKey) -> None:
        """The node confirms the SSUBSCRIBE of `topic`, if one was sent."""
        node = self.node_of[topic]
        connection = self.nodes[node]
        if connection.up and topic in connection.asked:
            connection.asked.discard(topic)
            connection.held.add(topic)
            self.queue.append(Listen(node, frozenset((topic,)), False))

    def confirm_all(self) -> None:
        """Every SSUBSCRIBE sent is confirmed."""
        for connection in self.nodes:
            for topic in sorted(connection.asked):
                self.confirm(topic)

    def drop(self, node: int) -> None:
        """The connection to `node` drops: it hears nothing until `reconnect`."""
        connection = self.nodes[node]
        if connection.up:
            connection.up = False
            connection.held.clear()
            connection.asked.clear()
            self.queue.append(Drop(node))

    def reconnect(self, node: int) -> None:
        """The connection to `node` is opened again, subscribing every wanted channel in one
        command (a whole `Listening`)."""
        connection = self.nodes[node]
        if not connection.up:
            connection.up = True
            connection.held = set(connection.wanted)
            self.queue.append(Listen(node, frozenset(connection.wanted), True))

    # the reader

    def take(self) -> None:
        """Hand every queued item to the merge, as `ChannelBus._take_all` does."""
        items, self.queue = self.queue, []
        merge = self.merge
        for item in items:
            if isinstance(item, Message):
                merge.on_message(item.topic, item.prev, item.events)
            elif isinstance(item, Tick):
                merge.on_tick(item.node, item.start, item.upto, dict(item.last))
            elif isinstance(item, Listen):
                merge.listening(item.node, item.topics, item.whole)
            else:
                merge.lost(item.node)

    def step(self) -> None:
        """`take`, then one `ChannelBus._step`: settle, fill the gaps, release. A step the
        merge was not `ready()` for must read nothing and release no event: the channel bus
        skips it (it only moves the position, later)."""
        self.take()
        merge = self.merge
        if not merge.ready():
            reads, released = len(self.reads), len(self.released)
            self._step()
            assert len(self.reads) == reads, "a step that was not ready read Postgres"
            assert len(self.released) == released, "a step that was not ready released events"
            return
        self._step()

    def _step(self) -> None:
        merge = self.merge
        topics, nodes = merge.to_settle()
        if topics or nodes:
            low = merge.settle_from(topics, nodes)
            head = self.head
            events = self.read("settle", topics, low, head) if topics else []
            if self.pruned > low:
                return self.lost(low)
            merge.settle(topics, nodes, head, events)
        bound = merge.bound()
        while (due := merge.fills(bound)) is not None:
            gap_topics, low = due
            events = self.read("fill", gap_topics, low, bound)
            if self.pruned > low:
                return self.lost(low)
            merge.filled(gap_topics, bound, events)
            bound = min(bound, merge.bound())
        self.check(merge.release(min(bound, merge.bound())))

    def read(self, kind: str, topics: Sequence[ChannelKey], low: int, high: int) -> list[Event]:
        """`sync.outbox.read_topics`: the committed events of `topics` in `(low, high]`."""
        assert high <= self.head, f"a {kind} read up to {high}, past the head {self.head}"
        self.reads.append(Read(kind, tuple(sorted(topics)), low, high, self.merge.released))
        if self.during_read is not None:
            action, self.during_read = self.during_read, None
            action()
        wanted = set(topics)
        return [e for e in self.outbox if low < e.seq <= high and wanted & set(topics_of(e))]

    def lost(self, low: int) -> None:
        """`ChannelBus._lost`: events after `low` were pruned before they were read."""
        self.losses.append((low, self.pruned))
        skipped = self.merge.release(max(self.merge.bound(), self.pruned))
        if skipped is not None:
            self.upto = skipped.upto

    def check(self, release: Release | None) -> None:
        """Keep a release's events, checking it follows the previous one in order."""
        if release is None:
            return
        positions = [e.seq for e in release.events]
        assert positions == sorted(set(positions)), positions
        assert all(release.prev < p <= release.upto for p in positions), release
        assert release.prev == self.upto, (release, self.upto)
        self.released.extend(release.events)
        self.upto = release.upto

    # what was released

    def positions(self) -> list[int]:
        """The positions of every event released so far, in release order."""
        return [e.seq for e in self.released]

    def expected(self) -> list[int]:
        """The positions of every committed event of a subscribed topic past its `since`,
        up to the release position: what `positions()` must be."""
        return [
            e.seq
            for e in self.outbox
            if e.seq <= self.merge.released
            and any(t in self.since and e.seq > self.since[t] for t in topics_of(e))
        ]

    def fills(self) -> list[Read]:
        """The gap fills read so far."""
        return [r for r in self.reads if r.kind == "fill"]


ONE_NODE = {U1: 0, U2: 0, W1: 0, W2: 0}
TWO_NODES = {U1: 0, U2: 0, W1: 1, W2: 1}


def settled(sim: Simulation, *topics: ChannelKey) -> Simulation:
    """`sim` with `topics` subscribed, confirmed and settled."""
    for topic in topics:
        sim.subscribe(topic)
    sim.confirm_all()
    sim.step()
    return sim


def run(
    sim: Simulation, upto: int, lose: Iterable[ChannelKey] = (), lose_ticks: Iterable[int] = ()
) -> None:
    """Commit up to `upto`, publish it as one batch (`lose` and `lose_ticks` as in
    `Simulation.publish`), then one reader step."""
    sim.commit(upto)
    sim.publish(upto, lose, lose_ticks)
    sim.step()


# -- TopicMerge -----------------------------------------------------------------------------


def test_a_merge_needs_a_node() -> None:
    with pytest.raises(ValueError, match="a merge needs at least one node, got 0"):
        TopicMerge(0, 0)


def test_subscribe_registers_a_topic_once_on_its_node() -> None:
    merge = TopicMerge(5, 2)

    assert merge.subscribe(W1, 1, 3) == 5
    assert merge.subscribe(U1, 0, 9) == 9
    assert merge.subscribe(W1, 1, 20) == 5

    assert W1 in merge and U1 in merge and W2 not in merge
    assert sorted(merge.topics) == [U1, W1]
    assert merge.topics_of_node(1) == [W1]


def test_in_order_delivery_releases_every_event_once_with_no_fill() -> None:
    outbox = [in_workspace(1), for_user(2), naming_user(3), in_workspace(4), for_user(5, "u2")]
    sim = settled(Simulation(outbox, ONE_NODE), U1, W1)

    for upto in (2, 3, 5):
        run(sim, upto)

    assert sim.positions() == [1, 2, 3, 4]
    assert sim.merge.released == 5
    assert sim.fills() == []


def test_ready_only_for_a_settle_a_fill_or_an_event_up_to_the_bound() -> None:
    merge = TopicMerge(0, 1)
    merge.subscribe(U1, 0, 0)
    assert not merge.ready()  # not yet confirmed: nothing to settle
    merge.listening(0, [U1], whole=True)
    assert merge.ready()  # its node resyncs and the topic settles
    merge.settle(*merge.to_settle(), 0, [])
    assert not merge.ready()

    merge.on_tick(0, 0, 4, {})
    assert merge.bound() == 4 and not merge.ready()  # only the position would move
    merge.on_message(U1, None, [for_user(6)])
    assert not merge.ready()  # heard, but past the bound
    merge.on_tick(0, 4, 6, {U1: 6})
    assert merge.ready()
    merge.release(merge.bound())
    merge.on_tick(0, 6, 9, {U1: 8})  # its message up to 8 was lost
    assert merge.ready()


def test_a_lost_message_is_found_by_the_ticks_last_and_filled() -> None:
    outbox = [in_workspace(1), for_user(2), in_workspace(3)]
    sim = settled(Simulation(outbox, ONE_NODE), U1, W1)
    sim.commit(3)
    sim.publish(lose=[W1])
    sim.take()

    assert sim.merge.fills(sim.merge.bound()) == ([W1], 0)
    sim.step()
    assert sim.positions() == [1, 2, 3]
    assert sim.fills() == [Read("fill", (W1,), 0, 3, 0)]


def test_a_lost_message_is_found_by_the_next_messages_prev() -> None:
    outbox = [in_workspace(1), in_workspace(2), in_workspace(3), in_workspace(4)]
    sim = settled(Simulation(outbox, ONE_NODE), W1)
    run(sim, 1)
    sim.commit(3)
    sim.publish(2, lose=[W1], lose_ticks=[0])
    sim.publish(3, lose_ticks=[0])
    sim.take()

    assert sim.merge.fills(3) == ([W1], 1)  # no tick told yet: message 3 names prev 2
    run(sim, 4)
    assert sim.positions() == [1, 2, 3, 4]


def test_lost_messages_and_ticks_of_a_node_are_found_by_its_next_ticks_from() -> None:
    outbox = [in_workspace(1), for_user(2), in_workspace(3), for_user(4), in_workspace(5)]
    outbox += [for_user(6), for_user(7), for_user(8)]
    sim = settled(Simulation(outbox, TWO_NODES, nodes=2), U1, W1)
    run(sim, 2)
    sim.commit(6)
    sim.publish(4, lose=[W1], lose_ticks=[1])
    sim.publish(6, lose=[W1], lose_ticks=[1])
    sim.commit(8)
    sim.publish(8)  # no event of W1: only node 1's tick shows the loss
    sim.take()

    assert sim.merge.fills(8) == ([W1], 2)  # the tick's `from` 6 is past node 1's tick 2
    sim.step()
    assert sim.positions() == list(range(1, 9))


def test_a_relay_takeover_republishes_without_prev_and_nothing_is_doubled() -> None:
    outbox = [in_workspace(p) if p % 2 else for_user(p) for p in range(1, 8)]
    sim = settled(Simulation(outbox, ONE_NODE), U1, W1)
    run(sim, 3)
    sim.commit(5)
    sim.publish(5, lose=[W1], lose_ticks=[0])  # the old relay's last batch: half lost
    sim.take_over(2)
    sim.commit(7)
    sim.publish(7, lose=[U1])  # (2, 7] again, every prev None, the user's message lost
    sim.step()

    assert sim.positions() == list(range(1, 8))


def test_a_republished_batch_heard_twice_is_released_once() -> None:
    outbox = [in_workspace(1), naming_user(2), in_workspace(3)]
    sim = settled(Simulation(outbox, ONE_NODE), U1, W1)
    sim.commit(3)
    sim.publish(3)
    sim.take_over(0)
    sim.publish(3)
    sim.step()

    assert sim.positions() == [1, 2, 3]


def test_a_topic_subscribed_while_events_flow_gets_every_event_past_its_since() -> None:
    outbox = [
        in_workspace(1),
        for_user(2),
        in_workspace(3),  # published before the SSUBSCRIBE is confirmed: never heard
        for_user(4),
        in_workspace(5),  # published after the confirmation, before the reader's step
        for_user(6),
        in_workspace(7),  # committed before the settle, published after it
    ]
    sim = settled(Simulation(outbox, ONE_NODE), U1)
    run(sim, 2)
    assert sim.subscribe(W1) == 2

    run(sim, 4)
    assert sim.merge.released == 2  # W1 is not settled: nothing past its since
    sim.confirm(W1)
    sim.commit(7)
    sim.publish(6)
    sim.step()
    assert sim.positions() == [2, 3, 4, 5, 6]
    run(sim, 7)
    assert sim.positions() == [2, 3, 4, 5, 6, 7]
    assert sim.reads[-1] == Read("settle", (W1,), 2, 7, 2)


def test_release_never_passes_the_since_of_an_unsettled_topic() -> None:
    outbox = [for_user(p) if p % 3 else in_workspace(p) for p in range(1, 13)]
    sim = settled(Simulation(outbox, TWO_NODES, nodes=2), U1)
    run(sim, 2)
    assert sim.subscribe(W1) == 2

    for upto in (4, 6, 8):
        run(sim, upto)
        assert sim.merge.bound() == 2
        assert sim.merge.released == 2
    sim.drop(1)  # the node drops before confirming: the topic waits for the reconnection
    run(sim, 10)
    assert sim.merge.released == 2
    sim.reconnect(1)
    run(sim, 12)

    assert sim.positions() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def test_a_node_reconnection_settles_its_topics_and_moves_its_tick_to_the_head() -> None:
    outbox = [in_workspace(p) if p % 2 else for_user(p) for p in range(1, 7)]
    sim = settled(Simulation(outbox, TWO_NODES, nodes=2), U1, W1, W2)
    run(sim, 2)
    sim.drop(1)
    run(sim, 4)
    run(sim, 6)
    assert sim.merge.released == 2  # node 1's tick stays at 2 while it is down

    sim.reconnect(1)
    sim.take()
    topics, nodes = sim.merge.to_settle()
    assert (sorted(topics), nodes) == ([W1, W2], {1})
    sim.step()  # no tick of node 1 past 2 ever came: its lost tail is read from Postgres

    assert sim.merge.ticks == [6, 6]
    assert sim.positions() == [1, 2, 3, 4, 5, 6]
    settle = sim.reads[-1]
    assert (settle.kind, settle.topics, settle.high) == ("settle", (W1, W2), 6)
    assert settle.low <= 2


def test_a_topic_settled_by_a_whole_confirmation_that_did_not_name_it_is_kept_by_ticks() -> None:
    outbox = [in_workspace(1), for_user(2), in_workspace(3), in_workspace(4), in_workspace(5)]
    sim = settled(Simulation(outbox, TWO_NODES, nodes=2), U1)
    sim.drop(1)
    sim.reconnect(1)  # names no channel
    sim.subscribe(W1)  # sent after the reconnection's command, not confirmed yet
    run(sim, 2)  # the node's resync settles W1 all the same
    assert sim.positions() == [1, 2]

    run(sim, 3)  # W1's message is not heard: the tick's `last` shows it
    assert sim.positions() == [1, 2, 3]
    assert sim.fills()[-1] == Read("fill", (W1,), 2, 3, 2)
    sim.confirm(W1)
    sim.commit(5)
    sim.publish(4, lose_ticks=[1])
    sim.publish(5)
    sim.step()
    assert sim.positions() == [1, 2, 3, 4, 5]


def test_unsubscribe_forgets_the_topic_and_its_gaps() -> None:
    outbox = [in_workspace(1), for_user(2), in_workspace(3), for_user(4)]
    sim = settled(Simulation(outbox, ONE_NODE), U1, W1)
    sim.commit(2)
    sim.publish(2, lose=[W1])
    sim.take()
    sim.unsubscribe(W1)
    sim.step()
    run(sim, 4)

    assert sim.positions() == [2, 4]
    assert sim.fills() == []
    assert W1 not in sim.merge and sim.merge.topics == [U1]


def test_events_heard_before_unsubscribe_are_still_released() -> None:
    outbox = [in_workspace(1), for_user(2)]
    sim = settled(Simulation(outbox, ONE_NODE), U1, W1)
    sim.commit(2)
    sim.publish(2)
    sim.take()
    sim.unsubscribe(W1)
    sim.step()

    assert sim.positions() == [1, 2]


def test_unsubscribing_an_unsettled_topic_lets_the_release_go_on() -> None:
    outbox = [for_user(1), for_user(2)]
    sim = settled(Simulation(outbox, ONE_NODE), U1)
    sim.subscribe(W1)
    run(sim, 2)
    assert sim.merge.released == 0

    sim.unsubscribe(W1)
    sim.step()
    assert sim.positions() == [1, 2]


def test_a_topic_subscribed_again_while_its_node_is_settled_keeps_its_lost_events() -> None:
    outbox = [for_user(1), for_user(2), for_user(3)]
    sim = settled(Simulation(outbox, TWO_NODES, nodes=2), U1, W1)
    sim.commit(3)
    sim.publish(1, lose=[U1])  # U1's gap (0, 1]; node 1's tick 1 holds the release at 0
    sim.publish(3, lose_ticks=[1])
    sim.drop(0)
    sim.reconnect(0)  # node 0 is settled after its tick 3

    def again() -> None:
        sim.unsubscribe(U1)
        assert sim.subscribe(U1) == 0
        sim.confirm(U1)

    sim.during_read = again  # while the reader awaits the settle's read of node 0
    sim.step()
    sim.drop(1)
    sim.reconnect(1)
    sim.step()  # node 1's tick moves to the head: the release may reach 3

    assert sim.merge.released == 3
    assert sim.positions() == [1, 2, 3]


# -- reads never reach before the release position ----------------------------------------
#
# Every event before the release position was released or is of no subscribed topic, so a
# read from there is wasted and, worse, `ChannelBus._step` takes `pruned_through > low` for
# events pruned before they were read (`ChannelBus._lost`) although retention only pruned
# events released long ago: a quiet topic keeps the `seen` of its last event (or of its
# subscription) however far the release moves.


def quiet_user() -> Simulation:
    """U1 (quiet since its subscription) and W1 settled, W1's events 1..10 released, and
    retention past position 5 (released long ago)."""
    outbox = [*(in_workspace(p) for p in range(1, 11)), for_user(11), in_workspace(12)]
    sim = settled(Simulation(outbox, ONE_NODE), U1, W1)
    for upto in range(1, 11):
        run(sim, upto)
    assert sim.positions() == list(range(1, 11))
    sim.pruned = 5
    return sim


def test_a_reconnection_reads_a_quiet_topic_from_the_release_position() -> None:
    sim = quiet_user()
    sim.drop(0)
    sim.reconnect(0)
    sim.step()
    run(sim, 12)

    assert sim.losses == []
    assert all(r.low >= r.released for r in sim.reads), sim.reads
    assert sim.positions() == list(range(1, 13))


def test_a_lost_message_of_a_quiet_topic_is_read_from_the_release_position() -> None:
    sim = quiet_user()
    run(sim, 11, lose=[U1])
    run(sim, 12)

    assert sim.losses == []
    assert all(r.low >= r.released for r in sim.reads), sim.reads
    assert sim.positions() == list(range(1, 13))


# -- the guarantee, under random loss ------------------------------------------------------

USERS = ("u1", "u2", "u3")
WORKSPACES = ("w1", "w2")
TOPICS = (*(user_channel(u) for u in USERS), *(workspace_channel(w) for w in WORKSPACES))
KINDS: dict[str, Callable[[int, str, str], Event]] = {
    "workspace": lambda seq, _user, workspace: in_workspace(seq, workspace),
    "user": for_user,
    "stream": naming_user,
}

Op = tuple[str, int, frozenset[ChannelKey], frozenset[int]]


@dataclass(frozen=True)
class Scenario:
    """An outbox (its last event committed and published only at the end), the node of
    each topic, the topics subscribed at first, and what happens meanwhile."""

    outbox: list[Event]
    nodes: int
    node_of: dict[ChannelKey, int]
    initial: frozenset[ChannelKey]
    ops: list[Op]


OP_NAMES = ["publish"] * 4 + ["step"] * 3 + ["commit", "subscribe", "confirm", "confirm"]
OP_NAMES += ["drop", "reconnect", "take_over", "subscribe_while_reading"]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    kinds = st.tuples(
        st.sampled_from(sorted(KINDS)),
        st.sampled_from(USERS),
        st.sampled_from(WORKSPACES),
        st.integers(1, 2),
    )
    outbox, position = [], 0
    for kind, user, workspace, step in draw(st.lists(kinds, min_size=2, max_size=30)):
        position += step
        outbox.append(KINDS[kind](position, user, workspace))
    nodes = draw(st.integers(1, 3))
    node_of = {t: draw(st.integers(0, nodes - 1)) for t in TOPICS}
    initial = draw(st.frozensets(st.sampled_from(TOPICS), min_size=1))
    ops = st.tuples(
        st.sampled_from(OP_NAMES),
        st.integers(0, len(TOPICS) - 1),
        st.frozensets(st.sampled_from(TOPICS), max_size=2),
        st.frozensets(st.integers(0, nodes - 1), max_size=1),
    )
    return Scenario(outbox, nodes, node_of, initial, draw(st.lists(ops, min_size=5, max_size=40)))


def position_after(sim: Simulation, position: int, count: int) -> int:
    """The position `count` events after `position`, short of the outbox's last event."""
    later = [e.seq for e in sim.outbox[:-1] if e.seq > position]
    if count == 0 or not later:
        return position
    return later[min(count, len(later)) - 1]


def position_before(sim: Simulation, position: int, count: int) -> int:
    """The position `count` events before `position` (0 before the first event)."""
    earlier = [0, *(e.seq for e in sim.outbox if e.seq <= position)]
    return earlier[max(0, len(earlier) - 1 - count)]


def subscriber(sim: Simulation, topic: ChannelKey) -> Callable[[], None]:
    """What subscribes `topic` in `sim` when called."""

    def subscribe() -> None:
        sim.subscribe(topic)

    return subscribe


def play(sim: Simulation, op: Op) -> None:
    """One step of a scenario."""
    name, number, topics, nodes = op
    topic = TOPICS[number]
    node = number % len(sim.nodes)
    if name == "commit":
        sim.commit(position_after(sim, sim.head, number))
    elif name == "publish":
        upto = position_after(sim, sim.published, number + 1)
        sim.commit(upto)
        sim.publish(upto, lose=topics, lose_ticks=nodes)
    elif name == "take_over":
        sim.take_over(position_before(sim, sim.published, number))
    elif name == "subscribe":
        sim.subscribe(topic)
    elif name == "subscribe_while_reading":
        sim.during_read = subscriber(sim, topic)
    elif name == "confirm":
        sim.confirm(topic)
    elif name == "drop":
        sim.drop(node)
    elif name == "reconnect":
        sim.reconnect(node)
    else:
        sim.step()


def finish(sim: Simulation) -> None:
    """Every connection up and SSUBSCRIBE confirmed, then the last event committed and
    published with no loss: every tick reaches it."""
    sim.during_read = None
    for node in range(len(sim.nodes)):
        sim.reconnect(node)
    sim.confirm_all()
    sim.step()
    run(sim, sim.outbox[-1].seq)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_released_events_are_those_of_the_subscribed_topics_past_since_under_loss(
    scenario: Scenario,
) -> None:
    sim = Simulation(scenario.outbox, scenario.node_of, scenario.nodes)
    for topic in sorted(scenario.initial):
        sim.subscribe(topic)
    for op in scenario.ops:
        play(sim, op)
    finish(sim)

    assert sim.merge.released == scenario.outbox[-1].seq
    assert sim.positions() == sim.expected()
    assert sim.losses == []
