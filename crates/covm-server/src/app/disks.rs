//! First-class disks: objects of their own with an image file in a datastore, made and changed with
//! `qemu-img`. covm names every file (`DATASTORE/disks/<id>.<format>`); a user never gives a path,
//! except to import a file that already lies inside a datastore.
//!
//! Every operation checks everything before it changes anything (privileges, sizes, free space, the
//! pool's disk quota), and undoes its file work when the store refuses the record.
//! TODO: attach and detach (hot and cold), move, and the persisted saga log are the next step.

use std::path::{Path, PathBuf};

use covm_hv::img;
use covm_store::{NewObject, ObjectRecord};
use covm_types::api::{ObjectKind, Page, Quota};
use covm_types::disk::{
    CAPACITY_MAX, CAPACITY_MIN, DiskAttachmentView, DiskClone, DiskCreate, DiskFormat, DiskImport, DiskListQuery,
    DiskResize, DiskState, DiskView, ImageView, Sharing,
};
use covm_types::vm::{VmConfig, datastore_path};
use covm_types::{Error, ErrorKind, Privilege, ROOT_ID};
use serde_json::json;
use uuid::Uuid;

use super::host::fs_capacity;
use super::node::hv_error;
use super::{App, Ctx, EventExt};

fn spec_str<'a>(o: &'a ObjectRecord, k: &str) -> &'a str {
    o.spec[k].as_str().unwrap_or_default()
}

fn format_of(o: &ObjectRecord) -> DiskFormat {
    serde_json::from_value(o.spec["format"].clone()).unwrap_or_default()
}

fn capacity_check(field: &str, bytes: u64) -> Result<(), Error> {
    if !(CAPACITY_MIN..=CAPACITY_MAX).contains(&bytes) || !bytes.is_multiple_of(512) {
        return Err(Error::new(
            ErrorKind::InvalidRequest,
            "invalid_capacity",
            format!("a disk holds from 1 MiB to 64 TiB, in multiples of 512 bytes; {bytes} is not that"),
        )
        .with_field(field));
    }
    Ok(())
}

impl App {
    async fn datastore_for_disk(&self, ctx: &Ctx, name: &str) -> Result<(ObjectRecord, PathBuf), Error> {
        let ds = self.object_resolve(ctx, name, Some(ObjectKind::Datastore), "datastore").await?;
        self.require(ctx, &ds, Privilege::DatastoreAllocateSpace).await?;
        let root = PathBuf::from(spec_str(&ds, "path"));
        Ok((ds, root))
    }

    fn space_check(root: &Path, bytes: u64) -> Result<(), Error> {
        let (_, free) =
            fs_capacity(root).map_err(|e| Error::internal(format!("cannot read the datastore's capacity: {e}")))?;
        if bytes > free {
            return Err(Error::conflict(
                "insufficient_space",
                format!("the datastore has {free} bytes free; the disk needs {bytes}"),
            )
            .with_details(json!({ "free_bytes": free, "needed_bytes": bytes })));
        }
        Ok(())
    }

    /// The pool a disk counts against, after checking its disk quota holds with `bytes` more.
    async fn disk_pool_admit(&self, pool: &str, bytes: u64, except: Option<Uuid>) -> Result<String, Error> {
        let p = self
            .object_lookup(pool, Some(ObjectKind::Pool))
            .await?
            .ok_or_else(|| Error::invalid("pool", format!("there is no pool {pool}")))?;
        let quota: Quota = serde_json::from_value(p.spec["quota"].clone()).unwrap_or_default();
        if let Some(limit) = quota.disk_bytes {
            let mut used = bytes;
            for d in self.disks_all().await? {
                if spec_str(&d, "pool") == p.name && Some(d.id) != except {
                    used += d.spec["capacity_bytes"].as_u64().unwrap_or(0);
                }
            }
            if used > limit {
                return Err(Error::conflict(
                    "quota_exceeded",
                    format!("pool {} allows {limit} bytes of disks; this would make {used}", p.name),
                ));
            }
        }
        Ok(p.name)
    }

    /// TODO-perf: every disk, for quota sums and attachment lookups; fine for hundreds.
    async fn disks_all(&self) -> Result<Vec<ObjectRecord>, Error> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.store().objects_list(ObjectKind::Disk, None, after.as_deref(), 1000).await?;
            let full = page.len() == 1000;
            after = page.last().map(|o| o.path.clone());
            out.extend(page);
            if !full {
                return Ok(out);
            }
        }
    }

    /// VMs whose config holds the disk (by name or id).
    pub(crate) async fn disk_attachments(&self, disk: &ObjectRecord) -> Result<Vec<DiskAttachmentView>, Error> {
        let mut out = Vec::new();
        for vm in self.vms_all().await? {
            let Ok(c) = serde_json::from_value::<VmConfig>(vm.config.clone()) else { continue };
            for d in c.disks.iter().filter(|d| d.disk == disk.name || d.disk == disk.id.to_string()) {
                out.push(DiskAttachmentView {
                    vm: vm.object.name.clone(),
                    controller: d.controller.clone(),
                    unit: d.unit,
                    read_only: d.read_only,
                });
            }
        }
        Ok(out)
    }

    /// The running VMs that hold a disk.
    async fn disk_holders_running(&self, disk: &ObjectRecord) -> Result<Vec<Uuid>, Error> {
        let mut out = Vec::new();
        for a in self.disk_attachments(disk).await? {
            if let Some(o) = self.store().object_by_name(ObjectKind::Vm, &a.vm).await?
                && let Some(vm) = self.store().vm_get(o.id).await?
                && super::vms::running(&vm)
            {
                out.push(o.id);
            }
        }
        Ok(out)
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
        Ok(DiskView {
            id: o.id,
            name: o.name.clone(),
            path: o.path.clone(),
            datastore: spec_str(o, "datastore").to_owned(),
            file: spec_str(o, "file").to_owned(),
            format: format_of(o),
            capacity_bytes: o.spec["capacity_bytes"].as_u64().unwrap_or(0),
            sharing: serde_json::from_value(o.spec["sharing"].clone()).unwrap_or_default(),
            state: if attachments.is_empty() { DiskState::Detached } else { DiskState::Attached },
            pool: spec_str(o, "pool").to_owned(),
            attachments,
            image,
            created_at: o.created_at,
        })
    }

    /// The absolute path of a disk's image file.
    pub(crate) async fn disk_file(&self, o: &ObjectRecord) -> Result<PathBuf, Error> {
        let ds = self
            .object_lookup(spec_str(o, "datastore"), Some(ObjectKind::Datastore))
            .await?
            .ok_or_else(|| Error::conflict("datastore_missing", "the disk's datastore is gone"))?;
        Ok(PathBuf::from(spec_str(&ds, "path")).join(spec_str(o, "file")))
    }

    /// Records a new disk whose image file exists; removes the file when the store refuses.
    #[allow(clippy::too_many_arguments)]
    async fn disk_record(
        &self,
        ctx: &Ctx,
        id: Uuid,
        name: &str,
        folder: &ObjectRecord,
        spec: serde_json::Value,
        file: &Path,
        data: serde_json::Value,
    ) -> Result<DiskView, Error> {
        let ev = ctx.event("disk.created", "disk", Some(id), name).data(data);
        let object = NewObject { id, kind: ObjectKind::Disk, name: name.to_owned(), parent_id: folder.id, spec };
        match self.store().object_create(object, ev).await {
            Ok((rec, _)) => {
                self.committed();
                self.disk_view(&rec, false).await
            }
            Err(e) => {
                let _ = std::fs::remove_file(file);
                Err(e)
            }
        }
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
        let folder = self.disk_placement(ctx, p.folder.as_deref()).await?;
        let (ds, root) = self.datastore_for_disk(ctx, &p.datastore).await?;
        if self.object_lookup(p.name.as_str(), Some(ObjectKind::Disk)).await?.is_some() {
            return Err(
                Error::conflict("already_exists", format!("a disk named {} already exists", p.name)).with_field("name")
            );
        }
        Self::space_check(&root, p.capacity_bytes)?;
        let pool = self.disk_pool_admit(p.pool.as_deref().unwrap_or("default"), p.capacity_bytes, None).await?;
        let id = Uuid::now_v7();
        let rel = format!("disks/{id}.{}", p.format.as_str());
        let file = root.join(&rel);
        std::fs::create_dir_all(root.join("disks"))
            .map_err(|e| Error::internal(format!("cannot make the disks directory: {e}")))?;
        img::create(&file, p.format.as_str(), p.capacity_bytes).await.map_err(hv_error)?;
        let spec = json!({
            "datastore": ds.name, "file": rel, "format": p.format, "capacity_bytes": p.capacity_bytes,
            "sharing": p.sharing, "pool": pool,
        });
        let data = json!({ "datastore": ds.name, "capacity_bytes": p.capacity_bytes, "format": p.format });
        self.disk_record(ctx, id, p.name.as_str(), &folder, spec, &file, data).await
    }

    pub async fn disks_list(&self, ctx: &Ctx, q: DiskListQuery) -> Result<Page<DiskView>, Error> {
        let limit = q.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(Error::invalid("limit", "limit is between 1 and 1000"));
        }
        let items = self.store().objects_list(ObjectKind::Disk, Some(ctx.user_id), q.after.as_deref(), limit).await?;
        let next = (items.len() == limit as usize).then(|| items.last().map(|o| o.path.clone())).flatten();
        let mut out = Vec::new();
        for o in items.iter().filter(|o| q.datastore.as_deref().is_none_or(|d| spec_str(o, "datastore") == d)) {
            let v = self.disk_view(o, false).await?;
            if q.state.is_none_or(|s| s == v.state) {
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
        let current = o.spec["capacity_bytes"].as_u64().unwrap_or(0);
        if p.capacity_bytes == current {
            return self.disk_view(&o, false).await;
        }
        if p.capacity_bytes < current {
            return Err(Error::conflict(
                "shrink_refused",
                format!("disks only grow: {} is {current} bytes, {} is smaller", o.name, p.capacity_bytes),
            )
            .with_field("capacity_bytes"));
        }
        let file = self.disk_file(&o).await?;
        let root = file.parent().and_then(Path::parent).map(Path::to_owned).unwrap_or_default();
        Self::space_check(&root, p.capacity_bytes - current)?;
        self.disk_pool_admit(spec_str(&o, "pool"), p.capacity_bytes, Some(o.id)).await?;
        // A disk that a running VM holds grows live through that VM's QEMU (which holds the image's
        // lock); otherwise qemu-img grows the file.
        let running: Vec<Uuid> = self.disk_holders_running(&o).await?;
        if running.is_empty() {
            img::resize(&file, format_of(&o).as_str(), p.capacity_bytes).await.map_err(hv_error)?;
        } else {
            let node = format!("d{}", &o.id.simple().to_string()[20..]);
            let size = p.capacity_bytes;
            for vm in running {
                let n = node.clone();
                self.node().ask(vm, |r| super::node::Cmd::DiskResize(n, size, r)).await.map_err(hv_error)?;
            }
        }
        let mut spec = o.spec.clone();
        spec["capacity_bytes"] = json!(p.capacity_bytes);
        let ev = ctx
            .event("disk.resized", "disk", Some(o.id), &o.name)
            .data(json!({ "from_bytes": current, "to_bytes": p.capacity_bytes }));
        self.store().object_spec_update(o.id, &o.spec, spec, ev).await?;
        self.committed();
        let o = self.store().object_get(o.id).await?.ok_or_else(|| Error::not_found("disk", disk))?;
        self.disk_view(&o, false).await
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
            return Err(
                Error::conflict("already_exists", format!("a disk named {} already exists", p.name)).with_field("name")
            );
        }
        if self.disk_attachments(&src).await?.iter().any(|a| !a.read_only)
            && let Some(vm) = self.disk_holders_running(&src).await?.first()
        {
            let name = self.store().object_get(*vm).await?.map(|o| o.name).unwrap_or_default();
            return Err(Error::conflict(
                "disk_in_use",
                format!(
                    "{} is attached read-write to {name}, which is running; a copy would not be consistent",
                    src.name
                ),
            ));
        }
        let capacity = src.spec["capacity_bytes"].as_u64().unwrap_or(0);
        Self::space_check(&root, capacity)?;
        let pool = self.disk_pool_admit(spec_str(&src, "pool"), capacity, None).await?;
        let format = format_of(&src);
        let id = Uuid::now_v7();
        let rel = format!("disks/{id}.{}", format.as_str());
        let file = root.join(&rel);
        img::convert(&self.disk_file(&src).await?, format.as_str(), &file, format.as_str()).await.map_err(hv_error)?;
        let mut spec = src.spec.clone();
        spec["file"] = json!(rel);
        spec["pool"] = json!(pool);
        spec["sharing"] = json!(Sharing::None);
        let data = json!({ "datastore": ds.name, "cloned_from": src.name, "capacity_bytes": capacity });
        self.disk_record(ctx, id, p.name.as_str(), &parent, spec, &file, data).await
    }

    /// Makes a disk of an image file that already lies inside a datastore; covm moves it to a name of
    /// its own in the same datastore.
    pub async fn disk_import(&self, ctx: &Ctx, name: &str, p: DiskImport) -> Result<DiskView, Error> {
        let name = covm_types::Name::parse(name)
            .map_err(|e| Error::new(ErrorKind::InvalidRequest, "invalid_name", e.to_string()).with_field("disk"))?;
        let (_, rel) = datastore_path("path", &format!("{}:{}", p.datastore, p.path))?;
        let folder = self.disk_placement(ctx, p.folder.as_deref()).await?;
        let (ds, root) = self.datastore_for_disk(ctx, &p.datastore).await?;
        if self.object_lookup(name.as_str(), Some(ObjectKind::Disk)).await?.is_some() {
            return Err(
                Error::conflict("already_exists", format!("a disk named {name} already exists")).with_field("disk")
            );
        }
        let root = root
            .canonicalize()
            .map_err(|_| Error::conflict("datastore_missing", "the datastore's directory is gone"))?;
        let outside = || {
            Error::new(
                ErrorKind::InvalidRequest,
                "path_outside_datastore",
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
            return Err(Error::conflict("already_a_disk", format!("{} is already a covm disk's file", p.path))
                .with_field("path"));
        }
        let info = img::info(&src).await.map_err(hv_error)?;
        let format: DiskFormat = serde_json::from_value(json!(info.format)).map_err(|_| {
            Error::invalid("path", format!("{} is a {} image; covm takes qcow2 and raw", p.path, info.format))
        })?;
        if info.backing_filename.is_some() {
            return Err(Error::invalid("path", "an image with a backing file cannot be imported"));
        }
        let pool = self.disk_pool_admit(p.pool.as_deref().unwrap_or("default"), info.virtual_size, None).await?;
        let id = Uuid::now_v7();
        let new_rel = format!("disks/{id}.{}", format.as_str());
        let file = root.join(&new_rel);
        std::fs::create_dir_all(root.join("disks"))
            .map_err(|e| Error::internal(format!("cannot make the disks directory: {e}")))?;
        std::fs::rename(&src, &file).map_err(|e| Error::internal(format!("cannot move the image into place: {e}")))?;
        let spec = json!({
            "datastore": ds.name, "file": new_rel, "format": format, "capacity_bytes": info.virtual_size,
            "sharing": Sharing::None, "pool": pool,
        });
        let data = json!({ "datastore": ds.name, "imported_from": p.path, "capacity_bytes": info.virtual_size });
        match self.disk_record(ctx, id, name.as_str(), &folder, spec, &file, data).await {
            Ok(v) => Ok(v),
            Err(e) => {
                // disk_record removed the file; the import was a move, so put it back instead.
                let _ = std::fs::rename(&file, &src);
                Err(e)
            }
        }
    }

    /// Deletes a disk and its image; refused while a VM's config holds it, naming the VMs.
    pub async fn disk_delete(&self, ctx: &Ctx, disk: &str) -> Result<(), Error> {
        let o = self.object_resolve(ctx, disk, Some(ObjectKind::Disk), "disk").await?;
        self.require(ctx, &o, Privilege::DiskDelete).await?;
        let holders = self.disk_attachments(&o).await?;
        if !holders.is_empty() {
            let vms: Vec<&str> = holders.iter().map(|a| a.vm.as_str()).collect();
            return Err(Error::conflict("disk_in_use", format!("{} is attached to {}", o.name, vms.join(", ")))
                .with_details(json!({ "vms": vms })));
        }
        let file = self.disk_file(&o).await?;
        let ev = ctx
            .event("disk.deleted", "disk", Some(o.id), &o.name)
            .scope(o.parent_id.unwrap_or(ROOT_ID))
            .data(json!({ "datastore": spec_str(&o, "datastore"), "file": spec_str(&o, "file") }));
        self.store().object_delete(o.id, ev).await?;
        self.committed();
        if let Err(e) = std::fs::remove_file(&file) {
            tracing::warn!(file = %file.display(), error = %e, "a deleted disk's image could not be removed");
        }
        Ok(())
    }
}
