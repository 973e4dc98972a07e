//! The snapshot sagas. Create: the tags in every covered disk (all or none), then the record (the
//! pivot). Delete: the record (the pivot), then the tags. Data revert: every covered disk goes back to
//! its tag (the pivot; its undo puts each disk back to the safety snapshot taken just before).

use std::path::PathBuf;

use async_trait::async_trait;
use covm_hv::img;
use covm_store::SnapshotRecord;
use covm_types::Error;
use covm_types::snapshot::SnapshotView;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::Saga;
use crate::app::agent::VmOp;
use crate::app::attach::disk_node;
use crate::app::node::hv_error;
use crate::app::{App, Ctx, EventExt};

/// A snapshot's tag inside every image it covers (its disks, and its VM's state image).
pub fn snapshot_tag(id: Uuid) -> String {
    format!("covm-{id}")
}

/// A snapshot and the image files of the disks it covers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tagged {
    pub vm_id: Uuid,
    pub view: SnapshotView,
    /// The image files of `view.disks`, in order (a disk deleted since has none).
    pub files: Vec<Option<PathBuf>>,
    /// The VM runs: its QEMU takes the tags, in one transaction across the disks.
    #[serde(default)]
    pub live: bool,
    /// The VM whose QEMU takes them, when it is not the owner (a disk's own snapshot).
    #[serde(default)]
    pub via: Option<Uuid>,
    /// The owner is a disk (a snapshot of the disk on its own), not a VM.
    #[serde(default)]
    pub disk: bool,
    /// A memory snapshot: the VM's hidden state image, which holds the tag too.
    #[serde(default)]
    pub state: Option<PathBuf>,
    /// How long the running QEMU took for its part (the QMP `transaction` or `snapshot-save`): the
    /// guest's I/O waits that long at most (with memory, the guest is paused that long).
    #[serde(default)]
    pub qemu_ms: Option<f64>,
}

impl Tagged {
    fn tag(&self, i: usize) -> &str {
        &self.view.disks[i].tag
    }

    /// The tag of the snapshot in its VM's state image (a memory snapshot's).
    fn state_tag(&self) -> String {
        snapshot_tag(self.view.id)
    }

    /// Takes the tags; answers how long the running QEMU took for its part, if it had one.
    ///
    /// The disks the running QEMU holds take their tags at once: one QMP `transaction`, or with memory
    /// one `snapshot-save` that also keeps the guest in the state image (the guest pauses meanwhile).
    /// The others (a disk pending for the next boot, or all of them when the VM stopped meanwhile)
    /// take theirs with qemu-img; a memory snapshot of a VM that stopped is refused.
    async fn tags_add(&mut self, app: &App) -> Result<Option<f64>, Error> {
        let vm = self.via.unwrap_or(self.vm_id);
        let held = match self.live && !self.view.disks.is_empty() || self.state.is_some() {
            true => match app.agent().block_state(vm).await {
                Ok(h) => Some(h.nodes),
                Err(covm_hv::HvError::Gone) => None,
                Err(e) => return Err(hv_error(e)),
            },
            false => None,
        };
        if self.state.is_some() && held.is_none() {
            return Err(memory_gone(&self.view.vm));
        }
        let held = held.unwrap_or_default();
        let mut nodes = Vec::new();
        for (i, d) in self.view.disks.iter().enumerate() {
            let node = disk_node(d.disk_id);
            if held.contains(&node) {
                nodes.push(node);
            } else if let Some(f) = &self.files[i] {
                let key = app.disk_key_by_id(d.disk_id).await?;
                img::snapshot_create(f, self.tag(i), key.as_ref()).await.map_err(hv_error)?;
            }
        }
        let op = match &self.state {
            Some(state) => {
                let m = covm_hv::MemoryState { tag: self.state_tag(), state: state.clone(), nodes };
                VmOp::SnapshotSave(Box::new(m))
            }
            None if nodes.is_empty() => return Ok(None),
            None => VmOp::SnapshotTake(nodes, self.view.disks[0].tag.clone()),
        };
        // Quiesced: the guest's file systems are frozen while the tags are taken, and always thawed.
        let quiesce = self.view.consistency == covm_types::snapshot::Consistency::Quiesced
            && matches!(op, VmOp::SnapshotTake(..));
        if quiesce {
            let frozen = match app.guest_freeze(vm).await {
                Ok(n) => n,
                Err(e) => {
                    // It may have frozen some before it failed (or timed out): never leave it so.
                    let _ = app.guest_thaw(vm).await;
                    return Err(crate::app::guest::agent_error(&self.view.vm, e));
                }
            };
            tracing::info!(vm = %self.view.vm, frozen, "froze the guest's file systems for a snapshot");
            self.view.frozen_filesystems = Some(frozen);
        }
        let t = std::time::Instant::now();
        let taken = app.agent().ask(vm, op).await;
        if quiesce {
            match app.guest_thaw(vm).await {
                Ok(n) => tracing::info!(vm = %self.view.vm, thawed = n, "thawed the guest's file systems"),
                Err(e) => tracing::error!(vm = %self.view.vm, error = %e, "could not thaw the guest's file systems"),
            }
        }
        match taken {
            Ok(()) => Ok(Some(t.elapsed().as_secs_f64() * 1000.0)),
            Err(covm_hv::HvError::Gone) if self.state.is_some() => Err(memory_gone(&self.view.vm)),
            Err(e) => Err(hv_error(e)),
        }
    }

    /// Removes the tags, each through the QEMU that holds its disk now (a file a process holds cannot
    /// be changed by `qemu-img`), or with `qemu-img` when none does.
    async fn tags_remove(&self, app: &App) -> Result<(), Error> {
        for (i, f) in self.files.iter().enumerate() {
            let Some(f) = f else { continue };
            let d = &self.view.disks[i];
            let holders = app.store().disk_attachments(&d.disk, d.disk_id).await?;
            let mut done = false;
            for h in holders.iter().filter(|h| h.power_state.is_active()) {
                match app.agent().ask(h.vm_id, VmOp::SnapshotDelete(disk_node(d.disk_id), d.tag.clone())).await {
                    Ok(()) => done = true,
                    // It stopped meanwhile: the file is free.
                    Err(covm_hv::HvError::Gone) => {}
                    Err(e) => return Err(hv_error(e)),
                }
            }
            if !done {
                let key = app.disk_key_by_id(d.disk_id).await?;
                img::snapshot_delete(f, self.tag(i), key.as_ref()).await.map_err(hv_error)?;
            }
        }
        if let Some(state) = &self.state {
            // The state image: through the VM's QEMU when it holds it, else with qemu-img.
            let held = match app.agent().block_state(self.vm_id).await {
                Ok(h) => h.nodes.iter().any(|n| n == covm_hv::STATE_NODE),
                Err(covm_hv::HvError::Gone) => false,
                Err(e) => return Err(hv_error(e)),
            };
            let op = VmOp::SnapshotDelete(covm_hv::STATE_NODE.into(), self.state_tag());
            if held {
                match app.agent().ask(self.vm_id, op).await {
                    Ok(()) => return Ok(()),
                    // It stopped meanwhile: the file is free.
                    Err(covm_hv::HvError::Gone) => {}
                    Err(e) => return Err(hv_error(e)),
                }
            }
            img::snapshot_delete(state, &self.state_tag(), None).await.map_err(hv_error)?;
        }
        Ok(())
    }

    fn record(&self) -> SnapshotRecord {
        SnapshotRecord {
            id: self.view.id,
            owner_id: self.vm_id,
            name: self.view.name.clone(),
            doc: serde_json::to_value(&self.view).unwrap_or_default(),
            created_at: self.view.created_at,
        }
    }

    async fn recorded(&self, app: &App) -> Result<bool, Error> {
        Ok(app.store().snapshot_get(self.view.id).await?.is_some())
    }

    async fn record_add(&self, app: &App, ctx: &Ctx) -> Result<(), Error> {
        if self.recorded(app).await? {
            return Ok(());
        }
        let data = json!({ "snapshot": self.view.id, "name": self.view.name, "kind": self.view.kind,
            "config_version": self.view.config_version, "memory": self.view.memory, "qemu_ms": self.qemu_ms });
        let (kind, object) = if self.disk { ("disk.snapshot.created", "disk") } else { ("vm.snapshot.created", "vm") };
        let ev = ctx.event(kind, object, Some(self.vm_id), &self.view.vm).data(data);
        app.store().snapshot_insert(self.record(), ev).await?;
        app.committed();
        Ok(())
    }

    async fn record_remove(&self, app: &App, ctx: &Ctx) -> Result<(), Error> {
        let data = json!({ "snapshot": self.view.id, "name": self.view.name });
        let (kind, object) = if self.disk { ("disk.snapshot.deleted", "disk") } else { ("vm.snapshot.deleted", "vm") };
        let ev = ctx.event(kind, object, Some(self.vm_id), &self.view.vm).data(data);
        if app.store().snapshot_remove(self.view.id, ev).await? {
            app.committed();
        }
        Ok(())
    }
}

/// A memory snapshot of a VM that stopped meanwhile.
fn memory_gone(vm: &str) -> Error {
    Error::conflict(covm_types::ErrorCode::VmNotRunning, format!("{vm} stopped; a memory snapshot needs it running"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStep {
    /// The tag in every covered disk.
    Tags,
    /// The snapshot's record.
    Record,
    /// Every covered disk back to its tag.
    Apply,
    /// The VM's config back to the snapshot's version.
    Config,
}

/// A new snapshot: the tags, then the record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotCreateSaga(pub Tagged);

#[async_trait]
impl Saga for SnapshotCreateSaga {
    const KIND: &'static str = "vm.snapshot.create";
    type Step = SnapshotStep;

    fn steps(&self) -> Vec<SnapshotStep> {
        vec![SnapshotStep::Tags, SnapshotStep::Record]
    }

    fn pivot(&self) -> SnapshotStep {
        SnapshotStep::Record
    }

    async fn forward(&mut self, app: &App, ctx: &Ctx, step: SnapshotStep) -> Result<(), Error> {
        match step {
            SnapshotStep::Tags => {
                self.0.qemu_ms = self.0.tags_add(app).await?;
                Ok(())
            }
            SnapshotStep::Record => self.0.record_add(app, ctx).await,
            SnapshotStep::Apply | SnapshotStep::Config => Ok(()),
        }
    }

    async fn undo(&mut self, app: &App, ctx: &Ctx, step: SnapshotStep) -> Result<(), Error> {
        match step {
            SnapshotStep::Tags => self.0.tags_remove(app).await,
            SnapshotStep::Record => self.0.record_remove(app, ctx).await,
            SnapshotStep::Apply | SnapshotStep::Config => Ok(()),
        }
    }

    async fn pivoted(&self, app: &App) -> Result<bool, Error> {
        self.0.recorded(app).await
    }
}

/// A snapshot removed: the record (the pivot), then the tags.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotDeleteSaga(pub Tagged);

#[async_trait]
impl Saga for SnapshotDeleteSaga {
    const KIND: &'static str = "vm.snapshot.delete";
    type Step = SnapshotStep;

    fn steps(&self) -> Vec<SnapshotStep> {
        vec![SnapshotStep::Record, SnapshotStep::Tags]
    }

    fn pivot(&self) -> SnapshotStep {
        SnapshotStep::Record
    }

    async fn forward(&mut self, app: &App, ctx: &Ctx, step: SnapshotStep) -> Result<(), Error> {
        match step {
            SnapshotStep::Record => self.0.record_remove(app, ctx).await,
            SnapshotStep::Tags => self.0.tags_remove(app).await,
            SnapshotStep::Apply | SnapshotStep::Config => Ok(()),
        }
    }

    async fn undo(&mut self, app: &App, ctx: &Ctx, step: SnapshotStep) -> Result<(), Error> {
        match step {
            SnapshotStep::Record => self.0.record_add(app, ctx).await,
            // After the pivot: never undone.
            SnapshotStep::Tags | SnapshotStep::Apply | SnapshotStep::Config => Ok(()),
        }
    }

    async fn pivoted(&self, app: &App) -> Result<bool, Error> {
        Ok(!self.0.recorded(app).await?)
    }
}

/// The config half of a revert: a new version equal to version `version` (its document).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigRevert {
    pub version: i64,
    pub doc: serde_json::Value,
    pub message: String,
    /// The config before (what an undo writes back).
    pub before_version: i64,
    pub before_doc: serde_json::Value,
    /// The caller's lease token, for the config write.
    #[serde(default)]
    pub lease_token: Option<i64>,
}

/// A revert: the data (every covered disk the VM still holds back to the snapshot's tag; undone by
/// putting each back to the safety snapshot of the present taken just before), then the config (the
/// pivot, one write). With only one of them, that one is the pivot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRevertSaga {
    pub to: Tagged,
    /// The safety snapshot's tag in the same files (in the same order).
    pub safety_tags: Vec<Option<String>>,
    pub data: bool,
    pub config: Option<ConfigRevert>,
    /// The safety snapshot of the present, taken as the first step (a data revert).
    #[serde(default)]
    pub safety: Option<Tagged>,
}

#[async_trait]
impl Saga for SnapshotRevertSaga {
    const KIND: &'static str = "vm.snapshot.revert";
    type Step = SnapshotStep;

    fn steps(&self) -> Vec<SnapshotStep> {
        let mut s = Vec::new();
        if self.safety.is_some() {
            s.push(SnapshotStep::Tags);
        }
        if self.data {
            s.push(SnapshotStep::Apply);
        }
        if self.config.is_some() {
            s.push(SnapshotStep::Config);
        }
        s
    }

    fn pivot(&self) -> SnapshotStep {
        if self.config.is_some() { SnapshotStep::Config } else { SnapshotStep::Apply }
    }

    async fn forward(&mut self, app: &App, ctx: &Ctx, step: SnapshotStep) -> Result<(), Error> {
        match (step, &self.config) {
            (SnapshotStep::Tags, _) => match &mut self.safety {
                Some(s) => {
                    s.tags_add(app).await?;
                    s.record_add(app, ctx).await
                }
                None => Ok(()),
            },
            (SnapshotStep::Apply, _) => {
                for (i, f) in self.to.files.iter().enumerate() {
                    if let Some(f) = f {
                        let key = app.disk_key_by_id(self.to.view.disks[i].disk_id).await?;
                        img::snapshot_apply(f, self.to.tag(i), key.as_ref()).await.map_err(hv_error)?;
                    }
                }
                Ok(())
            }
            (SnapshotStep::Config, Some(c)) => app.vm_config_restore(ctx, self.to.vm_id, c).await,
            _ => Ok(()),
        }
    }

    async fn undo(&mut self, app: &App, ctx: &Ctx, step: SnapshotStep) -> Result<(), Error> {
        match (step, &self.config) {
            (SnapshotStep::Tags, _) => match &mut self.safety {
                Some(s) => {
                    s.record_remove(app, ctx).await?;
                    s.tags_remove(app).await
                }
                None => Ok(()),
            },
            (SnapshotStep::Apply, _) => {
                for (i, (f, tag)) in self.to.files.iter().zip(&self.safety_tags).enumerate() {
                    if let (Some(f), Some(tag)) = (f, tag) {
                        let key = app.disk_key_by_id(self.to.view.disks[i].disk_id).await?;
                        img::snapshot_apply(f, tag, key.as_ref()).await.map_err(hv_error)?;
                    }
                }
                Ok(())
            }
            // The config write is one transaction; if it happened, the config before is written back.
            (SnapshotStep::Config, Some(c)) => {
                let now = app.store().vm_get(self.to.vm_id).await?;
                if now.is_some_and(|v| v.version != c.before_version && v.config == c.doc) {
                    let back = ConfigRevert {
                        version: c.before_version,
                        doc: c.before_doc.clone(),
                        message: format!("undo: {}", c.message),
                        before_version: c.version,
                        before_doc: c.doc.clone(),
                        lease_token: c.lease_token,
                    };
                    app.vm_config_restore(ctx, self.to.vm_id, &back).await?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// With a config step: whether the revert's version was written (a version after the one it
    /// started from holds its config; other changes may have followed it). A data-only revert
    /// interrupted at its pivot cannot tell from the files; it is put back to the safety snapshot.
    async fn pivoted(&self, app: &App) -> Result<bool, Error> {
        let Some(c) = &self.config else { return Ok(false) };
        let Some(now) = app.store().vm_get(self.to.vm_id).await? else { return Ok(false) };
        for n in (c.before_version + 1)..=now.version {
            if app.store().vm_version(self.to.vm_id, n).await?.is_some_and(|v| v.config == c.doc) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
