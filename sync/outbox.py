"""Reading the outbox in commit order (the read side of the rule in core/schema/002_outbox.sql).

`fetch_after(conn, after, limit)` returns committed rows with `seq > after` in `seq` order.
Because `seq` is drawn at commit under one lock, a row that commits later always has a greater
`seq` than every row already visible, so following `seq > last` never skips a late committer
(the BIGSERIAL-gap problem: event-driven.io, "How Postgres sequences issues can impact your
messaging guarantees"; commanded/eventstore#3). No wall-clock gap detection is needed.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import orjson

from core.events import Event, MalformedEvent
from core.types import Connection, Row
from sync.topics import WORKSPACE_STATE_TYPES, split_topics

COLUMNS = (
    "id, seq, xid, type, resource_type, action, entity_id, workspace_id, stream_id,"
    " user_id, actor_id, data, tx, access, created_at, committed_at"
)
"""The outbox columns an event is built from (`Event.from_row`), for SELECT and RETURNING."""
_SELECT = f"SELECT {COLUMNS} FROM outbox"


@dataclass(frozen=True, slots=True)
class Malformed:
    """A row that `Event.from_row` refused, with the reason."""

    row: Row
    error: str


@dataclass(slots=True)
class Page:
    """Events read from the outbox, the rows refused, and `last`: the highest `seq` read.

    `last` equals the cursor to continue from even when the last rows were malformed;
    it is the `after` given when nothing was read.
    """

    events: list[Event] = field(default_factory=list)
    malformed: list[Malformed] = field(default_factory=list)
    last: int = 0


async def fetch_after(conn: Connection, after: int, limit: int) -> list[Row]:
    """Committed outbox rows with `seq > after`, in `seq` (commit) order, whole transactions.

    Reads `limit` rows, then, if the page is full, the rest of its last transaction: one
    transaction's rows have consecutive positions (drawn under the commit lock), and a reader
    must see all of them together to judge them against the state after that transaction
    (PROTOCOL.md §2). A page may therefore hold more than `limit` rows.
    """
    query = f"{_SELECT} WHERE seq > $1 ORDER BY seq LIMIT $2"
    rows = list(await conn.fetch(query, after, limit))
    page = rows
    # The rest of the last transaction: following pages by the `seq` index while their rows
    # carry its xid (a filter on `xid` alone would scan the table: `xid` has no index).
    while len(page) == limit:
        xid = rows[-1]["xid"]
        page = list(await conn.fetch(query, rows[-1]["seq"], limit))
        same = list(itertools.takewhile(partial(_in_transaction, xid), page))
        rows += same
        if len(same) < len(page):
            break
    return rows


def _in_transaction(xid: int, row: Row) -> bool:
    return bool(row["xid"] == xid)


async def read_page(conn: Connection, after: int, limit: int) -> Page:
    """`fetch_after` turned into events; rows that are not valid events go to `malformed`."""
    page = Page(last=after)
    for row in await fetch_after(conn, after, limit):
        try:
            page.events.append(Event.from_row(row))
        except MalformedEvent as exc:
            page.malformed.append(Malformed(row, str(exc)))
        page.last = int(row["seq"])
    return page


async def record_dead_letters(conn: Connection, malformed: Sequence[Malformed]) -> None:
    """Keep refused rows in `outbox_dead_letters` with their reason (idempotent per row)."""
    if not malformed:
        return
    await conn.executemany(
        "INSERT INTO outbox_dead_letters (outbox_id, seq, row_data, error)"
        " VALUES ($1, $2, $3::jsonb, $4) ON CONFLICT (outbox_id) DO NOTHING",
        [
            (m.row["id"], m.row["seq"], orjson.dumps(dict(m.row), default=str).decode(), m.error)
            for m in malformed
        ],
    )


_TOPICS = (
    f"{_SELECT} WHERE seq > $1 AND seq <= $2 AND (user_id = ANY($3::text[])"
    " OR (workspace_id = ANY($4::text[])"
    " AND (user_id IS NULL OR resource_type = ANY($5::text[])))) ORDER BY seq"
)


async def read_topics(
    conn: Connection, topics: Sequence[str], after: int, upto: int
) -> list[Event]:
    """The valid events of the bus topics `topics` (`sync.topics`) with `after < seq <= upto`,
    in position order, by the indexes of core/schema/005_topic_history.sql. Rows that are
    not valid events are left out (the relay keeps them in `outbox_dead_letters`). Raises
    ValueError for a key that is not a topic."""
    users, workspaces = split_topics(list(topics))
    rows = await conn.fetch(_TOPICS, after, upto, users, workspaces, sorted(WORKSPACE_STATE_TYPES))
    return valid_events(rows)


def valid_events(rows: Sequence[Row]) -> list[Event]:
    """The events of `rows` (outbox rows), in their order, leaving out the rows that are not
    valid events: readers skip them, the relay keeps them in `outbox_dead_letters`."""
    events = []
    for row in rows:
        try:
            events.append(Event.from_row(row))
        except MalformedEvent:
            continue
    return events
