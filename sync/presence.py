"""Presence: who is online in each workspace, across every gateway replica (PROTOCOL.md §5).

A user is online in a workspace while at least one of their `/me/stream` connections is open on
some replica and they are an active member there. Each replica knows only its own connections
and the memberships of its own connected users, so presence is kept as *pairs* (workspace,
user) that each replica vouches for, and the workspace's online set is the union over replicas.

`PresenceBook` is that bookkeeping, with no I/O (the clock is passed in, so it is tested
without sleeping):

- `connected` / `disconnected` count this replica's open streams per user.
- `tick(now, active_workspaces)` works out the pairs this replica vouches for now and returns
  the change to announce to the other replicas: new pairs at once; a pair that lost its last
  connection (or its membership) only once it has stayed gone for `grace_s` seconds, so that a
  reconnect within the grace announces nothing (no flapping).
- `apply_remote` takes another replica's announcement; `replace_remote` takes every replica's
  full set (from their heartbeats: a replica whose heartbeat expired is dropped, and its users
  go offline unless another replica vouches for them).
- `diff(workspace)` is what changed in a workspace's online set since the last diff for it:
  called once per interval per workspace, it batches every change of the interval into one
  `event: presence` frame and drops the ones that cancel out.

Between replicas the book speaks `PresenceUpdate`s, numbered per replica (`seq`): a change
(`outgoing`, published at once) or the replica's whole set (`full_update`: its heartbeat, and
its announcement after the bus came back). Pub/sub and the heartbeat store are separate paths,
so a heartbeat read may be older than an announcement already applied; `receive` and
`apply_heartbeats` ignore what is older than the last update applied from that replica. A
connect need not wait for the next tick: `announce_new` announces the pairs of users connected
since the last tick.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

Pair = tuple[str, str]
"""(workspace id, user id): the user is online in that workspace."""


@dataclass(frozen=True, slots=True)
class Announcement:
    """A replica's change of the pairs it vouches for: `online` new, `offline` gone."""

    online: frozenset[Pair]
    offline: frozenset[Pair]

    def __bool__(self) -> bool:
        return bool(self.online or self.offline)


@dataclass(frozen=True, slots=True)
class WorkspaceDiff:
    """Users who came online and went offline in `workspace_id` since the last diff, sorted
    (the `data` of an `event: presence` frame, PROTOCOL.md §5)."""

    workspace_id: str
    online: tuple[str, ...]
    offline: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.online or self.offline)


@dataclass(frozen=True, slots=True)
class PresenceUpdate:
    """One replica's message to the others: the `seq`-th change of the pairs it vouches for
    (`online` new, `offline` gone), or, with `full`, every pair it vouches for in `online`
    (`offline` empty) as of its `seq`-th change. `seq` increases by one per change a replica
    makes, from 1; a replica is one process lifetime (a restart takes a new `replica` id).
    """

    replica: str
    seq: int
    online: frozenset[Pair]
    offline: frozenset[Pair] = frozenset()
    full: bool = False

    def encode(self) -> bytes:
        """JSON bytes: `{"replica", "seq", "full", "online": {workspace: [user, ...]},
        "offline": {...}}` (pairs grouped by workspace, sorted, to keep heartbeats small)."""
        return orjson.dumps(
            {
                "replica": self.replica,
                "seq": self.seq,
                "full": self.full,
                "online": _grouped(self.online),
                "offline": _grouped(self.offline),
            }
        )

    @classmethod
    def decode(cls, payload: bytes | str) -> "PresenceUpdate":
        """Inverse of `encode`. Raises ValueError for a payload that is not an encoded update
        (not JSON, a missing member, a member of the wrong type)."""
        body = orjson.loads(payload)
        if not isinstance(body, dict):
            raise ValueError(f"not a presence update: {type(body).__name__}")
        replica, seq, full = body.get("replica"), body.get("seq"), body.get("full")
        if not isinstance(replica, str) or not replica:
            raise ValueError(f"not a presence update: replica {replica!r}")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ValueError(f"not a presence update: seq {seq!r}")
        if not isinstance(full, bool):
            raise ValueError(f"not a presence update: full {full!r}")
        online, offline = _pairs(body.get("online")), _pairs(body.get("offline"))
        return cls(replica, seq, online, offline, full)


def _grouped(pairs: Iterable[Pair]) -> dict[str, list[str]]:
    by_workspace: dict[str, list[str]] = {}
    for workspace_id, user_id in sorted(pairs):
        by_workspace.setdefault(workspace_id, []).append(user_id)
    return by_workspace


def _pairs(grouped: Any) -> frozenset[Pair]:
    """The pairs of `{workspace: [user, ...]}`; ValueError for any other shape."""
    if not isinstance(grouped, dict):
        raise ValueError(f"not a presence update: pairs {type(grouped).__name__}")
    pairs: set[Pair] = set()
    for workspace_id, users in grouped.items():
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise ValueError(f"not a presence update: users of {workspace_id!r}")
        pairs.update((workspace_id, user_id) for user_id in users)
    return frozenset(pairs)


class PresenceBook:
    """The presence state of one replica, `replica` (module docstring).

    `grace_s`: seconds a pair stays announced after this replica stops vouching for it.
    """

    def __init__(self, replica: str, grace_s: float) -> None:
        self.replica = replica
        self.grace_s = grace_s
        self.seq = 0
        """Number of this replica's last change (`outgoing`)."""
        self._streams: dict[str, int] = {}  # user -> open streams on this replica
        self._fresh: set[str] = set()  # users connected since the last tick
        self._announced: set[Pair] = set()  # pairs this replica vouches for
        self._leaving: dict[Pair, float] = {}  # announced pairs no longer held -> since when
        self._remote: dict[str, set[Pair]] = {}  # other replica -> the pairs it vouches for
        self._seq_in: dict[str, int] = {}  # other replica -> seq of its last update applied
        self._heard: dict[str, float] = {}  # other replica -> when that update was applied
        self._online: dict[str, dict[str, int]] = {}  # workspace -> user -> replicas vouching
        self._sent: dict[str, frozenset[str]] = {}  # workspace -> online set of the last diff
        self._changed: set[str] = set()  # workspaces whose online set changed since `changed`

    def connected(self, user_id: str) -> None:
        """One more open stream of `user_id` on this replica."""
        self._streams[user_id] = self._streams.get(user_id, 0) + 1
        self._fresh.add(user_id)

    def disconnected(self, user_id: str) -> None:
        """One stream of `user_id` on this replica closed (ignored when none was open)."""
        left = self._streams.get(user_id, 0) - 1
        if left > 0:
            self._streams[user_id] = left
        else:
            self._streams.pop(user_id, None)

    def connected_users(self) -> int:
        """Users with at least one open stream on this replica."""
        return len(self._streams)

    def pair_count(self) -> int:
        """(workspace, user) pairs online on any replica, as this replica knows them."""
        return sum(len(users) for users in self._online.values())

    def tick(self, now: float, active_workspaces: Callable[[str], Iterable[str]]) -> Announcement:
        """Bring this replica's pairs up to date at `now` (seconds, any monotonic clock);
        `active_workspaces(user)` names the workspaces where `user` is an active member.
        Returns what to announce to the other replicas (possibly empty)."""
        self._fresh.clear()
        held = {(ws, user) for user in self._streams for ws in active_workspaces(user)}
        online = frozenset(held - self._announced)
        for pair in held:
            self._leaving.pop(pair, None)
        for pair in self._announced - held:
            self._leaving.setdefault(pair, now)
        offline = frozenset(
            pair for pair, since in self._leaving.items() if now - since >= self.grace_s
        )
        for pair in offline:
            del self._leaving[pair]
        self._announced = (self._announced | online) - offline
        self._vouch(online, offline)
        return Announcement(online, offline)

    def announce_new(self, active_workspaces: Callable[[str], Iterable[str]]) -> Announcement:
        """The pairs of the users connected since the last tick that are not announced yet
        (a reconnect within the grace has none), now vouched for: what a connect announces
        at once. Costs O(those users), where `tick` costs O(every connected user); pairs
        that left wait for the next tick."""
        fresh, self._fresh = self._fresh, set()
        held = {
            (ws, user) for user in fresh if user in self._streams for ws in active_workspaces(user)
        }
        for pair in held:
            self._leaving.pop(pair, None)
        online = frozenset(held - self._announced)
        self._announced |= online
        self._vouch(online, ())
        return Announcement(online, frozenset())

    def outgoing(self, change: Announcement) -> PresenceUpdate:
        """`change` as this replica's next numbered update (`seq` moves on by one)."""
        self.seq += 1
        return PresenceUpdate(self.replica, self.seq, change.online, change.offline)

    def full_update(self) -> PresenceUpdate:
        """Every pair this replica vouches for, as of its last change (its heartbeat)."""
        return PresenceUpdate(self.replica, self.seq, self.vouched(), full=True)

    def vouched(self) -> frozenset[Pair]:
        """Every pair this replica vouches for now (its heartbeat)."""
        return frozenset(self._announced)

    def apply_remote(self, replica: str, change: Announcement) -> None:
        """Take another replica's announcement (one of this replica's own is ignored)."""
        if replica == self.replica:
            return
        pairs = self._remote.setdefault(replica, set())
        online = change.online - pairs
        offline = change.offline & pairs
        pairs |= online
        pairs -= offline
        self._vouch(online, offline)

    def receive(self, update: PresenceUpdate, now: float) -> bool:
        """Take another replica's update, received at `now` (the clock of `tick`). Ignored,
        returning False: this replica's own, a change not newer than the last update applied
        from that replica, a full set older than it (a heartbeat read that an announcement
        overtook)."""
        replica = update.replica
        last = self._seq_in.get(replica)
        if replica == self.replica or (
            last is not None and (update.seq < last or (update.seq == last and not update.full))
        ):
            return False
        if update.full:
            self._set_remote(replica, set(update.online))
        else:
            self.apply_remote(replica, Announcement(update.online, update.offline))
        self._seq_in[replica] = update.seq
        self._heard[replica] = now
        return True

    def apply_heartbeats(self, heartbeats: Iterable[PresenceUpdate], read_since: float) -> None:
        """Take every live replica's full set (`full_update`), as read from the heartbeat
        store in a read that started at `read_since` (the clock of `tick`). A set older than
        the last update applied from its replica is ignored; a replica with no set is gone,
        and its pairs with it, unless an update of it was received since the read began (it
        announced before its first heartbeat was visible)."""
        live = {h.replica: h for h in heartbeats if h.replica != self.replica}
        for replica in set(self._remote) | set(self._seq_in) | set(live):
            heartbeat = live.get(replica)
            if heartbeat is None:
                if self._heard.get(replica, read_since - 1) < read_since:
                    self._drop(replica)
            elif heartbeat.seq >= self._seq_in.get(replica, heartbeat.seq):
                self._set_remote(replica, set(heartbeat.online))
                self._seq_in[replica] = heartbeat.seq

    def replace_remote(self, vouched: Mapping[str, Iterable[Pair]]) -> None:
        """Take the full sets of every live replica (this one's own entry is ignored); a
        replica missing from `vouched` is gone, and so are its pairs."""
        live = {r: set(p) for r, p in vouched.items() if r != self.replica}
        for replica in set(self._remote) | set(live):
            if replica in live:
                self._set_remote(replica, live[replica])
            else:
                self._drop(replica)

    def online(self, workspace_id: str) -> frozenset[str]:
        """Users online in `workspace_id` on any replica."""
        return frozenset(self._online.get(workspace_id, ()))

    def changed(self) -> set[str]:
        """The workspaces whose online set changed since the last call (a change that was
        undone counts too); only these can have a non-empty `diff`, or need a `forget`."""
        changed, self._changed = self._changed, set()
        return changed

    def diff(self, workspace_id: str) -> WorkspaceDiff:
        """What changed in `workspace_id`'s online set since the last call for it."""
        now = self.online(workspace_id)
        before = self._sent.get(workspace_id, frozenset())
        if now:
            self._sent[workspace_id] = now
        else:
            self._sent.pop(workspace_id, None)
        return WorkspaceDiff(workspace_id, tuple(sorted(now - before)), tuple(sorted(before - now)))

    def forget(self, workspace_id: str) -> None:
        """Stop diffing `workspace_id` (this replica has no subscriber there any more); the
        next diff for it starts from an empty set."""
        self._sent.pop(workspace_id, None)

    def _set_remote(self, replica: str, after: set[Pair]) -> None:
        """Make `after` the whole set `replica` vouches for."""
        before = self._remote.get(replica, set())
        self._vouch(after - before, before - after)
        if after:
            self._remote[replica] = after
        else:
            self._remote.pop(replica, None)

    def _drop(self, replica: str) -> None:
        """Forget a replica that is gone, and the pairs it vouched for."""
        self._set_remote(replica, set())
        self._seq_in.pop(replica, None)
        self._heard.pop(replica, None)

    def _vouch(self, online: Iterable[Pair], offline: Iterable[Pair]) -> None:
        for workspace_id, user_id in online:
            users = self._online.setdefault(workspace_id, {})
            count = users.get(user_id, 0)
            users[user_id] = count + 1
            if not count:
                self._changed.add(workspace_id)
        for workspace_id, user_id in offline:
            users = self._online.get(workspace_id, {})
            count = users.get(user_id, 0) - 1
            if count > 0:
                users[user_id] = count
            else:
                users.pop(user_id, None)
                self._changed.add(workspace_id)
                if not users:
                    self._online.pop(workspace_id, None)
