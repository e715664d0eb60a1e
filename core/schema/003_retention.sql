-- Retention of the outbox: how far back history has been pruned (sync/retention.py).
--
-- The active relay deletes outbox rows older than its retention setting, oldest first, in
-- small batches. Each batch raises `pruned_through` to the largest position it deleted, in the
-- same statement, so a reader that finds `pruned_through <= p` after reading the rows past `p`
-- knows none of them was missing (sync/catchup.py). Every deleted row has a position at or
-- below `pruned_through`; a cursor below it gets `must-refetch` (PROTOCOL.md §3). The value
-- never decreases. One row only.

CREATE TABLE IF NOT EXISTS outbox_retention (
    singleton      boolean PRIMARY KEY DEFAULT true CONSTRAINT outbox_retention_one_row
                   CHECK (singleton),
    pruned_through bigint NOT NULL DEFAULT 0,
    pruned_at      timestamptz
);

INSERT INTO outbox_retention (singleton) VALUES (true) ON CONFLICT (singleton) DO NOTHING;
