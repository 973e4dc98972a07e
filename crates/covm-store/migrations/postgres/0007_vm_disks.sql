-- Which VM's config holds which disk, kept by the store in the same transaction as every config
-- version, so that a disk's attachments are one indexed read, whatever the number of VMs.
CREATE TABLE vm_disks (
    vm_id      TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    -- The disk as the config names it (its name, or its id in configs written long ago).
    disk       TEXT NOT NULL,
    controller TEXT NOT NULL,
    unit       BIGINT NOT NULL,
    read_only  BIGINT NOT NULL,
    generation BIGINT NOT NULL
);
CREATE INDEX vm_disks_disk ON vm_disks(disk);
CREATE INDEX vm_disks_vm ON vm_disks(vm_id);

INSERT INTO vm_disks (vm_id, disk, controller, unit, read_only, generation)
SELECT v.id, d->>'disk', d->>'controller', (d->>'unit')::bigint,
       CASE WHEN COALESCE((d->>'read_only')::boolean, false) THEN 1 ELSE 0 END,
       COALESCE((d->>'generation')::bigint, 0)
FROM vms v, jsonb_array_elements(COALESCE(v.config::jsonb->'disks', '[]'::jsonb)) d;
