//! The VM configuration document (DESIGN §3) and the shapes of the VM, version, diff and lease API.
//!
//! A config is one JSON document. Every field has a default, so `{"name":"web-1"}` is a whole VM; an
//! unknown field is refused. Checks that need nothing but the document (ranges, shapes, controller
//! references) are in [`VmConfig::check`]; checks against the inventory (does the network exist?) are
//! the server's.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{Error, Name};

pub const CPUS_MAX: u32 = 256;
pub const MEMORY_MIB_MIN: u64 = 16;
pub const ANNOTATIONS_MAX: usize = 256;
pub const ANNOTATION_KEY_MAX: usize = 64;
pub const ANNOTATION_VALUE_MAX: usize = 4096;
pub const DESCRIPTION_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Machine {
    #[default]
    Q35,
    Pc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// KVM where it is real and fast, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ControllerType {
    /// Hot-pluggable; units 0–255.
    VirtioScsi,
    /// `pc` machines only; units 0–3; no hot-plug.
    Ide,
    /// SATA; units 0–5; no hot-plug.
    Ahci,
}

impl ControllerType {
    /// The highest unit number on this bus.
    pub fn max_unit(self) -> u32 {
        match self {
            ControllerType::VirtioScsi => 255,
            ControllerType::Ide => 3,
            ControllerType::Ahci => 5,
        }
    }

    pub fn hotplug(self) -> bool {
        match self {
            ControllerType::VirtioScsi => true,
            ControllerType::Ide | ControllerType::Ahci => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Controller {
    /// `scsi0`, `ide0`, `sata0`, …
    pub id: String,
    #[serde(rename = "type")]
    pub kind: ControllerType,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskAttachment {
    /// The disk's name or id.
    pub disk: String,
    pub controller: String,
    pub unit: u32,
    #[serde(default)]
    pub read_only: bool,
    /// Which attachment of this disk this is (counts up per disk, set by covm on attach); a detach that
    /// names a generation removes only that attachment.
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NicModel {
    #[default]
    VirtioNet,
    E1000,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// A network's name.
    pub network: String,
    #[serde(default)]
    pub model: NicModel,
    /// `52:54:00:xx:xx:xx`; covm picks one when it is left out, and keeps it.
    #[serde(default)]
    pub mac: Option<String>,
    /// Whether the link is up (a live change).
    #[serde(default = "yes")]
    pub connected: bool,
    /// Host ports forwarded to the guest: only on a `user` network (a `nat` network's forwards are the
    /// network's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_forwards: Vec<PortForward>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A host port that reaches a guest port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    #[schema(minimum = 1, maximum = 65535)]
    pub host_port: u16,
    #[schema(minimum = 1, maximum = 65535)]
    pub guest_port: u16,
    #[serde(default)]
    pub proto: Proto,
    /// The host address it listens on (default 127.0.0.1: only the host itself).
    #[serde(default = "loopback")]
    #[schema(value_type = String, example = "127.0.0.1")]
    pub host_addr: std::net::IpAddr,
}

fn loopback() -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
}

/// A cloud-init NoCloud seed that covm builds at each power-on from the running version (an ISO
/// labelled `cidata`, attached as a read-only CD). Its instance id is the VM's id, so a clone is a new
/// instance to cloud-init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// The guest's host name (default: the VM's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<CloudInitUser>,
    /// A network config, version 2 (netplan's shape): `{"version": 2, "ethernets": {...}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub network: Option<serde_json::Value>,
    /// Raw user-data: used as it is instead of what covm would write from `hostname` and `users`
    /// (a `#cloud-config` document or a script).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudInitUser {
    /// A POSIX user name.
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// Whether the user may run anything as root without a password.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sudo: bool,
}

pub const USER_DATA_MAX: usize = 64 * 1024;

fn hostname_ok(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl CloudInit {
    /// Checks the seed's parts on their own; the error names the field.
    pub fn check(&self) -> Result<(), Error> {
        if let Some(h) = &self.hostname
            && !hostname_ok(h)
        {
            return Err(Error::invalid(
                "cloud_init.hostname",
                "a host name is labels of letters, digits and '-' separated by dots (RFC 1123)",
            ));
        }
        if self.users.len() > 32 {
            return Err(Error::invalid("cloud_init.users", "at most 32 users"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let ok = !u.name.is_empty()
                && u.name.len() <= 32
                && u.name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && u.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if !ok {
                return Err(Error::invalid(
                    &format!("cloud_init.users[{i}].name"),
                    "a user name has 1 to 32 lowercase letters, digits, '_' or '-', and starts with a letter or '_'",
                ));
            }
            if !names.insert(u.name.as_str()) {
                return Err(Error::invalid(
                    &format!("cloud_init.users[{i}].name"),
                    format!("two users are named {}", u.name),
                ));
            }
            for (j, k) in u.ssh_authorized_keys.iter().enumerate() {
                let mut parts = k.split_whitespace();
                let (kind, body) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let kind_ok = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
                if !kind_ok || body.is_empty() || k.contains(['\n', '\r']) || k.len() > 16 * 1024 {
                    return Err(Error::invalid(
                        &format!("cloud_init.users[{i}].ssh_authorized_keys[{j}]"),
                        "an SSH public key is one line: its type (ssh-ed25519, ssh-rsa, ecdsa-…), the key, a comment",
                    ));
                }
            }
        }
        if let Some(n) = &self.network
            && n.get("version").and_then(|v| v.as_u64()) != Some(2)
        {
            return Err(Error::invalid(
                "cloud_init.network",
                "a network config is an object of version 2: {\"version\": 2, \"ethernets\": {…}}",
            ));
        }
        if self.user_data.as_ref().is_some_and(|u| u.len() > USER_DATA_MAX) {
            return Err(Error::invalid("cloud_init.user_data", format!("user_data has at most {USER_DATA_MAX} bytes")));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BootDevice {
    Disk,
    Cdrom,
    Network,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Console {
    #[serde(default = "yes")]
    pub vnc: bool,
    #[serde(default = "yes")]
    pub serial: bool,
}

impl Default for Console {
    fn default() -> Self {
        Console { vnc: true, serial: true }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Autostart {
    #[serde(default)]
    pub enabled: bool,
    /// Lower starts first.
    #[serde(default)]
    pub order: i32,
    /// Seconds to wait after starting this VM before the next.
    #[serde(default)]
    pub delay_s: u32,
}

fn yes() -> bool {
    true
}

fn default_cpus() -> u32 {
    1
}

fn default_memory() -> u64 {
    512
}

fn default_folder() -> String {
    "/".into()
}

fn default_pool() -> String {
    "default".into()
}

fn default_controllers() -> Vec<Controller> {
    vec![Controller { id: "scsi0".into(), kind: ControllerType::VirtioScsi }]
}

fn default_boot() -> Vec<BootDevice> {
    vec![BootDevice::Disk]
}

/// The whole configuration of a VM: the versioned document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: Name,
    #[serde(default)]
    pub description: String,
    /// The folder's path.
    #[serde(default = "default_folder")]
    pub folder: String,
    /// The resource pool's name.
    #[serde(default = "default_pool")]
    pub pool: String,
    #[serde(default = "default_cpus")]
    #[schema(minimum = 1, maximum = 256)]
    pub cpus: u32,
    /// At least 16, at most the host's memory.
    #[serde(default = "default_memory")]
    #[schema(minimum = 16)]
    pub memory_mib: u64,
    #[serde(default)]
    pub machine: Machine,
    #[serde(default)]
    pub firmware: Firmware,
    #[serde(default)]
    pub accel: Accel,
    #[serde(default = "default_controllers")]
    pub controllers: Vec<Controller>,
    #[serde(default)]
    pub disks: Vec<DiskAttachment>,
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// An ISO image as `DATASTORE:path/in/it.iso`.
    #[serde(default)]
    pub cdrom: Option<String>,
    #[serde(default = "default_boot")]
    pub boot: Vec<BootDevice>,
    #[serde(default)]
    pub console: Console,
    #[serde(default)]
    pub autostart: Autostart,
    /// Free key/values.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Direct kernel boot: `DATASTORE:path` of a kernel image.
    #[serde(default)]
    pub kernel: Option<String>,
    /// `DATASTORE:path` of an initramfs, with `kernel`.
    #[serde(default)]
    pub initrd: Option<String>,
    /// The kernel command line, with `kernel`.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// When covm takes a safety snapshot before a change (default `risky`: changes that can lose data
    /// or break boot).
    #[serde(default, skip_serializing_if = "SafetyPolicy::is_default")]
    pub safety_snapshots: SafetyPolicy,
    /// A template: read-only, never powered on, the source of clones (`POST /vms/{vm}/template`
    /// makes one; a change cannot).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub template: bool,
    /// A cloud-init seed for the guest, built at each power-on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
}

/// When covm takes a safety snapshot (disks only, `kind: safety`) before a change of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SafetyPolicy {
    /// Before detaching or removing a disk and before changing the machine type, firmware or boot order.
    #[default]
    Risky,
    /// Before every change.
    Always,
    /// Never (a change may still ask with `?snapshot=true`).
    Off,
}

impl SafetyPolicy {
    pub fn is_default(&self) -> bool {
        *self == SafetyPolicy::Risky
    }
}

/// A `DATASTORE:relative/path` reference: the datastore's name and a path that stays inside it.
pub fn datastore_path(field: &str, s: &str) -> Result<(String, String), Error> {
    let bad = |why: &str| Error::invalid(field, format!("{field} is DATASTORE:relative/path ({why})"));
    let (ds, path) = s.split_once(':').ok_or_else(|| bad("no datastore"))?;
    Name::parse(ds).map_err(|_| bad("the datastore is not a valid name"))?;
    if path.is_empty() || path.starts_with('/') || path.len() > 1024 {
        return Err(bad("the path is relative and not empty"));
    }
    if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") || path.contains('\0') {
        return Err(bad("the path may not hold '..', '.' or empty parts"));
    }
    Ok((ds.to_owned(), path.to_owned()))
}

fn mac_ok(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        // Unicast: the low bit of the first octet is 0.
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

impl VmConfig {
    /// Checks what the document alone can tell; the error names the field at fault.
    pub fn check(&self, host_memory_mib: u64) -> Result<(), Error> {
        if !(1..=CPUS_MAX).contains(&self.cpus) {
            return Err(Error::invalid("cpus", format!("cpus is between 1 and {CPUS_MAX}")));
        }
        if self.memory_mib < MEMORY_MIB_MIN || (host_memory_mib > 0 && self.memory_mib > host_memory_mib) {
            return Err(Error::invalid(
                "memory_mib",
                format!("memory_mib is between {MEMORY_MIB_MIN} and the host's memory ({host_memory_mib} MiB)"),
            ));
        }
        if self.description.len() > DESCRIPTION_MAX {
            return Err(Error::invalid("description", format!("a description has at most {DESCRIPTION_MAX} bytes")));
        }
        if !self.folder.starts_with('/') {
            return Err(Error::invalid("folder", "folder is a path starting with /"));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, c) in self.controllers.iter().enumerate() {
            let field = format!("controllers[{i}].id");
            if c.id.is_empty()
                || c.id.len() > 16
                || !c.id.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit())
            {
                return Err(Error::invalid(&field, "a controller id has 1 to 16 lowercase letters or digits"));
            }
            if !ids.insert(c.id.as_str()) {
                return Err(Error::invalid(&field, format!("two controllers are named {}", c.id)));
            }
            if c.kind == ControllerType::Ide && self.machine != Machine::Pc {
                return Err(Error::new(
                    crate::ErrorKind::InvalidRequest,
                    crate::ErrorCode::ControllerUnsupported,
                    format!("an IDE controller needs machine pc, not {:?}", self.machine).to_lowercase(),
                )
                .with_field(format!("controllers[{i}].type")));
            }
        }
        let mut slots = std::collections::HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            let Some(c) = self.controllers.iter().find(|c| c.id == d.controller) else {
                return Err(Error::new(
                    crate::ErrorKind::InvalidRequest,
                    crate::ErrorCode::UnknownController,
                    format!("there is no controller {}", d.controller),
                )
                .with_field(format!("disks[{i}].controller")));
            };
            if d.unit > c.kind.max_unit() {
                return Err(Error::new(
                    crate::ErrorKind::InvalidRequest,
                    crate::ErrorCode::UnitOutOfRange,
                    format!("unit {} is beyond {} (0 to {})", d.unit, c.id, c.kind.max_unit()),
                )
                .with_field(format!("disks[{i}].unit")));
            }
            if !slots.insert((d.controller.as_str(), d.unit)) {
                return Err(Error::new(
                    crate::ErrorKind::InvalidRequest,
                    crate::ErrorCode::UnitTaken,
                    format!("two disks are on {} unit {}", d.controller, d.unit),
                )
                .with_field(format!("disks[{i}].unit")));
            }
        }
        let mut macs = std::collections::HashSet::new();
        let mut forwards = std::collections::HashSet::new();
        for (i, n) in self.nics.iter().enumerate() {
            if n.port_forwards.len() > 64 {
                return Err(Error::invalid(&format!("nics[{i}].port_forwards"), "at most 64 port forwards a NIC"));
            }
            for (j, f) in n.port_forwards.iter().enumerate() {
                if f.host_port == 0 || f.guest_port == 0 {
                    let field = if f.host_port == 0 { "host_port" } else { "guest_port" };
                    return Err(Error::invalid(
                        &format!("nics[{i}].port_forwards[{j}].{field}"),
                        "a port is between 1 and 65535",
                    ));
                }
                if !forwards.insert((f.proto, f.host_addr, f.host_port)) {
                    return Err(Error::invalid(
                        &format!("nics[{i}].port_forwards[{j}].host_port"),
                        format!("{} port {} of {} is forwarded twice", f.proto.as_str(), f.host_port, f.host_addr),
                    ));
                }
            }
            if let Some(mac) = &n.mac {
                if !mac_ok(mac) {
                    return Err(Error::invalid(
                        &format!("nics[{i}].mac"),
                        "a MAC is six hex pairs like 52:54:00:12:34:56, unicast",
                    ));
                }
                if !macs.insert(mac.to_ascii_lowercase()) {
                    return Err(Error::invalid(&format!("nics[{i}].mac"), format!("two nics have the MAC {mac}")));
                }
            }
        }
        if self.annotations.len() > ANNOTATIONS_MAX {
            return Err(Error::invalid("annotations", format!("at most {ANNOTATIONS_MAX} annotations")));
        }
        for (k, v) in &self.annotations {
            if k.is_empty() || k.len() > ANNOTATION_KEY_MAX || v.len() > ANNOTATION_VALUE_MAX {
                return Err(Error::invalid(
                    &format!("annotations.{k}"),
                    format!(
                        "annotation keys have 1 to {ANNOTATION_KEY_MAX} bytes, values at most {ANNOTATION_VALUE_MAX}"
                    ),
                ));
            }
        }
        if let Some(c) = &self.cdrom {
            datastore_path("cdrom", c)?;
        }
        if let Some(k) = &self.kernel {
            datastore_path("kernel", k)?;
        }
        if let Some(i) = &self.initrd {
            datastore_path("initrd", i)?;
            if self.kernel.is_none() {
                return Err(Error::invalid("initrd", "an initrd goes with a kernel"));
            }
        }
        if let Some(c) = &self.cmdline {
            if self.kernel.is_none() {
                return Err(Error::invalid("cmdline", "a kernel command line goes with a kernel"));
            }
            if c.len() > 4096 {
                return Err(Error::invalid("cmdline", "a kernel command line has at most 4096 bytes"));
            }
        }
        if self.boot.is_empty() || self.boot.len() > 3 {
            return Err(Error::invalid("boot", "boot lists 1 to 3 devices"));
        }
        if let Some(c) = &self.cloud_init {
            c.check()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------
// API shapes

impl VmConfig {
    /// A config with every default (`/`, 1 vCPU …) and this name.
    pub fn named(name: &str) -> Result<VmConfig, crate::Error> {
        serde_json::from_value(serde_json::json!({ "name": name }))
            .map_err(|e| crate::Error::invalid("name", e.to_string()))
    }
}

/// What a running VM uses of its host now: its QEMU process as the host's kernel counts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmStats {
    /// The node (covm replica's data directory) that runs it.
    pub node: String,
    /// Its QEMU process (none for a simulated VM).
    pub pid: Option<u32>,
    /// User and system CPU time of the process since it started, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory of the process.
    pub memory_rss_bytes: u64,
    /// The memory the VM is configured with.
    pub memory_configured_bytes: u64,
    pub sampled_at: DateTime<Utc>,
}

/// Power states of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    #[default]
    Off,
    Starting,
    Running,
    Paused,
    Stopping,
    Crashed,
}

impl PowerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Off => "off",
            PowerState::Starting => "starting",
            PowerState::Running => "running",
            PowerState::Paused => "paused",
            PowerState::Stopping => "stopping",
            PowerState::Crashed => "crashed",
        }
    }

    /// The state a stored string names (the inverse of [`PowerState::as_str`]).
    pub fn parse(s: &str) -> Option<PowerState> {
        [
            PowerState::Off,
            PowerState::Starting,
            PowerState::Running,
            PowerState::Paused,
            PowerState::Stopping,
            PowerState::Crashed,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }

    /// A QEMU process exists (or is being made or ended) for the VM.
    pub fn is_active(self) -> bool {
        matches!(self, PowerState::Running | PowerState::Paused | PowerState::Starting | PowerState::Stopping)
    }
}

/// What is running, as opposed to what is configured. Not versioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(default)]
pub struct VmRuntime {
    pub power_state: PowerState,
    pub pid: Option<u32>,
    pub host: Option<String>,
    /// The covm node (data directory) whose agent runs it; with several replicas, power and console
    /// requests for it go to that replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `kvm` or `tcg` while running.
    pub accel: Option<String>,
    /// The config version QEMU runs (older than `version` means changes are pending).
    pub running_version: Option<i64>,
    pub since: Option<DateTime<Utc>>,
    pub generation: i64,
    /// True when the simulated driver "runs" the VM (no QEMU process).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub simulated: bool,
    /// What the guest agent last said of the guest while it runs (refreshed every few seconds);
    /// absent until covm has asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestInfo>,
}

/// The guest as its agent (qemu-guest-agent) tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct GuestInfo {
    /// Whether the guest agent answers.
    pub agent: bool,
    /// Why not, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The operating system as the guest names it (`PRETTY_NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// The guest's network interfaces with their addresses (loopback left out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<GuestInterface>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestInterface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `10.0.2.15/24`, `fe80::…/64`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

impl GuestInfo {
    /// The guest's first IPv4 address (without its prefix length), if it told one.
    pub fn ipv4(&self) -> Option<String> {
        self.interfaces
            .iter()
            .flat_map(|i| &i.addresses)
            .filter_map(|a| a.split('/').next())
            .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
            .map(str::to_owned)
    }
}

/// `?next_boot=true` on a NIC's plug or unplug: a running VM takes it at its next power-on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NicQuery {
    #[serde(default)]
    pub next_boot: bool,
}

/// `POST /vms/{vm}/guest/password`: sets a guest user's password through the guest agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestPassword {
    pub user: String,
    /// The password as it is (covm sends it to the agent and keeps nothing of it).
    pub password: String,
}

/// `POST /vms/{vm}/guest/ssh-keys`: adds SSH public keys to a guest user's `authorized_keys`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestSshKeys {
    pub user: String,
    pub keys: Vec<String>,
    /// Replace the file's keys instead of adding to them.
    #[serde(default)]
    pub replace: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeaseView {
    pub holder: String,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The fencing token: send it as `Covm-Lease` with every write under the lease. Only its holder
    /// sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    pub id: Uuid,
    pub name: String,
    pub path: String,
    /// The newest config version (also the `ETag`).
    pub version: i64,
    pub config: VmConfig,
    pub runtime: VmRuntime,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseView>,
}

/// `POST /vms/{vm}/clone`: a new VM from a VM or a template.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmClone {
    /// The new VM's name; its disks are named `NAME-1`, `NAME-2`… in the order of the source's disks.
    pub name: Name,
    /// Linked: each disk is a qcow2 overlay on the template's disk (fast, small; the template's disks
    /// stay while clones use them). Full: each disk is copied. Default: linked for a template, full
    /// for a VM (a linked clone needs a template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linked: Option<bool>,
    /// The folder of the new VM and its disks (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<String>,
    /// The resource pool (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// A new identity for the guest: cloud-init's host name (default: the new VM's name) and users
    /// (replacing the source's). New MAC addresses and a new instance id come with every clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customize: Option<CloneCustomize>,
    /// A description for the new VM (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneCustomize {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<CloudInitUser>>,
    /// A network config (version 2) replacing the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub network: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VmListQuery {
    /// Only VMs in this folder (and below it).
    pub folder: Option<String>,
    /// Only VMs whose name starts with this.
    pub name: Option<String>,
    pub power_state: Option<PowerState>,
    pub after: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApplyMode {
    /// Store changes that need a power cycle as pending instead of refusing them.
    NextBoot,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VmChangeQuery {
    /// A note for the history.
    pub message: Option<String>,
    /// Return what would change, and change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// `next_boot`: on a running VM, keep changes that need a power cycle as pending.
    pub apply: Option<ApplyMode>,
    /// Take a safety snapshot before the change, whatever the VM's policy.
    #[serde(default)]
    pub snapshot: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    On,
    /// Stop QEMU at once (pull the plug).
    Off,
    /// Ask the guest (ACPI); give up after `timeout_s`, leaving it running.
    Shutdown,
    Reset,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerRequest {
    pub action: PowerAction,
    /// For `shutdown`: how long to wait for the guest (default 60, at most 3600).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_s: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    Success,
    Error,
    Cancelled,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Success => "success",
            TaskState::Error => "error",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// The state a stored string names (the inverse of [`TaskState::as_str`]).
    pub fn parse(s: &str) -> Option<TaskState> {
        [TaskState::Queued, TaskState::Running, TaskState::Success, TaskState::Error, TaskState::Cancelled]
            .into_iter()
            .find(|t| t.as_str() == s)
    }

    /// The task has ended (it will not change again).
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Success | TaskState::Error | TaskState::Cancelled)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    pub id: Uuid,
    /// `vm.power.on`, …
    pub kind: String,
    pub object_id: Option<Uuid>,
    pub object_name: Option<String>,
    pub actor: String,
    pub state: TaskState,
    /// 0 to 100.
    pub progress: i64,
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<serde_json::Value>,
    pub cancelable: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TaskQuery {
    /// Only tasks older than this one (paging).
    pub before: Option<Uuid>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SerialQuery {
    /// The last N lines (default 100, at most 10000).
    #[param(maximum = 10000)]
    pub tail: Option<u32>,
    /// A console ticket (`POST /vms/{vm}/console/ticket`) instead of a token or the session cookie,
    /// for a browser's WebSocket, which cannot send `Authorization`.
    pub ticket: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// A console ticket (`POST /vms/{vm}/console/ticket`) instead of a token or the session cookie.
    pub ticket: Option<String>,
}

/// A single-use pass to a VM's consoles for a browser's WebSocket.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConsoleTicket {
    /// Send as `?ticket=` when opening `/vms/{vm}/console/vnc` or `/vms/{vm}/console/serial`; it
    /// works once, for this VM, until `expires_at`.
    pub ticket: String,
    pub expires_at: DateTime<Utc>,
}

/// What a user is doing with a VM, as others see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PresenceState {
    Viewing,
    Editing,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PresenceSet {
    pub state: PresenceState,
}

/// One user on a VM: `editing` while they said so or hold the VM's edit lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PresenceEntry {
    pub user: String,
    pub state: PresenceState,
    pub since: DateTime<Utc>,
}

/// The feed's `event: presence` (not in the log, no id): who is on a VM now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PresenceEvent {
    pub vm: Uuid,
    pub entries: Vec<PresenceEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionView {
    pub version: i64,
    pub author: String,
    pub time: DateTime<Utc>,
    pub message: Option<String>,
    pub request_id: Option<String>,
    /// RFC 6902 patch from the version before.
    pub patch: serde_json::Value,
    /// The log entry that recorded it.
    pub event_seq: Option<i64>,
    /// The whole document, in `GET /vms/{vm}/versions/{n}` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<VmConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VersionQuery {
    /// Only versions older than this (paging: pass the last version seen).
    pub before: Option<i64>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiffQuery {
    pub from: i64,
    pub to: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiffView {
    pub from: i64,
    pub to: i64,
    /// RFC 6902.
    pub patch: serde_json::Value,
    /// One line per changed field: `memory_mib: 2048 → 4096`.
    pub summary: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    /// The version whose content the new version gets.
    #[serde(default)]
    pub version: Option<i64>,
    /// Instead of `version`: put the VM back to how it was before version N (the safety snapshot that
    /// protects N), its config, data or both (`scope`, default both).
    #[serde(default)]
    pub before_version: Option<i64>,
    #[serde(default)]
    pub scope: Option<crate::snapshot::RevertScope>,
    #[serde(default)]
    pub message: Option<String>,
    /// On a running VM, keep next-boot changes pending instead of refusing them.
    #[serde(default)]
    pub next_boot: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Seconds, 1 to 3600.
    #[schema(minimum = 1, maximum = 3600)]
    pub ttl_s: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LeaseReleaseQuery {
    /// Break someone else's lease (needs `VirtualMachine.Lease.Break`).
    #[serde(default)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: serde_json::Value) -> VmConfig {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn defaults_make_a_whole_vm() {
        let c = cfg(serde_json::json!({ "name": "web-1" }));
        assert_eq!(
            (c.cpus, c.memory_mib, c.machine, c.pool.as_str(), c.folder.as_str()),
            (1, 512, Machine::Q35, "default", "/")
        );
        assert_eq!(c.controllers[0].kind, ControllerType::VirtioScsi);
        c.check(1024).unwrap();
    }

    #[test]
    fn checks_name_the_field() {
        let field = |j: serde_json::Value| cfg(j).check(4096).unwrap_err().field.clone().unwrap();
        assert_eq!(field(serde_json::json!({ "name": "a", "cpus": 0 })), "cpus");
        assert_eq!(field(serde_json::json!({ "name": "a", "cpus": 257 })), "cpus");
        assert_eq!(field(serde_json::json!({ "name": "a", "memory_mib": 8 })), "memory_mib");
        assert_eq!(field(serde_json::json!({ "name": "a", "memory_mib": 8192 })), "memory_mib");
        assert_eq!(
            field(serde_json::json!({ "name": "a", "disks": [{ "disk": "d", "controller": "nope", "unit": 0 }] })),
            "disks[0].controller"
        );
        assert_eq!(
            field(serde_json::json!({ "name": "a", "disks": [{ "disk": "d", "controller": "scsi0", "unit": 256 }] })),
            "disks[0].unit"
        );
        assert_eq!(
            field(serde_json::json!({ "name": "a", "controllers": [{ "id": "ide0", "type": "ide" }] })),
            "controllers[0].type"
        );
        assert_eq!(
            field(serde_json::json!({ "name": "a", "nics": [{ "network": "user", "mac": "01:00:00:00:00:00" }] })),
            "nics[0].mac"
        );
        assert_eq!(field(serde_json::json!({ "name": "a", "kernel": "local:../etc/passwd" })), "kernel");
        assert_eq!(field(serde_json::json!({ "name": "a", "initrd": "local:i.img" })), "initrd");
    }

    #[test]
    fn datastore_paths_stay_inside() {
        assert_eq!(datastore_path("k", "local:a/b.img").unwrap(), ("local".into(), "a/b.img".into()));
        for bad in ["local", "local:", "local:/abs", "local:a/../b", "Bad:a", "local:a//b", "local:./a"] {
            assert!(datastore_path("k", bad).is_err(), "{bad}");
        }
    }
}

/// What a running VM holds of block devices, as its hypervisor reports it
/// (`GET /vms/{vm}/block`: QEMU's `query-named-block-nodes` and `query-block`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BlockState {
    /// Block node names (a covm disk has `<node>` and `<node>-file`).
    pub nodes: Vec<String>,
    /// Block device ids (a covm disk's device is named like its node).
    pub devices: Vec<String>,
}

/// What a change did, or (dry run) would do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChangePlan {
    pub from_version: i64,
    /// RFC 6902 from the newest version.
    pub patch: serde_json::Value,
    pub summary: Vec<String>,
    /// The top-level fields that change.
    pub fields: Vec<String>,
    /// Of those, the ones a running VM takes at once.
    pub live: Vec<String>,
    /// And the ones that wait for the next power-on.
    pub next_boot: Vec<String>,
    /// Why the change would be refused, if it would.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// The answer to a change: the VM, or with `dry_run` the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum VmChangeResponse {
    Vm(Box<VmView>),
    Plan(ChangePlan),
}

/// The body of `PATCH /vms/{vm}`: a JSON Merge Patch (RFC 7386) of [`VmConfig`]. A field left out stays
/// as it is; `null` sets it back to its default (an optional field: removes it); a list replaces the
/// whole list; `console`, `autostart` and `annotations` are merged key by key (an annotation set to
/// `null` is removed). It documents the body for clients and generators; the server merges the
/// document as sent and then checks the whole config. Built in Rust, a field left `None` is left out
/// of the patch (to set a field back to its default with `null`, send a JSON document).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The folder's path: moves the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[schema(minimum = 1, maximum = 256)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[schema(minimum = 16)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controllers: Option<Vec<Controller>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskAttachment>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nics: Option<Vec<Nic>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdrom: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Vec<BootDevice>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleChange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<AutostartChange>,
    /// Keys to set; a key set to `null` is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, Option<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_snapshots: Option<SafetyPolicy>,
    /// Refused: a VM becomes a template with `POST /vms/{vm}/template`, and a template takes no change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<bool>,
    /// The cloud-init seed, merged key by key (`null` removes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
}

/// A merge patch of [`Console`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleChange {
    pub vnc: Option<bool>,
    pub serial: Option<bool>,
}

/// A merge patch of [`Autostart`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AutostartChange {
    pub enabled: Option<bool>,
    pub order: Option<i32>,
    pub delay_s: Option<u32>,
}

impl std::fmt::Display for PowerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
