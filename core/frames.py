"""SSE frames of the public wire format (PROTOCOL.md §3), encoded once as bytes.

Each function returns one complete frame ending in a blank line, with `\n` line ends
(WHATWG HTML §9.2.6 accepts `\n`, `\r` and `\r\n`). JSON is produced by orjson, which escapes
line breaks inside strings, so every payload is a single `data:` line. The change payload
embeds the event's `data` and `tx` JSON text as they came from Postgres (`orjson.Fragment`),
without parsing them. An ephemeral signal's frame and a presence frame (PROTOCOL.md §5) have no
`id:` line, so they never move a client's `Last-Event-ID`.
"""

from collections.abc import Sequence

import orjson

from core.events import Event
from core.signals import Signal
from core.types import Frame

PING: Frame = b": ping\n\n"
"""The keep-alive comment (PROTOCOL.md §3)."""


def _frame(event: str, payload: object, cursor: str | None = None) -> Frame:
    id_line = b"id: " + cursor.encode() + b"\n" if cursor is not None else b""
    head = b"event: " + event.encode() + b"\n" + id_line
    return head + b"data: " + orjson.dumps(payload) + b"\n\n"


def change_payload(event: Event, cursor: str | None = None) -> bytes:
    """The JSON object of a change frame, keys in PROTOCOL.md §3 order (camelCase); `cursor`
    replaces the event's own (a cursor carrying a prefetch snapshot, core/cursors.py)."""
    return orjson.dumps(
        {
            "cursor": cursor or event.cursor,
            "type": event.type,
            "resourceType": event.resource_type,
            "action": event.action,
            "entityId": event.entity_id,
            "workspaceId": event.workspace_id,
            "streamId": event.stream_id,
            "userId": event.user_id,
            "actorId": event.actor_id,
            "createdAt": event.created_at,
            "data": _embedded(event.data),
            "tx": _embedded(event.tx),
        }
    )


def _embedded(text: str | None) -> orjson.Fragment | None:
    # Valid JSON text holds line breaks only as whitespace between tokens (inside strings
    # they are escaped), so turning them into spaces keeps the value and keeps the frame to
    # one `data:` line. Postgres `jsonb` output has none; this guards any other source.
    if text is None:
        return None
    if "\n" in text or "\r" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    return orjson.Fragment(text)


def encode_change(event: Event, cursor: str | None = None) -> Frame:
    """`event: change` with `id: <cursor>` and the change payload (PROTOCOL.md §3); `cursor`
    replaces the event's own in both (a cursor carrying a prefetch snapshot)."""
    text = (cursor or event.cursor).encode()
    return b"event: change\nid: " + text + b"\ndata: " + change_payload(event, cursor) + b"\n\n"


def encode_ephemeral(signal: Signal) -> Frame:
    """`event: ephemeral` with `data: {"type", "workspaceId", "streamId", "userId", "data",
    "at"}` and no `id:` line (PROTOCOL.md §5); `userId` is the sender (`Signal.actor_id`) and
    `data` the signal's JSON text, embedded as it is."""
    payload = {
        "type": signal.type,
        "workspaceId": signal.workspace_id,
        "streamId": signal.stream_id,
        "userId": signal.actor_id,
        "data": _embedded(signal.data),
        "at": signal.at,
    }
    return b"event: ephemeral\ndata: " + orjson.dumps(payload) + b"\n\n"


def encode_presence(workspace_id: str, online: Sequence[str], offline: Sequence[str]) -> Frame:
    """`event: presence` with `data: {"workspaceId", "online": [...], "offline": [...]}` and no
    `id:` line (PROTOCOL.md §5): the users who came online and went offline in the workspace
    since the previous presence frame, in the order given."""
    payload = {"workspaceId": workspace_id, "online": list(online), "offline": list(offline)}
    return b"event: presence\ndata: " + orjson.dumps(payload) + b"\n\n"


def encode_offset(cursor: str) -> Frame:
    """`event: offset`, `id: <cursor>`, `data: {"cursor": ...}`: the stream is live from here."""
    return _frame("offset", {"cursor": cursor}, cursor)


def encode_must_refetch(reason: str) -> Frame:
    """`event: must-refetch` with `data: {"reason": ...}`: the client must prefetch again."""
    return _frame("must-refetch", {"reason": reason})


def encode_close(reason: str) -> Frame:
    """`event: close` with `data: {"reason": ...}`, sent before the server ends a stream."""
    return _frame("close", {"reason": reason})


def encode_retry(retry_ms: int) -> Frame:
    """`retry: <ms>`: the reconnection delay an EventSource uses (WHATWG HTML §9.2.6).

    Raises ValueError for a negative delay.
    """
    if retry_ms < 0:
        raise ValueError(f"retry must be >= 0 ms, got {retry_ms}")
    return b"retry: " + str(retry_ms).encode() + b"\n\n"
