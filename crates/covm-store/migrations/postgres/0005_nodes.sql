-- The nodes (covm data directories) and the URL where each one's replica answers: a request about a VM
-- that another node runs is forwarded there.
CREATE TABLE nodes (
    id         TEXT PRIMARY KEY,
    url        TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
