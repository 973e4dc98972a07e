-- Snapshots of a VM (the config version they hold and the tag of each disk they cover) or of one disk
-- (its tag). The tags live in the disk files. `owner_id` is the VM or the disk; `doc` is the snapshot
-- as the API shows it.
CREATE TABLE snapshots (
    id         TEXT PRIMARY KEY,
    owner_id   TEXT NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    doc        TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (owner_id, name)
);
CREATE INDEX snapshots_owner ON snapshots(owner_id, created_at);
