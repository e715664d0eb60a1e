"""Simulated activity in the demo world, so that the demo page always has something to show.

`ActivitySimulator.step()` performs one random action of a chat workspace as one transaction:
the change to the stream-model tables where there is one, and the outbox events announcing it
through the publisher SDK (PROTOCOL.md §1), so every action exercises the path a real service
would. `run(stop)` repeats it at `rate_per_s` on average (exponential gaps, like real traffic).

The simulator keeps the facts the demo is built on: it never changes a workspace membership
(frank stays invited), never changes who is in #leadership (bob stays out), and never leaves a
public channel with fewer than two members. It remembers the messages it posted (in memory) so
that reactions and read cursors point at real message ids.
"""

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import nanoid

from core.publish import OutboxEvent, publish, publish_many
from core.types import Connection
from gateway.demo_world import DemoWorld

logger = logging.getLogger(__name__)

_MESSAGES = (
    "Morning all! Standup in 10 minutes.",
    "The staging deploy is green.",
    "Can someone review the pricing page copy?",
    "Lunch order closes at noon.",
    "I pushed the fix for the login redirect.",
    "Customer call moved to 3pm.",
    "Who has the slides from Tuesday?",
    "Release notes draft is up for comments.",
)
_REPLIES = (
    "Agreed, let's ship it Thursday.",
    "I can take the QA pass.",
    "Docs are updated.",
    "Blocking on the analytics event names.",
    "Marketing wants a screenshot first.",
)
_LEADERSHIP = (
    "Q3 budget draft is in the shared folder.",
    "Hiring plan: two backend roles approved.",
    "Board deck review tomorrow at 9.",
    "Keep the reorg under wraps until Friday.",
)
_DM = (
    "Got a minute for a quick call?",
    "Thanks for covering the on-call shift!",
    "Sending you the contract now.",
    "Coffee later?",
)
_MENTIONS = ("can you take a look?", "thoughts on this?", "this one's yours.", "great work!")
_EMOJI = ("👍", "🎉", "👀", "❤️", "😂", "🚀")
_PUBLIC_CHANNELS = ("general", "random")
_LABELS = {"launch": "the thread 'Launch plan'", "dm": "the alice/bob DM"}
"""How log lines name streams by key; channels are `#key`."""
_MIN_CHANNEL_MEMBERS = 2
_RECENT_PER_STREAM = 20


@dataclass(frozen=True)
class _Done:
    """What one action did: a log line, and the message it posted (stream id, event id)."""

    description: str
    posted: tuple[str, str] | None = None


_Action = Callable[[Connection], Awaitable[_Done]]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{nanoid.generate(size=12)}"


class ActivitySimulator:
    """Random realistic changes in a seeded demo world (`gateway.demo_world.seed`).

    `rate_per_s` is the average number of actions per second (> 0); `seed` makes the choice
    of actions repeatable (ids stay random). Raises ValueError for a rate <= 0.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        world: DemoWorld,
        *,
        rate_per_s: float = 2.0,
        seed: int | None = None,
    ) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
        self._pool = pool
        self._world = world
        self._rate_per_s = rate_per_s
        self._rng = random.Random(seed)
        self._recent: dict[str, deque[str]] = {}
        self._labels = {sid: _LABELS.get(key, f"#{key}") for key, sid in world.stream_ids.items()}
        self._actions: tuple[_Action, ...] = (
            self._channel_message,
            self._thread_reply,
            self._reaction,
            self._read_cursor,
            self._mention,
            self._join_or_leave,
            self._leadership_message,
            self._dm_message,
        )
        self._weights = (6, 3, 3, 3, 2, 2, 1, 1)

    async def run(self, stop: asyncio.Event) -> None:
        """Perform actions until `stop` is set, waiting a random gap between them (exponential
        with mean 1/rate_per_s s, capped at 2/rate_per_s s so a watcher never waits long).
        A failed action is logged and the next one goes ahead."""
        while not stop.is_set():
            try:
                await self.step()
            except (asyncpg.PostgresError, OSError):
                logger.warning("simulated action failed", exc_info=True)
            gap_s = min(self._rng.expovariate(self._rate_per_s), 2 / self._rate_per_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=gap_s)

    async def step(self) -> str:
        """Perform one random action in one transaction; return a one-line description.

        Raises what asyncpg raises when the database fails (nothing is then written)."""
        action = self._rng.choices(self._actions, self._weights)[0]
        async with self._pool.acquire() as conn, conn.transaction():
            done = await action(conn)
        if done.posted is not None:
            stream_id, event_id = done.posted
            self._recent.setdefault(stream_id, deque(maxlen=_RECENT_PER_STREAM)).append(event_id)
        logger.debug("simulated: %s", done.description)
        return done.description

    # Actions: each runs inside the step's transaction and publishes what it changed.

    async def _channel_message(self, conn: Connection) -> _Done:
        key = self._rng.choice(_PUBLIC_CHANNELS)
        author = self._rng.choice(await self._members(conn, key))
        return await self._post(conn, key, author, self._rng.choice(_MESSAGES))

    async def _thread_reply(self, conn: Connection) -> _Done:
        # The thread inherits #general's visibility (public): any active member may reply.
        author = self._world.user(self._rng.choice(self._world.active_handles))
        return await self._post(conn, "launch", author, self._rng.choice(_REPLIES))

    async def _leadership_message(self, conn: Connection) -> _Done:
        author = self._rng.choice(await self._members(conn, "leadership"))
        return await self._post(conn, "leadership", author, self._rng.choice(_LEADERSHIP))

    async def _dm_message(self, conn: Connection) -> _Done:
        author = self._rng.choice(await self._members(conn, "dm"))
        return await self._post(conn, "dm", author, self._rng.choice(_DM))

    async def _mention(self, conn: Connection) -> _Done:
        """A channel message naming someone, and their notification, in one transaction."""
        key = self._rng.choice(_PUBLIC_CHANNELS)
        author = self._rng.choice(await self._members(conn, key))
        handle = self._rng.choice(
            [h for h in self._world.active_handles if self._world.user(h) != author]
        )
        target = self._world.user(handle)
        text = f"@{handle} {self._rng.choice(_MENTIONS)}"
        message_id = _new_id("evt")
        notification = OutboxEvent(
            type="notification.created",
            resource_type="notification",
            action="create",
            entity_id=_new_id("ntf"),
            workspace_id=self._world.workspace_id,
            stream_id=self._world.stream(key),
            user_id=target,
            actor_id=author,
            data={
                "kind": "mention",
                "text": f"{self._name(author)} mentioned you in #{key}",
                "messageId": message_id,
            },
        )
        await publish_many(conn, [self._message(key, author, text, message_id), notification])
        return _Done(
            f"{self._name(author)} mentioned {self._name(target)} in #{key}",
            (self._world.stream(key), message_id),
        )

    async def _reaction(self, conn: Connection) -> _Done:
        posted = [(sid, ids[-1]) for sid, ids in self._recent.items() if ids]
        if not posted:
            return await self._channel_message(conn)
        stream_id, message_id = self._rng.choice(posted)
        actor = self._rng.choice(await self._readers(conn, stream_id))
        emoji = self._rng.choice(_EMOJI)
        await publish(
            conn,
            OutboxEvent(
                type="reaction.created",
                resource_type="reaction",
                action="create",
                entity_id=_new_id("rx"),
                workspace_id=self._world.workspace_id,
                stream_id=stream_id,
                actor_id=actor,
                data={"messageId": message_id, "emoji": emoji, "authorName": self._name(actor)},
            ),
        )
        return _Done(f"{self._name(actor)} reacted {emoji} in {self._labels[stream_id]}")

    async def _read_cursor(self, conn: Connection) -> _Done:
        """A user marks a stream read up to its latest message (user-scoped, PROTOCOL.md §2.1)."""
        user_id = self._world.user(self._rng.choice(self._world.active_handles))
        joined = await conn.fetch(
            "SELECT stream_id FROM stream_members WHERE user_id = $1 AND left_at IS NULL",
            user_id,
        )
        unread = [r["stream_id"] for r in joined if self._recent.get(r["stream_id"])]
        if not unread:
            return await self._channel_message(conn)
        stream_id = self._rng.choice(unread)
        last_read = self._recent[stream_id][-1]
        await conn.execute(
            "UPDATE stream_members SET last_read_event_id = $3, last_read_at = now()"
            " WHERE stream_id = $1 AND user_id = $2",
            stream_id,
            user_id,
            last_read,
        )
        await publish(
            conn,
            OutboxEvent(
                type="read_cursor.updated",
                resource_type="read_cursor",
                action="update",
                entity_id=f"{stream_id}:{user_id}",
                workspace_id=self._world.workspace_id,
                stream_id=stream_id,
                user_id=user_id,
                actor_id=user_id,
                data={"lastReadEventId": last_read},
            ),
        )
        return _Done(f"{self._name(user_id)} read {self._labels[stream_id]} up to {last_read}")

    async def _join_or_leave(self, conn: Connection) -> _Done:
        """Someone joins or leaves a public channel; each keeps at least two members."""
        key = self._rng.choice(_PUBLIC_CHANNELS)
        stream_id = self._world.stream(key)
        members = await self._members(conn, key)
        everyone = [self._world.user(h) for h in self._world.active_handles]
        outside = [u for u in everyone if u not in members]
        joins = bool(outside) and (len(members) <= _MIN_CHANNEL_MEMBERS or self._rng.random() < 0.5)
        user_id = self._rng.choice(outside if joins else members)
        if joins:
            await conn.execute(
                "INSERT INTO stream_members (stream_id, user_id) VALUES ($1, $2)"
                " ON CONFLICT (stream_id, user_id)"
                " DO UPDATE SET left_at = NULL, joined_at = now()",
                stream_id,
                user_id,
            )
        else:
            await conn.execute(
                "UPDATE stream_members SET left_at = now() WHERE stream_id = $1 AND user_id = $2",
                stream_id,
                user_id,
            )
        await publish(
            conn,
            OutboxEvent(
                type="stream_member.created" if joins else "stream_member.deleted",
                resource_type="stream_member",
                action="create" if joins else "delete",
                entity_id=f"{stream_id}:{user_id}",
                workspace_id=self._world.workspace_id,
                stream_id=stream_id,
                user_id=user_id,
                actor_id=user_id,
                data={"authorName": self._name(user_id)},
            ),
        )
        return _Done(f"{self._name(user_id)} {'joined' if joins else 'left'} #{key}")

    # Helpers.

    async def _post(self, conn: Connection, key: str, author: str, text: str) -> _Done:
        message_id = _new_id("evt")
        await publish(conn, self._message(key, author, text, message_id))
        stream_id = self._world.stream(key)
        where = self._labels[stream_id]
        return _Done(f"{self._name(author)} posted in {where}: {text}", (stream_id, message_id))

    def _message(self, key: str, author: str, text: str, message_id: str) -> OutboxEvent:
        return OutboxEvent(
            type="stream_event.created",
            resource_type="stream_event",
            action="create",
            entity_id=message_id,
            workspace_id=self._world.workspace_id,
            stream_id=self._world.stream(key),
            actor_id=author,
            data={"text": text, "authorName": self._name(author)},
        )

    async def _members(self, conn: Connection, key: str) -> list[str]:
        """Current members of stream `key` (never empty: the seeded members if none)."""
        rows = await conn.fetch(
            "SELECT user_id FROM stream_members WHERE stream_id = $1 AND left_at IS NULL"
            " ORDER BY user_id",
            self._world.stream(key),
        )
        members = [r["user_id"] for r in rows]
        return members or [self._world.user("alice")]

    async def _readers(self, conn: Connection, stream_id: str) -> list[str]:
        """Users who may act in `stream_id`: members of a private stream, else anyone active."""
        for key in self._world.private_stream_keys:
            if self._world.stream(key) == stream_id:
                return await self._members(conn, key)
        return [self._world.user(h) for h in self._world.active_handles]

    def _name(self, user_id: str) -> str:
        return self._world.names.get(user_id, user_id)
