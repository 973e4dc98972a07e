//! The node agent: one supervisor task per running VM, which alone talks to that VM's QEMU (through a
//! [`VmHandle`]) and reports what happens to it as runtime state. Everything else sends it commands
//! with a reply channel.
//!
//! ```text
//!            power on                  QEMU up, cont
//!   off ───────────────▶ starting ───────────────────▶ running ◀──▶ paused
//!    ▲                      │ start failed                │ │
//!    │◀─────────────────────┘                             │ │ guest powers off / quit
//!    │◀───────────────────────────────────────────────────┘ │
//!    │                                                      │ process died unexpectedly
//!    └───────── power off (clears) ──────────────────── crashed
//! ```
//!
//! Runtime writes carry the run's generation: a write for a run that is no longer the VM's current
//! one (a late report from an old supervisor) changes nothing. When covm starts, VMs whose QEMU still
//! runs are adopted (pid file + QMP socket) by a new supervisor; VMs whose QEMU is gone become crashed.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use covm_hv::{BlockState, HvError, HvEvent, Hypervisor, VmSpec};
use covm_store::{RuntimeWrite, VmRecord, VmWrite, WriteOutcome};
use covm_types::vm::VmRuntime;
use covm_types::{Error, ErrorCode, ErrorKind};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::agent::{NodeAgent, Run, RunReports, VmOp, VmUse};
use super::transition::{PowerEvent, power_transition};
use super::{App, EventExt, system_event};

/// A command to a VM's supervisor, with its reply channel.
enum Cmd {
    /// Power off at once; the reply comes when the process is gone.
    Quit(oneshot::Sender<Result<(), HvError>>),
    /// ACPI power-down; the reply comes when the guest has powered off.
    Powerdown(oneshot::Sender<Result<(), HvError>>),
    /// The reply comes when the process is gone.
    AwaitExit(oneshot::Sender<Result<(), HvError>>),
    Reset(oneshot::Sender<Result<(), HvError>>),
    SetLink(String, bool, oneshot::Sender<Result<(), HvError>>),
    NicAdd(Box<covm_hv::NicSpec>, oneshot::Sender<Result<(), HvError>>),
    NicDel(String, oneshot::Sender<Result<(), HvError>>),
    NetdevDel(String, oneshot::Sender<Result<(), HvError>>),
    /// Adds a disk's block nodes (kept if already there).
    BlockdevAdd(Box<covm_hv::DiskSpec>, oneshot::Sender<Result<(), HvError>>),
    /// Adds a disk's device (kept if already there).
    DeviceAdd(Box<covm_hv::DiskSpec>, oneshot::Sender<Result<(), HvError>>),
    /// Asks the guest to release a disk's device (`device_del`); the reply comes when it has
    /// (`DEVICE_DELETED`), or at once when there is no such device.
    DeviceDel(String, oneshot::Sender<Result<(), HvError>>),
    /// Removes a disk's block nodes (those there).
    BlockdevDel(String, oneshot::Sender<Result<(), HvError>>),
    /// What the VM holds of block nodes and devices.
    BlockQuery(oneshot::Sender<Result<covm_hv::BlockState, HvError>>),
    /// Grows an attached disk (`block_resize`).
    DiskResize(String, u64, oneshot::Sender<Result<(), HvError>>),
    SnapshotTake(Vec<String>, String, oneshot::Sender<Result<(), HvError>>),
    SnapshotSave(Box<covm_hv::MemoryState>, oneshot::Sender<Result<(), HvError>>),
    SnapshotDelete(String, String, oneshot::Sender<Result<(), HvError>>),
}

/// A supervised run: its command channel and its process.
struct Supervised {
    tx: mpsc::UnboundedSender<Cmd>,
    pid: Option<u32>,
}

/// This host's agent: the supervisors of the VMs running here, one task each.
pub struct LocalAgent {
    driver: Arc<dyn Hypervisor>,
    /// Where run directories live (`DATA/vms/<id>`).
    vms_dir: PathBuf,
    vms: Arc<Mutex<HashMap<Uuid, Supervised>>>,
    /// QEMU processes left over from deleted VMs (reported, never killed).
    leftovers: Mutex<Vec<String>>,
}

impl LocalAgent {
    pub fn new(driver: Arc<dyn Hypervisor>, data_dir: &std::path::Path) -> LocalAgent {
        LocalAgent { driver, vms_dir: data_dir.join("vms"), vms: Arc::default(), leftovers: Mutex::default() }
    }

    fn sender(&self, id: Uuid) -> Option<mpsc::UnboundedSender<Cmd>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|s| s.tx.clone())
    }

    /// Sends a command to a VM's supervisor and waits for its reply.
    async fn command<T>(
        &self,
        id: Uuid,
        make: impl FnOnce(oneshot::Sender<Result<T, HvError>>) -> Cmd,
    ) -> Result<T, HvError> {
        let tx = self.sender(id).ok_or(HvError::Gone)?;
        let (reply, rx) = oneshot::channel();
        tx.send(make(reply)).map_err(|_| HvError::Gone)?;
        rx.await.map_err(|_| HvError::Gone)?
    }
}

#[async_trait]
impl NodeAgent for LocalAgent {
    fn driver_name(&self) -> &'static str {
        self.driver.name()
    }

    fn check(&self) -> Result<(), HvError> {
        self.driver.check()
    }

    fn run_dir(&self, id: Uuid) -> PathBuf {
        self.vms_dir.join(id.to_string())
    }

    fn serial_log(&self, id: Uuid) -> PathBuf {
        self.driver.serial_log(&self.run_dir(id))
    }

    fn vnc_socket(&self, id: Uuid) -> PathBuf {
        self.driver.vnc_socket(&self.run_dir(id))
    }

    fn serial_socket(&self, id: Uuid) -> PathBuf {
        self.driver.serial_socket(&self.run_dir(id))
    }

    async fn start(&self, spec: &VmSpec) -> Result<Run, HvError> {
        self.driver.start(spec).await.map(Run::new)
    }

    async fn adopt(&self, id: Uuid) -> Result<Option<Run>, HvError> {
        Ok(self.driver.adopt(id, &self.run_dir(id)).await?.map(Run::new))
    }

    fn supervise(&self, id: Uuid, run: Run, reports: Arc<dyn RunReports>) {
        let (tx, rx) = mpsc::unbounded_channel::<Cmd>();
        self.vms.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Supervised { tx, pid: run.pid });
        tokio::spawn(supervise(id, run, rx, reports, self.vms.clone()));
    }

    async fn ask(&self, id: Uuid, op: VmOp) -> Result<(), HvError> {
        match op {
            VmOp::Quit => self.command(id, Cmd::Quit).await,
            VmOp::Powerdown => self.command(id, Cmd::Powerdown).await,
            VmOp::Reset => self.command(id, Cmd::Reset).await,
            VmOp::SetLink(mac, up) => self.command(id, |r| Cmd::SetLink(mac, up, r)).await,
            VmOp::NicAdd(n) => self.command(id, |r| Cmd::NicAdd(n, r)).await,
            VmOp::NicDel(mac) => self.command(id, |r| Cmd::NicDel(mac, r)).await,
            VmOp::NetdevDel(mac) => self.command(id, |r| Cmd::NetdevDel(mac, r)).await,
            VmOp::BlockdevAdd(d) => self.command(id, |r| Cmd::BlockdevAdd(d, r)).await,
            VmOp::DeviceAdd(d) => self.command(id, |r| Cmd::DeviceAdd(d, r)).await,
            VmOp::DeviceDel(node) => self.command(id, |r| Cmd::DeviceDel(node, r)).await,
            VmOp::BlockdevDel(node) => self.command(id, |r| Cmd::BlockdevDel(node, r)).await,
            VmOp::DiskResize(node, size) => self.command(id, |r| Cmd::DiskResize(node, size, r)).await,
            VmOp::SnapshotTake(nodes, tag) => self.command(id, |r| Cmd::SnapshotTake(nodes, tag, r)).await,
            VmOp::SnapshotSave(m) => self.command(id, |r| Cmd::SnapshotSave(m, r)).await,
            VmOp::SnapshotDelete(node, tag) => self.command(id, |r| Cmd::SnapshotDelete(node, tag, r)).await,
            VmOp::AwaitExit => self.command(id, Cmd::AwaitExit).await,
        }
    }

    async fn block_state(&self, id: Uuid) -> Result<BlockState, HvError> {
        self.command(id, Cmd::BlockQuery).await
    }

    async fn guest(
        &self,
        id: Uuid,
        command: &str,
        args: serde_json::Value,
        timeout: std::time::Duration,
    ) -> Result<serde_json::Value, HvError> {
        let running = self.vms.lock().unwrap_or_else(|p| p.into_inner()).get(&id).is_some_and(|s| !s.tx.is_closed());
        if !running {
            return Err(HvError::Gone);
        }
        if self.driver.name() == "sim" {
            return Err(HvError::Unavailable("a simulated VM has no guest, so no guest agent".into()));
        }
        covm_hv::qga::call(&self.run_dir(id).join("qga.sock"), command, args, timeout).await
    }

    async fn stats(&self, id: Uuid) -> Result<VmUse, HvError> {
        let pid = {
            let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
            vms.get(&id).filter(|s| !s.tx.is_closed()).ok_or(HvError::Gone)?.pid
        };
        let Some(pid) = pid else { return Ok(VmUse { pid: None, cpu_seconds: 0.0, rss_bytes: 0 }) };
        let u = tokio::task::spawn_blocking(move || covm_hv::procfs::proc_use(pid))
            .await
            .map_err(|e| HvError::Io(format!("reading /proc failed: {e}")))??;
        Ok(VmUse { pid: Some(pid), cpu_seconds: u.cpu_seconds, rss_bytes: u.rss_bytes })
    }

    fn leftovers_scan(&self, known: &HashSet<Uuid>) -> Vec<String> {
        let mut found = Vec::new();
        if let Ok(dirs) = std::fs::read_dir(&self.vms_dir) {
            for d in dirs.flatten() {
                let Some(id) = d.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()) else { continue };
                if known.contains(&id) {
                    continue;
                }
                if let Some(pid) = self.driver.leftover_pid(&d.path()) {
                    let msg = format!(
                        "QEMU pid {pid} in {} belongs to no VM (deleted?); covm leaves it running",
                        d.path().display()
                    );
                    tracing::warn!("{msg}");
                    found.push(msg);
                }
            }
        }
        self.leftovers.lock().unwrap_or_else(|p| p.into_inner()).extend(found.iter().cloned());
        found
    }

    fn leftovers(&self) -> Vec<String> {
        self.leftovers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Each supervisor ends when its command channel closes; the VMs keep running.
    fn release_all(&self) {
        self.vms.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// One VM's supervisor: the only task that talks to its QEMU, until QEMU ends (reported) or covm lets
/// go of it (its command channel closes).
async fn supervise(
    id: Uuid,
    run: Run,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    reports: Arc<dyn RunReports>,
    vms: Arc<Mutex<HashMap<Uuid, Supervised>>>,
) {
    let mut handle = run.handle;
    let mut waiters: Vec<oneshot::Sender<Result<(), HvError>>> = Vec::new();
    let mut unplugs: Vec<(String, oneshot::Sender<Result<(), HvError>>)> = Vec::new();
    let (event, data) = loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Cmd::Quit(reply)) => {
                    let r = handle.quit().await;
                    waiters.push(reply);
                    if let Err(e) = r {
                        tracing::warn!(%id, error = %e, "quit failed");
                    }
                    break (PowerEvent::Stopped, json!({ "reason": "powered off" }));
                }
                Some(Cmd::Powerdown(reply)) => match handle.powerdown().await {
                    Ok(()) => waiters.push(reply),
                    Err(e) => { let _ = reply.send(Err(e)); }
                },
                Some(Cmd::AwaitExit(reply)) => waiters.push(reply),
                Some(Cmd::Reset(reply)) => { let _ = reply.send(handle.reset().await); }
                Some(Cmd::SetLink(mac, up, reply)) => { let _ = reply.send(handle.set_link(&mac, up).await); }
                Some(Cmd::NicAdd(n, reply)) => { let _ = reply.send(handle.nic_add(&n).await); }
                Some(Cmd::NetdevDel(mac, reply)) => { let _ = reply.send(handle.netdev_del(&mac).await); }
                Some(Cmd::NicDel(mac, reply)) => match handle.nic_del(&mac).await {
                    Ok(true) => unplugs.push((covm_hv::nic_id(&mac), reply)),
                    Ok(false) => { let _ = reply.send(Ok(())); }
                    Err(e) => { let _ = reply.send(Err(e)); }
                },
                Some(Cmd::BlockdevAdd(d, reply)) => { let _ = reply.send(handle.blockdev_add(&d).await); }
                Some(Cmd::DeviceAdd(d, reply)) => { let _ = reply.send(handle.device_add(&d).await); }
                Some(Cmd::BlockdevDel(node, reply)) => { let _ = reply.send(handle.blockdev_del(&node).await); }
                Some(Cmd::BlockQuery(reply)) => { let _ = reply.send(handle.block_query().await); }
                Some(Cmd::DiskResize(node, size, reply)) => { let _ = reply.send(handle.block_resize(&node, size).await); }
                Some(Cmd::SnapshotTake(nodes, tag, reply)) => { let _ = reply.send(handle.snapshot_internal(&nodes, &tag).await); }
                Some(Cmd::SnapshotSave(m, reply)) => { let _ = reply.send(handle.snapshot_save(&m).await); }
                Some(Cmd::SnapshotDelete(node, tag, reply)) => { let _ = reply.send(handle.snapshot_delete_internal(&node, &tag).await); }
                Some(Cmd::DeviceDel(node, reply)) => match handle.device_del(&node).await {
                    Ok(true) => unplugs.push((node, reply)),
                    Ok(false) => { let _ = reply.send(Ok(())); }
                    Err(e) => { let _ = reply.send(Err(e)); }
                },
            },
            ev = handle.next_event() => match ev {
                HvEvent::GuestShutdown => {
                    let _ = handle.quit().await;
                    break (PowerEvent::Stopped, json!({ "reason": "the guest powered off" }));
                }
                HvEvent::Exited { status, log_tail } => {
                    tracing::warn!(%id, ?status, "QEMU exited unexpectedly");
                    break (PowerEvent::Exited, json!({ "reason": "QEMU exited unexpectedly", "exit_status": status, "log_tail": log_tail }));
                }
                HvEvent::Paused => reports.power(PowerEvent::Paused, json!({})).await,
                HvEvent::Resumed => reports.power(PowerEvent::Resumed, json!({})).await,
                HvEvent::Reset => tracing::info!(%id, "the VM was reset"),
                HvEvent::DeviceDeleted(dev) => {
                    tracing::debug!(%id, %dev, "device deleted");
                    let waiter = unplugs.iter().position(|(n, _)| *n == dev).map(|i| unplugs.swap_remove(i).1);
                    if waiter.is_none_or(|w| w.send(Ok(())).is_err()) {
                        // No one waits (the detach gave up, or no one asked): the config decides.
                        let reports = reports.clone();
                        tokio::spawn(async move { reports.device_released(dev).await });
                    }
                }
            },
        }
    };
    // The run goes first: a command sent from now on finds the VM gone (a new run that already
    // replaced it keeps its place).
    rx.close();
    {
        let mut vms = vms.lock().unwrap_or_else(|p| p.into_inner());
        if vms.get(&id).is_some_and(|s| s.tx.is_closed()) {
            vms.remove(&id);
        }
    }
    reports.power(event, data).await;
    for w in waiters {
        let _ = w.send(Ok(()));
    }
}

/// How the app records what an agent reports about one run.
struct AppRunReports {
    app: App,
    id: Uuid,
    generation: i64,
}

#[async_trait]
impl RunReports for AppRunReports {
    async fn power(&self, event: PowerEvent, data: serde_json::Value) {
        let ended = matches!(event, PowerEvent::Stopped | PowerEvent::Exited);
        let f: RuntimeFn = Box::new(move |_, old| {
            let Some(power_state) = power_transition(old.power_state, event) else { return Ok(None) };
            if power_state == old.power_state && !ended {
                return Ok(None);
            }
            let rt = if ended {
                VmRuntime { power_state, since: Some(chrono::Utc::now()), ..Default::default() }
            } else {
                VmRuntime { power_state, ..old.clone() }
            };
            Ok(Some((rt, data)))
        });
        if let Err(e) = self.app.runtime_write(self.id, Some(self.generation), false, None, f).await {
            tracing::error!(id = %self.id, error = %e, ?event, "could not record a VM's power");
        }
    }

    async fn device_released(&self, device: String) {
        self.app.disk_device_reconcile(self.id, &device).await;
    }
}

pub fn runtime_of(r: &VmRecord) -> VmRuntime {
    let mut rt: VmRuntime = serde_json::from_value(r.runtime.clone()).unwrap_or_default();
    rt.generation = r.generation;
    rt.power_state = serde_json::from_value(json!(r.power_state)).unwrap_or_default();
    rt
}

/// A runtime write for the run `generation` (None: any run), decided from the VM's current runtime.
pub type RuntimeFn =
    Box<dyn FnOnce(&VmRecord, &VmRuntime) -> Result<Option<(VmRuntime, serde_json::Value)>, Error> + Send>;

impl App {
    /// Writes runtime state (and a `vm.power.changed` event when the power state changes). With
    /// `generation`, the write applies only while that run is current. Returns the VM after it.
    pub(crate) async fn runtime_write(
        &self,
        id: Uuid,
        generation: Option<i64>,
        bump: bool,
        actor: Option<(&str, &str)>,
        f: RuntimeFn,
    ) -> Result<Option<VmRecord>, Error> {
        let (actor, request_id) = actor.map_or(("-".to_owned(), None), |(a, r)| (a.to_owned(), Some(r.to_owned())));
        let write = Box::new(move |vm: &VmRecord, _at: chrono::DateTime<chrono::Utc>| {
            if generation.is_some_and(|g| g != vm.generation) {
                return Ok(WriteOutcome::Unchanged);
            }
            let old = runtime_of(vm);
            let Some((new, data)) = f(vm, &old)? else { return Ok(WriteOutcome::Unchanged) };
            let mut events = Vec::new();
            if new.power_state != old.power_state || bump {
                let mut d = data;
                d["power_state"] = json!(new.power_state);
                d["previous"] = json!(old.power_state);
                let ev = system_event("vm.power.changed", "vm", Some(vm.object.id), &vm.object.name).data(d);
                events.push(covm_store::NewEvent { actor: actor.clone(), request_id: request_id.clone(), ..ev });
            }
            let power_state = new.power_state;
            let mut runtime = serde_json::to_value(&new).unwrap_or_default();
            runtime.as_object_mut().map(|o| o.remove("generation"));
            Ok(WriteOutcome::from(VmWrite {
                runtime: Some(RuntimeWrite { power_state, runtime, bump_generation: bump }),
                events,
                ..Default::default()
            }))
        });
        let (after, events) = self.store().vm_write(id, write).await?.done()?;
        if !events.is_empty() {
            self.committed();
        }
        Ok(after)
    }

    /// Has this host's agent supervise a run (just started, or adopted) as run `generation`.
    pub(crate) fn supervise(&self, id: Uuid, generation: i64, run: Run) {
        let reports = Arc::new(AppRunReports { app: self.clone(), id, generation });
        self.agent().supervise(id, run, reports);
    }

    /// Where a node's replica answers and the certificate it is trusted by (for forwarding a
    /// request about one of its VMs).
    pub async fn node_addr(&self, node: &str) -> Option<covm_store::NodeAddr> {
        self.store().node_addr(node).await.ok().flatten()
    }

    /// At start: adopts VMs whose QEMU still runs, marks the others crashed, reports leftovers.
    pub async fn node_recover(&self) -> Result<(), Error> {
        let mut known = std::collections::HashSet::new();
        for vm in &self.vms_all().await? {
            known.insert(vm.object.id);
            let rt = runtime_of(vm);
            if !rt.power_state.is_active() {
                continue;
            }
            if rt.node.as_ref().is_some_and(|n| *n != self.config().node_id) {
                // Another replica's node runs it.
                continue;
            }
            let id = vm.object.id;
            match self.agent().adopt(id).await {
                Ok(Some(run)) => {
                    let pid = run.pid;
                    let accel = run.accel.as_str().to_owned();
                    let f: RuntimeFn = Box::new(move |_, old| {
                        let Some(power_state) = power_transition(old.power_state, PowerEvent::Adopted) else {
                            return Ok(None);
                        };
                        Ok(Some((
                            VmRuntime { power_state, pid, accel: Some(accel), ..old.clone() },
                            json!({ "reason": "adopted after a covm restart", "adopted": true }),
                        )))
                    });
                    let after = self.runtime_write(id, None, true, None, f).await?;
                    let generation = after.map_or(0, |a| a.generation);
                    tracing::info!(vm = %vm.object.name, ?pid, "adopted a running VM");
                    self.supervise(id, generation, run);
                }
                Ok(None) | Err(_) => {
                    tracing::warn!(vm = %vm.object.name, "its QEMU is gone: marking it crashed");
                    let f: RuntimeFn = Box::new(|_, old| {
                        let Some(power_state) = power_transition(old.power_state, PowerEvent::Lost) else {
                            return Ok(None);
                        };
                        Ok(Some((
                            VmRuntime { power_state, since: Some(chrono::Utc::now()), ..Default::default() },
                            json!({ "reason": "QEMU exited while covm was down" }),
                        )))
                    });
                    self.runtime_write(id, None, false, None, f).await?;
                }
            }
        }
        // QEMUs of VMs that no longer exist: reported, never killed.
        self.agent().leftovers_scan(&known);
        Ok(())
    }
}

/// A driver error as the API shows it.
pub fn hv_error(e: HvError) -> Error {
    match e {
        HvError::Unavailable(m) => Error::conflict(ErrorCode::HypervisorUnavailable, m),
        HvError::Gone => Error::conflict(ErrorCode::VmNotRunning, "the VM is not running"),
        other => Error::new(ErrorKind::Internal, ErrorCode::HypervisorError, other.chain()),
    }
}
