"""Cursors: opaque, totally ordered positions in the outbox's commit order (PROTOCOL.md §3, §4).

A cursor is the text form of an event's `seq`, the position the outbox assigns to each row *at
commit time* under one lock (see `core/schema/002_outbox.sql`), so that cursor order is commit
order and is the same on every replica. The text is 16 lower-case hex digits: fixed width, so the
byte-wise order of two cursors is the numeric order of their positions and a client may dedupe
with `cursor <= last`.

Position 0 is "before the first event".
"""

import re

from core.types import Connection

CURSOR_LENGTH = 16
MAX_POSITION = 2**63 - 1  # Postgres bigint
_CURSOR_RE = re.compile(r"[0-9a-f]{16}")


class InvalidCursor(ValueError):
    """A cursor string that is not one this gateway issued (wrong length, alphabet or range)."""


def format_cursor(position: int) -> str:
    """Text form of a position: 16 lower-case hex digits, e.g. `000000000000002a` for 42.

    Raises ValueError for a position outside 0..2**63-1.
    """
    if not 0 <= position <= MAX_POSITION:
        raise ValueError(f"position {position} is outside 0..{MAX_POSITION}")
    return f"{position:016x}"


def parse_cursor(text: str) -> int:
    """Position of a cursor string produced by `format_cursor`.

    Raises InvalidCursor, naming the value, for anything else (including upper-case hex).
    """
    if not isinstance(text, str) or not _CURSOR_RE.fullmatch(text):
        raise InvalidCursor(
            f"invalid cursor {_shown(text)}: expected {CURSOR_LENGTH} lower-case hex digits"
        )
    position = int(text, 16)
    if position > MAX_POSITION:
        raise InvalidCursor(f"invalid cursor {text!r}: beyond the largest position")
    return position


def _shown(value: object) -> str:
    # A string (at most 64 characters of it) by repr; anything else by its type only.
    if isinstance(value, str):
        return repr(value if len(value) <= 64 else f"{value[:64]}...")
    return f"of type {type(value).__name__}"


async def current_position(conn: Connection) -> int:
    """The position of the last event committed before this statement's snapshot (0 if none).

    Every event committed after the snapshot gets a greater position, and every event visible
    in it a smaller or equal one, because positions are drawn at commit under one lock (the
    commit-order rule in `core/schema/002_outbox.sql`).
    """
    value = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM outbox")
    return int(value)


async def current_cursor(conn: Connection) -> str:
    """The cursor to return with a REST prefetch, for the client to stream from (PROTOCOL.md §3).

    Call it inside the transaction that reads the prefetch data. In a REPEATABLE READ (or
    SERIALIZABLE) transaction every statement shares one snapshot, so the data and the cursor
    agree exactly: events committed after the snapshot come after the cursor, those visible in
    the snapshot at or before it. Under READ COMMITTED, call it *before* the reads: an event
    committed in between is then both in the data and streamed (apply it idempotently); none
    is ever missed.
    """
    return format_cursor(await current_position(conn))
