-- Sagas: multi-step operations (attach a disk: block node, device, config version) with a persisted
-- log, so that a crash in the middle is finished or undone at the next start.
CREATE TABLE sagas (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    -- running | done | undone | stuck
    state       TEXT NOT NULL,
    actor       TEXT NOT NULL,
    request_id  TEXT,
    -- The saga's own typed state (what it decided, what its steps produced).
    data        TEXT NOT NULL,
    -- The steps that completed, in order (JSON array), and the one in progress.
    done        TEXT NOT NULL,
    current     TEXT,
    error       TEXT,
    -- The replica running it (recovery takes only sagas whose replica is gone).
    owner       TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX sagas_unfinished ON sagas(state) WHERE state = 'running';

-- Operation locks: at most one saga changes a VM or a disk at a time. A row lives as long as its saga
-- runs (a crash leaves it, and recovery removes it with the saga's end).
CREATE TABLE op_locks (
    object_id   TEXT PRIMARY KEY,
    saga_id     TEXT NOT NULL REFERENCES sagas(id),
    kind        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    taken_at    TEXT NOT NULL
);
CREATE INDEX op_locks_saga ON op_locks(saga_id);
