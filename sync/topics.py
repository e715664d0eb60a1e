"""Bus topics: the pub/sub channels an event is published on, for interest-based fan-out.

A gateway replica on the channel bus (`sync.bus_channels`) subscribes only the topics its open
streams need: `user:{id}` for each connected user and `workspace:{id}` for each workspace one
of them is active in, the same keys as the delivery channels (`core.channels`). An event is
published on its delivery channel (PROTOCOL.md §2 rule 1, else rules 2-3), and an event that
changes a workspace's access state (`stream` and `workspace` rows) also on its workspace's
topic when it names a user: every replica that holds that workspace's streams must apply it,
whichever users it serves (sync/access_cache.py). A replica that gets one event on two topics
takes it once, by position.
"""

from core.channels import channel_for, workspace_channel
from core.events import Event
from core.types import ChannelKey

WORKSPACE_STATE_TYPES = frozenset({"stream", "workspace"})
"""Resource types whose events change the access state a workspace's replicas share."""

USER_PREFIX = "user:"
WORKSPACE_PREFIX = "workspace:"


def topics_of(event: Event) -> tuple[ChannelKey, ...]:
    """The topics `event` is published on: its delivery channel (`core.channels.channel_for`),
    then its workspace's when it is a `stream` or `workspace` event that names a user."""
    channel = channel_for(event)
    if (
        event.user_id is not None
        and event.workspace_id is not None
        and event.resource_type in WORKSPACE_STATE_TYPES
    ):
        return (channel, workspace_channel(event.workspace_id))
    return (channel,)


def split_topics(topics: list[ChannelKey]) -> tuple[list[str], list[str]]:
    """(user ids, workspace ids) named by `topics`. Raises ValueError for another key."""
    users, workspaces = [], []
    for topic in topics:
        if topic.startswith(USER_PREFIX):
            users.append(topic.removeprefix(USER_PREFIX))
        elif topic.startswith(WORKSPACE_PREFIX):
            workspaces.append(topic.removeprefix(WORKSPACE_PREFIX))
        else:
            raise ValueError(f"not a bus topic: {topic!r}")
    return users, workspaces
