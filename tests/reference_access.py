"""A reference for PROTOCOL.md §2 written in SQL, for tests only: who may receive each event.

The gateway answers access from an in-memory state moved along by after-images
(`core.access`, `sync.access_cache`); this module answers the same question straight from the
stream-model tables, the way Cella's `checkStreamAccess` does, so that a test can compare the
two. Evaluated right after a transaction commits (and before the next one), the tables are the
state after that transaction, which is the state PROTOCOL.md §2 judges its events against.

The rules, as `readers_of` applies them to an outbox row `e` and a candidate user `u`:

1. `e.user_id` set: `u = e.user_id`, nothing else.
2. else `e.stream_id` set: `u` is an active member of `e.workspace_id`
   (`workspace_members.status = 'active'`), the stream exists in that workspace, and along its
   lineage (the stream, then while the current stream's visibility is `inherit` its parent in
   the same workspace, at most `MAX_INHERIT_DEPTH` parents up) some stream is `public` or has
   `u` as a current member (`stream_members.left_at IS NULL`); or `u` carries the
   `system_role: "admin"` claim, which reads every stream of a workspace where `u` is active.
3. else (`workspace_id` only): `u` is an active member of `e.workspace_id`.

Nothing here imports the gateway's code: the reference must not share its mistakes.
"""

from collections.abc import Collection, Iterable

from core.types import Connection

MAX_INHERIT_DEPTH = 10
"""Parents an `inherit` stream may climb to find a readable one (PROTOCOL.md §2)."""

_READERS = """
WITH RECURSIVE
    ev AS (
        SELECT id, workspace_id, stream_id, user_id FROM outbox WHERE id = ANY($1::bigint[])
    ),
    candidate AS (SELECT DISTINCT u AS user_id FROM unnest($2::text[]) AS u),
    admin AS (SELECT user_id FROM candidate WHERE user_id = ANY($3::text[])),
    active AS (SELECT workspace_id, user_id FROM workspace_members WHERE status = 'active'),
    -- The stream of each rule-2 event, then the parents it inherits from: `origin` is the
    -- event's stream, `depth` the number of parents climbed to reach `id`.
    lineage (origin, workspace_id, id, visibility, parent_stream_id, depth) AS (
        SELECT s.id, s.workspace_id, s.id, s.visibility, s.parent_stream_id, 0
          FROM streams s
         WHERE EXISTS (
                SELECT 1 FROM ev
                 WHERE ev.user_id IS NULL
                   AND ev.stream_id = s.id
                   AND ev.workspace_id = s.workspace_id)
        UNION ALL
        SELECT l.origin, p.workspace_id, p.id, p.visibility, p.parent_stream_id, l.depth + 1
          FROM lineage l
          JOIN streams p ON p.id = l.parent_stream_id AND p.workspace_id = l.workspace_id
         WHERE l.visibility = 'inherit' AND l.depth < $4::int
    ),
    -- Who can read each origin stream, leaving the workspace-membership check to the end.
    stream_reader (origin, user_id) AS (
        SELECT l.origin, c.user_id
          FROM lineage l CROSS JOIN candidate c
         WHERE l.visibility = 'public'
            OR EXISTS (
                SELECT 1 FROM stream_members m
                 WHERE m.stream_id = l.id AND m.user_id = c.user_id AND m.left_at IS NULL)
        UNION
        SELECT l.origin, a.user_id
          FROM lineage l CROSS JOIN admin a
         WHERE l.depth = 0
    )
SELECT ev.id, c.user_id                                   -- rule 1
  FROM ev JOIN candidate c ON c.user_id = ev.user_id
UNION
SELECT ev.id, c.user_id                                   -- rule 2
  FROM ev
  JOIN candidate c ON TRUE
  JOIN active m ON m.workspace_id = ev.workspace_id AND m.user_id = c.user_id
  JOIN stream_reader r ON r.origin = ev.stream_id AND r.user_id = c.user_id
 WHERE ev.user_id IS NULL AND ev.stream_id IS NOT NULL
UNION
SELECT ev.id, c.user_id                                   -- rule 3
  FROM ev
  JOIN candidate c ON TRUE
  JOIN active m ON m.workspace_id = ev.workspace_id AND m.user_id = c.user_id
 WHERE ev.user_id IS NULL AND ev.stream_id IS NULL
"""


async def readers_of(
    conn: Connection,
    outbox_ids: Iterable[int],
    users: Collection[str],
    admins: Collection[str] = (),
) -> dict[int, set[str]]:
    """Which of `users` may receive each outbox row in `outbox_ids` (PROTOCOL.md §2).

    Returns outbox id -> set of user ids, with an entry (possibly empty) for every id asked
    about; ids with no outbox row map to the empty set. `admins` are the users whose token
    carries `system_role: "admin"`; an admin not in `users` is ignored. The answer reflects the
    tables as `conn` sees them now: call it right after the events' transaction commits, before
    any later transaction changes the stream model, to get the state PROTOCOL.md §2 requires.
    """
    ids = sorted(set(outbox_ids))
    readers: dict[int, set[str]] = {outbox_id: set() for outbox_id in ids}
    if not ids:
        return readers
    rows = await conn.fetch(_READERS, ids, list(users), list(admins), MAX_INHERIT_DEPTH)
    for row in rows:
        readers[int(row["id"])].add(row["user_id"])
    return readers
