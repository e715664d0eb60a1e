"""Who may receive an event: the rules of PROTOCOL.md §2 as pure functions over an access state.

`AccessState` holds what the rules need, for the users connected to one gateway and the
workspaces they belong to: each user's workspace memberships (status) and current stream
memberships, and each such workspace's streams (visibility, parent). It is built from Postgres
at connect (`sync.access_cache`) and kept current by `apply_event`, which applies the
after-image an access-changing event carries (captured at commit, see
`core/schema/002_outbox.sql`), so that every event is judged against the state as it stood
after its own transaction committed, with no query per event or per subscriber.

Departures from the reference (Cella's `checkStreamAccess`): none in the rules; the state is
exact at each position in the stream instead of frozen at connect time.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from core.channels import Routed
from core.events import Event

MAX_INHERIT_DEPTH = 10
"""How many parents an `inherit` stream may climb to find a readable one (PROTOCOL.md §2)."""

ACTIVE = "active"


@dataclass(slots=True)
class StreamInfo:
    """What the rules need of a `streams` row: `visibility` is public, private or inherit."""

    id: str
    workspace_id: str
    visibility: str
    parent_id: str | None
    status: str = "active"

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "StreamInfo":
        """From a `streams` row (or its JSON after-image), keyed like the table's columns."""
        return cls(
            id=row["id"],
            workspace_id=row["workspace_id"],
            visibility=row["visibility"],
            parent_id=row.get("parent_stream_id"),
            status=row.get("status") or "active",
        )


@dataclass(slots=True)
class UserAccess:
    """One user's memberships: workspace id -> status, and ids of streams joined and not left."""

    user_id: str
    workspaces: dict[str, str] = field(default_factory=dict)
    streams: set[str] = field(default_factory=set)

    def active_workspaces(self) -> set[str]:
        """Ids of the workspaces where this user's membership status is `active`."""
        return {ws for ws, status in self.workspaces.items() if status == ACTIVE}


@dataclass(frozen=True, slots=True)
class ChannelChange:
    """A user gained (`active=True`) or lost the right to a workspace channel."""

    user_id: str
    workspace_id: str
    active: bool


@dataclass(slots=True)
class AccessState:
    """Memberships of tracked users and streams of tracked workspaces (id -> stream)."""

    users: dict[str, UserAccess] = field(default_factory=dict)
    streams: dict[str, dict[str, StreamInfo]] = field(default_factory=dict)


def can_read_stream(
    state: AccessState, user: UserAccess, workspace_id: str, stream_id: str, *, admin: bool = False
) -> bool:
    """PROTOCOL.md §2 rule 2 for a user already known to be an active workspace member.

    True when the user is a current member of the stream, the stream is public, the user is a
    system admin (`system_role: "admin"` claim), or the stream's visibility is `inherit` and
    the same holds for its parent, climbing at most `MAX_INHERIT_DEPTH` parents. A stream that
    is unknown, or not in `workspace_id`, is not readable.
    """
    streams = state.streams.get(workspace_id)
    if streams is None:
        return False
    current = streams.get(stream_id)
    for _ in range(MAX_INHERIT_DEPTH + 1):
        if current is None:
            return False
        if current.id in user.streams or current.visibility == "public" or admin:
            return True
        if current.visibility != "inherit" or current.parent_id is None:
            return False
        current = streams.get(current.parent_id)
    return False


def can_receive(state: AccessState, user_id: str, event: Routed, *, admin: bool = False) -> bool:
    """Whether `user_id` may receive `event`, judged against `state` (PROTOCOL.md §2).

    `event` is a change (`core.events.Event`) or an ephemeral signal (`core.signals.Signal`,
    PROTOCOL.md §5: the same rules, as of now). Rule 1: an event with `user_id` goes to that
    user only. Rule 2: with `stream_id`, to active workspace members who can read the stream
    (`can_read_stream`). Rule 3: with only `workspace_id`, to every active member. An
    untracked user receives nothing.
    """
    if event.user_id is not None:
        return event.user_id == user_id
    user = state.users.get(user_id)
    if user is None or event.workspace_id is None:
        return False
    if user.workspaces.get(event.workspace_id) != ACTIVE:
        return False
    if event.stream_id is None:
        return True
    return can_read_stream(state, user, event.workspace_id, event.stream_id, admin=admin)


def workspace_of_stream(state: AccessState, user_id: str, stream_id: str) -> str | None:
    """The workspace of `stream_id` among those where `user_id` is an active member, or None
    (an untracked user, or a stream of no such workspace, as far as `state` knows). A signal
    sent to a stream names no workspace (PROTOCOL.md §5); a stream the sender could read is
    in one of theirs, whose streams `state` holds."""
    user = state.users.get(user_id)
    if user is None:
        return None
    for workspace_id, status in user.workspaces.items():
        if status == ACTIVE and stream_id in state.streams.get(workspace_id, {}):
            return workspace_id
    return None


def workspaces_to_load(state: AccessState, event: Event) -> set[str]:
    """Workspaces whose streams must be loaded before `apply_event(state, event)`.

    A tracked user who becomes an active member of a workspace no tracked user belonged to
    needs that workspace's streams; everything else the event carries itself.
    """
    if event.resource_type != "membership" or event.workspace_id is None:
        return set()
    row = _after_image(event)
    if row is None or row.get("status") != ACTIVE:
        return set()
    user_id = row.get("user_id", event.user_id)
    if user_id in state.users and event.workspace_id not in state.streams:
        return {event.workspace_id}
    return set()


def apply_event(state: AccessState, event: Event) -> list[ChannelChange]:
    """Bring `state` to the position just after `event` and return the channel changes.

    Only access-changing events (`Event.changes_access`) with a captured after-image change
    anything; rows of untracked users and workspaces are ignored. A `stream` event of a stream
    that is not public also carries its current member ids (`access.members`), which replace
    the tracked users' memberships of that stream. A workspace's streams must
    already be loaded when one of its members turns active (see `workspaces_to_load`).
    """
    if not event.changes_access or event.access is None:
        return []
    row = _after_image(event)
    if event.resource_type == "membership":
        return _apply_membership(state, event, row)
    if event.resource_type == "stream_member":
        _apply_stream_member(state, event, row)
    elif event.resource_type == "stream":
        _apply_stream(state, event, row)
    elif event.resource_type == "workspace" and row is None and event.workspace_id:
        return _drop_workspace(state, event.workspace_id)
    return []


def _after_image(event: Event) -> Mapping[str, Any] | None:
    row = (event.access or {}).get("row")
    return row if isinstance(row, Mapping) else None


def _apply_membership(
    state: AccessState, event: Event, row: Mapping[str, Any] | None
) -> list[ChannelChange]:
    workspace_id = event.workspace_id
    user_id = row["user_id"] if row is not None else event.user_id
    if workspace_id is None or user_id is None:
        return []
    user = state.users.get(user_id)
    if user is None:
        return []
    was_active = user.workspaces.get(workspace_id) == ACTIVE
    if row is None:
        user.workspaces.pop(workspace_id, None)
    else:
        user.workspaces[workspace_id] = row["status"]
    is_active = user.workspaces.get(workspace_id) == ACTIVE
    if was_active == is_active:
        return []
    return [ChannelChange(user_id, workspace_id, is_active)]


def _apply_stream_member(state: AccessState, event: Event, row: Mapping[str, Any] | None) -> None:
    user_id = row["user_id"] if row is not None else event.user_id
    stream_id = row["stream_id"] if row is not None else event.stream_id
    user = state.users.get(user_id) if user_id is not None else None
    if user is None or stream_id is None:
        return
    if row is not None and row.get("left_at") is None:
        user.streams.add(stream_id)
    else:
        user.streams.discard(stream_id)


def _apply_stream(state: AccessState, event: Event, row: Mapping[str, Any] | None) -> None:
    if row is not None:
        streams = state.streams.get(row["workspace_id"])
        if streams is not None:
            streams[row["id"]] = StreamInfo.from_row(row)
        members = (event.access or {}).get("members")
        if isinstance(members, list):
            _apply_stream_members(state, row["id"], set(members))
        return
    stream_id = event.stream_id or event.entity_id
    if event.workspace_id is not None and event.workspace_id in state.streams:
        state.streams[event.workspace_id].pop(stream_id, None)


def _apply_stream_members(state: AccessState, stream_id: str, members: set[str]) -> None:
    for user in state.users.values():
        if user.user_id in members:
            user.streams.add(stream_id)
        else:
            user.streams.discard(stream_id)


def _drop_workspace(state: AccessState, workspace_id: str) -> list[ChannelChange]:
    changes = []
    for user in state.users.values():
        if user.workspaces.pop(workspace_id, None) == ACTIVE:
            changes.append(ChannelChange(user.user_id, workspace_id, False))
    state.streams.pop(workspace_id, None)
    return changes
