-- The stream model the gateway reads to decide access (PROTOCOL.md §2).
-- Ids are text. Every column but the ones a row is about has a default or is nullable.

CREATE TABLE IF NOT EXISTS workspaces (
    id          text PRIMARY KEY,
    name        text NOT NULL DEFAULT '',
    slug        text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS users (
    id          text PRIMARY KEY,
    email       text,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS workspace_members (
    workspace_id text NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    user_id      text NOT NULL,
    role         text NOT NULL DEFAULT 'member'
                 CONSTRAINT workspace_members_role CHECK (role IN ('owner', 'admin', 'member')),
    status       text NOT NULL DEFAULT 'active'
                 CONSTRAINT workspace_members_status CHECK (status IN ('active', 'invited')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, user_id)
);
CREATE INDEX IF NOT EXISTS workspace_members_user ON workspace_members (user_id);

CREATE TABLE IF NOT EXISTS streams (
    id                     text PRIMARY KEY,
    workspace_id           text NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    stream_type            text NOT NULL DEFAULT 'channel'
                           CONSTRAINT streams_type CHECK (stream_type IN ('channel', 'thread', 'dm', 'incident')),
    name                   text,
    slug                   text,
    parent_stream_id       text REFERENCES streams (id) ON DELETE CASCADE,
    branched_from_event_id text,
    visibility             text NOT NULL DEFAULT 'private'
                           CONSTRAINT streams_visibility CHECK (visibility IN ('public', 'private', 'inherit')),
    status                 text NOT NULL DEFAULT 'active'
                           CONSTRAINT streams_status CHECK (status IN ('active', 'archived', 'resolved')),
    archived_at            timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS streams_workspace ON streams (workspace_id);
CREATE INDEX IF NOT EXISTS streams_parent ON streams (parent_stream_id) WHERE parent_stream_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS stream_members (
    stream_id          text NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    user_id            text NOT NULL,
    role               text NOT NULL DEFAULT 'member'
                       CONSTRAINT stream_members_role CHECK (role IN ('owner', 'admin', 'member')),
    notify_level       text NOT NULL DEFAULT 'all',
    last_read_event_id text,
    last_read_at       timestamptz,
    joined_at          timestamptz NOT NULL DEFAULT now(),
    left_at            timestamptz,
    PRIMARY KEY (stream_id, user_id)
);
CREATE INDEX IF NOT EXISTS stream_members_user ON stream_members (user_id) WHERE left_at IS NULL;
