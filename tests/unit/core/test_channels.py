"""Channel keys, and the one channel each event is routed to (PROTOCOL.md §2)."""

import pytest

from core.channels import channel_for, user_channel, workspace_channel
from tests.factories import make_event


def test_user_channel_key() -> None:
    assert user_channel("u1") == "user:u1"


def test_workspace_channel_key() -> None:
    assert workspace_channel("w1") == "workspace:w1"


def test_user_and_workspace_channels_never_collide() -> None:
    assert user_channel("x") != workspace_channel("x")


@pytest.mark.parametrize(
    ("workspace_id", "stream_id", "user_id", "channel"),
    [
        ("w1", None, "u1", "user:u1"),  # rule 1: user_id wins over the workspace
        ("w1", "s1", "u1", "user:u1"),
        (None, None, "u1", "user:u1"),
        ("w1", "s1", None, "workspace:w1"),  # rule 2: readers are filtered by can_receive
        ("w1", None, None, "workspace:w1"),  # rule 3
    ],
)
def test_channel_for_routes_by_user_then_workspace(
    workspace_id: str | None, stream_id: str | None, user_id: str | None, channel: str
) -> None:
    event = make_event(
        type="thing.created",
        resource_type="thing",
        workspace_id=workspace_id,
        stream_id=stream_id,
        user_id=user_id,
    )

    assert channel_for(event) == channel
