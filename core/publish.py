"""The publisher SDK: the one place that writes the outbox (PROTOCOL.md §1).

Call `publish` or `publish_many` inside your own asyncpg transaction, next to the change the
event announces; the event becomes visible to the relay exactly when, and only if, your
transaction commits::

    async with conn.transaction():
        await conn.execute("INSERT INTO stream_members (stream_id, user_id) VALUES ($1, $2)", s, u)
        await publish(conn, OutboxEvent(
            type="stream_member.created", resource_type="stream_member", action="create",
            entity_id=f"{s}:{u}", workspace_id=w, stream_id=s, user_id=u, actor_id=admin))

Every event is validated before anything is written; a bad one raises `InvalidEvent` and
writes nothing, so the caller's transaction is not aborted by a CHECK violation or by a value
Postgres cannot store (a NUL character: text and jsonb refuse U+0000, PostgreSQL docs §8.3 and
§8.14).

`publish_ephemeral(sink, event)` sends the same kind of event as an ephemeral signal
(PROTOCOL.md §5) instead: validated the same way, routed by §2 on every gateway, written
nowhere. It needs no database, only the bus the gateways share: pass a `sync.bus_redis.RedisBus`
built with the gateways' `REDIS_URL` and `USERSTREAM_REDIS_PREFIX` (any `SignalSink` fits)::

    bus = RedisBus(redis_url, "userstream:")
    await publish_ephemeral(bus, OutboxEvent(
        type="typing", resource_type="stream", action="update", entity_id=s,
        workspace_id=w, stream_id=s, actor_id=u, data={"active": True}))

A service without Redis access sends it over HTTP instead: `POST /publish` with
`"ephemeral": true` on the event (`gateway.publish`).
"""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from core.events import ACTIONS, MAX_DATA_BYTES, scope_error
from core.signals import Signal, signal_time
from core.types import Connection


class InvalidEvent(ValueError):
    """An event the outbox would refuse; the message names the field, the value and the limit."""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One change to announce: the columns of PROTOCOL.md §1.

    `data` is any JSON-serializable value (orjson), at most 64 KiB (65,536 bytes) as Postgres
    stores it; `tx` is a mapping of JSON-serializable values, or None. No string, key or value
    may contain a NUL character (U+0000).
    """

    type: str
    resource_type: str
    action: str
    entity_id: str
    workspace_id: str | None = None
    stream_id: str | None = None
    user_id: str | None = None
    actor_id: str | None = None
    data: Any = None
    tx: Mapping[str, Any] | None = field(default=None)

    def validate(self) -> tuple[Any, ...]:
        """The INSERT parameters, in `_COLUMNS` order, with `data`/`tx` as JSON text.

        Raises InvalidEvent for an empty required field, an unknown action, missing scope
        columns (`core.events.scope_error`), a non-string id, a NUL character in a string field
        or in the JSON text of `data` or `tx`, a `tx` that is not a mapping or None, and
        unserializable or oversize `data`.
        """
        for name in ("type", "resource_type", "action", "entity_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidEvent(f"{name} must be a non-empty string, got {value!r}")
            _refuse_nul(name, value)
        for name in ("workspace_id", "stream_id", "user_id", "actor_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidEvent(f"{name} must be a non-empty string or None, got {value!r}")
            if value is not None:
                _refuse_nul(name, value)
        if self.tx is not None and not isinstance(self.tx, Mapping):
            # The annotation says so, but no type checker stands between JSON and the SDK.
            raise InvalidEvent(
                f"tx must be a mapping (a JSON object) or None, got {type(self.tx).__name__}"
            )
        if self.action not in ACTIONS:
            raise InvalidEvent(f"action {self.action!r} is not one of {sorted(ACTIONS)}")
        problem = scope_error(self.resource_type, _scope(self))
        if problem is not None:
            raise InvalidEvent(f"event {self.type!r} for {self.entity_id!r}: {problem}")
        return (
            self.type,
            self.resource_type,
            self.action,
            self.entity_id,
            self.workspace_id,
            self.stream_id,
            self.user_id,
            self.actor_id,
            _data_text(self.data),
            _json_text(self.tx, "tx"),
        )


def _scope(event: OutboxEvent) -> dict[str, str | None]:
    return {
        "workspace_id": event.workspace_id,
        "stream_id": event.stream_id,
        "user_id": event.user_id,
    }


_COLUMNS = (
    "type, resource_type, action, entity_id, workspace_id, stream_id, user_id, actor_id, data, tx"
)


def _refuse_nul(name: str, value: str) -> None:
    """Raise InvalidEvent if `value` contains U+0000, which Postgres text cannot store
    (PostgreSQL docs §8.3: "the character with code zero cannot be stored")."""
    if "\x00" in value:
        raise InvalidEvent(
            f"{name} contains a NUL character (U+0000), which Postgres cannot store: {value!r}"
        )


_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
"""An escaped U+0000 in JSON text: `\\u0000` preceded by an even number of backslashes, zero
included (after an odd number its backslash closes an escaped `\\\\`, and the text is the
six literal characters `\\u0000`). orjson writes U+0000 only in this form (RFC 8259 §7:
control characters are escaped)."""


def _json_text(value: Any, name: str) -> str | None:
    """`value` as JSON text (orjson), or None for None. Raises InvalidEvent when it is not
    serializable or contains U+0000, which jsonb refuses ("unsupported Unicode escape
    sequence", PostgreSQL docs §8.14)."""
    if value is None:
        return None
    try:
        text = orjson.dumps(value).decode()
    except TypeError as exc:
        raise InvalidEvent(f"{name} is not JSON-serializable: {exc}") from None
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise InvalidEvent(
            f"{name} contains a NUL character (U+0000, \\u0000 in its JSON text) in a string or"
            " key, which Postgres jsonb cannot store"
        )
    return text


def _data_text(value: Any) -> str | None:
    text = _json_text(value, "data")
    if text is None:
        return None
    size = len(text.encode())
    if size * 2 > MAX_DATA_BYTES:
        # Postgres prints jsonb with a space after every ':' and ','; measure that form, from
        # the JSON text so that values only orjson serializes (datetime, UUID...) are measured.
        spaced = json.dumps(orjson.loads(text), separators=(", ", ": "), ensure_ascii=False)
        size = len(spaced.encode())
    if size > MAX_DATA_BYTES:
        raise InvalidEvent(f"data is {size} bytes serialized; the limit is {MAX_DATA_BYTES} bytes")
    return text


async def publish(conn: Connection, event: OutboxEvent) -> int:
    """Insert one event into the outbox in the caller's transaction; return its outbox `id`.

    Raises InvalidEvent (nothing written) for an event the outbox would refuse.
    """
    params = event.validate()
    value = await conn.fetchval(
        f"INSERT INTO outbox ({_COLUMNS}) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb) RETURNING id",
        *params,
    )
    return int(value)


async def publish_many(conn: Connection, events: Sequence[OutboxEvent]) -> list[int]:
    """Insert several events with one statement, in order; return their outbox ids.

    All are validated first: one InvalidEvent and nothing is written. Their cursors follow
    the order given.
    """
    rows = [event.validate() for event in events]
    if not rows:
        return []
    columns = list(zip(*rows, strict=True))
    records = await conn.fetch(
        f"INSERT INTO outbox ({_COLUMNS}) "
        "SELECT a, b, c, d, e, f, g, h, i, j FROM unnest($1::text[], $2::text[], $3::text[],"
        " $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::jsonb[]) "
        "WITH ORDINALITY AS t(a, b, c, d, e, f, g, h, i, j, n) ORDER BY n RETURNING id",
        *[list(column) for column in columns],
    )
    return [int(r["id"]) for r in records]


class SignalSink(Protocol):
    """Where `publish_ephemeral` hands a signal; every `sync.bus.Bus` is one."""

    async def publish_signal(self, signal: Signal) -> None:
        """Send `signal` to every gateway; raises ConnectionError when the transport is down."""
        ...


def ephemeral_signal(event: OutboxEvent, at: str | None = None) -> Signal:
    """The signal that carries `event` (PROTOCOL.md §5): its type and scope columns,
    `actor_id` as the sender, `data` as JSON text, `at` (now when None, `signal_time`).
    `resource_type`, `action`, `entity_id` and `tx` are checked but not carried: the
    `ephemeral` frame has no field for them. Raises InvalidEvent as `OutboxEvent.validate`."""
    *_, data, _tx = event.validate()
    return Signal(
        type=event.type,
        workspace_id=event.workspace_id,
        stream_id=event.stream_id,
        user_id=event.user_id,
        actor_id=event.actor_id,
        data=data,
        at=at or signal_time(),
    )


async def publish_ephemeral(sink: SignalSink, event: OutboxEvent) -> Signal:
    """Send `event` as an ephemeral signal through `sink` (the gateways' bus); return it.

    Nothing is written to the outbox; the signal reaches the connections that are live on a
    gateway when it arrives, at most once (PROTOCOL.md §5). Raises InvalidEvent (nothing
    sent) for an event the outbox would refuse, and the sink's ConnectionError when its
    transport is down (the signal is lost: send a later one, not this one again).
    """
    signal = ephemeral_signal(event)
    await sink.publish_signal(signal)
    return signal
