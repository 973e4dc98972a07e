-- covm foundation schema (PostgreSQL; the same shape as SQLite's, so that one body of SQL serves both). Times are RFC 3339 UTC strings with microseconds, so that they sort
-- as text; ids are hyphenated UUID strings.

-- Refuses a change to an append-only table (the log, config versions).
CREATE FUNCTION covm_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0];
END
$$;

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- The inventory tree. `path` is materialized (`/team-a/web-1`; the root is `/`) and unique, so a path
-- names one object whatever its kind. `spec` holds the kind's own fields as JSON.
CREATE TABLE objects (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    parent_id  TEXT REFERENCES objects(id),
    path       TEXT NOT NULL UNIQUE,
    spec       TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE INDEX objects_parent ON objects(parent_id, name);
CREATE INDEX objects_kind_name ON objects(kind, name);
-- Names are unique per kind, except folders, which are unique within their parent (through `path`).
CREATE UNIQUE INDEX objects_kind_name_unique ON objects(kind, name) WHERE kind <> 'folder';

-- Closure of the tree: one row per (object, ancestor-or-self) with the distance between them.
CREATE TABLE closure (
    object_id   TEXT NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
    ancestor_id TEXT NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
    depth       BIGINT NOT NULL,
    PRIMARY KEY (object_id, ancestor_id)
);
CREATE INDEX closure_ancestor ON closure(ancestor_id, depth);

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL
);

CREATE TABLE groups (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);

CREATE TABLE group_members (
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    user_id  TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_user ON group_members(user_id);

CREATE TABLE roles (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    builtin    BIGINT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE role_privileges (
    role_id   TEXT NOT NULL REFERENCES roles(id) ON DELETE CASCADE,
    privilege TEXT NOT NULL,
    PRIMARY KEY (role_id, privilege)
);

-- A grant of a role to a user or a group on an inventory object.
CREATE TABLE permissions (
    id             TEXT PRIMARY KEY,
    principal_kind TEXT NOT NULL CHECK (principal_kind IN ('user', 'group')),
    principal_id   TEXT NOT NULL,
    role_id        TEXT NOT NULL REFERENCES roles(id),
    object_id      TEXT NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
    propagate      BIGINT NOT NULL,
    created_at     TEXT NOT NULL,
    UNIQUE (principal_kind, principal_id, object_id)
);
CREATE INDEX permissions_principal ON permissions(principal_id);
CREATE INDEX permissions_object ON permissions(object_id);

-- Session and API tokens; only the SHA-256 of a token is kept.
CREATE TABLE tokens (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ('session', 'api')),
    name       TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX tokens_user ON tokens(user_id, kind);

-- The one append-only log: change feed, audit log and history. `hash = sha256(prev_hash || entry)`.
-- `scope_id` is the inventory object whose visibility decides who sees the event in the feed; `feed` is
-- 0 for audit-only entries (denials, failed requests, sign-ins).
CREATE TABLE events (
    seq            BIGINT PRIMARY KEY,
    time           TEXT NOT NULL,
    actor          TEXT NOT NULL,
    request_id     TEXT,
    kind           TEXT NOT NULL,
    object_kind    TEXT NOT NULL,
    object_id      TEXT,
    object_name    TEXT,
    scope_id       TEXT,
    feed           BIGINT NOT NULL,
    version_before BIGINT,
    version_after  BIGINT,
    patch          TEXT,
    data           TEXT NOT NULL,
    hash           TEXT NOT NULL
);
CREATE INDEX events_object ON events(object_id, seq);
CREATE INDEX events_actor ON events(actor, seq);
CREATE INDEX events_kind ON events(kind, seq);
CREATE INDEX events_time ON events(time);

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION covm_refuse('events are append-only');
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION covm_refuse('events are append-only');

-- Every replica's feed tailer LISTENs on covm_log: a commit that appended to the log wakes them at once
-- (a lost notification only delays an event: the tailers also poll).
CREATE FUNCTION covm_log_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('covm_log', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER events_notify AFTER INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION covm_log_notify();
