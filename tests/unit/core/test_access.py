"""Who may receive an event (PROTOCOL.md §2), and how access-changing events move the state."""

from typing import Any

import pytest

from core.access import (
    MAX_INHERIT_DEPTH,
    AccessState,
    ChannelChange,
    StreamInfo,
    UserAccess,
    apply_event,
    can_read_stream,
    can_receive,
    workspaces_to_load,
)
from core.events import Event
from tests import factories
from tests.factories import event_type

_NO_ACCESS: Any = object()


def make_event(
    resource_type: str = "stream_event",
    *,
    action: str = "create",
    workspace_id: str | None = "w1",
    stream_id: str | None = None,
    user_id: str | None = None,
    entity_id: str = "e1",
    row: Any = _NO_ACCESS,
) -> Event:
    """A `tests.factories.make_event` of `event_type(resource_type, action)` with these scope
    columns; `row` is the after-image (`access={"row": row}`), no `access` when not given."""
    return factories.make_event(
        type=event_type(resource_type, action),
        resource_type=resource_type,
        action=action,
        entity_id=entity_id,
        workspace_id=workspace_id,
        stream_id=stream_id,
        user_id=user_id,
        access=None if row is _NO_ACCESS else {"row": row},
    )


def stream_row(
    stream_id: str,
    visibility: str,
    *,
    workspace_id: str = "w1",
    parent: str | None = None,
    status: str = "active",
) -> dict[str, Any]:
    """A `streams` after-image, shaped like `to_jsonb(streams)`."""
    return {
        "id": stream_id,
        "workspace_id": workspace_id,
        "stream_type": "thread" if parent else "channel",
        "name": stream_id,
        "parent_stream_id": parent,
        "visibility": visibility,
        "status": status,
        "archived_at": None,
    }


def membership_row(user_id: str, status: str, workspace_id: str = "w1") -> dict[str, Any]:
    """A `workspace_members` after-image."""
    return {"workspace_id": workspace_id, "user_id": user_id, "role": "member", "status": status}


def stream_member_row(user_id: str, stream_id: str, *, left: bool = False) -> dict[str, Any]:
    """A `stream_members` after-image; `left` sets `left_at`."""
    return {
        "stream_id": stream_id,
        "user_id": user_id,
        "role": "member",
        "joined_at": "2026-11-20T09:00:00+00:00",
        "left_at": "2026-11-20T10:00:00+00:00" if left else None,
    }


def build_state() -> AccessState:
    """Two workspaces and the users of the tests.

    w1: `general` (public), `secret` (private; alice is a member), `dm` (private; alice and
    bob), `thread-general` (inherit from general), `thread-secret` (inherit from secret;
    bob is a member of the thread itself), `thread-deep` (inherit from thread-secret).
    w2: `w2-general` (public).
    alice, bob and erin are active in w1 (erin is in no stream); carol is invited to w1;
    dave is active in w2 only.
    """
    streams = [
        StreamInfo("general", "w1", "public", None),
        StreamInfo("secret", "w1", "private", None),
        StreamInfo("dm", "w1", "private", None),
        StreamInfo("thread-general", "w1", "inherit", "general"),
        StreamInfo("thread-secret", "w1", "inherit", "secret"),
        StreamInfo("thread-deep", "w1", "inherit", "thread-secret"),
        StreamInfo("w2-general", "w2", "public", None),
    ]
    state = AccessState()
    for stream in streams:
        state.streams.setdefault(stream.workspace_id, {})[stream.id] = stream
    state.users = {
        "alice": UserAccess("alice", {"w1": "active"}, {"secret", "dm"}),
        "bob": UserAccess("bob", {"w1": "active"}, {"dm", "thread-secret"}),
        "carol": UserAccess("carol", {"w1": "invited"}, {"general"}),
        "dave": UserAccess("dave", {"w2": "active"}, set()),
        "erin": UserAccess("erin", {"w1": "active"}, set()),
    }
    return state


RULES = [
    # rule 1: user_id set -> only that user
    ("notification for alice", "alice", {"user_id": "alice"}, True),
    ("notification for alice, to bob", "bob", {"user_id": "alice"}, False),
    ("user event for an untracked user", "zed", {"user_id": "zed", "workspace_id": None}, True),
    (
        "user event with a stream, other user",
        "alice",
        {"user_id": "bob", "stream_id": "secret"},
        False,
    ),
    ("user event overrides stream access", "bob", {"user_id": "bob", "stream_id": "secret"}, True),
    ("user event for an invited member", "carol", {"user_id": "carol"}, True),
    # rule 3: workspace only -> every active member
    ("workspace event, active member", "alice", {}, True),
    ("workspace event, invited member", "carol", {}, False),
    ("workspace event, not a member", "dave", {}, False),
    ("workspace event, untracked user", "zed", {}, False),
    ("workspace event of w2, active there", "dave", {"workspace_id": "w2"}, True),
    # rule 2: stream
    ("public stream, any active member", "bob", {"stream_id": "general"}, True),
    ("public stream, invited member", "carol", {"stream_id": "general"}, False),
    ("public stream, not a member", "dave", {"stream_id": "general"}, False),
    ("private stream, stream member", "alice", {"stream_id": "secret"}, True),
    ("private stream, not a stream member", "bob", {"stream_id": "secret"}, False),
    ("dm, participant", "bob", {"stream_id": "dm"}, True),
    ("inherit via public parent", "bob", {"stream_id": "thread-general"}, True),
    ("inherit via parent membership", "alice", {"stream_id": "thread-secret"}, True),
    ("inherit, private parent, no membership", "erin", {"stream_id": "thread-secret"}, False),
    (
        "inherit two levels, private root, no membership",
        "erin",
        {"stream_id": "thread-deep"},
        False,
    ),
    ("inherit via public parent, no membership", "erin", {"stream_id": "thread-general"}, True),
    ("inherit, member of the thread itself", "bob", {"stream_id": "thread-secret"}, True),
    ("inherit two levels via parent membership", "alice", {"stream_id": "thread-deep"}, True),
    ("inherit two levels via thread membership", "bob", {"stream_id": "thread-deep"}, True),
    ("unknown stream", "alice", {"stream_id": "nope"}, False),
    ("stream of another workspace", "dave", {"stream_id": "general", "workspace_id": "w2"}, False),
    (
        "stream of an unloaded workspace",
        "alice",
        {"stream_id": "general", "workspace_id": "w9"},
        False,
    ),
]


@pytest.mark.parametrize(
    ("user_id", "columns", "expected"),
    [case[1:] for case in RULES],
    ids=[case[0] for case in RULES],
)
def test_can_receive_follows_protocol_section_2(
    user_id: str, columns: dict[str, Any], expected: bool
) -> None:
    assert can_receive(build_state(), user_id, make_event(**columns)) is expected


ADMIN_RULES = [
    ("private stream of an active workspace", "bob", "w1", "secret", True),
    ("thread under a private parent", "erin", "w1", "thread-deep", True),
    ("private stream of a workspace where invited", "carol", "w1", "secret", False),
    ("private stream of a workspace not joined", "dave", "w1", "secret", False),
    ("unknown stream", "bob", "w1", "nope", False),
]


@pytest.mark.parametrize(
    ("user_id", "workspace_id", "stream_id", "expected"),
    [case[1:] for case in ADMIN_RULES],
    ids=[case[0] for case in ADMIN_RULES],
)
def test_admin_reads_every_stream_of_its_active_workspaces_only(
    user_id: str, workspace_id: str, stream_id: str, expected: bool
) -> None:
    event = make_event(workspace_id=workspace_id, stream_id=stream_id)

    assert can_receive(build_state(), user_id, event, admin=True) is expected
    assert can_receive(build_state(), user_id, event) is False


def test_left_stream_member_receives_nothing_more_from_the_stream() -> None:
    state = build_state()
    assert can_receive(state, "alice", make_event(stream_id="secret")) is True

    left = make_event(
        "stream_member",
        action="update",
        stream_id="secret",
        user_id="alice",
        row=stream_member_row("alice", "secret", left=True),
    )

    assert apply_event(state, left) == []
    assert "secret" not in state.users["alice"].streams
    assert can_receive(state, "alice", make_event(stream_id="secret")) is False
    assert can_receive(state, "alice", make_event(stream_id="thread-secret")) is False
    assert can_receive(state, "alice", make_event(stream_id="general")) is True


def _chain_state(parents: int, *, top_visibility: str = "public") -> AccessState:
    """w1 with stream `c0` under `parents` inherit levels: c0 -> c1 -> ... -> c{parents}.

    Every stream but the top one is `inherit`; the top one has `top_visibility`. The user
    `u` is an active member of w1 and of the top stream.
    """
    streams = {f"c{i}": StreamInfo(f"c{i}", "w1", "inherit", f"c{i + 1}") for i in range(parents)}
    streams[f"c{parents}"] = StreamInfo(f"c{parents}", "w1", top_visibility, None)
    user = UserAccess("u", {"w1": "active"}, {f"c{parents}"})
    return AccessState(users={"u": user}, streams={"w1": streams})


def test_inherit_depth_limit_is_ten_parents() -> None:
    assert MAX_INHERIT_DEPTH == 10


@pytest.mark.parametrize("top_visibility", ["public", "private"])
@pytest.mark.parametrize(("parents", "readable"), [(0, True), (1, True), (10, True), (11, False)])
def test_inherit_walks_up_at_most_ten_parents(
    parents: int, readable: bool, top_visibility: str
) -> None:
    state = _chain_state(parents, top_visibility=top_visibility)

    assert can_receive(state, "u", make_event(stream_id="c0")) is readable
    assert can_read_stream(state, state.users["u"], "w1", "c0") is readable


def test_inherit_stops_at_a_missing_parent() -> None:
    state = build_state()
    state.streams["w1"]["orphan"] = StreamInfo("orphan", "w1", "inherit", "gone")

    assert can_receive(state, "alice", make_event(stream_id="orphan")) is False


def test_inherit_without_a_parent_is_not_readable() -> None:
    state = build_state()
    state.streams["w1"]["rootless"] = StreamInfo("rootless", "w1", "inherit", None)

    assert can_receive(state, "alice", make_event(stream_id="rootless")) is False


def test_inherit_cycle_ends_as_not_readable() -> None:
    state = build_state()
    state.streams["w1"]["a"] = StreamInfo("a", "w1", "inherit", "b")
    state.streams["w1"]["b"] = StreamInfo("b", "w1", "inherit", "a")

    assert can_receive(state, "alice", make_event(stream_id="a")) is False


def test_stream_info_from_an_after_image() -> None:
    info = StreamInfo.from_row(stream_row("t1", "inherit", parent="general", status="archived"))

    assert info == StreamInfo("t1", "w1", "inherit", "general", "archived")


def test_stream_info_defaults_a_missing_status_to_active() -> None:
    row = {"id": "s", "workspace_id": "w1", "visibility": "public"}

    assert StreamInfo.from_row(row) == StreamInfo("s", "w1", "public", None, "active")


def test_active_workspaces_leaves_out_invitations() -> None:
    user = UserAccess("u", {"w1": "active", "w2": "invited", "w3": "active"})

    assert user.active_workspaces() == {"w1", "w3"}


# apply_event: membership


def _membership(user_id: str, row: dict[str, Any] | None, action: str = "update") -> Event:
    workspace_id = row["workspace_id"] if row is not None else "w1"
    return make_event(
        "membership", action=action, workspace_id=workspace_id, user_id=user_id, row=row
    )


def test_membership_turning_invited_to_active_opens_the_workspace_channel() -> None:
    state = build_state()

    changes = apply_event(state, _membership("carol", membership_row("carol", "active")))

    assert changes == [ChannelChange("carol", "w1", True)]
    assert state.users["carol"].workspaces == {"w1": "active"}
    assert can_receive(state, "carol", make_event(stream_id="general")) is True


def test_membership_turning_active_to_invited_closes_the_workspace_channel() -> None:
    state = build_state()

    changes = apply_event(state, _membership("alice", membership_row("alice", "invited")))

    assert changes == [ChannelChange("alice", "w1", False)]
    assert can_receive(state, "alice", make_event(stream_id="secret")) is False


def test_membership_deleted_closes_the_workspace_channel() -> None:
    state = build_state()

    changes = apply_event(state, _membership("bob", None, action="delete"))

    assert changes == [ChannelChange("bob", "w1", False)]
    assert "w1" not in state.users["bob"].workspaces
    assert can_receive(state, "bob", make_event()) is False


def test_membership_joining_a_new_workspace_opens_its_channel() -> None:
    state = build_state()

    changes = apply_event(state, _membership("alice", membership_row("alice", "active", "w2")))

    assert changes == [ChannelChange("alice", "w2", True)]
    assert can_receive(state, "alice", make_event(workspace_id="w2", stream_id="w2-general"))


@pytest.mark.parametrize(
    ("user_id", "row", "action"),
    [
        ("alice", membership_row("alice", "active"), "update"),  # e.g. a role change
        ("carol", membership_row("carol", "invited"), "update"),
        ("carol", None, "delete"),  # an invitation withdrawn
        ("dave", membership_row("dave", "invited"), "create"),  # invited to w1
    ],
)
def test_membership_without_a_status_flip_changes_no_channel(
    user_id: str, row: dict[str, Any] | None, action: str
) -> None:
    assert apply_event(build_state(), _membership(user_id, row, action)) == []


def test_membership_of_an_untracked_user_is_ignored() -> None:
    state = build_state()

    changes = apply_event(state, _membership("zed", membership_row("zed", "active")))

    assert changes == []
    assert "zed" not in state.users
    assert state == build_state()


# apply_event: streams and stream members


def _stream(stream_id: str, row: dict[str, Any] | None, action: str = "update") -> Event:
    return make_event("stream", action=action, stream_id=stream_id, row=row)


def test_stream_created_is_readable_per_its_visibility() -> None:
    state = build_state()

    assert apply_event(state, _stream("new", stream_row("new", "private"), "create")) == []
    assert can_receive(state, "alice", make_event(stream_id="new")) is False

    joined = make_event(
        "stream_member",
        stream_id="new",
        user_id="alice",
        row=stream_member_row("alice", "new"),
    )
    assert apply_event(state, joined) == []
    assert can_receive(state, "alice", make_event(stream_id="new")) is True
    assert can_receive(state, "bob", make_event(stream_id="new")) is False


def test_stream_made_public_opens_it_to_every_active_member() -> None:
    state = build_state()
    assert can_receive(state, "bob", make_event(stream_id="secret")) is False

    apply_event(state, _stream("secret", stream_row("secret", "public")))

    assert state.streams["w1"]["secret"].visibility == "public"
    assert can_receive(state, "bob", make_event(stream_id="secret")) is True
    assert can_receive(state, "carol", make_event(stream_id="secret")) is False


def test_stream_made_private_closes_it_to_non_members() -> None:
    state = build_state()

    apply_event(state, _stream("general", stream_row("general", "private")))

    assert can_receive(state, "alice", make_event(stream_id="general")) is False
    assert can_receive(state, "bob", make_event(stream_id="thread-general")) is False


def test_stream_deleted_is_readable_by_nobody() -> None:
    state = build_state()

    assert apply_event(state, _stream("secret", None, "delete")) == []

    assert "secret" not in state.streams["w1"]
    assert can_receive(state, "alice", make_event(stream_id="secret")) is False
    assert can_receive(state, "alice", make_event(stream_id="thread-secret")) is False


def test_stream_of_an_untracked_workspace_is_ignored() -> None:
    state = build_state()

    apply_event(
        state,
        make_event(
            "stream",
            workspace_id="w9",
            stream_id="x",
            row=stream_row("x", "public", workspace_id="w9"),
        ),
    )

    assert state == build_state()


def test_stream_member_deleted_leaves_the_stream() -> None:
    state = build_state()
    removed = make_event(
        "stream_member", action="delete", stream_id="secret", user_id="alice", row=None
    )

    assert apply_event(state, removed) == []

    assert can_receive(state, "alice", make_event(stream_id="secret")) is False


def test_stream_member_rejoining_after_leaving_reads_again() -> None:
    state = build_state()
    for left in (True, False):
        apply_event(
            state,
            make_event(
                "stream_member",
                action="update",
                stream_id="secret",
                user_id="alice",
                row=stream_member_row("alice", "secret", left=left),
            ),
        )

    assert can_receive(state, "alice", make_event(stream_id="secret")) is True


def test_stream_member_of_an_untracked_user_is_ignored() -> None:
    state = build_state()

    apply_event(
        state,
        make_event(
            "stream_member",
            stream_id="secret",
            user_id="zed",
            row=stream_member_row("zed", "secret"),
        ),
    )

    assert state == build_state()


# apply_event: workspaces and events that change nothing


def test_workspace_deleted_closes_every_active_members_channel() -> None:
    state = build_state()
    deleted = make_event("workspace", action="delete", entity_id="w1", row=None)

    changes = apply_event(state, deleted)

    assert changes == [
        ChannelChange("alice", "w1", False),
        ChannelChange("bob", "w1", False),
        ChannelChange("erin", "w1", False),
    ]
    assert "w1" not in state.streams
    assert all("w1" not in user.workspaces for user in state.users.values())
    assert state.users["dave"].workspaces == {"w2": "active"}
    assert can_receive(state, "alice", make_event(stream_id="general")) is False


def test_workspace_updated_changes_nothing() -> None:
    state = build_state()
    row = {"id": "w1", "name": "Renamed", "slug": "renamed"}

    assert apply_event(state, make_event("workspace", action="update", row=row)) == []
    assert state == build_state()


@pytest.mark.parametrize(
    "event",
    [
        make_event(stream_id="secret"),
        make_event("stream_event", stream_id="secret", row={"id": "secret"}),
        make_event("membership", workspace_id="w1", user_id="alice"),  # no after-image
        make_event("stream", stream_id="secret"),
        make_event("workspace", action="delete"),
    ],
    ids=[
        "stream-event",
        "stream-event-with-access",
        "membership-uncaptured",
        "stream-uncaptured",
        "workspace-delete-uncaptured",
    ],
)
def test_events_without_an_access_after_image_change_nothing(event: Event) -> None:
    state = build_state()

    assert apply_event(state, event) == []
    assert state == build_state()


# workspaces_to_load


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (_membership("alice", membership_row("alice", "active", "w3")), {"w3"}),
        (_membership("alice", membership_row("alice", "active", "w2")), set()),  # loaded
        (_membership("alice", membership_row("alice", "invited", "w3")), set()),
        (_membership("zed", membership_row("zed", "active", "w3")), set()),  # untracked
        (
            make_event("membership", action="delete", workspace_id="w3", user_id="alice", row=None),
            set(),
        ),
        (make_event("membership", workspace_id="w3", user_id="alice"), set()),  # uncaptured
        (
            make_event(
                "stream",
                workspace_id="w3",
                stream_id="s",
                row=stream_row("s", "public", workspace_id="w3"),
            ),
            set(),
        ),
        (make_event(workspace_id="w3"), set()),
    ],
    ids=[
        "joins-unloaded",
        "joins-loaded",
        "invited",
        "untracked-user",
        "deleted",
        "uncaptured",
        "stream-event",
        "plain-event",
    ],
)
def test_workspaces_to_load_names_a_newly_joined_unloaded_workspace(
    event: Event, expected: set[str]
) -> None:
    assert workspaces_to_load(build_state(), event) == expected


def test_loading_then_applying_a_join_makes_the_new_workspace_readable() -> None:
    state = build_state()
    join = _membership("alice", membership_row("alice", "active", "w3"), "create")

    for workspace_id in workspaces_to_load(state, join):
        state.streams[workspace_id] = {"w3-general": StreamInfo("w3-general", "w3", "public", None)}
    changes = apply_event(state, join)

    assert changes == [ChannelChange("alice", "w3", True)]
    event = make_event(workspace_id="w3", stream_id="w3-general")
    assert can_receive(state, "alice", event) is True
