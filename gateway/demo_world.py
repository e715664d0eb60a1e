"""The demo workspace "Acme": users, channels, a thread, a DM and who may read what.

`seed(conn)` writes it into the stream-model tables (core/schema/001_stream_model.sql) and
announces every row it creates through the publisher SDK in the same transaction
(`workspace.created`, `membership.created`, `stream.created`, `stream_member.created`,
PROTOCOL.md §1). It is idempotent: rows that exist are left alone and not announced again,
except the few access facts the demo is built on, which are restored if they drifted.

Access, by PROTOCOL.md §2: #general and #random are public; #leadership is private with
alice and carol as members (bob is not); the thread "Launch plan" inherits from #general;
the DM between alice and bob is private to them; frank is invited, not active, so he
receives only events addressed to him.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import asyncpg

from core.publish import OutboxEvent, publish_many

WORKSPACE_ID = "ws_acme"
WORKSPACE_NAME = "Acme"

_USERS = (
    # handle, display name, workspace role, workspace status
    ("alice", "Alice Martin", "owner", "active"),
    ("bob", "Bob Okafor", "member", "active"),
    ("carol", "Carol Nguyen", "admin", "active"),
    ("dave", "Dave Rossi", "member", "active"),
    ("erin", "Erin Walsh", "member", "active"),
    ("frank", "Frank Ito", "member", "invited"),
)

_STREAMS = (
    # key, id, stream_type, name, visibility, parent key
    ("general", "st_general", "channel", "general", "public", None),
    ("random", "st_random", "channel", "random", "public", None),
    ("leadership", "st_leadership", "channel", "leadership", "private", None),
    ("launch", "st_general_launch", "thread", "Launch plan", "inherit", "general"),
    ("dm", "st_dm_alice_bob", "dm", None, "private", None),
)

_ACTIVE = ("alice", "bob", "carol", "dave", "erin")
_STREAM_MEMBERS = {
    # stream key -> ((handle, role), ...); threads need no members to be readable.
    "general": tuple((h, "owner" if h == "alice" else "member") for h in _ACTIVE),
    "random": (("alice", "member"), ("bob", "owner"), ("dave", "member"), ("erin", "member")),
    "leadership": (("alice", "owner"), ("carol", "member")),
    "launch": (("alice", "owner"), ("dave", "member")),
    "dm": (("alice", "member"), ("bob", "member")),
}

LEADERSHIP_MEMBERS = frozenset({"alice", "carol"})
"""Handles of the members of #leadership: fixed, the demo's access contrast relies on it."""


@dataclass(frozen=True)
class AccessExample:
    """One user to open the demo page as, and what they see, for the startup printout."""

    user_id: str
    name: str
    sees: str


@dataclass(frozen=True)
class DemoWorld:
    """The ids of the seeded world.

    `user_ids` and `stream_ids` map a short key to an id: users by handle (`alice`, ...,
    `frank`), streams by `general`, `random`, `leadership`, `launch` (the thread under
    #general) and `dm` (alice and bob). `names` maps a user id to a display name.
    """

    workspace_id: str
    user_ids: Mapping[str, str]
    stream_ids: Mapping[str, str]
    names: Mapping[str, str]
    active_handles: tuple[str, ...]
    private_stream_keys: frozenset[str]

    def user(self, handle: str) -> str:
        """The id of the user `handle`; KeyError for an unknown handle."""
        return self.user_ids[handle]

    def stream(self, key: str) -> str:
        """The id of the stream `key`; KeyError for an unknown key."""
        return self.stream_ids[key]

    @property
    def access_examples(self) -> tuple[AccessExample, AccessExample]:
        """Two users who see different things: alice reads #leadership, bob cannot."""
        return (
            AccessExample(
                self.user("alice"),
                self.names[self.user("alice")],
                "reads #leadership, the DM with bob and every public channel",
            ),
            AccessExample(
                self.user("bob"),
                self.names[self.user("bob")],
                "cannot read #leadership: same workspace, fewer events",
            ),
        )


def _user_id(handle: str) -> str:
    return f"usr_{handle}"


def demo_world() -> DemoWorld:
    """The ids of the demo world, without touching the database."""
    return DemoWorld(
        workspace_id=WORKSPACE_ID,
        user_ids=MappingProxyType({h: _user_id(h) for h, *_ in _USERS}),
        stream_ids=MappingProxyType({key: sid for key, sid, *_ in _STREAMS}),
        names=MappingProxyType({_user_id(h): name for h, name, *_ in _USERS}),
        active_handles=_ACTIVE,
        private_stream_keys=frozenset(k for k, _, _, _, vis, _ in _STREAMS if vis == "private"),
    )


async def seed(conn: asyncpg.Connection) -> DemoWorld:
    """Create the demo world in one transaction of `conn`; safe to run any number of times.

    Rows are inserted with ON CONFLICT DO NOTHING and announced only when new, so a second
    run writes no outbox rows. The access facts the demo relies on are upserted back: the
    workspace statuses (frank `invited`, the others `active`) and the #leadership members.
    Inside a caller's transaction it runs as a savepoint of it.
    """
    world = demo_world()
    async with conn.transaction():
        events = await _seed_workspace(conn, world)
        events += await _seed_streams(conn, world)
        events += await _seed_stream_members(conn, world)
        await publish_many(conn, events)
    return world


async def _seed_workspace(conn: asyncpg.Connection, world: DemoWorld) -> list[OutboxEvent]:
    ws, alice = world.workspace_id, world.user("alice")
    events = []
    created = await conn.fetchval(
        "INSERT INTO workspaces (id, name, slug) VALUES ($1, $2, 'acme')"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
        ws,
        WORKSPACE_NAME,
    )
    if created:
        events.append(_event("workspace", "create", ws, ws, actor=alice, data={"name": "Acme"}))
    await conn.executemany(
        "INSERT INTO users (id, name, email) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        [(_user_id(h), name, f"{h}@acme.test") for h, name, *_ in _USERS],
    )
    for handle, _, role, status in _USERS:
        user_id = _user_id(handle)
        inserted = await conn.fetchval(
            "INSERT INTO workspace_members AS m (workspace_id, user_id, role, status)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (workspace_id, user_id)"
            " DO UPDATE SET status = EXCLUDED.status WHERE m.status <> EXCLUDED.status"
            " RETURNING (xmax = 0)",  # true when inserted, false when updated
            ws,
            user_id,
            role,
            status,
        )
        if inserted is not None:
            action = "create" if inserted else "update"
            events.append(
                _event("membership", action, f"{ws}:{user_id}", ws, user=user_id, actor=alice)
            )
    return events


async def _seed_streams(conn: asyncpg.Connection, world: DemoWorld) -> list[OutboxEvent]:
    events = []
    for _, stream_id, stream_type, name, visibility, parent in _STREAMS:
        created = await conn.fetchval(
            "INSERT INTO streams (id, workspace_id, stream_type, name, slug, visibility,"
            " parent_stream_id) VALUES ($1, $2, $3, $4, $4, $5, $6)"
            " ON CONFLICT (id) DO NOTHING RETURNING id",
            stream_id,
            world.workspace_id,
            stream_type,
            name,
            visibility,
            world.stream(parent) if parent else None,
        )
        if created:
            data = {"name": name, "streamType": stream_type, "visibility": visibility}
            events.append(
                _event(
                    "stream",
                    "create",
                    stream_id,
                    world.workspace_id,
                    stream=stream_id,
                    actor=world.user("alice"),
                    data=data,
                )
            )
    return events


async def _seed_stream_members(conn: asyncpg.Connection, world: DemoWorld) -> list[OutboxEvent]:
    events = []
    for key, members in _STREAM_MEMBERS.items():
        stream_id = world.stream(key)
        # #leadership is restored to its two members; elsewhere the simulator's joins and
        # leaves are kept.
        conflict = (
            "DO UPDATE SET left_at = NULL WHERE m.left_at IS NOT NULL"
            if key == "leadership"
            else "DO NOTHING"
        )
        for handle, role in members:
            user_id = world.user(handle)
            inserted = await conn.fetchval(
                "INSERT INTO stream_members AS m (stream_id, user_id, role) VALUES ($1, $2, $3)"
                f" ON CONFLICT (stream_id, user_id) {conflict} RETURNING (xmax = 0)",
                stream_id,
                user_id,
                role,
            )
            if inserted is not None:
                events.append(
                    _event(
                        "stream_member",
                        "create" if inserted else "update",
                        f"{stream_id}:{user_id}",
                        world.workspace_id,
                        stream=stream_id,
                        user=user_id,
                        actor=world.user("alice"),
                    )
                )
    return events


def _event(
    resource_type: str,
    action: str,
    entity_id: str,
    workspace_id: str,
    *,
    stream: str | None = None,
    user: str | None = None,
    actor: str | None = None,
    data: object = None,
) -> OutboxEvent:
    verb = {"create": "created", "update": "updated", "delete": "deleted"}[action]
    return OutboxEvent(
        type=f"{resource_type}.{verb}",
        resource_type=resource_type,
        action=action,
        entity_id=entity_id,
        workspace_id=workspace_id,
        stream_id=stream,
        user_id=user,
        actor_id=actor,
        data=data,
    )
