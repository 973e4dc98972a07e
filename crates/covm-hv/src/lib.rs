//! Hypervisor drivers behind one trait: [`qemu::QemuDriver`] runs real QEMU/KVM processes and speaks
//! QMP to them; [`sim::SimDriver`] pretends, for fast tests and machines without QEMU.
//!
//! A driver starts a VM from a [`VmSpec`] and hands back a [`VmHandle`]; whoever owns the handle (one
//! task per VM, in the server's node agent) is the only one that talks to that VM. A handle reports
//! what happens to the VM as [`HvEvent`]s, ending with [`HvEvent::Exited`]. QEMU processes do not
//! belong to covm's process group, so they keep running when covm stops; [`Hypervisor::adopt`] finds
//! them again from their run directory (pid file and QMP socket).

pub mod img;
pub mod net;
pub mod procfs;
pub mod qemu;
pub mod qga;
pub mod qmp;
pub mod secret;
pub mod seed;
pub mod sim;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use covm_types::vm::{Accel, VmConfig};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HvError {
    /// The driver cannot run VMs here (no QEMU binary, no firmware, …); says what to install.
    #[error("{0}")]
    Unavailable(String),
    #[error("QEMU did not start: {0}")]
    Start(String),
    #[error("QMP: {0}")]
    Qmp(String),
    /// QEMU refused a command.
    #[error("QEMU refused: {desc} ({class})")]
    Command { class: String, desc: String },
    /// The VM's process is gone.
    #[error("the VM's QEMU process is gone")]
    Gone,
    #[error("{0}")]
    Io(String),
    /// A system call on a file, socket or process failed; the cause is kept.
    #[error("could not {what}")]
    Os {
        what: String,
        #[source]
        source: OsError,
    },
}

/// An OS error, shared (so that a driver error stays cheap to clone) and compared by kind and text.
#[derive(Debug, Clone)]
pub struct OsError(pub std::sync::Arc<std::io::Error>);

impl PartialEq for OsError {
    fn eq(&self, other: &OsError) -> bool {
        self.0.kind() == other.0.kind() && self.0.to_string() == other.0.to_string()
    }
}

impl std::fmt::Display for OsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for OsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl HvError {
    /// An OS error while doing `what` (a phrase after "could not").
    pub fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HvError {
        let what = what.into();
        move |source| HvError::Os { what, source: OsError(std::sync::Arc::new(source)) }
    }

    /// The message and its causes, as one line (for people: the API and the log).
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

pub use covm_types::vm::BlockState;

/// A disk to attach: its image and where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    /// covm's name for the block node and device (unique in the VM), e.g. `d-<disk id>`.
    pub node: String,
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    pub controller: String,
    pub bus: covm_types::vm::ControllerType,
    pub unit: u32,
    pub read_only: bool,
    /// The passphrase of an encrypted (LUKS) image.
    pub key: Option<secret::DiskKey>,
    /// A linked clone's base image (file and format), opened read-only beneath it. covm names it;
    /// a backing file named in the image's own header is never followed.
    pub backing: Option<(PathBuf, String)>,
}

/// A NIC as QEMU runs it: its device and backend are named after its MAC ([`nic_id`], [`netdev_id`]),
/// so that a NIC keeps its names whatever is plugged or unplugged beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct NicSpec {
    pub nic: covm_types::vm::Nic,
    /// The bridge of its tap, or None for user networking.
    pub bridge: Option<NicBridge>,
}

fn mac_hex(mac: &str) -> String {
    mac.replace(':', "").to_ascii_lowercase()
}

/// A NIC's QEMU device id.
pub fn nic_id(mac: &str) -> String {
    format!("nic-{}", mac_hex(mac))
}

/// A NIC's QEMU network backend id.
pub fn netdev_id(mac: &str) -> String {
    format!("net-{}", mac_hex(mac))
}

/// A NIC on a host bridge: QEMU makes the tap ([`net::tap_name`]), the driver puts it on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicBridge {
    pub bridge: String,
    pub vlan: Option<u16>,
}

/// Everything a driver needs to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: Uuid,
    pub name: String,
    /// The config version this start runs.
    pub version: i64,
    pub config: VmConfig,
    /// `kernel`, `initrd` and `cdrom` resolved to files inside their datastores.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cdrom: Option<PathBuf>,
    /// A cloud-init seed (an ISO labelled `cidata`), attached as a read-only CD on a virtio-scsi
    /// controller of its own (every cloud image drives virtio; not every kernel drives AHCI).
    pub seed: Option<PathBuf>,
    /// The disks, attached before the guest runs.
    pub disks: Vec<DiskSpec>,
    /// Per NIC: the host bridge its tap goes on (with a VLAN tag), or None for user-mode networking.
    pub nic_bridges: Vec<Option<NicBridge>>,
    /// Where the VM's sockets, pid file and logs live (`DATA/vms/<id>`).
    pub run_dir: PathBuf,
    /// The accelerator to use (already decided from `auto`).
    pub accel: AccelChoice,
    /// Start from a memory snapshot: loaded (`snapshot-load`) before the guest runs.
    pub restore: Option<MemoryState>,
}

/// The block node of a VM's hidden state image (where memory snapshots keep the guest's RAM and devices).
pub const STATE_NODE: &str = "covm-vmstate";

/// A memory snapshot to save or load: its tag, the VM's hidden state image (made when missing), and
/// the disks' format nodes that hold the same tag.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryState {
    pub tag: String,
    pub state: PathBuf,
    pub nodes: Vec<String>,
}

impl MemoryState {
    /// The state image's own block spec (a node with no device).
    pub fn state_spec(&self) -> DiskSpec {
        DiskSpec {
            node: STATE_NODE.into(),
            path: self.state.clone(),
            format: "qcow2".into(),
            controller: String::new(),
            bus: covm_types::vm::ControllerType::VirtioScsi,
            unit: 0,
            read_only: false,
            key: None,
            backing: None,
        }
    }

    /// The nodes `snapshot-save`/`snapshot-load` work on: the disks and the state image.
    pub fn devices(&self) -> Vec<String> {
        let mut d = self.nodes.clone();
        d.push(STATE_NODE.into());
        d
    }

    /// Makes the state image when it is not there yet (1 MiB; the saved state lives beyond its end).
    pub async fn state_image(&self) -> Result<(), HvError> {
        if !self.state.exists() {
            if let Some(dir) = self.state.parent() {
                std::fs::create_dir_all(dir).map_err(HvError::os(format!("create {}", dir.display())))?;
            }
            img::create(&self.state, "qcow2", 1 << 20, None).await?;
        }
        Ok(())
    }
}

/// What the VM is actually accelerated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Kvm,
    Tcg,
}

impl AccelChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            AccelChoice::Kvm => "kvm",
            AccelChoice::Tcg => "tcg",
        }
    }
}

/// Facts the accelerator choice depends on.
#[derive(Debug, Clone, Copy)]
pub struct KvmFacts {
    /// `/dev/kvm` opens.
    pub usable: bool,
    /// It is `kvm_pvm`, a nested software KVM that boots a stock kernel in minutes.
    pub slow: bool,
}

impl KvmFacts {
    pub fn probe() -> KvmFacts {
        KvmFacts {
            usable: std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok(),
            slow: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }
}

/// `auto` takes KVM only where it is real and fast; `kvm` insists (and fails without it).
pub fn accel_choose(wanted: Accel, facts: KvmFacts) -> Result<AccelChoice, HvError> {
    match wanted {
        Accel::Tcg => Ok(AccelChoice::Tcg),
        Accel::Kvm if facts.usable => Ok(AccelChoice::Kvm),
        Accel::Kvm => Err(HvError::Unavailable("accel kvm was asked for, but /dev/kvm cannot be opened".into())),
        Accel::Auto if facts.usable && !facts.slow => Ok(AccelChoice::Kvm),
        Accel::Auto => Ok(AccelChoice::Tcg),
    }
}

/// What happens to a running VM.
#[derive(Debug, Clone, PartialEq)]
pub enum HvEvent {
    /// The guest powered itself off (or answered an ACPI power-down); QEMU waits to be told to quit.
    GuestShutdown,
    /// The guest asked for a reset and QEMU did it.
    Reset,
    Paused,
    Resumed,
    /// A device was removed (hot-unplug confirmed by the guest).
    DeviceDeleted(String),
    /// The process ended. `status` is known only for a process covm started in this run.
    Exited {
        status: Option<String>,
        log_tail: Vec<String>,
    },
}

/// One running VM, owned by exactly one task.
#[async_trait]
pub trait VmHandle: Send {
    fn pid(&self) -> Option<u32>;
    fn accel(&self) -> AccelChoice;
    /// Asks the guest to power off (ACPI); returns at once.
    async fn powerdown(&mut self) -> Result<(), HvError>;
    async fn reset(&mut self) -> Result<(), HvError>;
    /// Ends the VM at once (power off) and waits for the process to go.
    async fn quit(&mut self) -> Result<(), HvError>;
    /// Sets a NIC's link up or down (the NIC by its MAC).
    async fn set_link(&mut self, mac: &str, up: bool) -> Result<(), HvError>;
    /// Plugs a NIC into the running VM (its network backend, then its device; a tap goes on its
    /// bridge). Where the machine cannot take one (no free hot-plug port): `HvError::Unavailable`.
    async fn nic_add(&mut self, _nic: &NicSpec) -> Result<(), HvError> {
        Err(HvError::Unavailable("this driver cannot plug NICs into a running VM".into()))
    }
    /// Asks the guest to release a NIC (`device_del`; `DeviceDeleted` with [`nic_id`] confirms it).
    /// `false`: there is no such NIC.
    async fn nic_del(&mut self, _mac: &str) -> Result<bool, HvError> {
        Ok(false)
    }
    /// Removes a NIC's network backend after its device is gone.
    async fn netdev_del(&mut self, _mac: &str) -> Result<(), HvError> {
        Ok(())
    }
    /// Adds a disk's block nodes (`blockdev-add` of its file node and its format node); nodes already
    /// there are kept, so a retry or a recovery can call it again.
    async fn blockdev_add(&mut self, disk: &DiskSpec) -> Result<(), HvError>;
    /// Adds a disk's device on its controller (`device_add`); a device already there is kept.
    async fn device_add(&mut self, disk: &DiskSpec) -> Result<(), HvError>;
    /// Adds a disk: block nodes, then device (at start and for hot-plug alike).
    async fn disk_add(&mut self, disk: &DiskSpec) -> Result<(), HvError> {
        self.blockdev_add(disk).await?;
        if let Err(e) = self.device_add(disk).await {
            let _ = self.blockdev_del(&disk.node).await;
            return Err(e);
        }
        Ok(())
    }
    /// Asks the guest to release a device (`device_del`); `DeviceDeleted` confirms it. `false`: there
    /// is no such device (already gone).
    async fn device_del(&mut self, node: &str) -> Result<bool, HvError>;
    /// Removes a disk's block nodes after its device is gone (those that are there).
    async fn blockdev_del(&mut self, node: &str) -> Result<(), HvError>;
    /// The block nodes and block devices the VM holds (QEMU's `query-named-block-nodes` and `query-block`).
    async fn block_query(&mut self) -> Result<BlockState, HvError>;
    /// Grows an attached disk while the VM runs (`block_resize`).
    async fn block_resize(&mut self, node: &str, size: u64) -> Result<(), HvError>;
    /// Takes an internal snapshot `tag` of every node (a disk's format node) at once: one QMP
    /// `transaction` of `blockdev-snapshot-internal-sync`, all or none.
    async fn snapshot_internal(&mut self, nodes: &[String], tag: &str) -> Result<(), HvError>;
    /// Deletes an internal snapshot of a node; one that is not there is already deleted.
    async fn snapshot_delete_internal(&mut self, node: &str, tag: &str) -> Result<(), HvError>;
    /// A memory snapshot: the guest's RAM and devices into the state image and the tag into every
    /// node (`snapshot-save`; the guest pauses while it runs).
    async fn snapshot_save(&mut self, m: &MemoryState) -> Result<(), HvError>;
    /// The next thing that happens; [`HvEvent::Exited`] is the last. Cancel-safe.
    async fn next_event(&mut self) -> HvEvent;
}

#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// `qemu` or `sim`.
    fn name(&self) -> &'static str;
    /// Whether this driver can start VMs here; the error says what to install.
    fn check(&self) -> Result<(), HvError>;
    /// Starts a VM (paused, devices added, then running).
    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn VmHandle>, HvError>;
    /// Finds a VM that runs from an earlier covm (its run directory), if its process is still alive.
    async fn adopt(&self, id: Uuid, run_dir: &Path) -> Result<Option<Box<dyn VmHandle>>, HvError>;
    /// The pid of a process found in a run directory that still lives (for leftovers of deleted VMs).
    fn leftover_pid(&self, run_dir: &Path) -> Option<u32>;
    /// Where a VM's serial console is logged, in its run directory.
    fn serial_log(&self, run_dir: &Path) -> PathBuf {
        run_dir.join("serial.log")
    }
    /// The unix socket of a VM's VNC console, in its run directory.
    fn vnc_socket(&self, run_dir: &Path) -> PathBuf {
        run_dir.join("vnc.sock")
    }
    /// The unix socket of a VM's serial console (input and output), in its run directory.
    fn serial_socket(&self, run_dir: &Path) -> PathBuf {
        run_dir.join("serial.sock")
    }
}

/// The last lines of a log file (for crash reports).
pub fn log_tail(path: &Path, lines: usize) -> Vec<String> {
    let Ok(text) = std::fs::read(path) else { return vec![] };
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_os_error_keeps_its_cause() {
        let e = HvError::os("open the log")(std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"));
        assert_eq!(e.to_string(), "could not open the log");
        assert_eq!(std::error::Error::source(&e).map(|c| c.to_string()).as_deref(), Some("no such file"));
        assert_eq!(e.chain(), "could not open the log: no such file");
        assert_eq!(e.clone(), e);
    }

    #[test]
    fn auto_avoids_a_slow_kvm() {
        let real = KvmFacts { usable: true, slow: false };
        let pvm = KvmFacts { usable: true, slow: true };
        let none = KvmFacts { usable: false, slow: false };
        assert_eq!(accel_choose(Accel::Auto, real), Ok(AccelChoice::Kvm));
        assert_eq!(accel_choose(Accel::Auto, pvm), Ok(AccelChoice::Tcg));
        assert_eq!(accel_choose(Accel::Auto, none), Ok(AccelChoice::Tcg));
        assert_eq!(accel_choose(Accel::Kvm, pvm), Ok(AccelChoice::Kvm));
        assert!(accel_choose(Accel::Kvm, none).is_err());
        assert_eq!(accel_choose(Accel::Tcg, real), Ok(AccelChoice::Tcg));
    }
}
