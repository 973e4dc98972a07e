//! First-class disks: objects of their own with an image file in a datastore, made and changed with
//! `qemu-img`. covm names every file (`DATASTORE/disks/<id>.<format>`); a user never gives a path,
//! except to import a file that already lies inside a datastore.
//!
//! Every operation checks everything before it changes anything (privileges, sizes, free space, the
//! pool's disk quota), then runs as a saga ([`super::saga`]): create, clone and import make the file and
//! then the record (the pivot); delete removes the record (the pivot) and then the file; resize grows
//! the image (or, on a running VM, the block node) and then the record. A failure or a crash leaves
//! no file without a record and no record without its file.

use covm_types::ErrorCode;
use std::path::{Path, PathBuf};

use covm_hv::img;
use covm_store::ObjectRecord;
use covm_types::api::{ObjectKind, Page, Quota};
use covm_types::disk::{
    CAPACITY_MAX, CAPACITY_MIN, DiskAttachmentView, DiskClone, DiskCreate, DiskFormat, DiskImport, DiskListQuery,
    DiskResize, DiskState, DiskView, ImageView, Sharing,
};
use covm_types::vm::datastore_path;
use covm_types::{Error, ErrorKind, Privilege, ROOT_ID};
use serde_json::json;
use uuid::Uuid;

use super::host::fs_capacity;
use super::node::hv_error;
use super::saga::Saga;
use super::saga::disk::*;
use super::saga::plug::{AttachSaga, DetachSaga, MoveSaga};
use super::{App, Ctx, EventExt};

pub(crate) fn attachment_view(a: covm_store::AttachmentRecord) -> DiskAttachmentView {
    DiskAttachmentView {
        vm: a.vm_name,
        controller: a.controller,
        unit: a.unit,
        read_only: a.read_only,
        generation: a.generation,
    }
}

pub(crate) fn spec_str<'a>(o: &'a ObjectRecord, k: &str) -> &'a str {
    o.spec[k].as_str().unwrap_or_default()
}

/// A disk's wrapped key, if its image is encrypted.
pub(crate) fn wrapped_key(spec: &serde_json::Value) -> Option<super::keys::WrappedKey> {
    serde_json::from_value(spec.get("encryption")?.clone()).ok()
}

pub(crate) fn format_of(o: &ObjectRecord) -> DiskFormat {
    serde_json::from_value(o.spec["format"].clone()).unwrap_or_default()
}

fn capacity_check(field: &str, bytes: u64) -> Result<(), Error> {
    if !(CAPACITY_MIN..=CAPACITY_MAX).contains(&bytes) || !bytes.is_multiple_of(512) {
        return Err(Error::new(
            ErrorKind::InvalidRequest,
            ErrorCode::InvalidCapacity,
            format!("a disk holds from 1 MiB to 64 TiB, in multiples of 512 bytes; {bytes} is not that"),
        )
        .with_field(field));
    }
    Ok(())
}

impl App {
    pub(crate) async fn datastore_for_disk(&self, ctx: &Ctx, name: &str) -> Result<(ObjectRecord, PathBuf), Error> {
        let ds = self.object_resolve(ctx, name, Some(ObjectKind::Datastore), "datastore").await?;
        self.require(ctx, &ds, Privilege::DatastoreAllocateSpace).await?;
        let root = PathBuf::from(spec_str(&ds, "path"));
        Ok((ds, root))
    }

    pub(crate) fn space_check(root: &Path, bytes: u64) -> Result<(), Error> {
        let (_, free) =
            fs_capacity(root).map_err(|e| Error::internal(format!("cannot read the datastore's capacity: {e}")))?;
        if bytes > free {
            return Err(Error::conflict(
                ErrorCode::InsufficientSpace,
                format!("the datastore has {free} bytes free; the disk needs {bytes}"),
            )
            .with_details(json!({ "free_bytes": free, "needed_bytes": bytes })));
        }
        Ok(())
    }

    /// The pool a disk counts against, after checking its disk quota holds with `bytes` more.
    pub(crate) async fn disk_pool_admit(&self, pool: &str, bytes: u64, except: Option<Uuid>) -> Result<String, Error> {
        let p = self
            .object_lookup(pool, Some(ObjectKind::Pool))
            .await?
            .ok_or_else(|| Error::invalid("pool", format!("there is no pool {pool}")))?;
        let quota: Quota = serde_json::from_value(p.spec["quota"].clone()).unwrap_or_default();
        if let Some(limit) = quota.disk_bytes {
            let used = bytes + self.store().pool_usage(&p.name, except).await?.disk_bytes;
            if used > limit {
                return Err(Error::conflict(
                    ErrorCode::QuotaExceeded,
                    format!("pool {} allows {limit} bytes of disks; this would make {used}", p.name),
                ));
            }
        }
        Ok(p.name)
    }

    /// VMs whose config holds the disk (by name or id): one indexed read of the store.
    pub(crate) async fn disk_attachments(&self, disk: &ObjectRecord) -> Result<Vec<DiskAttachmentView>, Error> {
        Ok(self.store().disk_attachments(&disk.name, disk.id).await?.into_iter().map(attachment_view).collect())
    }

    /// The running VMs that hold a disk.
    async fn disk_holders_running(&self, disk: &ObjectRecord) -> Result<Vec<Uuid>, Error> {
        let holders = self.store().disk_attachments(&disk.name, disk.id).await?;
        Ok(holders.into_iter().filter(|a| a.power_state.is_active()).map(|a| a.vm_id).collect())
    }

    async fn disk_view(&self, o: &ObjectRecord, with_image: bool) -> Result<DiskView, Error> {
        let image = if with_image {
            match self.disk_file(o).await {
                Ok(p) => img::info(&p).await.ok().map(|i| ImageView {
                    format: i.format,
                    virtual_size: i.virtual_size,
                    actual_size: i.actual_size,
                    backing_file: i.backing_filename,
                }),
                Err(_) => None,
            }
        } else {
            None
        };
        let attachments = self.disk_attachments(o).await?;
        // A saga at work on the disk says what it is doing; otherwise the attachments decide.
        let state = match self.store().op_lock_get(o.id).await?.map(|l| l.kind) {
            Some(k) if k == AttachSaga::KIND || k == MoveSaga::KIND => DiskState::Attaching,
            Some(k) if k == DetachSaga::KIND => DiskState::Detaching,
            Some(k) if k == ResizeSaga::KIND => DiskState::Resizing,
            _ if attachments.is_empty() => DiskState::Detached,
            _ => DiskState::Attached,
        };
        Ok(DiskView {
            id: o.id,
            name: o.name.clone(),
            path: o.path.clone(),
            datastore: spec_str(o, "datastore").to_owned(),
            file: spec_str(o, "file").to_owned(),
            format: format_of(o),
            capacity_bytes: o.spec["capacity_bytes"].as_u64().unwrap_or(0),
            sharing: serde_json::from_value(o.spec["sharing"].clone()).unwrap_or_default(),
            state,
            pool: spec_str(o, "pool").to_owned(),
            encryption: wrapped_key(&o.spec).map(|_| covm_types::disk::DiskEncryption::Luks),
            attachments,
            image,
            created_at: o.created_at,
        })
    }

    /// The passphrase of a disk's image (record id, spec), if it is encrypted.
    pub(crate) fn disk_key(
        &self,
        id: Uuid,
        spec: &serde_json::Value,
    ) -> Result<Option<covm_hv::secret::DiskKey>, Error> {
        match wrapped_key(spec) {
            Some(w) => Ok(Some(self.keys()?.unwrap(id, &w)?)),
            None => Ok(None),
        }
    }

    /// The passphrase of a disk's image by the disk's id (None: not encrypted, or the disk is gone).
    pub(crate) async fn disk_key_by_id(&self, id: Uuid) -> Result<Option<covm_hv::secret::DiskKey>, Error> {
        match self.store().object_get(id).await? {
            Some(o) => self.disk_key(o.id, &o.spec),
            None => Ok(None),
        }
    }

    /// The absolute path of a disk's image file.
    pub(crate) async fn disk_file(&self, o: &ObjectRecord) -> Result<PathBuf, Error> {
        let ds = self
            .object_lookup(spec_str(o, "datastore"), Some(ObjectKind::Datastore))
            .await?
            .ok_or_else(|| Error::conflict(ErrorCode::DatastoreMissing, "the disk's datastore is gone"))?;
        Ok(PathBuf::from(spec_str(&ds, "path")).join(spec_str(o, "file")))
    }

    /// A linked clone's base: the backing disk's image and format (None for an ordinary disk).
    pub(crate) async fn disk_backing(&self, o: &ObjectRecord) -> Result<Option<(PathBuf, String)>, Error> {
        let Some(b) = o.spec["backing_disk"].as_str() else { return Ok(None) };
        let id = Uuid::parse_str(b).map_err(|_| Error::internal("a disk names a backing disk that is not an id"))?;
        let base = self.store().object_get(id).await?.ok_or_else(|| {
            Error::conflict(
                ErrorCode::DiskMissing,
                format!("{} is a linked clone of a disk that no longer exists", o.name),
            )
        })?;
        Ok(Some((self.disk_file(&base).await?, format_of(&base).as_str().to_owned())))
    }

    /// Runs a create, clone or import saga; the new disk's view. A clone's source (`copy_of`) stays
    /// locked while it is copied, so no one attaches it read-write meanwhile, and is checked with the
    /// lock held.
    async fn disk_make(&self, ctx: &Ctx, saga: CreateSaga, copy_of: Option<ObjectRecord>) -> Result<DiskView, Error> {
        let (app, ctx2) = (self.clone(), ctx.clone());
        self.to_the_end(async move {
            let mut locks = vec![saga.record.id];
            locks.extend(copy_of.as_ref().map(|s| s.id));
            let guard = app.saga_begin(&ctx2, CreateSaga::KIND, &locks).await?;
            if let Some(src) = &copy_of
                && let Err(e) = app.clone_check(src).await
            {
                return Err(guard.refuse(e).await);
            }
            let saga = guard.run(&ctx2, saga).await?;
            let rec = app
                .store()
                .object_get(saga.record.id)
                .await?
                .ok_or_else(|| Error::not_found("disk", &saga.record.name))?;
            app.disk_view(&rec, false).await
        })
        .await
    }

    async fn disk_placement(&self, ctx: &Ctx, folder: Option<&str>) -> Result<ObjectRecord, Error> {
        let f = self.object_resolve(ctx, folder.unwrap_or("/"), Some(ObjectKind::Folder), "folder").await?;
        self.require(ctx, &f, Privilege::DiskCreate).await?;
        Ok(f)
    }

    pub async fn disk_create(&self, ctx: &Ctx, p: DiskCreate) -> Result<DiskView, Error> {
        capacity_check("capacity_bytes", p.capacity_bytes)?;
        if p.sharing == Sharing::MultiWriter && p.format != DiskFormat::Raw {
            return Err(Error::invalid("sharing", "a multi-writer disk is raw (format: raw)"));
        }
        if p.encryption.is_some() && p.format != DiskFormat::Qcow2 {
            return Err(Error::invalid("encryption", "an encrypted disk is qcow2 (LUKS inside qcow2)"));
        }
        let folder = self.disk_placement(ctx, p.folder.as_deref()).await?;
        let (ds, root) = self.datastore_for_disk(ctx, &p.datastore).await?;
        if self.object_lookup(p.name.as_str(), Some(ObjectKind::Disk)).await?.is_some() {
            return Err(Error::conflict(ErrorCode::AlreadyExists, format!("a disk named {} already exists", p.name))
                .with_field("name"));
        }
        Self::space_check(&root, p.capacity_bytes)?;
        let pool = self.disk_pool_admit(p.pool.as_deref().unwrap_or("default"), p.capacity_bytes, None).await?;
        let id = Uuid::now_v7();
        let rel = format!("disks/{id}.{}", p.format.as_str());
        let mut spec = json!({
            "datastore": ds.name, "file": rel, "format": p.format, "capacity_bytes": p.capacity_bytes,
            "sharing": p.sharing, "pool": pool,
        });
        if p.encryption.is_some() {
            // A passphrase of its own, kept only wrapped by the master key.
            spec["encryption"] = json!(self.keys()?.wrap(id, &covm_hv::secret::DiskKey::random()));
        }
        let data = json!({ "datastore": ds.name, "capacity_bytes": p.capacity_bytes, "format": p.format });
        let saga = CreateSaga {
            record: DiskRecord { id, name: p.name.to_string(), folder: folder.id, spec },
            file: root.join(&rel),
            source: Source::Empty { format: p.format.as_str().to_owned(), capacity: p.capacity_bytes },
            data,
        };
        self.disk_make(ctx, saga, None).await
    }

    pub async fn disks_list(&self, ctx: &Ctx, q: DiskListQuery) -> Result<Page<DiskView>, Error> {
        let limit = q.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(Error::invalid("limit", "limit is between 1 and 1000"));
        }
        let items = self
            .store()
            .objects_list(ObjectKind::Disk, Some(&self.viewer(ctx).await?), q.after.as_deref(), limit)
            .await?;
        let next = (items.len() == limit as usize).then(|| items.last().map(|o| o.path.clone())).flatten();
        let mut out = Vec::new();
        for o in items.iter().filter(|o| q.datastore.as_deref().is_none_or(|d| spec_str(o, "datastore") == d)) {
            let v = self.disk_view(o, false).await?;
            if q.state.is_none_or(|s| s == v.state)
                && q.vm.as_deref().is_none_or(|vm| v.attachments.iter().any(|a| a.vm == vm))
            {
                out.push(v);
            }
        }
        Ok(Page { items: out, next })
    }

    pub async fn disk_get(&self, ctx: &Ctx, disk: &str) -> Result<DiskView, Error> {
        let o = self.object_resolve(ctx, disk, Some(ObjectKind::Disk), "disk").await?;
        self.disk_view(&o, true).await
    }

    /// Grows a disk (never shrinks; the same size is already done).
    pub async fn disk_resize(&self, ctx: &Ctx, disk: &str, p: DiskResize) -> Result<DiskView, Error> {
        capacity_check("capacity_bytes", p.capacity_bytes)?;
        let o = self.object_resolve(ctx, disk, Some(ObjectKind::Disk), "disk").await?;
        self.require(ctx, &o, Privilege::DiskExtend).await?;
        let (app, ctx2) = (self.clone(), ctx.clone());
        self.to_the_end(async move {
            let guard = app.saga_begin(&ctx2, ResizeSaga::KIND, &[o.id]).await?;
            let saga = match app.resize_plan(o.id, p.capacity_bytes).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    guard.refuse(Error::internal("already that size")).await;
                    let o = app.store().object_get(o.id).await?.ok_or_else(|| Error::not_found("disk", &o.name))?;
                    return app.disk_view(&o, false).await;
                }
                Err(e) => return Err(guard.refuse(e).await),
            };
            let saga = guard.run(&ctx2, saga).await?;
            let o = app.store().object_get(saga.id).await?.ok_or_else(|| Error::not_found("disk", &saga.name))?;
            app.disk_view(&o, false).await
        })
        .await
    }

    /// A resize's rules, checked with the disk locked; `None`: it is that size already.
    async fn resize_plan(&self, id: Uuid, to: u64) -> Result<Option<ResizeSaga>, Error> {
        let o = self.store().object_get(id).await?.ok_or_else(|| Error::not_found("disk", &id.to_string()))?;
        let current = o.spec["capacity_bytes"].as_u64().unwrap_or(0);
        if to == current {
            return Ok(None);
        }
        if to < current {
            return Err(Error::conflict(
                ErrorCode::ShrinkRefused,
                format!("disks only grow: {} is {current} bytes, {to} is smaller", o.name),
            )
            .with_field("capacity_bytes"));
        }
        // Linked clones read it as it is: it stays so while they exist.
        self.linked_clones_refuse(&o.name, &[o.id]).await?;
        let file = self.disk_file(&o).await?;
        let root = file.parent().and_then(Path::parent).map(Path::to_owned).unwrap_or_default();
        Self::space_check(&root, to - current)?;
        self.disk_pool_admit(spec_str(&o, "pool"), to, Some(o.id)).await?;
        // A disk that a running VM holds grows live through that VM's QEMU (which holds the image's
        // lock); otherwise qemu-img grows the file.
        let live = self.disk_holders_running(&o).await?;
        for id in &live {
            if let Some(vm) = self.store().vm_get(*id).await? {
                self.agent_for(&vm)?;
            }
        }
        Ok(Some(ResizeSaga {
            id: o.id,
            name: o.name.clone(),
            file,
            key: wrapped_key(&o.spec),
            format: format_of(&o).as_str().to_owned(),
            from: current,
            to,
            live,
        }))
    }

    /// A copy of a disk as a new disk in the same datastore and folder.
    pub async fn disk_clone(&self, ctx: &Ctx, disk: &str, p: DiskClone) -> Result<DiskView, Error> {
        let src = self.object_resolve(ctx, disk, Some(ObjectKind::Disk), "disk").await?;
        let parent = self
            .store()
            .object_get(src.parent_id.unwrap_or(ROOT_ID))
            .await?
            .ok_or_else(|| Error::internal("the disk's folder is missing"))?;
        self.require(ctx, &parent, Privilege::DiskCreate).await?;
        let (ds, root) = self.datastore_for_disk(ctx, spec_str(&src, "datastore")).await?;
        if self.object_lookup(p.name.as_str(), Some(ObjectKind::Disk)).await?.is_some() {
            return Err(Error::conflict(ErrorCode::AlreadyExists, format!("a disk named {} already exists", p.name))
                .with_field("name"));
        }
        let capacity = src.spec["capacity_bytes"].as_u64().unwrap_or(0);
        Self::space_check(&root, capacity)?;
        let pool = self.disk_pool_admit(spec_str(&src, "pool"), capacity, None).await?;
        let format = format_of(&src);
        let id = Uuid::now_v7();
        let rel = format!("disks/{id}.{}", format.as_str());
        let mut spec = src.spec.clone();
        spec["file"] = json!(rel);
        spec["pool"] = json!(pool);
        spec["sharing"] = json!(Sharing::None);
        // A copy is whole: it reads no other disk, even when its source was a linked clone's.
        if let Some(o) = spec.as_object_mut() {
            o.remove("backing_disk");
        }
        // The copy of an encrypted disk is encrypted too, with a passphrase of its own; a plain disk's
        // copy is encrypted when asked (qemu-img converts it under the new key).
        let from_key = wrapped_key(&src.spec);
        if p.encryption.is_some() && format != DiskFormat::Qcow2 {
            return Err(Error::invalid("encryption", "an encrypted disk is qcow2 (LUKS inside qcow2)"));
        }
        if from_key.is_some() || p.encryption.is_some() {
            spec["encryption"] = json!(self.keys()?.wrap(id, &covm_hv::secret::DiskKey::random()));
        }
        let data = json!({ "datastore": ds.name, "cloned_from": src.name, "capacity_bytes": capacity });
        let saga = CreateSaga {
            record: DiskRecord { id, name: p.name.to_string(), folder: parent.id, spec },
            file: root.join(&rel),
            source: Source::Copy {
                from: self.disk_file(&src).await?,
                format: format.as_str().to_owned(),
                from_disk: from_key.map(|k| (src.id, k)),
            },
            data,
        };
        self.disk_make(ctx, saga, Some(src)).await
    }

    /// A disk a running VM writes to is not copied: the copy would not be consistent.
    pub(crate) async fn clone_check(&self, src: &ObjectRecord) -> Result<(), Error> {
        if self.disk_attachments(src).await?.iter().any(|a| !a.read_only)
            && let Some(vm) = self.disk_holders_running(src).await?.first()
        {
            let name = self.store().object_get(*vm).await?.map(|o| o.name).unwrap_or_default();
            return Err(Error::conflict(
                ErrorCode::DiskInUse,
                format!(
                    "{} is attached read-write to {name}, which is running; a copy would not be consistent",
                    src.name
                ),
            ));
        }
        Ok(())
    }

    /// Makes a disk of an image file that already lies inside a datastore; covm moves it to a name of
    /// its own in the same datastore.
    pub async fn disk_import(&self, ctx: &Ctx, name: &str, p: DiskImport) -> Result<DiskView, Error> {
        let name = covm_types::Name::parse(name).map_err(|e| {
            Error::new(ErrorKind::InvalidRequest, ErrorCode::InvalidName, e.to_string()).with_field("disk")
        })?;
        let (_, rel) = datastore_path("path", &format!("{}:{}", p.datastore, p.path))?;
        let folder = self.disk_placement(ctx, p.folder.as_deref()).await?;
        let (ds, root) = self.datastore_for_disk(ctx, &p.datastore).await?;
        if self.object_lookup(name.as_str(), Some(ObjectKind::Disk)).await?.is_some() {
            return Err(Error::conflict(ErrorCode::AlreadyExists, format!("a disk named {name} already exists"))
                .with_field("disk"));
        }
        let root = root
            .canonicalize()
            .map_err(|_| Error::conflict(ErrorCode::DatastoreMissing, "the datastore's directory is gone"))?;
        let outside = || {
            Error::new(
                ErrorKind::InvalidRequest,
                ErrorCode::PathOutsideDatastore,
                format!("{} is not a file inside datastore {}", p.path, ds.name),
            )
            .with_field("path")
        };
        let src = root.join(&rel).canonicalize().map_err(|_| outside())?;
        let meta = std::fs::symlink_metadata(root.join(&rel)).map_err(|_| outside())?;
        if !src.starts_with(&root) || !src.is_file() || meta.file_type().is_symlink() {
            return Err(outside());
        }
        if src.starts_with(root.join("disks")) {
            return Err(Error::conflict(ErrorCode::AlreadyADisk, format!("{} is already a covm disk's file", p.path))
                .with_field("path"));
        }
        let info = img::info(&src).await.map_err(hv_error)?;
        let format: DiskFormat = serde_json::from_value(json!(info.format)).map_err(|_| {
            Error::invalid("path", format!("{} is a {} image; covm takes qcow2 and raw", p.path, info.format))
        })?;
        if info.external_file().is_some() {
            return Err(Error::invalid(
                "path",
                "an image that names another file (a backing file or an external data file) cannot be imported",
            ));
        }
        if img::encrypted(&info) {
            return Err(Error::invalid(
                "path",
                "an encrypted image cannot be imported: covm does not know its passphrase (import it plain, then \
                 clone it into an encrypted disk)",
            ));
        }
        let pool = self.disk_pool_admit(p.pool.as_deref().unwrap_or("default"), info.virtual_size, None).await?;
        let id = Uuid::now_v7();
        let new_rel = format!("disks/{id}.{}", format.as_str());
        let spec = json!({
            "datastore": ds.name, "file": new_rel, "format": format, "capacity_bytes": info.virtual_size,
            "sharing": Sharing::None, "pool": pool,
        });
        let data = json!({ "datastore": ds.name, "imported_from": p.path, "capacity_bytes": info.virtual_size });
        let saga = CreateSaga {
            record: DiskRecord { id, name: name.to_string(), folder: folder.id, spec },
            file: root.join(&new_rel),
            source: Source::Import { from: src },
            data,
        };
        self.disk_make(ctx, saga, None).await
    }

    /// Wraps every encrypted disk's key again under a new master key (`Permissions.Modify` on `/`).
    /// No image changes: a disk's passphrase stays, only its wrapping does. The disks' operation locks
    /// are not needed: a rotation changes no file and writes every record in one transaction.
    pub async fn keys_rotate(&self, ctx: &Ctx) -> Result<covm_types::api::KeysRotated, Error> {
        self.require_global(ctx, Privilege::PermissionsModify).await?;
        // One rotation at a time in this process.
        static ROTATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = ROTATING.lock().await;
        let ring = self.keys()?;
        let dir = &self.config().data_dir;
        let next = ring.rotate_begin(dir)?;
        let master = next.id().to_owned();
        let mut disks = 0;
        // Twice: the second pass catches a disk made while the first ran (wrapped before the new key
        // became current). Each record is rewritten only if it is still as read (a resize meanwhile
        // makes the rotation fail, to be run again; it goes on with the same new key).
        for pass in 0..2 {
            let mut specs = Vec::new();
            let mut after = None;
            loop {
                let page = self.store().objects_list(ObjectKind::Disk, None, after.as_deref(), 1000).await?;
                for o in &page {
                    if let Some(w) = wrapped_key(&o.spec).filter(|w| !ring.is_current(w)) {
                        let mut spec = o.spec.clone();
                        spec["encryption"] = json!(ring.rewrap(&next, o.id, &w)?);
                        specs.push((o.id, o.spec.clone(), spec));
                    }
                }
                if page.len() < 1000 {
                    break;
                }
                after = page.last().map(|o| o.path.clone());
            }
            disks += specs.len();
            if pass == 1 && specs.is_empty() {
                break;
            }
            let ev = ctx
                .event("keys.rotated", "folder", Some(ROOT_ID), "/")
                .audit_only()
                .data(json!({ "disks": specs.len(), "master_key": master, "pass": pass + 1 }));
            self.store().object_specs_swap(specs, ev).await?;
            if pass == 0 {
                ring.rotate_finish(dir)?;
            }
        }
        tracing::info!(disks, master_key = %master, "rotated the master key of encrypted disks");
        Ok(covm_types::api::KeysRotated { disks: disks as u64, master_key: master })
    }

    /// Deletes a disk and its image; refused while a VM's config holds it, naming the VMs.
    pub async fn disk_delete(&self, ctx: &Ctx, disk: &str) -> Result<(), Error> {
        let o = self.object_resolve(ctx, disk, Some(ObjectKind::Disk), "disk").await?;
        self.require(ctx, &o, Privilege::DiskDelete).await?;
        let (app, ctx2) = (self.clone(), ctx.clone());
        self.to_the_end(async move {
            let guard = app.saga_begin(&ctx2, DeleteSaga::KIND, &[o.id]).await?;
            let saga = match app.delete_plan(o.id).await {
                Ok(s) => s,
                Err(e) => return Err(guard.refuse(e).await),
            };
            guard.run(&ctx2, saga).await.map(|_| ())
        })
        .await
    }

    async fn delete_plan(&self, id: Uuid) -> Result<DeleteSaga, Error> {
        let o = self.store().object_get(id).await?.ok_or_else(|| Error::not_found("disk", &id.to_string()))?;
        let holders = self.disk_attachments(&o).await?;
        if !holders.is_empty() {
            let vms: Vec<&str> = holders.iter().map(|a| a.vm.as_str()).collect();
            return Err(Error::conflict(ErrorCode::DiskInUse, format!("{} is attached to {}", o.name, vms.join(", ")))
                .with_details(json!({ "vms": vms })));
        }
        self.linked_clones_refuse(&o.name, &[o.id]).await?;
        Ok(DeleteSaga {
            record: DiskRecord {
                id: o.id,
                name: o.name.clone(),
                folder: o.parent_id.unwrap_or(ROOT_ID),
                spec: o.spec.clone(),
            },
            file: self.disk_file(&o).await?,
        })
    }
}
