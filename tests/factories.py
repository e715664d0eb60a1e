"""Builders of the test suite's events: outbox rows, `Event`s, bus batches and SDK messages.

Each builder returns a valid value with fixed defaults; keyword arguments replace any field.
A test that relies on a value passes it explicitly, so what it checks shows at the call.

- `outbox_row()`: a row as asyncpg returns it (datetimes, JSON text), for `Event.from_row`.
- `make_event()`: the `Event` the relay builds from `outbox_row()`.
- `event_at(seq)` / `batch(prev, *positions)`: distinct events at given positions and the
  `Batch` of them, as the bus carries them.
- `stream_message()` / `access_change()`: `OutboxEvent`s for the publisher SDK.
"""

import dataclasses
from datetime import UTC, datetime
from typing import Any

import orjson

from core.events import INTERNAL_TYPES, Event
from core.publish import OutboxEvent
from sync.bus import Batch

CREATED_AT = datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=UTC)
"""`created_at` of `outbox_row()`; its text form `2026-11-20T10:00:00.123456Z` is the event's."""

COMMITTED_AT = datetime(2026, 11, 20, 10, 0, 1, 500000, tzinfo=UTC)
"""`committed_at` of `outbox_row()`; the event's is its epoch seconds."""

MISSING: Any = object()
"""Given as a column of `outbox_row`, leaves that column out of the row."""

_VERBS = {"create": "created", "update": "updated", "delete": "deleted"}


def event_type(resource_type: str, action: str) -> str:
    """The conventional `type` of an event, e.g. `membership.created` for ("membership",
    "create"). Raises KeyError for an action other than create, update or delete."""
    return f"{resource_type}.{_VERBS[action]}"


def outbox_row(**columns: Any) -> dict[str, Any]:
    """An outbox row as asyncpg returns it, with `columns` replaced.

    Defaults: position 42 (`seq`, outbox id 7, xid 1234), a `stream_event.created` of entity
    `ev1` in workspace `w1`, stream `s1`, by `u1`, `data` and `tx` as JSON text, no `access`,
    `created_at` CREATED_AT and `committed_at` COMMITTED_AT. A column given as MISSING is left
    out of the row.
    """
    row: dict[str, Any] = {
        "id": 7,
        "seq": 42,
        "xid": 1234,
        "type": "stream_event.created",
        "resource_type": "stream_event",
        "action": "create",
        "entity_id": "ev1",
        "workspace_id": "w1",
        "stream_id": "s1",
        "user_id": None,
        "actor_id": "u1",
        "data": '{"text": "hello"}',
        "tx": '{"id": "t1", "sourceId": "tab-1"}',
        "access": None,
        "created_at": CREATED_AT,
        "committed_at": COMMITTED_AT,
    }
    row.update(columns)
    return {name: value for name, value in row.items() if value is not MISSING}


def make_event(**fields: Any) -> Event:
    """`Event.from_row(outbox_row())` with `fields` replaced as they are.

    Fields take the event's own forms: `access` a mapping such as `{"row": {...}}`,
    `created_at` RFC 3339 text, `committed_at` epoch seconds. Nothing is checked, so a test
    may build an event `Event.from_row` would refuse.
    """
    return dataclasses.replace(Event.from_row(outbox_row()), **fields)


def event_at(seq: int, **fields: Any) -> Event:
    """A `make_event()` at position `seq` that differs from every other position's.

    Its xid is 7000 + seq, its entity id `evt-{seq}` and its `data` `{"n": seq, ...}` with
    non-ASCII text and a newline, so encoding it for the bus has something to escape.
    `fields` replace any field, as in `make_event`.
    """
    data = orjson.dumps({"n": seq, "text": "héllo\nworld"}).decode()
    defaults = {"seq": seq, "xid": 7000 + seq, "entity_id": f"evt-{seq}", "data": data}
    return make_event(**(defaults | fields))


def batch(prev: int, *positions: int) -> Batch:
    """A `Batch` after `prev` of one `event_at` per position (increasing, past `prev`)."""
    return Batch(prev, tuple(event_at(p) for p in positions))


def stream_message(entity_id: Any = "ev1", **columns: Any) -> OutboxEvent:
    """A valid `stream_event.created` for the publisher SDK, with `columns` replaced.

    Defaults: workspace `w1`, stream `s1`, actor `u1`, `data` `{"text": "hello from <id>"}`
    and `tx` `{"id": "tx-<id>", "sourceId": "tab-1"}`. `entity_id` is not checked here, so a
    test may give one the SDK refuses.
    """
    fields: dict[str, Any] = {
        "type": "stream_event.created",
        "resource_type": "stream_event",
        "action": "create",
        "entity_id": entity_id,
        "workspace_id": "w1",
        "stream_id": "s1",
        "actor_id": "u1",
        "data": {"text": f"hello from {entity_id}"},
        "tx": {"id": f"tx-{entity_id}", "sourceId": "tab-1"},
    }
    fields.update(columns)
    return OutboxEvent(**fields)


def access_change(resource_type: str, action: str, entity_id: str, **scope: Any) -> OutboxEvent:
    """An `OutboxEvent` of `event_type(resource_type, action)` with only the `scope` columns
    given (`workspace_id`, `stream_id`, `user_id`, ...), no actor, data or tx."""
    return OutboxEvent(
        type=event_type(resource_type, action),
        resource_type=resource_type,
        action=action,
        entity_id=entity_id,
        **scope,
    )


PUBLISHED = "type NOT IN ({})".format(", ".join(f"'{t}'" for t in sorted(INTERNAL_TYPES)))
"""SQL condition on outbox rows: written by a publisher, not an access image or a barrier of
wal ingest (core.events.INTERNAL_TYPES)."""
