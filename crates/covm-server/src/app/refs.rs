//! Every object a VM config names, resolved and authorized in one place.
//!
//! A config names a folder, a pool, networks (`nics[].network`), disks (`disks[].disk`) and files in
//! datastores (`kernel`, `initrd`, `cdrom`). Whichever request carries the config — `POST /vms`,
//! `PATCH /vms/{vm}`, `POST /vms/{vm}/revert`, or the disk endpoints that write a config version —
//! each reference goes through [`App::config_refs_authorize`], and a disk through the same
//! [`App::disk_use_authorize`] and [`App::disk_writers_check`] as `POST /vms/{vm}/disks`. So a field
//! can never be a side door around its dedicated endpoint.
//!
//! The rules, per reference (only those that differ from the version the change starts from; a
//! revert starts from the newest version, so the old version is checked as of now):
//!
//! | field | must be | privilege, on the referenced object |
//! |---|---|---|
//! | `folder` | a folder the caller sees | `VirtualMachine.Inventory.Create` |
//! | `pool` | a pool the caller sees | `Resource.AssignVMToPool` |
//! | `nics[].network` | a network the caller sees | `Network.Assign` |
//! | `disks[].disk` | a disk the caller sees, free for this use (one writer) | `Disk.Attach` |
//! | `kernel`, `initrd`, `cdrom` | `DATASTORE:path` in a datastore the caller sees, never a covm disk's file | `Datastore.Browse` |
//!
//! An object the caller cannot see is "not found" (404), one it sees without the privilege is a 403
//! naming it; both are audited (`app::authz`). A new disk attachment also gets its generation here,
//! and its reference is stored as the disk's name.
//!
//! Disk rules need the disks locked: a caller that adds or widens a disk attachment holds the disks'
//! operation locks while it checks and writes ([`App::disk_refs_lock`]).

use covm_types::ErrorCode;
use std::collections::HashMap;

use covm_store::ObjectRecord;
use covm_types::api::ObjectKind;
use covm_types::disk::{DiskAttachmentView, Sharing};
use covm_types::vm::{VmConfig, datastore_path};
use covm_types::{Error, ErrorKind, Privilege};
use uuid::Uuid;

use super::saga::SagaGuard;
use super::{App, Ctx};

/// The folder inside every datastore that holds covm's disk images; no file reference may point into it.
pub const DISKS_DIR: &str = "disks";

/// The kind of the lock-only saga that holds the disks of a config change.
pub const CONFIG_DISKS_LOCK: &str = "vm.config.disks";

/// The file references of a config, with their field names.
pub fn file_refs(c: &VmConfig) -> [(&'static str, Option<&String>); 3] {
    [("kernel", c.kernel.as_ref()), ("initrd", c.initrd.as_ref()), ("cdrom", c.cdrom.as_ref())]
}

impl App {
    /// A disk the caller may attach to a VM: visible (else 404), with `Disk.Attach` on it (else 403).
    pub(crate) async fn disk_use_authorize(
        &self,
        ctx: &Ctx,
        reference: &str,
        field: &str,
    ) -> Result<ObjectRecord, Error> {
        let disk = self.object_resolve(ctx, reference, Some(ObjectKind::Disk), field).await?;
        self.require(ctx, &disk, Privilege::DiskAttach).await?;
        Ok(disk)
    }

    /// The VMs (other than `except`) whose config holds `disk`, each with its power state.
    pub(crate) async fn disk_holders(
        &self,
        disk: &ObjectRecord,
        except: Option<Uuid>,
    ) -> Result<Vec<(DiskAttachmentView, covm_types::vm::PowerState)>, Error> {
        let holders = self.store().disk_attachments(&disk.name, disk.id).await?;
        Ok(holders
            .into_iter()
            .filter(|a| Some(a.vm_id) != except)
            .map(|a| (a.power_state, a))
            .map(|(power, a)| (super::disks::attachment_view(a), power))
            .collect())
    }

    /// The one-writer rule for a new (or newly read-write) attachment of `disk` to `vm`.
    pub(crate) async fn disk_writers_check(
        &self,
        disk: &ObjectRecord,
        vm: Option<Uuid>,
        read_only: bool,
    ) -> Result<(), Error> {
        let holders = self.disk_holders(disk, vm).await?;
        let sharing: Sharing = serde_json::from_value(disk.spec["sharing"].clone()).unwrap_or_default();
        super::attach::writers_check(&disk.name, sharing, read_only, &holders)
    }

    /// A file reference (`DATASTORE:path`): its datastore is one the caller sees and may browse, and
    /// the path is not inside the datastore's disk folder.
    pub(crate) async fn file_ref_authorize(&self, ctx: &Ctx, field: &str, reference: &str) -> Result<(), Error> {
        let (ds, rel) = datastore_path(field, reference)?;
        let obj = self.object_resolve(ctx, &ds, Some(ObjectKind::Datastore), field).await?;
        self.require(ctx, &obj, Privilege::DatastoreBrowse).await?;
        if rel.split('/').next() == Some(DISKS_DIR) {
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                ErrorCode::ManagedDiskFile,
                format!("{reference} is inside {ds}:{DISKS_DIR}/, where covm keeps disk images; attach a disk instead"),
            )
            .with_field(field));
        }
        Ok(())
    }

    /// Takes the operation locks of the VM (if any), of every disk its config holds now and of every
    /// disk the change names, so that the disk rules hold until the change is written (as an attach
    /// saga holds them). A disk the VM does not hold yet is authorized first ([`App::disk_use_authorize`]),
    /// so nobody locks a disk they may not use. `None`: nothing to lock.
    pub(crate) async fn disk_refs_lock(
        &self,
        ctx: &Ctx,
        vm: Option<&covm_store::VmRecord>,
        new: &VmConfig,
    ) -> Result<Option<SagaGuard>, Error> {
        let old = vm.map(|v| super::vms::parse_config(&v.config)).transpose()?;
        let mut locks: Vec<Uuid> = vm.map(|v| v.object.id).into_iter().collect();
        for d in old.iter().flat_map(|o| o.disks.iter()) {
            if let Some(o) = self.object_lookup(&d.disk, Some(ObjectKind::Disk)).await?
                && !locks.contains(&o.id)
            {
                locks.push(o.id);
            }
        }
        for (i, d) in new.disks.iter().enumerate() {
            let held = self.object_lookup(&d.disk, Some(ObjectKind::Disk)).await?.filter(|o| locks.contains(&o.id));
            if held.is_none() {
                let o = self.disk_use_authorize(ctx, &d.disk, &format!("disks[{i}].disk")).await?;
                if !locks.contains(&o.id) {
                    locks.push(o.id);
                }
            }
        }
        if locks.is_empty() {
            return Ok(None);
        }
        self.saga_begin(ctx, CONFIG_DISKS_LOCK, &locks).await.map(Some)
    }

    /// The disk ids of a config's attachments, by index (references that no longer resolve are left out).
    async fn disk_ids(&self, c: Option<&VmConfig>) -> Result<HashMap<usize, Uuid>, Error> {
        let mut out = HashMap::new();
        for (i, d) in c.map(|c| c.disks.as_slice()).unwrap_or_default().iter().enumerate() {
            if let Some(o) = self.object_lookup(&d.disk, Some(ObjectKind::Disk)).await? {
                out.insert(i, o.id);
            }
        }
        Ok(out)
    }

    /// Resolves and authorizes every reference of `new` that differs from `old` (all of them when
    /// there is no `old`: a new VM), and settles its disk attachments (names, generations) unless the
    /// caller did (`disks_checked`: an attach or detach saga, which checked them under its locks). `vm`
    /// is the VM being changed and `parent` its folder now. Returns the folder's id.
    ///
    /// A caller that adds disks holds their locks ([`App::disk_refs_lock`]) around this and the write.
    pub(crate) async fn config_refs_authorize(
        &self,
        ctx: &Ctx,
        vm: Option<&ObjectRecord>,
        old: Option<&VmConfig>,
        parent: Uuid,
        new: &mut VmConfig,
        disks_checked: bool,
    ) -> Result<Uuid, Error> {
        let folder = match old {
            Some(o) if o.folder == new.folder => parent,
            _ => {
                let folder = self.object_resolve(ctx, &new.folder, Some(ObjectKind::Folder), "folder").await?;
                self.require(ctx, &folder, Privilege::VmInventoryCreate).await?;
                folder.id
            }
        };
        if old.is_none_or(|o| o.pool != new.pool) {
            let pool = self.object_resolve(ctx, &new.pool, Some(ObjectKind::Pool), "pool").await?;
            self.require(ctx, &pool, Privilege::ResourceAssignVmToPool).await?;
        }
        for (i, n) in new.nics.iter().enumerate() {
            if !n.port_forwards.is_empty() {
                // QEMU forwards ports only on its own user networking; other networks publish theirs.
                let kind =
                    self.object_lookup(&n.network, Some(ObjectKind::Network)).await?.map(|o| o.spec["kind"].clone());
                if kind.is_some_and(|k| k != "user") {
                    return Err(Error::invalid(
                        &format!("nics[{i}].port_forwards"),
                        format!("{} is not a user network: port forwards per NIC are for user networks", n.network),
                    ));
                }
            }
            if old.is_some_and(|o| o.nics.iter().any(|x| x.network == n.network)) {
                continue;
            }
            let field = format!("nics[{i}].network");
            let net = self.object_resolve(ctx, &n.network, Some(ObjectKind::Network), &field).await?;
            self.require(ctx, &net, Privilege::NetworkAssign).await?;
        }
        let before = old.map(file_refs);
        for (i, (field, v)) in file_refs(new).into_iter().enumerate() {
            if let Some(r) = v
                && before.as_ref().is_none_or(|b| b[i].1 != Some(r))
            {
                self.file_ref_authorize(ctx, field, r).await?;
            }
        }
        if !disks_checked {
            self.disk_refs_settle(ctx, vm, old, new).await?;
        }
        Ok(folder)
    }

    /// The disk attachments of `new`: each disk named once; a new attachment (or one turned
    /// read-write) is authorized and checked against the one-writer rule, stored under the disk's
    /// name with a new generation; an unchanged one keeps its generation.
    async fn disk_refs_settle(
        &self,
        ctx: &Ctx,
        vm: Option<&ObjectRecord>,
        old: Option<&VmConfig>,
        new: &mut VmConfig,
    ) -> Result<(), Error> {
        let old_ids = self.disk_ids(old).await?;
        let mut seen: Vec<Uuid> = Vec::new();
        let mut generation = None;
        for i in 0..new.disks.len() {
            let field = format!("disks[{i}].disk");
            let d = new.disks[i].clone();
            let prev = match self.object_lookup(&d.disk, Some(ObjectKind::Disk)).await? {
                Some(o) => old.and_then(|c| {
                    c.disks.iter().enumerate().find(|(j, _)| old_ids.get(j) == Some(&o.id)).map(|(_, p)| p.clone())
                }),
                None => None,
            };
            // Already attached as it was (or narrowed to read-only): nothing new is asked of the disk.
            let kept = prev.as_ref().filter(|p| !p.read_only || d.read_only);
            let disk = match kept {
                Some(_) => self
                    .object_lookup(&d.disk, Some(ObjectKind::Disk))
                    .await?
                    .ok_or_else(|| Error::not_found("disk", &d.disk).with_field(field.clone()))?,
                _ => self.disk_use_authorize(ctx, &d.disk, &field).await?,
            };
            if seen.contains(&disk.id) {
                return Err(Error::invalid(&field, format!("{} is named twice in disks", disk.name)));
            }
            seen.push(disk.id);
            let entry = &mut new.disks[i];
            entry.disk = disk.name.clone();
            match kept {
                Some(p) => entry.generation = p.generation,
                // New, or turned read-write: checked like an attach, with a generation of its own.
                None => {
                    self.disk_writers_check(&disk, vm.map(|v| v.id), d.read_only).await?;
                    let g = match generation {
                        Some(g) => g,
                        None => u64::try_from(self.store().events_head().await?).unwrap_or(0) + 1,
                    };
                    generation = Some(g);
                    entry.generation = g;
                }
            }
        }
        Ok(())
    }
}
