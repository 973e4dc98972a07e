-- VMs: the newest config (the versioned document), the runtime state, and the edit lease.
CREATE TABLE vms (
    id               TEXT PRIMARY KEY REFERENCES objects(id) ON DELETE CASCADE,
    version          BIGINT NOT NULL,
    config           TEXT NOT NULL,
    power_state      TEXT NOT NULL DEFAULT 'off',
    runtime          TEXT NOT NULL DEFAULT '{}',
    generation       BIGINT NOT NULL DEFAULT 0,
    -- The edit lease; `lease_fence` is the last fencing token handed out (monotonic per VM).
    lease_holder_id  TEXT,
    lease_holder     TEXT,
    lease_token      BIGINT,
    lease_acquired_at TEXT,
    lease_expires_at TEXT,
    lease_fence      BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX vms_power_state ON vms(power_state);
CREATE INDEX vms_lease_expiry ON vms(lease_expires_at) WHERE lease_expires_at IS NOT NULL;

-- Every version of every VM's config: immutable.
CREATE TABLE vm_versions (
    vm_id      TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    version    BIGINT NOT NULL,
    config     TEXT NOT NULL,
    author     TEXT NOT NULL,
    time       TEXT NOT NULL,
    message    TEXT,
    request_id TEXT,
    patch      TEXT NOT NULL,
    event_seq  BIGINT,
    PRIMARY KEY (vm_id, version)
);

CREATE TRIGGER vm_versions_no_update BEFORE UPDATE ON vm_versions
    FOR EACH ROW EXECUTE FUNCTION covm_refuse('versions are immutable');
