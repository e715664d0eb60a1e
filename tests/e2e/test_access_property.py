"""Access is always right: a real gateway against the SQL reference of PROTOCOL.md §2.

Each hypothesis example draws a stream model (1-2 workspaces, 5 users with active or invited
memberships, public and private channels, DMs, threads nested a few levels, now and then a chain
of 9-12 inheriting threads) and commits it without events. Then every user connects to one
real gateway (`userstream serve --with-relay`, Redis bus) from `now`, one of them with the
`system_role: "admin"` claim, and the example commits 5-15 transactions of 1-3 changes each:
messages, workspace-only and user-targeted events, stream joins and leaves, workspace additions,
activations and removals, visibility changes, threads promoted to channels and new streams
announced by `stream.created` alone; half of the transactions also carry a probe (one message
in every stream). Every change and its events share one transaction, with the scope columns of
PROTOCOL.md §1. Right after each commit `tests.reference_access.readers_of` records who may
receive each event of that transaction. Finally one user-targeted sentinel per user marks the
end; once each client has its sentinel, every user must have received exactly the events the
reference allows, in commit order.

Timing. Half of the transactions are committed while the relay is held back (`RelayBrake`), so
runs of them reach the gateway together, after all of them committed: the gateway then works
behind the database, as it does under relay or bus lag, and must still judge each event at its
own position.

Ids. Every example prefixes its ids (workspaces, users, streams, entities) with its own
`x<n>-`: a connection closed at the end of one example is released by the gateway a moment
later, and the next example's data, reset without events, must not meet that state.

The outbox is not truncated between examples: a gateway's `offset=now` position is the
outbox's largest `seq`, which must never move backwards under it.

Signals (PROTOCOL.md §5). Once every client has its sentinel (the gateway has applied every
change), each user sends, through `POST /me/ephemeral`, one signal to every stream and every
workspace of the model. Who may read each of these scopes now is asked of the reference by
committing one probe message per stream and one workspace-only event per workspace. A signal
must be accepted (202) exactly when its sender may read its scope (else 403), and reach
exactly the users who may, minus the sender. A marker signal per user (`POST /publish`,
`user_id` set) ends the wait: signals of one gateway arrive in the order sent.

The explicit examples are cases random search finds only now and then.
`USERSTREAM_PROPERTY_EXAMPLES` sets the number of drawn examples (default 200).
"""

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from asyncpg.transaction import Transaction as PgTransaction
from httpx_sse import aconnect_sse
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from core.cursors import format_cursor
from core.publish import OutboxEvent, publish, publish_many
from tests.e2e.harness import Gateway, Processes, StreamClient, bearer
from tests.reference_access import readers_of

WORKSPACES = ("w1", "w2")
USERS = ("u1", "u2", "u3", "u4", "u5")
ADMINS = frozenset({"u5"})
MAX_THREAD_DEPTH = 3
"""Parents a thread drawn outside a deep chain may have (a thread of a thread of a thread)."""
SENTINEL_TIMEOUT_S = 10.0
RELAY_HOLD_TIMEOUT_S = 5.0
EXAMPLES = int(os.environ.get("USERSTREAM_PROPERTY_EXAMPLES", "200"))

Namer = Callable[[str], str]
"""Prefixes a local id (`w1`, `u3`, `s7`) with the example's own `x<n>-`."""
Sql = tuple[str, tuple[object, ...]]


@dataclass
class StreamRow:
    """A `streams` row of the model; `kind` is its `stream_type` (channel, thread or dm)."""

    id: str
    workspace: str
    kind: str
    visibility: str
    parent: str | None


@dataclass
class Model:
    """The stream model as the drawn changes leave it, so that only valid changes are drawn.

    `memberships` maps (workspace, user) to a status; `members` maps (stream, user) to whether
    the user has left (`left_at` set).
    """

    workspaces: list[str] = field(default_factory=list)
    memberships: dict[tuple[str, str], str] = field(default_factory=dict)
    streams: dict[str, StreamRow] = field(default_factory=dict)
    members: dict[tuple[str, str], bool] = field(default_factory=dict)
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def new_id(self, kind: str) -> str:
        return f"{kind}{next(self.counter)}"

    def depth(self, stream_id: str) -> int:
        parent = self.streams[stream_id].parent
        return 0 if parent is None else 1 + self.depth(parent)

    def current_members(self) -> list[tuple[str, str]]:
        return sorted(key for key, left in self.members.items() if not left)


# Changes. Each has the SQL that makes it and the outbox events that announce it; ids are local
# (`s3`, `u1`) and prefixed by the example's `Namer` when written.

VERBS = {"created": "create", "updated": "update", "deleted": "delete"}


def outbox_event(
    n: Namer,
    type_: str,
    entity: str,
    workspace: str | None = None,
    stream: str | None = None,
    user: str | None = None,
) -> OutboxEvent:
    """The event `type_` (`<resource_type>.<verb>`, PROTOCOL.md §1) with its scope columns."""
    resource_type, verb = type_.split(".")

    def scoped(local: str | None) -> str | None:
        return n(local) if local is not None else None

    return OutboxEvent(
        type_,
        resource_type,
        VERBS[verb],
        n(entity),
        workspace_id=scoped(workspace),
        stream_id=scoped(stream),
        user_id=scoped(user),
    )


class Change:
    """One change of the stream model, or none (an event only)."""

    def sql(self, n: Namer) -> list[Sql]:
        return []

    def events(self, n: Namer) -> list[OutboxEvent]:
        raise NotImplementedError


@dataclass(frozen=True)
class Message(Change):
    id: str
    workspace: str
    stream: str

    def events(self, n: Namer) -> list[OutboxEvent]:
        return [outbox_event(n, "stream_event.created", self.id, self.workspace, self.stream)]


@dataclass(frozen=True)
class Probe(Change):
    """One message in each of `streams` ((workspace, stream) pairs): who can read what, over
    the whole model, at this position."""

    id: str
    streams: tuple[tuple[str, str], ...]

    def events(self, n: Namer) -> list[OutboxEvent]:
        return [
            outbox_event(n, "stream_event.created", f"{self.id}-{s}", w, s) for w, s in self.streams
        ]


@dataclass(frozen=True)
class WorkspaceEvent(Change):
    """A workspace-only event: `workspace.updated`, or one of a resource the gateway ignores."""

    id: str
    workspace: str
    workspace_updated: bool

    def events(self, n: Namer) -> list[OutboxEvent]:
        if self.workspace_updated:
            return [outbox_event(n, "workspace.updated", self.workspace, self.workspace)]
        return [outbox_event(n, "custom_emoji.created", self.id, self.workspace)]


@dataclass(frozen=True)
class UserEvent(Change):
    """An event for one user (rule 1), with or without a workspace and a stream."""

    id: str
    user: str
    workspace: str | None
    stream: str | None

    def events(self, n: Namer) -> list[OutboxEvent]:
        type_ = "notification.created"
        return [outbox_event(n, type_, self.id, self.workspace, self.stream, self.user)]


@dataclass(frozen=True)
class Join(Change):
    """A user joins a stream, or is added to it: a new row, or `left_at` cleared (`rejoin`)."""

    workspace: str
    stream: str
    user: str
    rejoin: bool

    def sql(self, n: Namer) -> list[Sql]:
        statement = REJOIN_STREAM if self.rejoin else JOIN_STREAM
        return [(statement, (n(self.stream), n(self.user)))]

    def events(self, n: Namer) -> list[OutboxEvent]:
        return [stream_member_event(n, "created", self.workspace, self.stream, self.user)]


@dataclass(frozen=True)
class Leave(Change):
    workspace: str
    stream: str
    user: str

    def sql(self, n: Namer) -> list[Sql]:
        return [(LEAVE_STREAM, (n(self.stream), n(self.user)))]

    def events(self, n: Namer) -> list[OutboxEvent]:
        return [stream_member_event(n, "deleted", self.workspace, self.stream, self.user)]


JOIN_STREAM = "INSERT INTO stream_members (stream_id, user_id) VALUES ($1, $2)"
REJOIN_STREAM = (
    "UPDATE stream_members SET left_at = NULL, joined_at = now()"
    " WHERE stream_id = $1 AND user_id = $2"
)
LEAVE_STREAM = "UPDATE stream_members SET left_at = now() WHERE stream_id = $1 AND user_id = $2"


def stream_member_event(n: Namer, verb: str, workspace: str, stream: str, user: str) -> OutboxEvent:
    type_ = f"stream_member.{verb}"
    return outbox_event(n, type_, f"{stream}:{user}", workspace, stream, user)


@dataclass(frozen=True)
class AddMember(Change):
    workspace: str
    user: str
    status: str

    def sql(self, n: Namer) -> list[Sql]:
        return [(ADD_MEMBER, (n(self.workspace), n(self.user), self.status))]

    def events(self, n: Namer) -> list[OutboxEvent]:
        return [membership_event(n, "created", self.workspace, self.user)]


@dataclass(frozen=True)
class Activate(Change):
    """An invited user accepts: status `invited` becomes `active`."""

    workspace: str
    user: str

    def sql(self, n: Namer) -> list[Sql]:
        return [(ACTIVATE_MEMBER, (n(self.workspace), n(self.user)))]

    def events(self, n: Namer) -> list[OutboxEvent]:
        return [membership_event(n, "updated", self.workspace, self.user)]


@dataclass(frozen=True)
class RemoveMember(Change):
    """A user is removed from a workspace; their stream memberships stay as they were."""

    workspace: str
    user: str

    def sql(self, n: Namer) -> list[Sql]:
        return [(REMOVE_MEMBER, (n(self.workspace), n(self.user)))]

    def events(self, n: Namer) -> list[OutboxEvent]:
        return [membership_event(n, "deleted", self.workspace, self.user)]


ADD_MEMBER = "INSERT INTO workspace_members (workspace_id, user_id, status) VALUES ($1, $2, $3)"
ACTIVATE_MEMBER = (
    "UPDATE workspace_members SET status = 'active' WHERE workspace_id = $1 AND user_id = $2"
)
REMOVE_MEMBER = "DELETE FROM workspace_members WHERE workspace_id = $1 AND user_id = $2"


def membership_event(n: Namer, verb: str, workspace: str, user: str) -> OutboxEvent:
    return outbox_event(n, f"membership.{verb}", f"{workspace}:{user}", workspace, user=user)


@dataclass(frozen=True)
class SetVisibility(Change):
    workspace: str
    stream: str
    visibility: str

    def sql(self, n: Namer) -> list[Sql]:
        return [(SET_VISIBILITY, (n(self.stream), self.visibility))]

    def events(self, n: Namer) -> list[OutboxEvent]:
        return [outbox_event(n, "stream.updated", self.stream, self.workspace, self.stream)]


@dataclass(frozen=True)
class Promote(Change):
    """A thread becomes a channel of its own: no parent, `public` or `private`."""

    workspace: str
    stream: str
    visibility: str

    def sql(self, n: Namer) -> list[Sql]:
        return [(PROMOTE, (n(self.stream), self.visibility))]

    def events(self, n: Namer) -> list[OutboxEvent]:
        return [outbox_event(n, "stream.updated", self.stream, self.workspace, self.stream)]


SET_VISIBILITY = "UPDATE streams SET visibility = $2 WHERE id = $1"
PROMOTE = (
    "UPDATE streams SET stream_type = 'channel', parent_stream_id = NULL, visibility = $2"
    " WHERE id = $1"
)


@dataclass(frozen=True)
class CreateStream(Change):
    """A stream created with its members in one transaction, announced by `stream.created`
    alone, or also by one `stream_member.created` per member (`announce_members`)."""

    stream: StreamRow
    members: tuple[str, ...]
    announce_members: bool

    def sql(self, n: Namer) -> list[Sql]:
        joins = [(JOIN_STREAM, (n(self.stream.id), n(user))) for user in self.members]
        return [insert_stream(self.stream, n), *joins]

    def events(self, n: Namer) -> list[OutboxEvent]:
        s = self.stream
        events = [outbox_event(n, "stream.created", s.id, s.workspace, s.id)]
        if self.announce_members:
            events += [
                stream_member_event(n, "created", s.workspace, s.id, u) for u in self.members
            ]
        return events


def insert_stream(stream: StreamRow, n: Namer) -> Sql:
    parent = n(stream.parent) if stream.parent is not None else None
    return (
        "INSERT INTO streams (id, workspace_id, stream_type, visibility, parent_stream_id)"
        " VALUES ($1, $2, $3, $4, $5)",
        (n(stream.id), n(stream.workspace), stream.kind, stream.visibility, parent),
    )


@dataclass(frozen=True)
class World:
    """The initial stream model: `memberships` (workspace, user, status), `streams` parents
    first, `members` (stream, user, left)."""

    workspaces: tuple[str, ...]
    memberships: tuple[tuple[str, str, str], ...]
    streams: tuple[StreamRow, ...]
    members: tuple[tuple[str, str, bool], ...]


@dataclass(frozen=True)
class Transaction:
    """Changes committed together; `relay_held`: committed while the relay is held back."""

    changes: tuple[Change, ...]
    relay_held: bool


@dataclass(frozen=True)
class Scenario:
    world: World
    transactions: tuple[Transaction, ...]

    def describe(self) -> str:
        lines = [f"workspaces {list(self.world.workspaces)}"]
        lines += [f"  membership {w} {u} {status}" for w, u, status in self.world.memberships]
        lines += [f"  {s}" for s in self.world.streams]
        lines += [
            f"  member {s} {u}{' (left)' if left else ''}" for s, u, left in self.world.members
        ]
        for i, tx in enumerate(self.transactions):
            held = " (relay held)" if tx.relay_held else ""
            lines.append(f"tx{i}{held}: " + "; ".join(map(repr, tx.changes)))
        return "\n".join(lines)


# Strategies.


def draw_stream(draw: st.DrawFn, model: Model, workspace: str) -> tuple[StreamRow, list[str]]:
    """A new stream of `workspace` (added to the model) and the users who are its members."""
    parents = [
        s.id
        for s in model.streams.values()
        if s.workspace == workspace and model.depth(s.id) < MAX_THREAD_DEPTH
    ]
    kinds = ["channel", "thread", "dm"] if parents else ["channel", "dm"]
    kind = draw(st.sampled_from(kinds))
    stream_id = model.new_id("s")
    if kind == "dm":
        stream = StreamRow(stream_id, workspace, "dm", "private", None)
        members = draw(st.lists(st.sampled_from(USERS), min_size=2, max_size=2, unique=True))
    else:
        parent = draw(st.sampled_from(parents)) if kind == "thread" else None
        choices = ["inherit", "private", "public"] if parent else ["public", "private"]
        stream = StreamRow(stream_id, workspace, kind, draw(st.sampled_from(choices)), parent)
        members = draw(st.lists(st.sampled_from(USERS), max_size=3, unique=True))
    model.streams[stream_id] = stream
    return stream, members


def draw_deep_chain(draw: st.DrawFn, model: Model, workspace: str) -> list[StreamRow]:
    """A channel and 9-12 threads each inheriting from the one before (PROTOCOL.md §2's limit
    is 10 parents)."""
    root = StreamRow(
        model.new_id("s"), workspace, "channel", draw(st.sampled_from(["private", "public"])), None
    )
    chain = [root]
    for _ in range(draw(st.integers(9, 12))):
        chain.append(StreamRow(model.new_id("s"), workspace, "thread", "inherit", chain[-1].id))
    for stream in chain:
        model.streams[stream.id] = stream
    return chain


@st.composite
def worlds(draw: st.DrawFn, model: Model) -> World:
    workspaces = list(WORKSPACES[: draw(st.integers(1, len(WORKSPACES)))])
    model.workspaces = workspaces
    streams: list[StreamRow] = []
    for workspace in workspaces:
        # Now and then nobody is active at first: the gateway holds none of its streams yet.
        statuses = draw(st.sampled_from([["active", "invited", None], ["invited", None]]))
        for user in USERS:
            status = draw(st.sampled_from(statuses))
            if status is not None:
                model.memberships[workspace, user] = status
        for _ in range(draw(st.integers(1, 5))):
            stream, members = draw_stream(draw, model, workspace)
            streams.append(stream)
            for user in members:
                model.members[stream.id, user] = stream.kind != "dm" and draw(st.booleans())
    if draw(st.integers(0, 3)) == 3:
        chain = draw_deep_chain(draw, model, draw(st.sampled_from(workspaces)))
        streams += chain
        for user in draw(st.lists(st.sampled_from(USERS), max_size=2, unique=True)):
            model.members[chain[0].id, user] = False
    return World(
        tuple(workspaces),
        tuple((w, u, s) for (w, u), s in model.memberships.items()),
        tuple(streams),
        tuple((s, u, left) for (s, u), left in model.members.items()),
    )


def draw_message(draw: st.DrawFn, model: Model) -> Change:
    stream = model.streams[draw(st.sampled_from(sorted(model.streams)))]
    return Message(model.new_id("m"), stream.workspace, stream.id)


def draw_workspace_event(draw: st.DrawFn, model: Model) -> Change:
    workspace = draw(st.sampled_from(model.workspaces))
    return WorkspaceEvent(model.new_id("e"), workspace, draw(st.booleans()))


def draw_user_event(draw: st.DrawFn, model: Model) -> Change:
    user = draw(st.sampled_from(USERS))
    where = draw(st.sampled_from([None, *sorted(model.streams), *model.workspaces]))
    if where in model.streams:
        return UserEvent(model.new_id("n"), user, model.streams[where].workspace, where)
    return UserEvent(model.new_id("n"), user, where, None)


def draw_join(draw: st.DrawFn, model: Model) -> Change:
    stream_id, user = draw(st.sampled_from(joinable(model)))
    rejoin = (stream_id, user) in model.members
    model.members[stream_id, user] = False
    return Join(model.streams[stream_id].workspace, stream_id, user, rejoin)


def joinable(model: Model) -> list[tuple[str, str]]:
    return [(s, u) for s in sorted(model.streams) for u in USERS if model.members.get((s, u), True)]


def draw_leave(draw: st.DrawFn, model: Model) -> Change:
    stream_id, user = draw(st.sampled_from(model.current_members()))
    model.members[stream_id, user] = True
    return Leave(model.streams[stream_id].workspace, stream_id, user)


def draw_add_member(draw: st.DrawFn, model: Model) -> Change:
    workspace, user = draw(st.sampled_from(addable(model)))
    status = draw(st.sampled_from(["active", "invited"]))
    model.memberships[workspace, user] = status
    return AddMember(workspace, user, status)


def addable(model: Model) -> list[tuple[str, str]]:
    return [(w, u) for w in model.workspaces for u in USERS if (w, u) not in model.memberships]


def draw_activate(draw: st.DrawFn, model: Model) -> Change:
    invited = sorted(k for k, status in model.memberships.items() if status == "invited")
    workspace, user = draw(st.sampled_from(invited))
    model.memberships[workspace, user] = "active"
    return Activate(workspace, user)


def draw_remove_member(draw: st.DrawFn, model: Model) -> Change:
    workspace, user = draw(st.sampled_from(sorted(model.memberships)))
    del model.memberships[workspace, user]
    return RemoveMember(workspace, user)


def draw_set_visibility(draw: st.DrawFn, model: Model) -> Change:
    stream = model.streams[draw(st.sampled_from(sorted(model.streams)))]
    choices = ["public", "private", "inherit"] if stream.parent else ["public", "private"]
    stream.visibility = draw(st.sampled_from([v for v in choices if v != stream.visibility]))
    return SetVisibility(stream.workspace, stream.id, stream.visibility)


def draw_promote(draw: st.DrawFn, model: Model) -> Change:
    stream = model.streams[draw(st.sampled_from(threads(model)))]
    stream.kind, stream.parent = "channel", None
    stream.visibility = draw(st.sampled_from(["public", "private"]))
    return Promote(stream.workspace, stream.id, stream.visibility)


def threads(model: Model) -> list[str]:
    return sorted(s.id for s in model.streams.values() if s.parent is not None)


def draw_create_stream(draw: st.DrawFn, model: Model) -> Change:
    stream, members = draw_stream(draw, model, draw(st.sampled_from(model.workspaces)))
    for user in members:
        model.members[stream.id, user] = False
    return CreateStream(stream, tuple(members), draw(st.booleans()))


CHANGES: list[tuple[Callable[[st.DrawFn, Model], Change], Callable[[Model], object]]] = [
    (draw_message, lambda m: m.streams),
    (draw_leave, Model.current_members),
    (draw_remove_member, lambda m: m.memberships),
    (draw_join, joinable),
    (draw_add_member, addable),
    (draw_activate, lambda m: "invited" in m.memberships.values()),
    (draw_set_visibility, lambda m: m.streams),
    (draw_promote, threads),
    (draw_create_stream, lambda m: True),
    (draw_workspace_event, lambda m: True),
    (draw_user_event, lambda m: True),
]
"""How to draw each kind of change, and when the model allows one (a truthy value)."""


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    model = Model()
    world = draw(worlds(model))
    transactions = []
    for _ in range(draw(st.integers(5, 15))):
        changes = []
        for _ in range(draw(st.integers(1, 3))):
            possible = [change for change, allowed in CHANGES if allowed(model)]
            changes.append(draw(st.sampled_from(possible))(draw, model))
        if draw(st.booleans()):
            streams = tuple((s.workspace, s.id) for s in model.streams.values())
            changes.append(Probe(model.new_id("p"), streams))
        transactions.append(Transaction(tuple(changes), draw(st.booleans())))
    return Scenario(world, tuple(transactions))


# Running a scenario against the gateway.


async def reset_and_seed(db: asyncpg.Connection, world: World, n: Namer) -> None:
    """Empty the stream-model tables and commit `world` (no outbox events).

    DELETE rather than TRUNCATE: TRUNCATE waits for an exclusive lock on each table, and takes
    tens of milliseconds where these few rows take one."""
    async with db.transaction():
        await db.execute("DELETE FROM workspaces")  # cascades to the other three tables
        await db.executemany(
            "INSERT INTO workspaces (id) VALUES ($1)", [(n(w),) for w in world.workspaces]
        )
        await db.executemany(
            "INSERT INTO workspace_members (workspace_id, user_id, status) VALUES ($1, $2, $3)",
            [(n(w), n(u), status) for w, u, status in world.memberships],
        )
        for stream in world.streams:
            statement, args = insert_stream(stream, n)
            await db.execute(statement, *args)
        await db.executemany(
            "INSERT INTO stream_members (stream_id, user_id, left_at)"
            " VALUES ($1, $2, CASE WHEN $3 THEN now() END)",
            [(n(s), n(u), left) for s, u, left in world.members],
        )


async def commit(db: asyncpg.Connection, changes: tuple[Change, ...], n: Namer) -> list[int]:
    """Make `changes` and publish their events in one transaction; the events' outbox ids."""
    async with db.transaction():
        for change in changes:
            for statement, args in change.sql(n):
                await db.execute(statement, *args)
        return await publish_many(db, [e for change in changes for e in change.events(n)])


Delivery = tuple[str, str, str]
"""What identifies a delivered change: (cursor, type, entity id)."""


async def deliveries(db: asyncpg.Connection, outbox_ids: list[int]) -> dict[int, Delivery]:
    rows = await db.fetch(
        "SELECT id, seq, type, entity_id FROM outbox WHERE id = ANY($1::bigint[])", outbox_ids
    )
    return {r["id"]: (format_cursor(r["seq"]), r["type"], r["entity_id"]) for r in rows}


@dataclass
class SharedClientStream(StreamClient):
    """A `StreamClient` whose connection goes through a shared `httpx.AsyncClient`: building
    one costs about 25 ms (its TLS context), and five per example would be most of the
    example's time."""

    http: httpx.AsyncClient | None = None

    async def _run(self) -> None:
        assert self.http is not None
        url = f"{self.url}/me/stream"
        async with aconnect_sse(self.http, "GET", url, headers=self.headers) as source:
            self.status = source.response.status_code
            async for event in source.aiter_sse():
                if event.event != "message" or event.data:  # WHATWG HTML §9.2.6
                    self.events.append(event)


@dataclass
class Run:
    """One example against the gateway: its clients and what the reference allows each user."""

    gateway: Gateway
    http: httpx.AsyncClient
    n: Namer
    clients: dict[str, SharedClientStream] = field(default_factory=dict)
    readers: dict[int, set[str]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)

    async def connect(self) -> None:
        for user in USERS:
            claims = {"system_role": "admin"} if user in ADMINS else {}
            headers = bearer(self.n(user), **claims)
            self.clients[user] = SharedClientStream(self.gateway.url, headers, http=self.http)
        await asyncio.gather(*(client.connect() for client in self.clients.values()))

    async def record(self, db: asyncpg.Connection, outbox_ids: list[int]) -> None:
        """Ask the reference who may receive the events just committed."""
        users = [self.n(u) for u in USERS]
        admins = [self.n(u) for u in ADMINS]
        self.readers.update(await readers_of(db, outbox_ids, users, admins))
        self.order += outbox_ids

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients.values()))


_RELAY_WAITING = """
SELECT count(*) FROM pg_stat_activity
 WHERE datname = current_database() AND wait_event_type = 'Lock'
   AND query LIKE '%UPDATE outbox_relay %'
"""


@dataclass
class RelayBrake:
    """Holds the relay back, so that the gateway is behind the database (as under relay or bus
    lag) and access must still be judged at each event's own position (PROTOCOL.md §2).

    `hold` takes a row lock on `outbox_relay` on its own connection, commits one event for a
    user nobody connects as, and waits (bounded) until the relay, having published that event,
    waits on the lock to record its position (`_SAVE_POSITION` in sync/relay.py). Transactions
    committed until `release` then reach the gateway together, after all of them committed.
    """

    conn: asyncpg.Connection
    n: Namer
    _lock: PgTransaction | None = None
    _holds: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    async def hold(self, db: asyncpg.Connection) -> None:
        if self._lock is not None:
            return
        self._lock = self.conn.transaction()
        await self._lock.start()
        await self.conn.execute("SELECT 1 FROM outbox_relay FOR UPDATE")
        wake = outbox_event(
            self.n, "notification.created", f"brake{next(self._holds)}", user="nobody"
        )
        async with db.transaction():
            await publish(db, wake)
        deadline = time.monotonic() + RELAY_HOLD_TIMEOUT_S
        while not await db.fetchval(_RELAY_WAITING):  # pg_stat_activity: outside the lock's tx
            assert time.monotonic() < deadline, "the relay did not reach the held lock"
            await asyncio.sleep(0.001)

    async def release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            await lock.rollback()


async def run_scenario(
    run: Run, db: asyncpg.Connection, brake: RelayBrake, scenario: Scenario
) -> None:
    n = run.n
    for tx in scenario.transactions:
        if tx.relay_held:
            await brake.hold(db)
        else:
            await brake.release()
        await run.record(db, await commit(db, tx.changes, n))
    await brake.release()
    sentinels = {user: f"sentinel-{user}" for user in USERS}
    events = [outbox_event(n, "notification.created", s, user=u) for u, s in sentinels.items()]
    async with db.transaction():
        outbox_ids = await publish_many(db, events)
    await run.record(db, outbox_ids)
    for user, client in run.clients.items():
        await client.wait_for(has_change(client, n(sentinels[user])), SENTINEL_TIMEOUT_S)


def has_change(client: StreamClient, entity_id: str) -> Callable[[], bool]:
    """Whether `client` has received a change of `entity_id`."""
    return lambda: any(change["entityId"] == entity_id for change in client.changes())


async def check(run: Run, db: asyncpg.Connection) -> None:
    """Every user received exactly what the reference allows, in commit order."""
    delivered = await deliveries(db, run.order)
    ordered = sorted(run.order, key=lambda i: delivered[i][0])
    prefix = run.n("")
    failures = []
    for user, client in run.clients.items():
        expected = [delivered[i] for i in ordered if run.n(user) in run.readers[i]]
        got = [(c["cursor"], c["type"], c["entityId"]) for c in client.changes()]
        if got != expected:
            shown = [
                [f"{kind} {entity.replace(prefix, '')}" for _, kind, entity in events]
                for events in (expected, got)
            ]
            failures.append(f"user {user}:\n  expected {shown[0]}\n  got      {shown[1]}")
    assert not failures, "\n".join(failures)


# Signals: judged like a change of the same scope, as of now (PROTOCOL.md §5).

PUBLISH_TOKEN = "publish-secret-for-the-access-property"
SIGNAL_TIMEOUT_S = 10.0

Scope = tuple[str, str | None]
"""A signal's scope: (workspace, stream) or (workspace, None), local ids."""


def scopes_of(scenario: Scenario) -> list[Scope]:
    """Every stream the scenario ever has (none is deleted), then every workspace."""
    streams = [(s.workspace, s.id) for s in scenario.world.streams]
    for tx in scenario.transactions:
        streams += [
            (c.stream.workspace, c.stream.id) for c in tx.changes if isinstance(c, CreateStream)
        ]
    return [*streams, *((w, None) for w in scenario.world.workspaces)]


async def readers_now(
    run: Run, db: asyncpg.Connection, scopes: list[Scope]
) -> dict[Scope, set[str]]:
    """Who may read each scope now, by the reference: one probe change per scope."""
    n = run.n
    events = [
        outbox_event(n, "stream_event.created", f"final-{w}-{s}", w, s)
        if s is not None
        else outbox_event(n, "custom_emoji.created", f"final-{w}", w)
        for w, s in scopes
    ]
    async with db.transaction():
        outbox_ids = await publish_many(db, events)
    users = [n(u) for u in USERS]
    readers = await readers_of(db, outbox_ids, users, [n(u) for u in ADMINS])
    return {scope: readers[i] for scope, i in zip(scopes, outbox_ids, strict=True)}


async def send_signals(run: Run, scopes: list[Scope], user: str) -> dict[int, bool]:
    """`user` sends a signal to every scope; signal key (its scope's index) -> accepted."""
    claims = {"system_role": "admin"} if user in ADMINS else {}
    headers = bearer(run.n(user), **claims)

    async def send(key: int, workspace: str, stream: str | None) -> bool:
        scope = {"streamId": run.n(stream)} if stream else {"workspaceId": run.n(workspace)}
        body = {"type": "probe", **scope, "data": {"key": key, "from": user}}
        response = await run.http.post(
            f"{run.gateway.url}/me/ephemeral", json=body, headers=headers
        )
        assert response.status_code in (202, 403), response.text
        return response.status_code == 202

    sent = await asyncio.gather(*(send(k, w, s) for k, (w, s) in enumerate(scopes)))
    return dict(enumerate(sent))


async def check_signals(run: Run, db: asyncpg.Connection, scenario: Scenario) -> None:
    """Every signal is accepted exactly when its sender may read its scope, and reaches
    exactly the others who may, as the reference says now."""
    scopes = scopes_of(scenario)
    readers = await readers_now(run, db, scopes)
    accepted = dict(
        zip(
            USERS, await asyncio.gather(*(send_signals(run, scopes, u) for u in USERS)), strict=True
        )
    )
    markers = [
        {
            "type": "marker",
            "resource_type": "marker",
            "action": "create",
            "entity_id": f"marker-{user}",
            "user_id": run.n(user),
            "ephemeral": True,
        }
        for user in USERS
    ]
    response = await run.http.post(
        f"{run.gateway.url}/publish",
        json={"events": markers},
        headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"},
    )
    assert response.status_code == 202, response.text
    for client in run.clients.values():
        await client.wait_for(lambda c=client: bool(signals_of(c, "marker")), SIGNAL_TIMEOUT_S)
    failures = []
    for user, client in run.clients.items():
        may_send = {k: run.n(user) in readers[scope] for k, scope in enumerate(scopes)}
        if accepted[user] != may_send:
            failures.append(f"{user} sent: accepted {accepted[user]}, reference {may_send}")
        expected = sorted(
            (sender, key)
            for sender in USERS
            for key, scope in enumerate(scopes)
            if sender != user and accepted[sender][key] and run.n(user) in readers[scope]
        )
        got = sorted((d["data"]["from"], d["data"]["key"]) for d in signals_of(client, "probe"))
        if got != expected:
            failures.append(f"{user} received {got}, reference {expected} (scopes {scopes})")
    assert not failures, "\n".join(failures)


def signals_of(client: StreamClient, kind: str) -> list[dict[str, Any]]:
    """The data of the `ephemeral` events of type `kind` the client received."""
    found = [orjson.loads(e.data) for e in client.events if e.event == "ephemeral"]
    return [d for d in found if d["type"] == kind]


@pytest.fixture
def gateway(processes: Processes) -> Gateway:
    """One gateway with its relay for the whole test function (every example shares it); no
    signal rate limit to speak of, and `POST /publish` on (for the signal markers)."""
    env = {
        "USERSTREAM_EPHEMERAL_RATE": "1000000",
        "USERSTREAM_EPHEMERAL_BURST": "1000000",
        "USERSTREAM_PUBLISH_TOKEN": PUBLISH_TOKEN,
    }
    return processes.gateway("--with-relay", env=env)


@pytest.fixture
async def brake_conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A second connection to the test's database, for `RelayBrake`'s lock."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP client every example's SSE connections share."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
        yield client


@pytest.fixture
def prefixes() -> Iterator[str]:
    """`x1-`, `x2-`, ...: one fresh id prefix per example."""
    return (f"x{i}-" for i in itertools.count(1))


def one_workspace(*memberships: tuple[str, str], streams: int = 1) -> World:
    """Workspace `w1` with (user, status) memberships and public channels `s1`, `s2`..."""
    channels = [StreamRow(f"s{i}", "w1", "channel", "public", None) for i in range(1, streams + 1)]
    return World(("w1",), tuple(("w1", u, status) for u, status in memberships), (*channels,), ())


LAST_ACTIVE_LEAVES_AS_ANOTHER_JOINS = Scenario(
    one_workspace(("u1", "invited"), ("u2", "active")),
    (
        Transaction(
            (RemoveMember("w1", "u2"), Message("m1", "w1", "s1"), Activate("w1", "u1")), False
        ),
        Transaction((Message("m2", "w1", "s1"),), False),
    ),
)
"""The workspace's only active member is removed and an invited one turns active in the same
transaction: the new member reads the public channel from that transaction on."""

LAST_ACTIVE_LEAVES_THEN_ANOTHER_JOINS_IN_ONE_BATCH = Scenario(
    one_workspace(("u1", "invited"), ("u2", "active")),
    (
        Transaction((RemoveMember("w1", "u2"),), True),
        Transaction((Activate("w1", "u1"),), True),
        Transaction((Message("m1", "w1", "s1"),), False),
    ),
)
"""The same in two transactions that reach the gateway together."""

JOINED_WORKSPACE_CHANGES_BEFORE_THE_GATEWAY_GETS_THERE = Scenario(
    one_workspace(("u1", "invited"), streams=2),
    (
        Transaction((Activate("w1", "u1"), Message("m1", "w1", "s1")), True),
        Transaction((SetVisibility("w1", "s1", "private"), Message("m2", "w1", "s2")), True),
        Transaction((Message("m3", "w1", "s1"),), False),
    ),
)
"""A user turns active in a workspace no connected user was active in (the gateway holds none
of its streams), and `s1` turns private before the gateway reaches the activation: `m1` was
sent while `s1` was public."""


@pytest.mark.timeout(120 + 3 * EXAMPLES)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(scenario=LAST_ACTIVE_LEAVES_AS_ANOTHER_JOINS)
@example(scenario=LAST_ACTIVE_LEAVES_THEN_ANOTHER_JOINS_IN_ONE_BATCH)
@example(scenario=JOINED_WORKSPACE_CHANGES_BEFORE_THE_GATEWAY_GETS_THERE)
@given(scenario=scenarios())
async def test_every_user_receives_exactly_the_events_the_sql_reference_allows(
    gateway: Gateway,
    http: httpx.AsyncClient,
    db: asyncpg.Connection,
    brake_conn: asyncpg.Connection,
    prefixes: Iterator[str],
    scenario: Scenario,
) -> None:
    note(scenario.describe())
    prefix = next(prefixes)
    run = Run(gateway, http, lambda local: f"{prefix}{local}")
    brake = RelayBrake(brake_conn, run.n)
    await reset_and_seed(db, scenario.world, run.n)
    try:
        await run.connect()
        await run_scenario(run, db, brake, scenario)
        await check(run, db)
        await check_signals(run, db, scenario)
    finally:
        await brake.release()
        await run.close()
