"""Channel keys and routing by channel (PROTOCOL.md §2).

Every connection listens on `user:{its user id}` and on `workspace:{id}` for each workspace in
which its user is an active member. An event goes to exactly one channel: its user's when
`user_id` is set (rule 1), else its workspace's (rules 2 and 3). Which of that channel's
subscribers may see it is decided afterwards by `core.access.can_receive`.

The same routing serves changes (`core.events.Event`) and ephemeral signals
(`core.signals.Signal`, PROTOCOL.md §5): both are `Routed`, a scope of three ids.
"""

from typing import Protocol

from core.types import ChannelKey


class Routed(Protocol):
    """What PROTOCOL.md §2 routes by: the scope columns of an event or a signal. At least one
    of `user_id` and `workspace_id` is set (`core.events.scope_error`)."""

    @property
    def user_id(self) -> str | None:
        """Rule 1: the one user whose connections receive it."""
        ...

    @property
    def workspace_id(self) -> str | None:
        """Rules 2 and 3: the workspace whose active members may receive it."""
        ...

    @property
    def stream_id(self) -> str | None:
        """Rule 2: the stream whose readers receive it."""
        ...


def user_channel(user_id: str) -> ChannelKey:
    """`user:{user_id}`: the channel of one user's connections."""
    return f"user:{user_id}"


def workspace_channel(workspace_id: str) -> ChannelKey:
    """`workspace:{workspace_id}`: the channel of the workspace's active members' connections."""
    return f"workspace:{workspace_id}"


def channel_for(event: Routed) -> ChannelKey:
    """The one channel an event or a signal is routed to (PROTOCOL.md §2 rule 1, else
    rules 2-3).

    `Event.from_row` and `core.signals.Signal` guarantee that `user_id` or `workspace_id` is set.
    """
    if event.user_id is not None:
        return user_channel(event.user_id)
    assert event.workspace_id is not None  # invariant of Event.from_row and Signal
    return workspace_channel(event.workspace_id)
