-- VM snapshots: the config version they hold and the tag of each disk they cover (the tags live in
-- the disk files). `doc` is the snapshot as the API shows it, less what has columns of its own.
CREATE TABLE snapshots (
    id         TEXT PRIMARY KEY,
    vm_id      TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    doc        TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (vm_id, name)
);
CREATE INDEX snapshots_vm ON snapshots(vm_id, created_at);
