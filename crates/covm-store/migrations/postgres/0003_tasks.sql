-- Long operations (power on, shutdown, …): state and progress, kept after they end.
CREATE TABLE tasks (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    object_id   TEXT,
    object_name TEXT,
    actor       TEXT NOT NULL,
    request_id  TEXT,
    state       TEXT NOT NULL,
    progress    BIGINT NOT NULL,
    message     TEXT,
    error       TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX tasks_created ON tasks(created_at);
CREATE INDEX tasks_object ON tasks(object_id);
