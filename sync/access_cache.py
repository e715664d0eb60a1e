"""The gateway's access state: loaded from Postgres at connect, kept current by the event flow.

One `AccessCache` per gateway process holds the `core.access.AccessState` of the users
connected to it (shared by all of a user's connections) and the streams of the workspaces those
users are active in (loaded once per workspace, shared by every connection, evicted when no
connected user is active there any more). Access-changing events carry the after-image of the
row they name, captured at commit, so `apply` moves the state along the stream without a query.

Positions. The dispatcher judges each event against the state at that event's position, so
everything merged into the shared state must be at the dispatcher's position `p`:
- A connect loads a snapshot at position `c` (one REPEATABLE READ transaction) and waits until
  `p >= c` (sync/catchup.py); `install` then replays the access events of `(c, p]` from the
  dispatcher's recent window onto the new pieces before merging them. (If the dispatcher cannot
  catch up in time, the pieces go in ahead of it; re-applying the after-images of `(p, c]` as it
  reaches them converges to the same state, the last image winning.)
- A workspace loaded by the dispatcher itself (a connected user joined it) is read while the
  database is ahead of `p`; `load_workspaces` sets the streams touched since `p` back with the
  `before` images their events carry.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

import asyncpg
import orjson

from core.access import (
    AccessState,
    ChannelChange,
    StreamInfo,
    UserAccess,
    apply_event,
    workspaces_to_load,
)
from core.events import Event
from core.types import Connection
from sync.barrier import RelayBarrier

_FIRST_TOUCH_AFTER = """
SELECT DISTINCT ON (stream_id) stream_id, workspace_id, access FROM outbox
 WHERE resource_type = 'stream' AND workspace_id = ANY($1::text[]) AND seq > $2
   AND access ? 'before'
 ORDER BY stream_id, seq
"""
_POSITION_AND_MODE = (
    "SELECT coalesce(max(seq), 0) AS position,"
    " coalesce((SELECT mode FROM userstream_ingest), 'trigger') = 'wal' AS wal FROM outbox"
)
_STREAMS_OF = (
    "SELECT id, workspace_id, visibility, parent_stream_id, status FROM streams"
    " WHERE workspace_id = ANY($1::text[])"
)


@dataclass(slots=True)
class Snapshot:
    """One user's access and the streams of their not-yet-tracked workspaces, at `position`.

    `settled` is the position by which every transaction the snapshot saw has one (the same
    as `position` in trigger ingest mode; in wal mode a relay barrier's, sync/barrier.py):
    replaying the access events of `(position, settled]` brings the pieces to one position.
    """

    position: int
    user: UserAccess
    streams: dict[str, dict[str, StreamInfo]] = field(default_factory=dict)
    settled: int = 0


async def _load_streams(
    conn: Connection, workspace_ids: Iterable[str]
) -> dict[str, dict[str, StreamInfo]]:
    ids = sorted(set(workspace_ids))
    loaded: dict[str, dict[str, StreamInfo]] = {ws: {} for ws in ids}
    if ids:
        for row in await conn.fetch(_STREAMS_OF, ids):
            loaded[row["workspace_id"]][row["id"]] = StreamInfo.from_row(row)
    return loaded


def _rewind(streams: dict[str, StreamInfo], workspace_id: str, stream_id: str, access: str) -> None:
    """Set one stream back to the `before` image of its first `stream` event after the load
    point: the row as it stood before that event's transaction (None: it did not exist)."""
    images = orjson.loads(access) if access else {}
    if "before" not in images:
        return
    before = images["before"]
    if isinstance(before, dict) and before.get("workspace_id") == workspace_id:
        streams[stream_id] = StreamInfo.from_row(before)
    else:
        streams.pop(stream_id, None)


class AccessCache:
    """Access state of connected users with reference counts (see the module docstring)."""

    def __init__(self) -> None:
        self.state = AccessState()
        self._connections: dict[str, int] = {}
        self._active_users: dict[str, set[str]] = {}
        self._idle: set[str] = set()

    @property
    def user_count(self) -> int:
        """Users with at least one connection."""
        return len(self._connections)

    @property
    def workspace_count(self) -> int:
        """Workspaces whose streams are held."""
        return len(self.state.streams)

    async def load(
        self, pool: asyncpg.Pool, user_id: str, barrier: RelayBarrier | None = None
    ) -> Snapshot:
        """Read one user's memberships, and the streams of their active workspaces that are not
        held yet, with the outbox position, in one REPEATABLE READ read-only transaction
        (consistent: every event at or before `position` is reflected; in wal ingest mode also
        transactions not yet positioned, which `barrier`, when given, then bounds: `settled`).
        """
        async with (
            pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            [head] = await conn.fetch(_POSITION_AND_MODE)
            position = int(head["position"])
            user = UserAccess(user_id)
            for row in await conn.fetch(
                "SELECT workspace_id, status FROM workspace_members WHERE user_id = $1", user_id
            ):
                user.workspaces[row["workspace_id"]] = row["status"]
            user.streams = {
                row["stream_id"]
                for row in await conn.fetch(
                    "SELECT stream_id FROM stream_members WHERE user_id = $1 AND left_at IS NULL",
                    user_id,
                )
            }
            wanted = user.active_workspaces() - self.state.streams.keys()
            streams = await _load_streams(conn, wanted)
        settled = position
        if head["wal"] and barrier is not None:
            settled = await barrier.wait() or position
        return Snapshot(position, user, streams, settled)

    def install(self, snapshot: Snapshot, replay: Iterable[Event]) -> bool:
        """Merge a snapshot into the shared state and count one more connection of its user.

        `replay` holds the events after `snapshot.position` that the dispatcher has already
        applied (empty when the snapshot is ahead of it); their access changes are replayed
        onto the new pieces first. Returns False, changing nothing, when the user turned active
        in a workspace whose streams neither the snapshot nor the cache holds (load again).
        """
        user_id = snapshot.user.user_id
        pieces = AccessState(
            users={} if user_id in self.state.users else {user_id: snapshot.user},
            streams={
                ws: streams
                for ws, streams in snapshot.streams.items()
                if ws not in self.state.streams
            },
        )
        for event in replay:
            apply_event(pieces, event)
        if user_id in pieces.users:
            missing = pieces.users[user_id].active_workspaces() - pieces.streams.keys()
            if missing - self.state.streams.keys():
                return False
        self.state.streams.update(pieces.streams)
        if user_id in pieces.users:
            self.state.users[user_id] = pieces.users[user_id]
            for ws in pieces.users[user_id].active_workspaces():
                self._active_users.setdefault(ws, set()).add(user_id)
        self._connections[user_id] = self._connections.get(user_id, 0) + 1
        self._evict_unused(pieces.streams.keys())
        return True

    def release(self, user_id: str) -> None:
        """One connection of `user_id` ended; forget the user and unused workspaces at zero."""
        left = self._connections.get(user_id, 0) - 1
        if left > 0:
            self._connections[user_id] = left
            return
        self._connections.pop(user_id, None)
        user = self.state.users.pop(user_id, None)
        if user is None:
            return
        for ws in user.workspaces:
            members = self._active_users.get(ws)
            if members is not None:
                members.discard(user_id)
        self._evict_unused(user.workspaces.keys())

    def missing_workspaces(self, events: Iterable[Event]) -> set[str]:
        """Workspaces to load before `apply` can take `events` (see `workspaces_to_load`)."""
        missing: set[str] = set()
        for event in events:
            if event.resource_type == "membership":
                missing |= workspaces_to_load(self.state, event)
        return missing

    async def load_workspaces(
        self,
        pool: asyncpg.Pool,
        workspace_ids: Iterable[str],
        at: int,
        barrier: RelayBarrier | None = None,
    ) -> None:
        """Load and hold the streams of workspaces a connected user has just turned active in,
        as they stood at position `at` (the dispatcher's position).

        The database is ahead of `at`. Streams that no `stream` event touched after `at` are
        the same now as then; a touched one is set back to the `before` image its first
        `stream` event after `at` carries (the row before that transaction, captured by a
        trigger on `streams`: core/schema/002_outbox.sql; in wal ingest mode, read from the
        log by the relay), or removed if it did not exist. In wal mode the load may see
        transactions not yet positioned: `barrier`, when given, waits until they are, and the
        touches are read after it.
        """
        ids = sorted(set(workspace_ids))
        async with (
            pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            [head] = await conn.fetch(_POSITION_AND_MODE)
            wal = bool(head["wal"])
            loaded = await _load_streams(conn, ids)
            if not (wal and barrier):
                touched = await conn.fetch(_FIRST_TOUCH_AFTER, ids, at)
        if wal and barrier:
            await barrier.wait()
            async with pool.acquire() as conn:
                touched = await conn.fetch(_FIRST_TOUCH_AFTER, ids, at)
        for r in touched:
            ws = r["workspace_id"]
            _rewind(loaded[ws], ws, r["stream_id"], r["access"])
        for ws, streams in loaded.items():
            self.state.streams.setdefault(ws, streams)

    def apply(self, event: Event) -> list[ChannelChange]:
        """Move the state past one event; returns the workspace channels gained or lost."""
        changes = apply_event(self.state, event)
        for change in changes:
            members = self._active_users.setdefault(change.workspace_id, set())
            if change.active:
                members.add(change.user_id)
            else:
                members.discard(change.user_id)
                self._idle.add(change.workspace_id)
        return changes

    def evict_idle(self) -> None:
        """Forget the streams of workspaces no connected user is active in any more. Called
        after a whole batch, so a workspace left and re-entered within one batch stays loaded
        (and current: its `stream` events keep applying) instead of going missing."""
        idle, self._idle = self._idle, set()
        self._evict_unused(idle)

    def channels_of(self, user_id: str) -> set[str]:
        """Ids of the workspaces whose channel this user's connections listen on."""
        user = self.state.users.get(user_id)
        return user.active_workspaces() if user is not None else set()

    def _evict_unused(self, workspace_ids: Iterable[str]) -> None:
        for ws in list(workspace_ids):
            if not self._active_users.get(ws):
                self._active_users.pop(ws, None)
                self.state.streams.pop(ws, None)
