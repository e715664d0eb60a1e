"""Cursors: opaque, totally ordered positions in the outbox's commit order (PROTOCOL.md §3, §4).

A cursor is the text form of an event's `seq`, the position the outbox assigns to each row *at
commit time* under one lock (see `core/schema/002_outbox.sql`), so that cursor order is commit
order and is the same on every replica. The text is 16 lower-case hex digits: fixed width, so the
byte-wise order of two cursors is the numeric order of their positions and a client may dedupe
with `cursor <= last`.

Position 0 is "before the first event".

Prefetch cursors in wal ingest mode (core/schema/ingest.py) also carry the snapshot the
prefetch read in: `<16 hex digits>-<xmin>:<xmax>:<xip,...>`, the position followed by
Postgres' text form of `pg_current_snapshot()` (PostgreSQL docs, "Transaction ID and Snapshot
Information Functions"). There, positions are given by the relay in the order of the commit
records in the write-ahead log, which is not always the order in which transactions become
visible: a prefetch may see a transaction whose commit record follows one it cannot see yet.
The stream from such a cursor skips every event whose transaction the snapshot saw, by xid,
so snapshot and stream together hold every event exactly once. `-` sorts below every hex
digit, so the cursor sorts after its position and below every later position: the rule
"plain string order is delivery order" still holds (PROTOCOL.md §3). Once an event of a
transaction that started after the snapshot (`xid >= xmax`) has been passed, no later event
can have been seen by it (its commit record follows one written after the snapshot), and
cursors are plain again.
"""

import re
from dataclasses import dataclass

from core.types import Connection

CURSOR_LENGTH = 16
MAX_POSITION = 2**63 - 1  # Postgres bigint
_CURSOR_RE = re.compile(r"[0-9a-f]{16}")
_STREAM_CURSOR_RE = re.compile(r"([0-9a-f]{16})(?:-([0-9]{1,20}):([0-9]{1,20}):([0-9,]{0,16000}))?")
MAX_CURSOR_LENGTH = 16_384
"""Longest cursor accepted, in characters (a snapshot of some 800 concurrent transactions)."""


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


@dataclass(frozen=True, slots=True)
class PrefetchSnapshot:
    """The transactions a prefetch saw: Postgres' `pg_snapshot` (xids are 64-bit `xid8`).

    `xmin`: every xid below it had finished; `xmax`: every xid at or above it had not started;
    `xip`: the xids in between that were still running. `text` is `xmin:xmax:xip,...`.
    """

    xmin: int
    xmax: int
    xip: frozenset[int]

    def saw(self, xid: int) -> bool:
        """Whether the snapshot sees the commits of transaction `xid` (visibility rule of
        `pg_visible_in_snapshot`), i.e. a prefetch in it already holds that transaction's
        changes."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)

    @property
    def text(self) -> str:
        """`xmin:xmax:xip1,xip2,...` with the xids in ascending order, as Postgres prints it."""
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, sorted(self.xip)))}"

    @classmethod
    def parse(cls, text: str) -> "PrefetchSnapshot":
        """Parse `xmin:xmax:xip,...`; raises ValueError unless xmin <= every xip < xmax."""
        xmin_text, xmax_text, xip_text = text.split(":")
        xmin, xmax = int(xmin_text), int(xmax_text)
        xip = frozenset(int(x) for x in xip_text.split(",") if x)
        if not xmin <= xmax or any(not xmin <= x < xmax for x in xip):
            raise ValueError(f"snapshot {text!r} is not ordered xmin <= xip < xmax")
        return cls(xmin, xmax, xip)


@dataclass(frozen=True, slots=True)
class StreamCursor:
    """Where a stream starts: after `position`, skipping the transactions `snapshot` saw.

    `snapshot` is None for plain cursors (every `id:` of trigger mode, and of wal mode once
    past the snapshot's horizon, see the module docstring)."""

    position: int
    snapshot: PrefetchSnapshot | None = None

    def __str__(self) -> str:
        if self.snapshot is None:
            return format_cursor(self.position)
        return f"{format_cursor(self.position)}-{self.snapshot.text}"


def parse_stream_cursor(text: str) -> StreamCursor:
    """A cursor a client may stream from: plain (`parse_cursor`) or with a prefetch snapshot.

    Raises InvalidCursor, naming the value, for anything else, a snapshot whose xids are out
    of order, or a cursor longer than MAX_CURSOR_LENGTH characters.
    """
    match = (
        _STREAM_CURSOR_RE.fullmatch(text)
        if isinstance(text, str) and len(text) <= MAX_CURSOR_LENGTH
        else None
    )
    if match is None:
        raise InvalidCursor(
            f"invalid cursor {_shown(text)}: expected {CURSOR_LENGTH} lower-case hex digits,"
            " optionally followed by -xmin:xmax:xip,..."
        )
    position = parse_cursor(match.group(1))
    if match.group(2) is None:
        return StreamCursor(position)
    try:
        snapshot = PrefetchSnapshot.parse(":".join(match.group(2, 3, 4)))
    except ValueError as exc:
        raise InvalidCursor(f"invalid cursor {_shown(text)}: {exc}") from None
    return StreamCursor(position, snapshot)


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


_CURRENT = """
SELECT (SELECT coalesce(max(seq), 0) FROM outbox) AS position,
       pg_current_snapshot()::text AS snapshot,
       coalesce((SELECT mode FROM userstream_ingest), 'trigger') AS mode
"""


async def current_cursor(conn: Connection) -> str:
    """The cursor to return with a REST prefetch, for the client to stream from (PROTOCOL.md §3).

    Call it inside the transaction that reads the prefetch data. In a REPEATABLE READ (or
    SERIALIZABLE) transaction every statement shares one snapshot, so the data and the cursor
    agree exactly: the stream from the cursor delivers every event the snapshot did not see
    and none it did. Under READ COMMITTED, call it *before* the reads: an event committed in
    between is then both in the data and streamed (apply it idempotently); none is ever missed.

    In trigger ingest mode the cursor is the largest position visible (every later commit gets
    a greater one). In wal mode it also carries the snapshot (module docstring), because the
    relay gives positions after commit: the snapshot may see transactions not yet positioned,
    which will get positions after the cursor's and must not be streamed again.
    """
    row = await conn.fetchrow(_CURRENT)
    position = int(row["position"])
    if row["mode"] != "wal":
        return format_cursor(position)
    return str(StreamCursor(position, PrefetchSnapshot.parse(row["snapshot"])))
