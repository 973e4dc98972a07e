//! The node-agent seam: what a host does for the VMs it runs, as one trait. The app decides (who may,
//! what the config says, which state follows which); an agent does (starts QEMU, supervises it, plugs
//! disks, answers for its block layer, serves its console files) and reports what happens.
//!
//! Today one implementation exists, the local supervisor ([`super::node::LocalAgent`]). A VM that runs
//! on another node (another covm replica's data directory) has no local agent: [`App::agent_for`]
//! answers `vm_on_other_node` with the node, typed, and the HTTP layer forwards the request to that
//! replica. A remote agent (the multi-host issue) implements this trait over the network and is what
//! `agent_for` returns instead.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use covm_hv::{AccelChoice, BlockState, DiskSpec, HvError, VmHandle, VmSpec};
use covm_store::VmRecord;
use covm_types::Error;
use serde_json::Value;
use uuid::Uuid;

use super::App;
use super::transition::PowerEvent;

/// What an agent is asked to do to a running VM.
#[derive(Debug)]
pub enum VmOp {
    /// Power off at once; done when the process is gone.
    Quit,
    /// ACPI power-down; done when the guest has powered off.
    Powerdown,
    Reset,
    /// A NIC's link up or down (the NIC by its MAC).
    SetLink(String, bool),
    /// Plugs a NIC into the running VM.
    NicAdd(Box<covm_hv::NicSpec>),
    /// The guest releases a NIC (by its MAC); done when it has, or at once when there is none.
    NicDel(String),
    /// A NIC's network backend goes, after its device.
    NetdevDel(String),
    /// A disk's block nodes (kept if already there).
    BlockdevAdd(Box<DiskSpec>),
    /// A disk's device (kept if already there).
    DeviceAdd(Box<DiskSpec>),
    /// The guest releases a disk's device (`device_del`); done when it has (`DEVICE_DELETED`), or at
    /// once when there is no such device.
    DeviceDel(String),
    /// A disk's block nodes go (those there).
    BlockdevDel(String),
    /// An attached disk grows (`block_resize`).
    DiskResize(String, u64),
    /// An internal snapshot (the tag) of these format nodes, all at once.
    SnapshotTake(Vec<String>, String),
    /// A memory snapshot: RAM and devices into the state image, the tag into the nodes (`snapshot-save`).
    SnapshotSave(Box<covm_hv::MemoryState>),
    /// An internal snapshot of a node goes (already gone is done).
    SnapshotDelete(String, String),
    /// Nothing: done when the process has exited (after a shutdown asked of the guest agent).
    AwaitExit,
}

/// What a running VM's process uses (zero for a simulated VM, which has none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmUse {
    pub pid: Option<u32>,
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// A VM process an agent started or found, before it supervises it.
pub struct Run {
    pub pid: Option<u32>,
    pub accel: AccelChoice,
    pub(crate) handle: Box<dyn VmHandle>,
}

impl Run {
    pub(crate) fn new(handle: Box<dyn VmHandle>) -> Run {
        Run { pid: handle.pid(), accel: handle.accel(), handle }
    }
}

/// Where an agent reports what happens to a VM it supervises, for one run (a power-on or an
/// adoption): the app records it as runtime state, keyed by the run's generation so that a late report
/// from an old run changes nothing.
#[async_trait]
pub trait RunReports: Send + Sync + 'static {
    /// The VM's power moved (paused, resumed, stopped, exited).
    async fn power(&self, event: PowerEvent, data: Value);
    /// The guest released a device nobody waits for (a detach that gave up): the config decides.
    async fn device_released(&self, device: String);
}

/// What a host does for its VMs.
#[async_trait]
pub trait NodeAgent: Send + Sync {
    /// The hypervisor driver (`qemu`, `sim`).
    fn driver_name(&self) -> &'static str;
    /// Whether VMs can be started here now.
    fn check(&self) -> Result<(), HvError>;
    /// A VM's run files (QMP socket, pid file, serial log, VNC socket).
    fn run_dir(&self, id: Uuid) -> PathBuf;
    /// The serial log of a VM.
    fn serial_log(&self, id: Uuid) -> PathBuf;
    /// The VNC socket of a VM.
    fn vnc_socket(&self, id: Uuid) -> PathBuf;
    /// The serial console's socket of a VM.
    fn serial_socket(&self, id: Uuid) -> PathBuf;
    /// Starts a VM's process.
    async fn start(&self, spec: &VmSpec) -> Result<Run, HvError>;
    /// Finds a VM's process still running after covm's restart; None: it is gone.
    async fn adopt(&self, id: Uuid) -> Result<Option<Run>, HvError>;
    /// Supervises a run from now on, reporting to `reports`; its commands go through [`Self::ask`].
    fn supervise(&self, id: Uuid, run: Run, reports: Arc<dyn RunReports>);
    /// Does `op` to a running VM (`HvError::Gone` when it does not run here).
    async fn ask(&self, id: Uuid, op: VmOp) -> Result<(), HvError>;
    /// One guest agent command to a running VM: its answer. `HvError::Unavailable` when the guest
    /// runs no agent (or the VM is simulated), `HvError::Gone` when the VM does not run here.
    async fn guest(
        &self,
        id: Uuid,
        command: &str,
        args: serde_json::Value,
        timeout: std::time::Duration,
    ) -> Result<serde_json::Value, HvError>;
    /// The block nodes and devices a running VM holds.
    async fn block_state(&self, id: Uuid) -> Result<BlockState, HvError>;
    /// What a running VM's process uses of the host now.
    async fn stats(&self, id: Uuid) -> Result<VmUse, HvError>;
    /// QEMU processes in run directories of no known VM (reported, never killed).
    fn leftovers_scan(&self, known: &std::collections::HashSet<Uuid>) -> Vec<String>;
    /// The leftovers found at start.
    fn leftovers(&self) -> Vec<String>;
    /// Lets go of every VM without touching it (covm stops; the next covm adopts them).
    fn release_all(&self);
}

impl App {
    /// This host's agent.
    pub(crate) fn agent(&self) -> &dyn NodeAgent {
        self.node()
    }

    /// The agent of the node that runs a VM (or would run it: an off VM runs where it is started).
    /// A VM that runs on another node answers 409 `vm_on_other_node` naming it, typed, for forwarding.
    pub(crate) fn agent_for(&self, rec: &VmRecord) -> Result<&dyn NodeAgent, Error> {
        let rt = super::node::runtime_of(rec);
        match rt.node {
            Some(n) if n != self.config().node_id && rt.power_state.is_active() => Err(Error::on_other_node(
                &n,
                format!(
                    "{} runs on node {n} (another covm replica); send this request to that replica",
                    rec.object.name
                ),
            )),
            _ => Ok(self.agent()),
        }
    }
}
