//! The plug sagas: attach (block node, device, then the config version), detach (the guest lets go
//! of the device, the block node goes, then the config version) and move (a detach on the VM that
//! holds the disk, then an attach on the target), all built on one [`Plug`] and one plug decision
//! ([`plug_mode`]). The rules that come before them are in `app/attach.rs`.

use covm_hv::HvError;
use covm_types::vm::{ControllerType, DiskAttachment, VmConfig};
use covm_types::{Error, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use async_trait::async_trait;

use super::Saga;
use crate::app::agent::VmOp;
use crate::app::attach::{UNPLUG_TIMEOUT, conflict};
use crate::app::node::hv_error;
use crate::app::vms::{DocChange, Preconditions, WriteOpts, parse_config};
use crate::app::{App, Ctx, EventExt};

/// A disk going into or out of one VM: where, and whether QEMU takes part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plug {
    pub vm: Uuid,
    pub vm_name: String,
    pub disk: Uuid,
    pub disk_name: String,
    pub attachment: DiskAttachment,
    /// The VM runs and the bus hot-plugs: QEMU gets (or loses) the disk live.
    pub hot: Option<HotDisk>,
    /// Pending until the next power-on (a running VM, a bus that cannot hot-plug).
    pub next_boot: bool,
    /// A move's target side: the VM the disk comes from (its attach is reported as `disk.moved`).
    #[serde(default)]
    pub moved_from: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HotDisk {
    pub node: String,
    pub path: std::path::PathBuf,
    pub format: String,
    pub bus: ControllerType,
    /// The disk's wrapped key, if its image is encrypted.
    #[serde(default)]
    pub key: Option<crate::app::keys::WrappedKey>,
    /// A linked clone's base image (file, format).
    #[serde(default)]
    pub backing: Option<(std::path::PathBuf, String)>,
}

/// How a disk goes into or out of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlugMode {
    /// The VM is off: the config alone changes.
    Cold,
    /// The VM runs and the bus hot-plugs: QEMU takes (or lets go of) the disk live.
    Hot,
    /// The VM runs, the bus cannot hot-plug, and the caller asked for the next boot.
    NextBoot,
}

/// The one plug decision, for attach, detach and move: a running VM on a bus that cannot hot-plug
/// is refused unless the caller accepts the next boot (`next_boot_ok`).
pub fn plug_mode(
    vm: &str,
    running: bool,
    controller: &str,
    bus: ControllerType,
    attach: bool,
    next_boot_ok: bool,
) -> Result<PlugMode, Error> {
    match (running, bus.hotplug()) {
        (false, _) => Ok(PlugMode::Cold),
        (true, true) => Ok(PlugMode::Hot),
        (true, false) if next_boot_ok => Ok(PlugMode::NextBoot),
        (true, false) => Err(conflict(
            ErrorCode::HotplugUnsupported,
            format!(
                "{vm} is running and {controller} cannot {}; power it off{}",
                if attach { "hot-plug" } else { "hot-unplug" },
                if next_boot_ok { ", or send next_boot" } else { " first" }
            ),
        )),
    }
}

/// Undo steps tolerate a VM that stopped meanwhile: what it held went with its process.
fn gone_ok(r: Result<(), HvError>) -> Result<(), Error> {
    match r {
        Err(HvError::Gone) => Ok(()),
        r => r.map_err(hv_error),
    }
}

impl Plug {
    async fn spec(&self, app: &App) -> Result<Option<covm_hv::DiskSpec>, Error> {
        let Some(h) = &self.hot else { return Ok(None) };
        // As the disk's record holds the key now (a rotation may have rewrapped it since).
        let key = match &h.key {
            Some(w) => match app.disk_key_by_id(self.disk).await? {
                Some(k) => Some(k),
                None => Some(app.keys()?.unwrap(self.disk, w)?),
            },
            None => None,
        };
        Ok(Some(covm_hv::DiskSpec {
            node: h.node.clone(),
            path: h.path.clone(),
            format: h.format.clone(),
            controller: self.attachment.controller.clone(),
            bus: h.bus,
            unit: self.attachment.unit,
            read_only: self.attachment.read_only,
            key,
            backing: h.backing.clone(),
        }))
    }

    fn node(&self) -> String {
        self.hot.as_ref().map(|h| h.node.clone()).unwrap_or_default()
    }

    fn matches(&self, d: &DiskAttachment) -> bool {
        (d.disk == self.disk_name || d.disk == self.disk.to_string()) && d.generation == self.attachment.generation
    }

    async fn blockdev_add(&self, app: &App) -> Result<(), Error> {
        let Some(spec) = self.spec(app).await? else { return Ok(()) };
        app.agent().ask(self.vm, VmOp::BlockdevAdd(Box::new(spec))).await.map_err(hv_error)
    }

    async fn device_add(&self, app: &App) -> Result<(), Error> {
        let Some(spec) = self.spec(app).await? else { return Ok(()) };
        app.agent().ask(self.vm, VmOp::DeviceAdd(Box::new(spec))).await.map_err(hv_error)
    }

    async fn blockdev_del(&self, app: &App) -> Result<(), Error> {
        if self.hot.is_none() {
            return Ok(());
        }
        let node = self.node();
        gone_ok(app.agent().ask(self.vm, VmOp::BlockdevDel(node)).await)
    }

    /// Asks the guest to let go and waits for it (a bounded time).
    async fn device_del(&self, app: &App) -> Result<(), Error> {
        if self.hot.is_none() {
            return Ok(());
        }
        let node = self.node();
        match tokio::time::timeout(UNPLUG_TIMEOUT, app.agent().ask(self.vm, VmOp::DeviceDel(node))).await {
            Ok(r) => gone_ok(r),
            Err(_) => Err(conflict(
                ErrorCode::DetachTimeout,
                format!(
                    "the guest of {} did not release {} within {} s; it stays attached",
                    self.vm_name,
                    self.disk_name,
                    UNPLUG_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// The VM's current config.
    async fn config(&self, app: &App) -> Result<(covm_store::VmRecord, VmConfig), Error> {
        let rec = app.store().vm_get(self.vm).await?.ok_or_else(|| Error::not_found("vm", &self.vm_name))?;
        let cfg = parse_config(&rec.config)?;
        Ok((rec, cfg))
    }

    async fn config_has(&self, app: &App) -> Result<bool, Error> {
        Ok(self.config(app).await?.1.disks.iter().any(|d| self.matches(d)))
    }

    /// Writes a config version that holds the attachment (already so: nothing to write).
    async fn config_add(&self, app: &App, ctx: &Ctx, message: String) -> Result<(), Error> {
        let (rec, cfg) = self.config(app).await?;
        if cfg.disks.iter().any(|d| self.matches(d)) {
            return Ok(());
        }
        let mut disks = cfg.disks.clone();
        disks.push(self.attachment.clone());
        let kind = if self.moved_from.is_some() { "disk.moved" } else { "disk.attached" };
        self.config_write(app, ctx, rec, disks, message, kind).await
    }

    /// Writes a config version without the attachment (already so: nothing to write).
    async fn config_remove(&self, app: &App, ctx: &Ctx, message: String) -> Result<(), Error> {
        let (rec, cfg) = self.config(app).await?;
        if !cfg.disks.iter().any(|d| self.matches(d)) {
            return Ok(());
        }
        let disks: Vec<DiskAttachment> = cfg.disks.iter().filter(|d| !self.matches(d)).cloned().collect();
        self.config_write(app, ctx, rec, disks, message, "disk.detached").await
    }

    async fn config_write(
        &self,
        app: &App,
        ctx: &Ctx,
        rec: covm_store::VmRecord,
        disks: Vec<DiskAttachment>,
        message: String,
        kind: &str,
    ) -> Result<(), Error> {
        // The disk's own event, in the same transaction as the VM's config version.
        let a = &self.attachment;
        let event = ctx.event(kind, "disk", (!self.disk.is_nil()).then_some(self.disk), &self.disk_name).data(json!({
            "vm": self.vm_name, "from_vm": self.moved_from, "controller": a.controller, "unit": a.unit,
            "read_only": a.read_only, "generation": a.generation, "hot": self.hot.is_some(),
        }));
        let opts = WriteOpts {
            message: Some(message),
            next_boot: self.next_boot,
            disks_checked: true,
            disks_live: self.hot.is_some(),
            events: vec![event],
            ..Default::default()
        };
        let change = DocChange::Merge(json!({ "disks": disks }));
        app.vm_write_doc(ctx, rec, change, Preconditions::default(), opts).await.map(|_| ())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlugStep {
    BlockdevAdd,
    DeviceAdd,
    DeviceDel,
    BlockdevDel,
    Commit,
}

impl Plug {
    /// Takes one step of an attach (`attach`) or a detach of this plug.
    async fn step_forward(&self, app: &App, ctx: &Ctx, step: PlugStep, attach: bool, what: &str) -> Result<(), Error> {
        match step {
            PlugStep::BlockdevAdd => self.blockdev_add(app).await,
            PlugStep::DeviceAdd => self.device_add(app).await,
            PlugStep::DeviceDel => self.device_del(app).await,
            PlugStep::BlockdevDel => self.blockdev_del(app).await,
            PlugStep::Commit if attach => self.config_add(app, ctx, what.to_owned()).await,
            PlugStep::Commit => self.config_remove(app, ctx, what.to_owned()).await,
        }
    }

    /// Undoes one step. Putting a disk back into a VM that stopped meanwhile has nothing to do (the
    /// next power-on takes the config).
    async fn step_undo(&self, app: &App, ctx: &Ctx, step: PlugStep, attach: bool) -> Result<(), Error> {
        let back = |r: Result<(), Error>| match r {
            Err(e) if e.code == "vm_not_running" => Ok(()),
            r => r,
        };
        let what = format!("undo: {} {}", if attach { "attach" } else { "detach" }, self.disk_name);
        match step {
            PlugStep::BlockdevAdd => self.blockdev_del(app).await,
            PlugStep::DeviceAdd => self.device_del(app).await,
            PlugStep::DeviceDel => back(self.device_add(app).await),
            PlugStep::BlockdevDel => back(self.blockdev_add(app).await),
            PlugStep::Commit if attach => self.config_remove(app, ctx, what).await,
            PlugStep::Commit => self.config_add(app, ctx, what).await,
        }
    }
}

/// Attach (`ATTACH`: (hot) block node, device, then the config version) or detach ((hot) the guest
/// lets go of the device, the block node goes, then the config version). The config version is the
/// pivot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlugSaga<const ATTACH: bool> {
    pub plug: Plug,
}

pub type AttachSaga = PlugSaga<true>;
pub type DetachSaga = PlugSaga<false>;

#[async_trait]
impl<const ATTACH: bool> Saga for PlugSaga<ATTACH> {
    const KIND: &'static str = if ATTACH { "disk.attach" } else { "disk.detach" };
    type Step = PlugStep;

    fn steps(&self) -> Vec<PlugStep> {
        match (self.plug.hot.is_some(), ATTACH) {
            (true, true) => vec![PlugStep::BlockdevAdd, PlugStep::DeviceAdd, PlugStep::Commit],
            (true, false) => vec![PlugStep::DeviceDel, PlugStep::BlockdevDel, PlugStep::Commit],
            (false, _) => vec![PlugStep::Commit],
        }
    }

    fn pivot(&self) -> PlugStep {
        PlugStep::Commit
    }

    async fn forward(&mut self, app: &App, ctx: &Ctx, step: PlugStep) -> Result<(), Error> {
        let what = format!("{} {}", if ATTACH { "attach" } else { "detach" }, self.plug.disk_name);
        self.plug.step_forward(app, ctx, step, ATTACH, &what).await
    }

    async fn undo(&mut self, app: &App, ctx: &Ctx, step: PlugStep) -> Result<(), Error> {
        self.plug.step_undo(app, ctx, step, ATTACH).await
    }

    async fn pivoted(&self, app: &App) -> Result<bool, Error> {
        Ok(self.plug.config_has(app).await? == ATTACH)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveStep {
    FromDeviceDel,
    FromBlockdevDel,
    FromCommit,
    ToBlockdevAdd,
    ToDeviceAdd,
    ToCommit,
}

impl MoveStep {
    /// Which side it acts on (`true`: the target) and which plug step it is.
    fn split(self) -> (bool, PlugStep) {
        match self {
            MoveStep::FromDeviceDel => (false, PlugStep::DeviceDel),
            MoveStep::FromBlockdevDel => (false, PlugStep::BlockdevDel),
            MoveStep::FromCommit => (false, PlugStep::Commit),
            MoveStep::ToBlockdevAdd => (true, PlugStep::BlockdevAdd),
            MoveStep::ToDeviceAdd => (true, PlugStep::DeviceAdd),
            MoveStep::ToCommit => (true, PlugStep::Commit),
        }
    }
}

/// Move: the detach steps on the VM that holds the disk, then the attach steps on the target; the
/// target's config version is the pivot, so a failure anywhere before it puts the disk back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveSaga {
    pub from: Option<Plug>,
    pub to: Plug,
}

impl MoveSaga {
    fn side(&self, to: bool) -> Option<&Plug> {
        if to { Some(&self.to) } else { self.from.as_ref() }
    }
}

#[async_trait]
impl Saga for MoveSaga {
    const KIND: &'static str = "disk.move";
    type Step = MoveStep;

    fn steps(&self) -> Vec<MoveStep> {
        let mut s = Vec::new();
        if let Some(f) = &self.from {
            if f.hot.is_some() {
                s.extend([MoveStep::FromDeviceDel, MoveStep::FromBlockdevDel]);
            }
            s.push(MoveStep::FromCommit);
        }
        if self.to.hot.is_some() {
            s.extend([MoveStep::ToBlockdevAdd, MoveStep::ToDeviceAdd]);
        }
        s.push(MoveStep::ToCommit);
        s
    }

    fn pivot(&self) -> MoveStep {
        MoveStep::ToCommit
    }

    async fn forward(&mut self, app: &App, ctx: &Ctx, step: MoveStep) -> Result<(), Error> {
        let (to, plug_step) = step.split();
        let what = match &self.from {
            _ if !to => format!("move {} to {}", self.to.disk_name, self.to.vm_name),
            Some(f) => format!("move {} from {}", self.to.disk_name, f.vm_name),
            None => format!("move {} (unattached)", self.to.disk_name),
        };
        match self.side(to) {
            Some(p) => p.step_forward(app, ctx, plug_step, to, &what).await,
            None => Ok(()),
        }
    }

    async fn undo(&mut self, app: &App, ctx: &Ctx, step: MoveStep) -> Result<(), Error> {
        let (to, plug_step) = step.split();
        match self.side(to) {
            Some(p) => p.step_undo(app, ctx, plug_step, to).await,
            None => Ok(()),
        }
    }

    async fn pivoted(&self, app: &App) -> Result<bool, Error> {
        self.to.config_has(app).await
    }
}
