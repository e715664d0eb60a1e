"""Channel keys and routing by channel (PROTOCOL.md §2).

Every connection listens on `user:{its user id}` and on `workspace:{id}` for each workspace in
which its user is an active member. An event goes to exactly one channel: its user's when
`user_id` is set (rule 1), else its workspace's (rules 2 and 3). Which of that channel's
subscribers may see it is decided afterwards by `core.access.can_receive`.
"""

from core.events import Event
from core.types import ChannelKey


def user_channel(user_id: str) -> ChannelKey:
    """`user:{user_id}`: the channel of one user's connections."""
    return f"user:{user_id}"


def workspace_channel(workspace_id: str) -> ChannelKey:
    """`workspace:{workspace_id}`: the channel of the workspace's active members' connections."""
    return f"workspace:{workspace_id}"


def channel_for(event: Event) -> ChannelKey:
    """The one channel an event is routed to (PROTOCOL.md §2 rule 1, else rules 2-3).

    `Event.from_row` guarantees that `user_id` or `workspace_id` is set.
    """
    if event.user_id is not None:
        return user_channel(event.user_id)
    assert event.workspace_id is not None  # invariant of Event.from_row
    return workspace_channel(event.workspace_id)
