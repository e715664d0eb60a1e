-- Per-topic history: the outbox rows of some bus topics (`user:{id}`, `workspace:{id}`) in a
-- range of positions, read by a gateway that subscribes a topic or finds a gap in one
-- (sync/bus_channels.py, sync/outbox.py `read_topics`). A user topic is the rows naming that
-- user; a workspace topic the rows naming the workspace and no user, and its `stream` and
-- `workspace` rows whatever user they name (they change the workspace's access state).

CREATE INDEX IF NOT EXISTS outbox_user_seq ON outbox (user_id, seq);
CREATE INDEX IF NOT EXISTS outbox_workspace_seq ON outbox (workspace_id, seq);
