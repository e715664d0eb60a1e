-- The transactional outbox (PROTOCOL.md §1) and the relay's bookkeeping.
--
-- Commit-order rule. BIGSERIAL ids are drawn at INSERT but become visible at COMMIT, so a
-- reader that follows `id > last` skips a row whose transaction commits after a higher id was
-- read (event-driven.io, "How Postgres sequences issues can impact your messaging
-- guarantees"; Threa lost events this way). Here every row also gets `seq`, drawn by a
-- deferred constraint trigger, i.e. while its transaction commits, under one transaction-level
-- advisory lock. Postgres makes a transaction visible (ProcArrayEndTransaction) before it
-- releases its locks, so the next committer draws its `seq` only after the previous one is
-- visible: `seq` order is commit order, and a reader that follows `seq > last` can never see
-- a later `seq` before an earlier one. The lock is held only while committing; NOTIFY takes a
-- database-wide lock at the same point anyway (PreCommit_Notify), so the serialisation costs
-- little more than the wake-up itself. A rolled-back transaction leaves a harmless gap in `seq`.
--
-- The same trigger records, for access-changing events, the row they name as it stands at
-- commit (`access`), so gateways judge later events against the state after this transaction
-- without querying the database (PROTOCOL.md §2). For a stream that is not public it also
-- records the current members, so that members added in the transaction that announces the
-- stream can read the announcement even if their rows were not announced one by one; and for
-- every stream the row as it stood before the transaction (`before`, see below).

CREATE SEQUENCE IF NOT EXISTS outbox_seq AS bigint;

CREATE TABLE IF NOT EXISTS outbox (
    id            bigserial PRIMARY KEY,
    seq           bigint UNIQUE,
    xid           bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    type          text NOT NULL CONSTRAINT outbox_type_not_empty CHECK (type <> ''),
    resource_type text NOT NULL CONSTRAINT outbox_resource_type_not_empty CHECK (resource_type <> ''),
    action        text NOT NULL
                  CONSTRAINT outbox_action CHECK (action IN ('create', 'update', 'delete')),
    entity_id     text NOT NULL CONSTRAINT outbox_entity_id_not_empty CHECK (entity_id <> ''),
    workspace_id  text,
    stream_id     text,
    user_id       text,
    actor_id      text,
    data          jsonb CONSTRAINT outbox_data_max_64kib CHECK (octet_length(data::text) <= 65536),
    tx            jsonb,
    access        jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    committed_at  timestamptz,
    CONSTRAINT outbox_needs_workspace_or_user CHECK (workspace_id IS NOT NULL OR user_id IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS outbox_committed_at ON outbox (committed_at);

-- Before-images of `streams` rows: the first time a transaction inserts, updates or deletes a
-- stream, the row as it stood before the transaction (JSON null for an insert) is kept in the
-- transaction-local setting `userstream.streams_before` ({id: row}). A gateway that loads a
-- workspace while the database is ahead of it sets streams back to their state at its own
-- position with them (sync/access_cache.py).
CREATE OR REPLACE FUNCTION userstream_streams_before() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    seen jsonb := coalesce(nullif(current_setting('userstream.streams_before', true), ''), '{}');
    key text := CASE WHEN TG_OP = 'INSERT' THEN NEW.id ELSE OLD.id END;
BEGIN
    IF NOT seen ? key THEN
        seen := seen || jsonb_build_object(
            key, CASE WHEN TG_OP = 'INSERT' THEN 'null'::jsonb ELSE to_jsonb(OLD) END);
        PERFORM set_config('userstream.streams_before', seen::text, true);
    END IF;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS streams_before ON streams;
CREATE TRIGGER streams_before
    AFTER INSERT OR UPDATE OR DELETE ON streams
    FOR EACH ROW EXECUTE FUNCTION userstream_streams_before();

CREATE OR REPLACE FUNCTION userstream_outbox_access(r outbox) RETURNS jsonb
LANGUAGE sql STABLE AS $fn$
    SELECT CASE r.resource_type
        WHEN 'membership' THEN jsonb_build_object('row', (
            SELECT to_jsonb(m) FROM workspace_members m
            WHERE m.workspace_id = r.workspace_id AND m.user_id = r.user_id))
        WHEN 'stream_member' THEN jsonb_build_object('row', (
            SELECT to_jsonb(m) FROM stream_members m
            WHERE m.stream_id = r.stream_id AND m.user_id = r.user_id))
        WHEN 'stream' THEN (
            SELECT jsonb_build_object('row', to_jsonb(s), 'members', CASE
                WHEN s.visibility <> 'public' THEN coalesce((
                    SELECT jsonb_agg(m.user_id ORDER BY m.user_id) FROM stream_members m
                    WHERE m.stream_id = s.id AND m.left_at IS NULL), '[]'::jsonb)
                END,
                'before', CASE WHEN b.seen ? k.id THEN b.seen -> k.id ELSE to_jsonb(s) END)
            FROM (SELECT coalesce(r.stream_id, r.entity_id) AS id) k
            CROSS JOIN (SELECT coalesce(nullif(
                current_setting('userstream.streams_before', true), ''), '{}')::jsonb AS seen) b
            LEFT JOIN streams s ON s.id = k.id)
        WHEN 'workspace' THEN jsonb_build_object('row', (
            SELECT to_jsonb(w) FROM workspaces w WHERE w.id = coalesce(r.workspace_id, r.entity_id)))
    END
$fn$;

CREATE OR REPLACE FUNCTION userstream_outbox_commit() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_advisory_xact_lock(@COMMIT_LOCK@);
    UPDATE outbox
       SET seq = nextval('outbox_seq'),
           committed_at = clock_timestamp(),
           access = CASE WHEN NEW.resource_type IN ('workspace', 'membership', 'stream', 'stream_member')
                         THEN userstream_outbox_access(NEW) END
     WHERE id = NEW.id;
    PERFORM pg_notify('@NOTIFY_CHANNEL@', '');
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS outbox_commit ON outbox;
CREATE CONSTRAINT TRIGGER outbox_commit
    AFTER INSERT ON outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION userstream_outbox_commit();

-- Rows the relay could not turn into events: kept with the reason, never retried by itself.
CREATE TABLE IF NOT EXISTS outbox_dead_letters (
    outbox_id   bigint PRIMARY KEY,
    seq         bigint,
    row_data    jsonb NOT NULL,
    error       text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- The relay's durable progress: the last position it published to the bus.
CREATE TABLE IF NOT EXISTS outbox_relay (
    name       text PRIMARY KEY,
    position   bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
