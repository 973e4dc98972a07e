//! The clone saga: the new VM's disks (copies or qcow2 overlays on a template's disks), then the VM
//! (the pivot). A failure, or a crash, before the VM is written removes every disk made; the rules
//! that come before it are in `app/clone.rs`.

use async_trait::async_trait;
use covm_types::Error;
use covm_types::vm::VmConfig;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::Saga;
use super::disk::{CreateSaga, DiskStep};
use crate::app::{App, Ctx, EventExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneStep {
    Disks,
    Vm,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneSaga {
    pub vm_id: Uuid,
    pub config: VmConfig,
    /// The new disks, each made as a disk create saga makes one (file, then record).
    pub disks: Vec<CreateSaga>,
    /// What the `vm.created` entry says of the source.
    pub data: serde_json::Value,
}

#[async_trait]
impl Saga for CloneSaga {
    const KIND: &'static str = "vm.clone";
    type Step = CloneStep;

    fn steps(&self) -> Vec<CloneStep> {
        vec![CloneStep::Disks, CloneStep::Vm]
    }

    fn pivot(&self) -> CloneStep {
        CloneStep::Vm
    }

    async fn forward(&mut self, app: &App, ctx: &Ctx, step: CloneStep) -> Result<(), Error> {
        match step {
            CloneStep::Disks => {
                for d in &mut self.disks {
                    d.forward(app, ctx, DiskStep::File).await?;
                    d.forward(app, ctx, DiskStep::Record).await?;
                }
                Ok(())
            }
            CloneStep::Vm => {
                if app.store().object_get(self.vm_id).await?.is_some() {
                    return Ok(());
                }
                let message = format!("cloned from {}", self.data["source"].as_str().unwrap_or("?"));
                app.vm_create_locked(ctx, self.vm_id, self.config.clone(), &message, self.data.clone()).await?;
                Ok(())
            }
        }
    }

    async fn undo(&mut self, app: &App, ctx: &Ctx, step: CloneStep) -> Result<(), Error> {
        match step {
            CloneStep::Disks => {
                for d in self.disks.iter_mut().rev() {
                    d.undo(app, ctx, DiskStep::Record).await?;
                    d.undo(app, ctx, DiskStep::File).await?;
                }
                Ok(())
            }
            CloneStep::Vm => {
                if app.store().object_get(self.vm_id).await?.is_none() {
                    return Ok(());
                }
                let ctx2 = ctx.clone();
                let write = Box::new(move |vm: &covm_store::VmRecord, _at: chrono::DateTime<chrono::Utc>| {
                    let ev = ctx2
                        .event("vm.deleted", "vm", Some(vm.object.id), &vm.object.name)
                        .scope(vm.object.parent_id.unwrap_or(covm_types::ROOT_ID))
                        .data(json!({ "path": vm.object.path, "version": vm.version, "undo": true }));
                    Ok(covm_store::WriteOutcome::from(covm_store::VmWrite {
                        delete: true,
                        events: vec![ev],
                        ..Default::default()
                    }))
                });
                app.store().vm_write(self.vm_id, write).await?;
                app.committed();
                Ok(())
            }
        }
    }

    async fn pivoted(&self, app: &App) -> Result<bool, Error> {
        Ok(app.store().object_get(self.vm_id).await?.is_some())
    }
}
