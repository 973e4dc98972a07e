//! The disk sagas: create (also clone and import: the file, then the record), delete (the record,
//! then the file) and resize (the image or the running VM's block node, then the record). The rules
//! that come before them are in `app/disks.rs`.

use std::path::PathBuf;

use covm_hv::img;
use covm_store::NewObject;
use covm_types::Error;
use covm_types::api::ObjectKind;
use uuid::Uuid;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Saga;
use crate::app::agent::VmOp;
use crate::app::attach::disk_node;
use crate::app::node::hv_error;
use crate::app::{App, Ctx, EventExt};

/// Where a new disk's image comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `qemu-img create`.
    Empty { format: String, capacity: u64 },
    /// `qemu-img convert` of another disk's image (an encrypted one: its id and wrapped key).
    Copy {
        from: PathBuf,
        format: String,
        #[serde(default)]
        from_disk: Option<(Uuid, crate::app::keys::WrappedKey)>,
    },
    /// A file already in the datastore, moved under covm's name.
    Import { from: PathBuf },
    /// A qcow2 overlay on another disk's image (a linked clone).
    Overlay { backing: PathBuf, backing_format: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskStep {
    File,
    Record,
}

/// A disk's record in the store, as a saga makes or removes it (idempotently).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskRecord {
    pub id: Uuid,
    pub name: String,
    pub folder: Uuid,
    pub spec: serde_json::Value,
}

impl DiskRecord {
    async fn exists(&self, app: &App) -> Result<bool, Error> {
        Ok(app.store().object_get(self.id).await?.is_some())
    }

    async fn ensure(&self, app: &App, ctx: &Ctx, data: serde_json::Value) -> Result<(), Error> {
        if self.exists(app).await? {
            return Ok(());
        }
        // A key wrapped before a rotation began is wrapped again under the current master key.
        let mut spec = self.spec.clone();
        if let Some(w) = crate::app::disks::wrapped_key(&spec) {
            let ring = app.keys()?;
            if !ring.is_current(&w) {
                spec["encryption"] = serde_json::json!(ring.wrap(self.id, &ring.unwrap(self.id, &w)?));
            }
        }
        let ev = ctx.event("disk.created", "disk", Some(self.id), &self.name).data(data);
        let object =
            NewObject { id: self.id, kind: ObjectKind::Disk, name: self.name.clone(), parent_id: self.folder, spec };
        app.store().object_create(object, ev).await?;
        app.committed();
        Ok(())
    }

    async fn remove(&self, app: &App, ctx: &Ctx, data: serde_json::Value) -> Result<(), Error> {
        if !self.exists(app).await? {
            return Ok(());
        }
        let ev = ctx.event("disk.deleted", "disk", Some(self.id), &self.name).scope(self.folder).data(data);
        app.store().object_delete(self.id, ev).await?;
        app.committed();
        Ok(())
    }
}

/// Create, clone or import: the image file, then the record (the pivot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateSaga {
    pub record: DiskRecord,
    pub file: PathBuf,
    pub source: Source,
    pub data: serde_json::Value,
}

#[async_trait]
impl Saga for CreateSaga {
    const KIND: &'static str = "disk.create";
    type Step = DiskStep;

    fn steps(&self) -> Vec<DiskStep> {
        vec![DiskStep::File, DiskStep::Record]
    }

    fn pivot(&self) -> DiskStep {
        DiskStep::Record
    }

    async fn forward(&mut self, app: &App, ctx: &Ctx, step: DiskStep) -> Result<(), Error> {
        match step {
            DiskStep::File => {
                if let Some(dir) = self.file.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| Error::internal(format!("cannot make the disks directory: {e}")))?;
                }
                match &self.source {
                    // A file already there is this saga's own (a retry after a crash undoes first).
                    Source::Empty { .. } | Source::Copy { .. } | Source::Overlay { .. } if self.file.exists() => Ok(()),
                    Source::Overlay { backing, backing_format } => {
                        img::create_overlay(&self.file, backing, backing_format).await.map_err(hv_error)
                    }
                    Source::Empty { format, capacity } => {
                        let key = app.disk_key(self.record.id, &self.record.spec)?;
                        img::create(&self.file, format, *capacity, key.as_ref()).await.map_err(hv_error)
                    }
                    Source::Copy { from, format, from_disk } => {
                        let from_key = match from_disk {
                            // As the source's record holds it now (a rotation may have rewrapped it).
                            Some((id, w)) => match app.disk_key_by_id(*id).await? {
                                Some(k) => Some(k),
                                None => Some(app.keys()?.unwrap(*id, w)?),
                            },
                            None => None,
                        };
                        let key = app.disk_key(self.record.id, &self.record.spec)?;
                        img::convert(from, format, from_key.as_ref(), &self.file, format, key.as_ref())
                            .await
                            .map_err(hv_error)
                    }
                    Source::Import { from } => {
                        if self.file.exists() && !from.exists() {
                            return Ok(());
                        }
                        std::fs::rename(from, &self.file)
                            .map_err(|e| Error::internal(format!("cannot move the image into place: {e}")))
                    }
                }
            }
            DiskStep::Record => self.record.ensure(app, ctx, self.data.clone()).await,
        }
    }

    async fn undo(&mut self, app: &App, ctx: &Ctx, step: DiskStep) -> Result<(), Error> {
        match step {
            DiskStep::File => match &self.source {
                Source::Import { from } => {
                    if self.file.exists() && !from.exists() {
                        std::fs::rename(&self.file, from)
                            .map_err(|e| Error::internal(format!("cannot put an imported image back: {e}")))?;
                    }
                    Ok(())
                }
                _ => match std::fs::remove_file(&self.file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(Error::internal(format!("cannot remove a new disk's image: {e}")))
                    }
                    _ => Ok(()),
                },
            },
            DiskStep::Record => self.record.remove(app, ctx, json!({ "undo": true })).await,
        }
    }

    async fn pivoted(&self, app: &App) -> Result<bool, Error> {
        self.record.exists(app).await
    }
}

/// Delete: the record (the pivot), then the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteSaga {
    pub record: DiskRecord,
    pub file: PathBuf,
}

#[async_trait]
impl Saga for DeleteSaga {
    const KIND: &'static str = "disk.delete";
    type Step = DiskStep;

    fn steps(&self) -> Vec<DiskStep> {
        vec![DiskStep::Record, DiskStep::File]
    }

    fn pivot(&self) -> DiskStep {
        DiskStep::Record
    }

    async fn forward(&mut self, app: &App, ctx: &Ctx, step: DiskStep) -> Result<(), Error> {
        match step {
            DiskStep::Record => {
                let data = json!({ "datastore": self.record.spec["datastore"], "file": self.record.spec["file"] });
                self.record.remove(app, ctx, data).await
            }
            DiskStep::File => match std::fs::remove_file(&self.file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::internal(format!("cannot remove a deleted disk's image: {e}")))
                }
                _ => Ok(()),
            },
        }
    }

    async fn undo(&mut self, app: &App, ctx: &Ctx, step: DiskStep) -> Result<(), Error> {
        // The record went, then the saga failed before it ended: the disk comes back (its file is still there).
        match step {
            DiskStep::Record => self.record.ensure(app, ctx, json!({ "undo": true })).await,
            DiskStep::File => Ok(()),
        }
    }

    async fn pivoted(&self, app: &App) -> Result<bool, Error> {
        Ok(!self.record.exists(app).await?)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeStep {
    Grow,
    Record,
}

/// Resize: the image grows (live through each running holder's QEMU, else `qemu-img`), then the
/// record (the pivot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResizeSaga {
    pub id: Uuid,
    pub name: String,
    pub file: PathBuf,
    /// The disk's wrapped key, if its image is encrypted.
    #[serde(default)]
    pub key: Option<crate::app::keys::WrappedKey>,
    pub format: String,
    pub from: u64,
    pub to: u64,
    /// Running VMs that hold the disk (it grows live through them).
    pub live: Vec<Uuid>,
}

impl ResizeSaga {
    /// The disk's passphrase as its record holds it now (a key rotation may have rewrapped it since
    /// this saga began), else as the saga saved it.
    async fn key(&self, app: &App) -> Result<Option<covm_hv::secret::DiskKey>, Error> {
        if self.key.is_none() {
            return Ok(None);
        }
        match app.disk_key_by_id(self.id).await? {
            Some(k) => Ok(Some(k)),
            None => self.key.as_ref().map(|w| app.keys()?.unwrap(self.id, w)).transpose(),
        }
    }

    async fn record(&self, app: &App, ctx: &Ctx, from: u64, to: u64) -> Result<(), Error> {
        let o = app.store().object_get(self.id).await?.ok_or_else(|| Error::not_found("disk", &self.name))?;
        if o.spec["capacity_bytes"].as_u64() == Some(to) {
            return Ok(());
        }
        let mut spec = o.spec.clone();
        spec["capacity_bytes"] = json!(to);
        let ev =
            ctx.event("disk.resized", "disk", Some(o.id), &o.name).data(json!({ "from_bytes": from, "to_bytes": to }));
        app.store().object_spec_update(o.id, &o.spec, spec, ev).await?;
        app.committed();
        Ok(())
    }
}

#[async_trait]
impl Saga for ResizeSaga {
    const KIND: &'static str = "disk.resize";
    type Step = ResizeStep;

    fn steps(&self) -> Vec<ResizeStep> {
        vec![ResizeStep::Grow, ResizeStep::Record]
    }

    fn pivot(&self) -> ResizeStep {
        ResizeStep::Record
    }

    async fn forward(&mut self, app: &App, ctx: &Ctx, step: ResizeStep) -> Result<(), Error> {
        match step {
            ResizeStep::Grow if self.live.is_empty() => {
                let key = self.key(app).await?;
                img::resize(&self.file, &self.format, self.to, key.as_ref()).await.map_err(hv_error)
            }
            ResizeStep::Grow => {
                for vm in &self.live {
                    let (node, size) = (disk_node(self.id), self.to);
                    app.agent().ask(*vm, VmOp::DiskResize(node, size)).await.map_err(hv_error)?;
                }
                Ok(())
            }
            ResizeStep::Record => self.record(app, ctx, self.from, self.to).await,
        }
    }

    async fn undo(&mut self, app: &App, ctx: &Ctx, step: ResizeStep) -> Result<(), Error> {
        match step {
            // No guest has seen the new size of an image no running VM holds: it shrinks back.
            ResizeStep::Grow if self.live.is_empty() => {
                let info = img::info(&self.file).await.map_err(hv_error)?;
                if info.virtual_size > self.from {
                    let key = self.key(app).await?;
                    img::shrink_back(&self.file, &self.format, self.from, key.as_ref()).await.map_err(hv_error)?;
                }
                Ok(())
            }
            ResizeStep::Grow => {
                // A guest may already use the new space; a live disk never shrinks. The image stays
                // larger than the record says, which is harmless, and a retry grows the record.
                tracing::warn!(disk = %self.name, "a live grow cannot be undone; the image keeps its new size");
                Ok(())
            }
            ResizeStep::Record => {
                let o = app.store().object_get(self.id).await?.ok_or_else(|| Error::not_found("disk", &self.name))?;
                if o.spec["capacity_bytes"].as_u64() != Some(self.to) {
                    return Ok(());
                }
                let mut spec = o.spec.clone();
                spec["capacity_bytes"] = json!(self.from);
                let ev = ctx
                    .event("disk.resized", "disk", Some(o.id), &o.name)
                    .data(json!({ "from_bytes": self.to, "to_bytes": self.from, "undo": true }));
                app.store().object_spec_update(o.id, &o.spec, spec, ev).await?;
                app.committed();
                Ok(())
            }
        }
    }

    async fn pivoted(&self, app: &App) -> Result<bool, Error> {
        let o = app.store().object_get(self.id).await?;
        Ok(o.is_some_and(|o| o.spec["capacity_bytes"].as_u64() == Some(self.to)))
    }
}
