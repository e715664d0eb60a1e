-- How committed outbox rows reach the relay (core/schema/ingest.py): the ingest mode of this
-- database, set by `userstream migrate` and followed by every process. One row only.
--
-- `trigger`: the commit trigger of 002_outbox.sql draws each row's position at commit and
-- NOTIFYs the relay. `wal`: the relay reads committed changes from the logical replication slot
-- `userstream_<database>` through the publications `userstream_outbox` and
-- `userstream_access`, and gives positions itself; no trigger runs in the publisher's commit.

CREATE TABLE IF NOT EXISTS userstream_ingest (
    singleton  boolean PRIMARY KEY DEFAULT true CONSTRAINT userstream_ingest_one_row
               CHECK (singleton),
    mode       text NOT NULL DEFAULT 'trigger'
               CONSTRAINT userstream_ingest_mode CHECK (mode IN ('trigger', 'wal')),
    changed_at timestamptz -- null until `userstream migrate` first chooses a mode
);

INSERT INTO userstream_ingest (singleton) VALUES (true) ON CONFLICT (singleton) DO NOTHING;

-- In wal mode the relay gives positions before it publishes: `assigned` is the last position
-- it gave, `lsn` the end of the last transaction it gave positions to (both recorded in the
-- transaction that gives them), `position` stays the last position known published. The slot
-- is acknowledged only up to a recorded `lsn`.
ALTER TABLE outbox_relay ADD COLUMN IF NOT EXISTS assigned bigint;
ALTER TABLE outbox_relay ADD COLUMN IF NOT EXISTS lsn pg_lsn;
