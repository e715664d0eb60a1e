"""One replica's topics merged back into one position order: the read side of the channel bus.

On the channel bus (`sync.bus_channels`) the relay publishes each batch as one message per
topic (`sync.topics`), each naming the topic's previous position (`prev`, None when the relay
does not know it: it took over, or forgot), then one tick per node (`{"from", "upto",
"last"}`: the batch covers positions `(from, upto]`, and `last` maps each topic of that node
to its last position in the batch). A replica hears only its topics' messages, on a
connection per node, and every tick. `TopicMerge` holds what it heard and releases, in
position order, everything up to the lowest tick of all nodes: by then every message of every
node up to that position has arrived or is known missing. Nothing is released past a gap;
gaps are filled from Postgres first (the caller runs `fills()` and hands the events to
`filled()`), so each released batch holds every event of the subscribed topics in its range,
once, however messages were lost:

- a tick whose `from` is past the node's last tick: ticks (and so messages) of that node were
  lost, e.g. its connection dropped or the shard restarted empty: every topic of the node is
  filled over the missing range;
- a topic whose `last` in a tick is past what arrived for it: that message was lost;
- a message whose `prev` is past what arrived for its topic: an earlier one was lost.

Subscribing a topic races no event (the handoff of `sync.catchup`, per topic): `subscribe`
registers it at `since` (the release position or later) and from then on nothing is released
past `since` until the topic is *settled*: its SSUBSCRIBE is confirmed (`listening`) and a
read of Postgres made after the confirmation (`settle`, with the head position of the outbox
read first) fills it from `since` to that head. A message published before the confirmation
was committed before it, so that read has it; one published after arrives live; duplicates
are dropped by position. A node's (re)connection settles all its topics the same way and
moves its tick to the head, so that a lost tail needs no later tick to show.

Pure state, no I/O: `sync.bus_channels` feeds it and runs its queries.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from core.events import Event
from core.types import ChannelKey


@dataclass(slots=True)
class _Topic:
    node: int
    since: int
    """Every event of the topic past this position is released (the subscribe contract)."""
    seen: int
    """Every event of the topic at or before this position has arrived or is in a gap."""
    settled: bool = False
    listening: bool = False


@dataclass(frozen=True, slots=True)
class Release:
    """Events of the subscribed topics in `(prev, upto]`, in position order (maybe none)."""

    prev: int
    upto: int
    events: tuple[Event, ...]


class TopicMerge:
    """The merge state of one reader of `nodes` nodes, starting after position `after`
    (see the module docstring). Raises ValueError for fewer than one node."""

    def __init__(self, after: int, nodes: int) -> None:
        if nodes < 1:
            raise ValueError(f"a merge needs at least one node, got {nodes}")
        self.released = after
        self.ticks = [after] * nodes
        self._topics: dict[ChannelKey, _Topic] = {}
        self._pending: dict[int, Event] = {}
        self._gaps: dict[ChannelKey, tuple[int, int]] = {}
        self._unsettled: set[ChannelKey] = set()
        self._resyncing: set[int] = set()
        self._settling: dict[ChannelKey, _Topic] = {}

    def __contains__(self, topic: object) -> bool:
        return topic in self._topics

    @property
    def topics(self) -> list[ChannelKey]:
        """Every subscribed topic."""
        return list(self._topics)

    def topics_of_node(self, node: int) -> list[ChannelKey]:
        """The subscribed topics whose channel is on `node`."""
        return [name for name, t in self._topics.items() if t.node == node]

    def subscribe(self, topic: ChannelKey, node: int, after: int) -> int:
        """Register `topic` (its channel on `node`) unless it is; returns its `since`: every
        event of the topic past it will be released (at least `after` for a new topic)."""
        known = self._topics.get(topic)
        if known is not None:
            return known.since
        since = max(self.released, after)
        self._topics[topic] = _Topic(node, since, since)
        self._unsettled.add(topic)
        return since

    def unsubscribe(self, topic: ChannelKey) -> None:
        """Forget `topic`; its events already heard are still released."""
        self._topics.pop(topic, None)
        self._gaps.pop(topic, None)
        self._unsettled.discard(topic)

    def listening(self, node: int, topics: Iterable[ChannelKey], whole: bool) -> None:
        """The node confirmed SSUBSCRIBE of `topics`; `whole` when that was the node's whole
        set, after a (re)connection: then every topic of the node is settled again."""
        if whole:
            self._resyncing.add(node)
        for name in topics:
            topic = self._topics.get(name)
            if topic is not None and topic.node == node:
                topic.listening = True

    def lost(self, node: int) -> None:
        """The connection to `node` dropped: what it would have sent meanwhile is lost."""
        for topic in self._topics.values():
            if topic.node == node:
                topic.listening = False
        self._resyncing.discard(node)

    def to_settle(self) -> tuple[list[ChannelKey], set[int]]:
        """Topics to settle now (listening, not settled, or on a node to resync) and those
        nodes; `settle` with the outbox read after the confirmation then closes them."""
        if not self._unsettled and not self._resyncing:
            return [], set()
        names = [n for n in self._unsettled if self._topics[n].listening]
        nodes = set(self._resyncing)
        if nodes:
            named = set(names)
            names += [n for n, t in self._topics.items() if t.node in nodes and n not in named]
        return names, nodes

    def settle(
        self, topics: Sequence[ChannelKey], nodes: Iterable[int], head: int, events: Iterable[Event]
    ) -> None:
        """Close `topics` with `events`: theirs read from Postgres over their open range up to
        `head` (the outbox's last position, read after their confirmation), and move the
        ticks of `nodes` (resynced) to `head`."""
        self._take(events)
        settling, self._settling = self._settling, {}
        for name in topics:
            topic = self._topics.get(name)
            if topic is None or settling.get(name, topic) is not topic:
                continue  # unsubscribed, or subscribed anew during the read: not this read's
            topic.seen = max(topic.seen, head)
            topic.settled = True
            self._unsettled.discard(name)
        for node in nodes:
            self.ticks[node] = max(self.ticks[node], head)
            self._resyncing.discard(node)

    def settle_from(self, topics: Sequence[ChannelKey], nodes: Iterable[int]) -> int:
        """The position after which `settle` must read `topics`: the lowest of their `seen`
        and of the ticks of `nodes`, but not before the release (everything of a settled
        topic up to it was released: a quiet topic's `seen` stays behind). Remembers the
        topics' subscriptions, so that `settle` leaves out one made anew meanwhile."""
        self._settling = {n: self._topics[n] for n in topics if n in self._topics}
        low = [topic.seen for topic in self._settling.values()]
        low += [self.ticks[node] for node in nodes]
        return max(min(low, default=self.released), self.released)

    def on_message(self, topic: ChannelKey, prev: int | None, events: Sequence[Event]) -> None:
        """One topic message: its events are kept; a `prev` past what arrived is a gap."""
        state = self._topics.get(topic)
        if state is None or not events:
            return
        if state.settled and prev is not None and prev > state.seen:
            self._gap(topic, state.seen, prev)
        self._take(events)
        if state.settled:
            state.seen = max(state.seen, events[-1].seq)

    def on_tick(self, node: int, start: int, upto: int, last: Mapping[ChannelKey, int]) -> None:
        """One tick of `node` covering `(start, upto]` with its topics' last positions."""
        tick = self.ticks[node]
        if upto > tick:
            self.ticks[node] = upto
        topics = self._topics
        if not topics:
            return
        if start > tick:
            for name, topic in topics.items():
                if topic.node == node and topic.settled:
                    self._gap(name, tick, start)
        for name, position in last.items():
            state = topics.get(name)
            if state is not None and state.settled and position > state.seen:
                self._gap(name, state.seen, position)
                state.seen = position

    def ready(self) -> bool:
        """True when a step has work: topics or nodes to settle (`to_settle`), or gaps or
        heard events at or below `bound()`."""
        # Each loop is guarded: a set or dict emptied after holding thousands of topics keeps
        # its table, and iterating it costs as much as when it was full.
        if self._resyncing:
            return True
        if self._unsettled and any(self._topics[n].listening for n in self._unsettled):
            return True
        bound = self.bound()
        if self._gaps and any(low < bound for low, _ in self._gaps.values()):
            return True
        return bool(self._pending) and min(self._pending) <= bound

    def bound(self) -> int:
        """The position up to which a release may go now: the lowest tick, and no further
        than the `since` of a topic not yet settled."""
        bound = min(self.ticks)
        if self._unsettled:
            bound = min(bound, *(self._topics[name].since for name in self._unsettled))
        return bound

    def fills(self, upto: int) -> tuple[list[ChannelKey], int] | None:
        """The gaps to fill before releasing up to `upto`: (their topics, the lowest position
        to read after, not before the release), or None when there is none below `upto`."""
        if not self._gaps:
            return None
        due = [name for name, (low, _) in self._gaps.items() if low < upto]
        if not due:
            return None
        return due, max(self.released, min(self._gaps[name][0] for name in due))

    def filled(self, topics: Sequence[ChannelKey], upto: int, events: Iterable[Event]) -> None:
        """The events of `topics` read from Postgres up to `upto`; their gaps end there."""
        self._take(events)
        for name in topics:
            gap = self._gaps.get(name)
            if gap is None:
                continue
            if gap[1] > upto:
                self._gaps[name] = (upto, gap[1])
            else:
                del self._gaps[name]

    def release(self, upto: int) -> Release | None:
        """Everything heard up to `upto` (at most `bound()`, gaps below it filled), in
        position order; None when `upto` is not past the last release."""
        if upto <= self.released:
            return None
        ready = sorted(p for p in self._pending if p <= upto)
        events = tuple(self._pending.pop(p) for p in ready)
        release = Release(self.released, upto, events)
        self.released = upto
        return release

    def _take(self, events: Iterable[Event]) -> None:
        released = self.released
        for event in events:
            if event.seq > released:
                self._pending[event.seq] = event

    def _gap(self, topic: ChannelKey, low: int, high: int) -> None:
        gap = self._gaps.get(topic)
        self._gaps[topic] = (low, high) if gap is None else (min(gap[0], low), max(gap[1], high))
