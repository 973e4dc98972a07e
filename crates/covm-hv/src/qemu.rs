//! The QEMU driver: one `qemu-system-x86_64` process per running VM, started paused (`-S`) with a QMP
//! socket, a serial console (unix socket, logged to `serial.log`), a VNC unix socket and a pid file in
//! the VM's run directory, then resumed with `cont`. `-no-shutdown` keeps QEMU alive when the guest
//! powers off, so covm sees the `SHUTDOWN` event and ends the process itself.
//!
//! The process is put in its own process group, so stopping covm (even with Ctrl-C in a terminal)
//! leaves running VMs running; a later covm adopts them from the pid file and the QMP socket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use covm_types::vm::{BootDevice, ControllerType, Firmware, Machine, NicModel};
use serde_json::json;
use tokio::process::Child;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::qmp::{Qmp, QmpEvent};
use crate::{AccelChoice, DiskSpec, HvError, HvEvent, Hypervisor, VmHandle, VmSpec, log_tail};

pub const QEMU_BINARY: &str = "qemu-system-x86_64";
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";

pub struct QemuDriver {
    binary: PathBuf,
    qmp_timeout: Duration,
    /// QEMU runs in this network namespace (`--netns`), with the taps it makes.
    net: crate::net::HostNet,
}

impl Default for QemuDriver {
    fn default() -> Self {
        let binary = std::env::var_os("COVM_QEMU").map(PathBuf::from).unwrap_or_else(|| QEMU_BINARY.into());
        QemuDriver { binary, qmp_timeout: Duration::from_secs(10), net: Default::default() }
    }
}

impl QemuDriver {
    /// A driver that runs this QEMU binary (a name looked up in PATH, or a path).
    pub fn with_binary(binary: impl Into<PathBuf>) -> QemuDriver {
        QemuDriver { binary: binary.into(), ..QemuDriver::default() }
    }

    /// QEMU (and the taps it makes) in a network namespace made with `ip netns add`.
    pub fn in_netns(mut self, netns: Option<String>) -> QemuDriver {
        self.net = crate::net::HostNet::new(netns);
        self
    }
}

/// The files of a VM's run directory.
pub struct RunFiles {
    pub qmp: PathBuf,
    pub serial: PathBuf,
    pub serial_log: PathBuf,
    pub vnc: PathBuf,
    /// The guest agent's channel (virtio-serial `org.qemu.guest_agent.0`).
    pub qga: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
    /// This QEMU's own key (mode 0600), which the disk passphrases it is given are encrypted with.
    pub key: PathBuf,
}

pub fn run_files(dir: &Path) -> RunFiles {
    RunFiles {
        qmp: dir.join("qmp.sock"),
        serial: dir.join("serial.sock"),
        serial_log: dir.join("serial.log"),
        vnc: dir.join("vnc.sock"),
        qga: dir.join("qga.sock"),
        pid: dir.join("qemu.pid"),
        log: dir.join("qemu.log"),
        key: dir.join("master.key"),
    }
}

/// A program as PATH finds it (or a path given as it is), if it is there.
pub(crate) fn which(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return binary.is_file().then(|| binary.to_owned());
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(binary)).find(|p| p.is_file())
}

/// A value inside a QEMU option string (`key=value,key=value`): a comma is doubled, so that a file
/// named `x.iso,snapshot=on` stays one file name instead of adding an option.
pub fn opt_escape(v: &str) -> String {
    v.replace(',', ",,")
}

/// The command line for a spec (without the binary).
///
/// Every path that QEMU parses as part of an option string is escaped ([`opt_escape`]), and every
/// image gets its format given (`raw` for the cdrom; disks are added over QMP with their recorded
/// format), so QEMU never guesses a format from what a guest wrote into its image.
pub fn command_line(spec: &VmSpec) -> Result<Vec<String>, HvError> {
    let c = &spec.config;
    let f = run_files(&spec.run_dir);
    let p = |p: &Path| opt_escape(&p.display().to_string());
    let machine = match c.machine {
        Machine::Q35 => "q35",
        Machine::Pc => "pc",
    };
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", spec.name),
        "-uuid".into(),
        spec.id.to_string(),
        "-machine".into(),
        format!("{machine},accel={}", spec.accel.as_str()),
        "-cpu".into(),
        match spec.accel {
            AccelChoice::Kvm => "host".into(),
            AccelChoice::Tcg => "max".into(),
        },
        "-smp".into(),
        c.cpus.to_string(),
        "-m".into(),
        format!("{}M", c.memory_mib),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-S".into(),
        "-no-shutdown".into(),
        "-display".into(),
        "none".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", p(&f.qmp)),
        "-chardev".into(),
        format!("socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on", p(&f.serial), p(&f.serial_log)),
        "-serial".into(),
        "chardev:serial0".into(),
        "-pidfile".into(),
        f.pid.display().to_string(),
        // This process's own key: secrets for it (disk passphrases) arrive encrypted with it.
        "-object".into(),
        format!("secret,id={},file={},format=raw", crate::secret::PROCESS_KEY_ID, p(&f.key)),
        // The guest agent's channel, always there: a guest that runs qemu-guest-agent answers on it.
        "-chardev".into(),
        format!("socket,id=covm-qga,path={},server=on,wait=off", p(&f.qga)),
        "-device".into(),
        "virtio-serial-pci,id=covm-vser".into(),
        "-device".into(),
        "virtserialport,bus=covm-vser.0,chardev=covm-qga,name=org.qemu.guest_agent.0".into(),
    ];
    if c.console.vnc {
        // A display for the screen (`-nodefaults` took QEMU's default one away): standard VGA, which
        // every firmware and guest drives.
        args.extend(["-vga".into(), "std".into(), "-vnc".into(), format!("unix:{}", p(&f.vnc))]);
    }
    if c.firmware == Firmware::Uefi {
        if !Path::new(OVMF_CODE).is_file() {
            return Err(HvError::Unavailable(format!(
                "firmware uefi needs OVMF ({OVMF_CODE}); install the Debian package ovmf"
            )));
        }
        args.extend(["-drive".into(), format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}")]);
    }
    if let Some(k) = &spec.kernel {
        // -kernel and -initrd take a file name as it is (no option string).
        args.extend(["-kernel".into(), k.display().to_string()]);
        if let Some(i) = &spec.initrd {
            args.extend(["-initrd".into(), i.display().to_string()]);
        }
        args.extend(["-append".into(), c.cmdline.clone().unwrap_or_else(|| "console=ttyS0".into())]);
    }
    for ctl in &c.controllers {
        match ctl.kind {
            ControllerType::VirtioScsi => args.extend(["-device".into(), format!("virtio-scsi-pci,id={}", ctl.id)]),
            ControllerType::Ahci => args.extend(["-device".into(), format!("ahci,id={}", ctl.id)]),
            // The pc machine has its IDE controller built in.
            ControllerType::Ide => {}
        }
    }
    // On q35 every NIC sits on a PCIe root port of its own, and a few more wait for NICs plugged in
    // later (a device on the root complex itself cannot be unplugged).
    let q35 = machine == "q35";
    if q35 {
        for k in 0..c.nics.len() + SPARE_PORTS {
            args.extend(["-device".into(), format!("pcie-root-port,id=covm-rp{k},chassis={},slot={}", k + 1, k + 1)]);
        }
    }
    for (i, n) in c.nics.iter().enumerate() {
        let mac = n.mac.clone().unwrap_or_default();
        let (netdev, id) = (crate::netdev_id(&mac), crate::nic_id(&mac));
        let backend = match spec.nic_bridges.get(i).cloned().flatten() {
            Some(_) => format!("tap,id={netdev},ifname={},script=no,downscript=no", crate::net::tap_name(&mac)),
            None => {
                let mut b = format!("user,id={netdev}");
                for f in &n.port_forwards {
                    b.push_str(&format!(",hostfwd={}", hostfwd(f)));
                }
                b
            }
        };
        let bus = if q35 { format!(",bus=covm-rp{i}") } else { String::new() };
        args.extend([
            "-netdev".into(),
            backend,
            "-device".into(),
            format!("{},netdev={netdev},id={id},mac={mac}{bus}", nic_driver(n.model)),
        ]);
    }
    if let Some(cd) = &spec.cdrom {
        args.extend(["-drive".into(), format!("file={},format=raw,media=cdrom,readonly=on", p(cd))]);
    }
    if let Some(seed) = &spec.seed {
        args.extend([
            "-device".into(),
            "virtio-scsi-pci,id=covm-seed".into(),
            "-drive".into(),
            format!("file={},format=raw,if=none,id=covm-seed-cd,media=cdrom,readonly=on", p(seed)),
            "-device".into(),
            "scsi-cd,bus=covm-seed.0,drive=covm-seed-cd".into(),
        ]);
    }
    let order: String = c
        .boot
        .iter()
        .map(|b| match b {
            BootDevice::Disk => 'c',
            BootDevice::Cdrom => 'd',
            BootDevice::Network => 'n',
        })
        .collect();
    args.extend(["-boot".into(), format!("order={order}")]);
    Ok(args)
}

/// Root ports beyond the NICs a q35 VM starts with: how many NICs it can take while it runs.
const SPARE_PORTS: usize = 4;

fn nic_driver(m: NicModel) -> &'static str {
    match m {
        NicModel::VirtioNet => "virtio-net-pci",
        NicModel::E1000 => "e1000",
    }
}

/// QEMU's `hostfwd` of a port forward: `tcp:127.0.0.1:8080-:80`.
fn hostfwd(f: &covm_types::vm::PortForward) -> String {
    let addr = match f.host_addr {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("[{a}]"),
    };
    format!("{}:{addr}:{}-:{}", f.proto.as_str(), f.host_port, f.guest_port)
}

/// Whether `pid` is alive and is the QEMU of this run directory (not a recycled pid).
fn pid_is_ours(pid: u32, run_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let cmdline = String::from_utf8_lossy(&cmdline);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie (state Z) is gone for our purposes.
    let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !zombie && cmdline.contains(&run_dir.display().to_string())
}

fn read_pid(run_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(run_files(run_dir).pid).ok()?.trim().parse().ok()
}

#[async_trait]
impl Hypervisor for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn serial_log(&self, run_dir: &Path) -> PathBuf {
        run_files(run_dir).serial_log
    }

    fn vnc_socket(&self, run_dir: &Path) -> PathBuf {
        run_files(run_dir).vnc
    }

    fn serial_socket(&self, run_dir: &Path) -> PathBuf {
        run_files(run_dir).serial
    }

    fn check(&self) -> Result<(), HvError> {
        which(&self.binary).map(|_| ()).ok_or_else(|| {
            HvError::Unavailable(format!(
                "{} is not installed; install the Debian package qemu-system-x86 (scripts/install-qemu does it)",
                self.binary.display()
            ))
        })
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn VmHandle>, HvError> {
        self.check()?;
        let args = command_line(spec)?;
        let f = run_files(&spec.run_dir);
        std::fs::create_dir_all(&spec.run_dir)
            .map_err(HvError::os(format!("create the run directory {}", spec.run_dir.display())))?;
        for stale in [&f.qmp, &f.serial, &f.vnc, &f.pid] {
            let _ = std::fs::remove_file(stale);
        }
        let process_key = crate::secret::ProcessKey::random();
        process_key.save(&f.key)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&f.log)
            .map_err(HvError::os(format!("open QEMU's log {}", f.log.display())))?;
        let log2 = log.try_clone().map_err(HvError::os("share QEMU's log"))?;
        tracing::info!(vm = %spec.name, accel = spec.accel.as_str(), "starting QEMU: {} {}", self.binary.display(), args.join(" "));
        let mut cmd = match &self.net.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.binary);
                c
            }
            None => tokio::process::Command::new(&self.binary),
        };
        for v in crate::secret::SECRET_ENV {
            cmd.env_remove(v);
        }
        let mut child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(HvError::os(format!("start {}", self.binary.display())))?;
        let pid = child.id();
        // Wait for the QMP socket; a QEMU that exits first has said why in its log.
        let started = Instant::now();
        while !f.qmp.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(HvError::Start(format!("QEMU exited ({status}): {}", log_tail(&f.log, 5).join(" | "))));
            }
            if started.elapsed() > self.qmp_timeout {
                let _ = child.start_kill();
                return Err(HvError::Start("QEMU did not open its QMP socket in time".into()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (qmp, events) = match Qmp::connect(&f.qmp, self.qmp_timeout).await {
            Ok(q) => q,
            Err(e) => {
                let _ = child.start_kill();
                return Err(e);
            }
        };
        let mut vm = QemuVm {
            qmp,
            events,
            child: Some(child),
            pid,
            accel: spec.accel,
            run_dir: spec.run_dir.clone(),
            key: Some(process_key),
            net: self.net.clone(),
        };
        // The taps QEMU made go on their bridges before the guest runs.
        for (i, b) in spec.nic_bridges.iter().enumerate() {
            let mac = spec.config.nics.get(i).and_then(|n| n.mac.clone()).unwrap_or_default();
            if let Some(b) = b
                && let Err(e) = self.net.tap_attach(&crate::net::tap_name(&mac), &b.bridge, b.vlan).await
            {
                let _ = vm.quit().await;
                return Err(e);
            }
        }
        for d in &spec.disks {
            if let Err(e) = vm.disk_add(d).await {
                let _ = vm.quit().await;
                return Err(e);
            }
        }
        if let Some(m) = &spec.restore {
            // Still paused (-S): the guest's RAM, devices and disks come back before it runs.
            if let Err(e) = vm.memory_job("snapshot-load", m).await {
                let _ = vm.quit().await;
                return Err(e);
            }
        }
        if let Err(e) = vm.qmp.execute("cont", json!({})).await {
            let _ = vm.quit().await;
            return Err(e);
        }
        Ok(Box::new(vm))
    }

    async fn adopt(&self, _id: Uuid, run_dir: &Path) -> Result<Option<Box<dyn VmHandle>>, HvError> {
        let Some(pid) = read_pid(run_dir).filter(|p| pid_is_ours(*p, run_dir)) else { return Ok(None) };
        let f = run_files(run_dir);
        let (qmp, events) = Qmp::connect(&f.qmp, self.qmp_timeout).await?;
        let kvm = qmp.execute("query-kvm", json!({})).await?;
        let accel = if kvm["enabled"].as_bool() == Some(true) { AccelChoice::Kvm } else { AccelChoice::Tcg };
        // A QEMU from before covm's restart: its key is still in its run directory (for hot-plugs).
        let key = crate::secret::ProcessKey::load(&f.key).ok();
        Ok(Some(Box::new(QemuVm {
            qmp,
            events,
            child: None,
            pid: Some(pid),
            accel,
            run_dir: run_dir.to_owned(),
            key,
            net: self.net.clone(),
        })))
    }

    fn leftover_pid(&self, run_dir: &Path) -> Option<u32> {
        read_pid(run_dir).filter(|p| pid_is_ours(*p, run_dir))
    }
}

struct QemuVm {
    qmp: Qmp,
    events: mpsc::UnboundedReceiver<QmpEvent>,
    /// Our child when this covm started it; None when adopted.
    child: Option<Child>,
    pid: Option<u32>,
    accel: AccelChoice,
    run_dir: PathBuf,
    /// This QEMU's own key (secrets for it are encrypted with it); None for an adopted QEMU whose
    /// key file is gone.
    key: Option<crate::secret::ProcessKey>,
    /// The network namespace it runs in (for the taps of NICs plugged in later).
    net: crate::net::HostNet,
}

impl QemuVm {
    /// On q35: a PCIe root port of covm's (`covm-rpN`) with nothing behind it; None on pc.
    async fn free_root_port(&mut self) -> Result<Option<String>, HvError> {
        let buses = self.qmp.execute("query-pci", json!({})).await?;
        let mut ports = Vec::new();
        for bus in buses.as_array().into_iter().flatten() {
            for d in bus["devices"].as_array().into_iter().flatten() {
                if let Some(id) = d["qdev_id"].as_str().filter(|i| i.starts_with("covm-rp")) {
                    let empty = d["pci_bridge"]["devices"].as_array().is_none_or(|v| v.is_empty());
                    ports.push((id.to_owned(), empty));
                }
            }
        }
        if ports.is_empty() {
            return Ok(None);
        }
        match ports.into_iter().find(|(_, empty)| *empty) {
            Some((id, _)) => Ok(Some(id)),
            None => Err(HvError::Unavailable(
                "no free PCIe port for another NIC: power the VM off to add it (it takes it at the next power-on)"
                    .into(),
            )),
        }
    }

    /// Runs a QMP job command and waits for its end (`query-jobs` until `concluded`), then dismisses it;
    /// the job's error is the command's.
    async fn job(&mut self, command: &str, mut args: serde_json::Value) -> Result<(), HvError> {
        let id = format!("covm-{}", Uuid::new_v4().simple());
        args["job-id"] = json!(id);
        self.qmp.execute(command, args).await?;
        let started = Instant::now();
        loop {
            let jobs = self.qmp.execute("query-jobs", json!({})).await?;
            let job = jobs.as_array().and_then(|a| a.iter().find(|j| j["id"] == json!(id))).cloned();
            let Some(job) = job else {
                return Err(HvError::Qmp(format!("{command}: job {id} vanished")));
            };
            if job["status"] == "concluded" {
                let _ = self.qmp.execute("job-dismiss", json!({ "id": id })).await;
                return match job["error"].as_str() {
                    Some(desc) => Err(HvError::Command { class: "JobFailed".into(), desc: desc.to_owned() }),
                    None => Ok(()),
                };
            }
            if started.elapsed() > Duration::from_secs(600) {
                let _ = self.qmp.execute("job-cancel", json!({ "id": id })).await;
                return Err(HvError::Qmp(format!("{command} did not end within 10 minutes")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The state image's block node (made and added when missing).
    async fn state_node(&mut self, m: &crate::MemoryState) -> Result<(), HvError> {
        m.state_image().await?;
        self.blockdev_add(&m.state_spec()).await
    }

    /// `snapshot-save` or `snapshot-load` of a memory snapshot: the state image and the disks.
    async fn memory_job(&mut self, command: &str, m: &crate::MemoryState) -> Result<(), HvError> {
        self.state_node(m).await?;
        let args = json!({ "tag": m.tag, "vmstate": crate::STATE_NODE, "devices": m.devices() });
        self.job(command, args).await
    }

    /// Waits until the process has gone; returns its exit status when it was our child.
    async fn wait_gone(&mut self) -> Option<String> {
        if let Some(child) = &mut self.child {
            return child.wait().await.ok().map(|s| s.to_string());
        }
        while self.pid.is_some_and(|p| pid_is_ours(p, &self.run_dir)) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// The end of the process, with the last lines of QEMU's log (or of the serial console's, when
    /// QEMU said nothing).
    fn exited(&self, status: Option<String>) -> HvEvent {
        let f = run_files(&self.run_dir);
        let mut tail = log_tail(&f.log, 10);
        if tail.is_empty() {
            tail = log_tail(&f.serial_log, 10);
        }
        HvEvent::Exited { status, log_tail: tail }
    }
}

#[async_trait]
impl VmHandle for QemuVm {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn accel(&self) -> AccelChoice {
        self.accel
    }

    async fn powerdown(&mut self) -> Result<(), HvError> {
        self.qmp.execute("system_powerdown", json!({})).await.map(|_| ())
    }

    async fn reset(&mut self) -> Result<(), HvError> {
        self.qmp.execute("system_reset", json!({})).await.map(|_| ())
    }

    async fn quit(&mut self) -> Result<(), HvError> {
        match self.qmp.execute("quit", json!({})).await {
            Ok(_) | Err(HvError::Gone) => {}
            Err(e) => tracing::warn!(error = %e, "quit failed; killing QEMU"),
        }
        if tokio::time::timeout(Duration::from_secs(10), self.wait_gone()).await.is_err()
            && let Some(pid) = self.pid
        {
            tracing::warn!(pid, "QEMU did not quit in 10 s; killing it");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            let _ = self.wait_gone().await;
        }
        Ok(())
    }

    async fn set_link(&mut self, mac: &str, up: bool) -> Result<(), HvError> {
        self.qmp.execute("set_link", json!({ "name": crate::nic_id(mac), "up": up })).await.map(|_| ())
    }

    async fn nic_add(&mut self, n: &crate::NicSpec) -> Result<(), HvError> {
        let mac = n.nic.mac.clone().unwrap_or_default();
        let (netdev, id) = (crate::netdev_id(&mac), crate::nic_id(&mac));
        // A q35 machine plugs into a free PCIe root port of covm's; a pc machine into its PCI bus.
        let port = self.free_root_port().await?;
        let backend = match &n.bridge {
            Some(_) => {
                json!({ "type": "tap", "id": netdev, "ifname": crate::net::tap_name(&mac), "script": "no", "downscript": "no" })
            }
            None => {
                let mut b = json!({ "type": "user", "id": netdev });
                let fwd: Vec<String> = n.nic.port_forwards.iter().map(hostfwd).collect();
                if !fwd.is_empty() {
                    b["hostfwd"] = json!(fwd.iter().map(|f| json!({ "str": f })).collect::<Vec<_>>());
                }
                b
            }
        };
        self.qmp.execute("netdev_add", backend).await?;
        if let Some(b) = &n.bridge
            && let Err(e) = self.net.tap_attach(&crate::net::tap_name(&mac), &b.bridge, b.vlan).await
        {
            let _ = self.qmp.execute("netdev_del", json!({ "id": netdev })).await;
            return Err(e);
        }
        let mut dev = json!({ "driver": nic_driver(n.nic.model), "id": id, "netdev": netdev, "mac": mac });
        if let Some(p) = port {
            dev["bus"] = json!(p);
        }
        if let Err(e) = self.qmp.execute("device_add", dev).await {
            let _ = self.qmp.execute("netdev_del", json!({ "id": netdev })).await;
            return Err(e);
        }
        if !n.nic.connected {
            let _ = self.set_link(&mac, false).await;
        }
        Ok(())
    }

    async fn nic_del(&mut self, mac: &str) -> Result<bool, HvError> {
        match self.qmp.execute("device_del", json!({ "id": crate::nic_id(mac) })).await {
            Ok(_) => Ok(true),
            Err(HvError::Command { class, .. }) if class == "DeviceNotFound" => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn netdev_del(&mut self, mac: &str) -> Result<(), HvError> {
        match self.qmp.execute("netdev_del", json!({ "id": crate::netdev_id(mac) })).await {
            Ok(_) => Ok(()),
            Err(HvError::Command { desc, .. }) if desc.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn device_del(&mut self, node: &str) -> Result<bool, HvError> {
        if !self.block_query().await?.devices.iter().any(|d| d == node) {
            return Ok(false);
        }
        self.qmp.execute("device_del", json!({ "id": node })).await.map(|_| true)
    }

    async fn block_resize(&mut self, node: &str, size: u64) -> Result<(), HvError> {
        self.qmp.execute("block_resize", json!({ "node-name": node, "size": size })).await.map(|_| ())
    }

    async fn snapshot_internal(&mut self, nodes: &[String], tag: &str) -> Result<(), HvError> {
        let actions: Vec<serde_json::Value> = nodes
            .iter()
            .map(|n| json!({ "type": "blockdev-snapshot-internal-sync", "data": { "device": n, "name": tag } }))
            .collect();
        self.qmp.execute("transaction", json!({ "actions": actions })).await.map(|_| ())
    }

    async fn snapshot_delete_internal(&mut self, node: &str, tag: &str) -> Result<(), HvError> {
        match self.qmp.execute("blockdev-snapshot-delete-internal-sync", json!({ "device": node, "name": tag })).await {
            Err(HvError::Command { desc, .. }) if desc.contains("does not exist") => Ok(()),
            r => r.map(|_| ()),
        }
    }

    async fn snapshot_save(&mut self, m: &crate::MemoryState) -> Result<(), HvError> {
        self.memory_job("snapshot-save", m).await
    }

    async fn blockdev_del(&mut self, node: &str) -> Result<(), HvError> {
        let have = self.block_query().await?.nodes;
        for n in [node.to_owned(), format!("{node}-file"), format!("{node}-base"), format!("{node}-base-file")] {
            if have.contains(&n) {
                self.qmp.execute("blockdev-del", json!({ "node-name": n })).await?;
            }
        }
        // An encrypted disk's secret goes with it (none: nothing to do).
        let _ = self.qmp.execute("object-del", json!({ "id": format!("{node}-key") })).await;
        Ok(())
    }

    async fn blockdev_add(&mut self, d: &DiskSpec) -> Result<(), HvError> {
        let have = self.block_query().await?.nodes;
        let file = format!("{}-file", d.node);
        if !have.contains(&file) {
            let f = json!({ "driver": "file", "node-name": file, "filename": d.path.display().to_string(), "read-only": d.read_only });
            self.qmp.execute("blockdev-add", f).await?;
        }
        // A linked clone's base, read-only beneath it; covm names it (the image's header is not trusted).
        let base = format!("{}-base", d.node);
        if let Some((path, format)) = &d.backing
            && !have.contains(&base)
        {
            let base_file = format!("{}-base-file", d.node);
            if !have.contains(&base_file) {
                let f = json!({ "driver": "file", "node-name": base_file, "filename": path.display().to_string(), "read-only": true });
                self.qmp.execute("blockdev-add", f).await?;
            }
            let mut b = json!({ "driver": format, "node-name": base, "file": base_file, "read-only": true });
            if format == "qcow2" {
                b["backing"] = serde_json::Value::Null;
            }
            if let Err(e) = self.qmp.execute("blockdev-add", b).await {
                let _ = self.qmp.execute("blockdev-del", json!({ "node-name": base_file })).await;
                return Err(e);
            }
        }
        if !have.contains(&d.node) {
            let mut fmt = json!({ "driver": d.format, "node-name": d.node, "file": file, "read-only": d.read_only });
            // A qcow2 header that names a backing file is never followed: the base is covm's, or none.
            if d.format == "qcow2" {
                fmt["backing"] = if d.backing.is_some() { json!(base) } else { serde_json::Value::Null };
            }
            if let Some(k) = &d.key {
                // The passphrase arrives as a secret encrypted with this QEMU's own key.
                let process = self.key.as_ref().ok_or_else(|| {
                    HvError::Unavailable("this QEMU's key is gone: an encrypted disk cannot be added to it".into())
                })?;
                let id = format!("{}-key", d.node);
                let _ = self.qmp.execute("object-del", json!({ "id": id })).await;
                self.qmp.execute("object-add", process.qmp_secret(&id, k)).await?;
                fmt["encrypt"] = json!({ "format": "luks", "key-secret": id });
            }
            if let Err(e) = self.qmp.execute("blockdev-add", fmt).await {
                let _ = self.qmp.execute("blockdev-del", json!({ "node-name": file })).await;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn device_add(&mut self, d: &DiskSpec) -> Result<(), HvError> {
        if self.block_query().await?.devices.contains(&d.node) {
            return Ok(());
        }
        let device = match d.bus {
            ControllerType::VirtioScsi => json!({
                "driver": "scsi-hd", "id": d.node, "drive": d.node, "bus": format!("{}.0", d.controller),
                "channel": 0, "scsi-id": d.unit, "lun": 0,
            }),
            ControllerType::Ahci => {
                json!({ "driver": "ide-hd", "id": d.node, "drive": d.node, "bus": format!("{}.{}", d.controller, d.unit) })
            }
            ControllerType::Ide => json!({
                "driver": "ide-hd", "id": d.node, "drive": d.node, "bus": format!("ide.{}", d.unit / 2), "unit": d.unit % 2,
            }),
        };
        self.qmp.execute("device_add", device).await.map(|_| ())
    }

    async fn block_query(&mut self) -> Result<crate::BlockState, HvError> {
        let nodes = self.qmp.execute("query-named-block-nodes", json!({ "flat": true })).await?;
        let blocks = self.qmp.execute("query-block", json!({})).await?;
        let names = |v: &serde_json::Value, key: &str| -> Vec<String> {
            let mut out: Vec<String> = v
                .as_array()
                .map(|a| {
                    a.iter().filter_map(|x| x[key].as_str()).filter(|s| !s.is_empty()).map(str::to_owned).collect()
                })
                .unwrap_or_default();
            out.sort();
            out.dedup();
            out
        };
        Ok(crate::BlockState { nodes: names(&nodes, "node-name"), devices: names(&blocks, "qdev") })
    }

    async fn next_event(&mut self) -> HvEvent {
        loop {
            let Some(ev) = self.events.recv().await else {
                // The QMP socket closed: the process is ending.
                let status = self.wait_gone().await;
                return self.exited(status);
            };
            match ev.name.as_str() {
                "SHUTDOWN" => return HvEvent::GuestShutdown,
                "RESET" => return HvEvent::Reset,
                "STOP" => return HvEvent::Paused,
                "RESUME" => return HvEvent::Resumed,
                "DEVICE_DELETED" => {
                    let dev = ev.data["device"].as_str().or(ev.data["path"].as_str()).unwrap_or_default();
                    return HvEvent::DeviceDeleted(dev.to_owned());
                }
                _ => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AccelChoice;
    use covm_types::vm::VmConfig;

    #[test]
    fn the_command_line_has_what_covm_relies_on() {
        let config: VmConfig = serde_json::from_value(json!({
            "name": "web-1", "cpus": 2, "memory_mib": 128, "cmdline": "console=ttyS0",
            "kernel": "local:k", "nics": [{ "network": "user", "mac": "52:54:00:00:00:01" }]
        }))
        .unwrap();
        let spec = VmSpec {
            id: Uuid::nil(),
            name: "web-1".into(),
            version: 1,
            config,
            kernel: Some("/ds/k".into()),
            initrd: None,
            cdrom: None,
            run_dir: "/data/vms/x".into(),
            accel: AccelChoice::Tcg,
            nic_bridges: vec![None],
            seed: None,
            disks: vec![],
            restore: None,
        };
        let a = command_line(&spec).unwrap().join(" ");
        for part in [
            "-machine q35,accel=tcg",
            "-cpu max",
            "-smp 2",
            "-m 128M",
            "-S",
            "-no-shutdown",
            "-qmp unix:/data/vms/x/qmp.sock,server=on,wait=off",
            "logfile=/data/vms/x/serial.log",
            "-vga std -vnc unix:/data/vms/x/vnc.sock",
            "-pidfile /data/vms/x/qemu.pid",
            "-kernel /ds/k -append console=ttyS0",
            "-device virtio-scsi-pci,id=scsi0",
            "-device pcie-root-port,id=covm-rp0,chassis=1,slot=1",
            "-device pcie-root-port,id=covm-rp4,chassis=5,slot=5",
            "-netdev user,id=net-525400000001 -device virtio-net-pci,netdev=net-525400000001,id=nic-525400000001,mac=52:54:00:00:00:01,bus=covm-rp0",
            "-chardev socket,id=covm-qga,path=/data/vms/x/qga.sock,server=on,wait=off",
            "virtserialport,bus=covm-vser.0,chardev=covm-qga,name=org.qemu.guest_agent.0",
        ] {
            assert!(a.contains(part), "{part} missing from {a}");
        }
    }

    #[test]
    fn images_have_their_format_and_commas_stay_in_file_names() {
        let config: VmConfig = serde_json::from_value(json!({ "name": "a", "cdrom": "local:x" })).unwrap();
        let spec = VmSpec {
            id: Uuid::nil(),
            name: "a".into(),
            version: 1,
            config,
            kernel: None,
            initrd: None,
            cdrom: Some("/ds/x.iso,snapshot=on".into()),
            run_dir: "/data,1/vms/x".into(),
            accel: AccelChoice::Tcg,
            nic_bridges: vec![],
            seed: None,
            disks: vec![],
            restore: None,
        };
        let args = command_line(&spec).unwrap();
        let drive = args.iter().skip_while(|a| *a != "-drive").nth(1).unwrap();
        assert_eq!(drive, "file=/ds/x.iso,,snapshot=on,format=raw,media=cdrom,readonly=on");
        assert!(args.contains(&"unix:/data,,1/vms/x/qmp.sock,server=on,wait=off".to_owned()), "{args:?}");
        assert!(args.contains(&"/data,1/vms/x/qemu.pid".to_owned()), "{args:?}");
    }

    #[test]
    fn a_missing_binary_says_what_to_install() {
        let d = QemuDriver {
            binary: "/nonexistent/qemu-system-x86_64".into(),
            qmp_timeout: Duration::from_secs(1),
            net: Default::default(),
        };
        let e = d.check().unwrap_err();
        assert!(e.to_string().contains("qemu-system-x86"), "{e}");
    }
}
