"""The event model: one committed outbox row (PROTOCOL.md §1) as the gateway carries it.

An `Event` is built once from a row (`Event.from_row`) by the relay, travels over the bus as a
plain dict (`Event.to_wire` / `Event.from_row` again), and is encoded into an SSE frame once per
gateway (`core.frames.encode_change`). `data` and `tx` stay JSON *text* all the way, exactly as
Postgres returned them, so a payload is never parsed or re-serialized on the hot path.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from core.cursors import format_cursor

ACTIONS = frozenset({"create", "update", "delete"})
"""The values of `outbox.action` (PROTOCOL.md §1)."""

ACCESS_RESOURCE_TYPES = frozenset({"workspace", "membership", "stream", "stream_member"})
"""Resource types whose events change who may receive what (PROTOCOL.md §1, §2)."""

ACCESS_IMAGE_TYPE = "userstream.access"
"""`type` of the events the relay writes itself in wal ingest mode, one per committed change
to an access table (sync/wal.py): they move every gateway's access state at their position
and are never delivered to clients (`Event.internal`)."""

BARRIER_TYPE = "userstream.barrier"
"""`type` of the rows a gateway writes in wal ingest mode to learn the position by which every
transaction its snapshot saw has a position (sync/barrier.py); never delivered."""

INTERNAL_TYPES = frozenset({ACCESS_IMAGE_TYPE, BARRIER_TYPE})
"""Event types of the gateway's own bookkeeping rows (`Event.internal`)."""

MAX_DATA_BYTES = 65_536
"""Largest serialized `data` payload, in bytes (PROTOCOL.md §1; enforced by a CHECK too)."""

_SCOPE_COLUMNS = {
    "membership": ("workspace_id", "user_id"),
    "stream_member": ("workspace_id", "stream_id", "user_id"),
    "stream": ("workspace_id", "stream_id"),
    "workspace": ("workspace_id",),
}
_TEXT_FIELDS = ("type", "resource_type", "action", "entity_id")
_OPTIONAL_TEXT_FIELDS = ("workspace_id", "stream_id", "user_id", "actor_id")


class MalformedEvent(ValueError):
    """An outbox row that cannot become an event; the relay records it and skips it."""


def scope_error(resource_type: str, columns: Mapping[str, Any]) -> str | None:
    """Why an event lacks the scope columns PROTOCOL.md §1 requires, or None if it has them.

    Requires `workspace_id` or `user_id` on every event, and on access-changing events the
    columns that name the changed row: `membership` needs `workspace_id` and `user_id`,
    `stream_member` `workspace_id`, `stream_id` and `user_id`, `stream` `workspace_id` and
    `stream_id`, `workspace` `workspace_id`.
    """
    if columns.get("workspace_id") is None and columns.get("user_id") is None:
        return "neither workspace_id nor user_id is set"
    missing = [c for c in _SCOPE_COLUMNS.get(resource_type, ()) if columns.get(c) is None]
    if missing:
        return f"a {resource_type!r} event must set {', '.join(missing)}"
    return None


def format_timestamp(value: datetime) -> str:
    """RFC 3339 UTC text with microseconds, e.g. `2026-11-20T10:00:00.123456Z` (PROTOCOL §3)."""
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    return utc.isoformat(timespec="microseconds")[:-6] + "Z"


@dataclass(slots=True)
class Event:
    """One committed outbox row; never changed once built (not `frozen`: a frozen dataclass
    sets each field through `object.__setattr__`, several times the cost of building it, and
    every process builds one per event it reads).

    `seq` is the commit-ordered position (its text form is the cursor); `xid` identifies the
    publishing transaction (all events of one transaction have consecutive positions and one
    xid); `data`/`tx` are JSON text or None; `access` is the after-image of the access row an
    access-changing event names, captured at commit (`{"row": {...} | null}`), else None;
    `created_at` is RFC 3339 text; `committed_at` is the commit time in epoch seconds;
    `internal` is True for the gateway's own rows (INTERNAL_TYPES: access images, barriers),
    derived from `type`: applied to the access state, never delivered.
    """

    seq: int
    xid: int
    type: str
    resource_type: str
    action: str
    entity_id: str
    workspace_id: str | None
    stream_id: str | None
    user_id: str | None
    actor_id: str | None
    data: str | None
    tx: str | None
    access: Mapping[str, Any] | None
    created_at: str
    committed_at: float
    internal: bool = False

    @property
    def cursor(self) -> str:
        """The event's cursor (PROTOCOL.md §3): its position as 16 hex digits."""
        return format_cursor(self.seq)

    @property
    def changes_access(self) -> bool:
        """True for `workspace`, `membership`, `stream` and `stream_member` events."""
        return self.resource_type in ACCESS_RESOURCE_TYPES

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Event":
        """Build an event from an outbox row or from `to_wire()` output.

        Accepts datetimes or already formatted text for `created_at`, a datetime or epoch
        seconds for `committed_at`, and JSON text for `data`, `tx` and `access`.
        Raises MalformedEvent, naming the row id and the field, when a required field is
        missing or of the wrong type, `action` is unknown, or the scope columns are missing
        (`scope_error`).
        """
        ident = row.get("seq") if row.get("seq") is not None else row.get("id")
        try:
            return cls._from_row(row)
        except MalformedEvent as exc:
            raise MalformedEvent(f"outbox row {ident}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvent(f"outbox row {ident}: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_row(cls, row: Mapping[str, Any]) -> "Event":
        for name in _TEXT_FIELDS:
            value = row[name]
            if not isinstance(value, str) or not value:
                raise MalformedEvent(f"{name} must be a non-empty string, got {value!r}")
        for name in _OPTIONAL_TEXT_FIELDS:
            if row.get(name) is not None and not isinstance(row[name], str):
                raise MalformedEvent(f"{name} must be a string or null, got {row[name]!r}")
        if row["action"] not in ACTIONS:
            raise MalformedEvent(f"action {row['action']!r} is not one of {sorted(ACTIONS)}")
        # An access image names its row by the row's own columns, which need not hold every
        # scope column (a stream member row has no workspace_id).
        internal = row["type"] in INTERNAL_TYPES
        problem = None if internal else scope_error(row["resource_type"], row)
        if problem is not None:
            raise MalformedEvent(problem)
        seq = row["seq"]
        if not isinstance(seq, int) or seq <= 0:
            raise MalformedEvent(f"seq must be a positive integer, got {seq!r}")
        return cls(
            seq=seq,
            xid=int(row["xid"]),
            type=row["type"],
            resource_type=row["resource_type"],
            action=row["action"],
            entity_id=row["entity_id"],
            workspace_id=row.get("workspace_id"),
            stream_id=row.get("stream_id"),
            user_id=row.get("user_id"),
            actor_id=row.get("actor_id"),
            data=_json_text(row.get("data"), "data"),
            tx=_json_text(row.get("tx"), "tx"),
            access=_access(row.get("access")),
            created_at=_created_at(row["created_at"]),
            committed_at=_epoch(row.get("committed_at")),
            internal=internal,
        )

    def to_wire(self) -> dict[str, Any]:
        """A dict of plain JSON types that `from_row` turns back into an equal event."""
        return {
            "seq": self.seq,
            "xid": self.xid,
            "type": self.type,
            "resource_type": self.resource_type,
            "action": self.action,
            "entity_id": self.entity_id,
            "workspace_id": self.workspace_id,
            "stream_id": self.stream_id,
            "user_id": self.user_id,
            "actor_id": self.actor_id,
            "data": self.data,
            "tx": self.tx,
            "access": orjson.dumps(self.access).decode() if self.access is not None else None,
            "created_at": self.created_at,
            "committed_at": self.committed_at,
        }


def _json_text(value: Any, name: str) -> str | None:
    # Postgres `jsonb` output is always valid JSON text; it is embedded, never parsed.
    if value is None or isinstance(value, str):
        return value
    raise MalformedEvent(f"{name} must be JSON text, got {type(value).__name__}")


def _access(value: Any) -> Mapping[str, Any] | None:
    if value is None:
        return None
    parsed = orjson.loads(value) if isinstance(value, str | bytes) else value
    if not isinstance(parsed, Mapping):
        raise MalformedEvent(f"access must be a JSON object, got {parsed!r}")
    return parsed


def _created_at(value: Any) -> str:
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, str):
        return value
    raise MalformedEvent(f"created_at must be a timestamp, got {value!r}")


def _epoch(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value)
