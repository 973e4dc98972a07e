//! Power actions as tasks, pool admission, autostart, and tasks themselves.
//!
//! A power request is checked at once (privilege, state, quota, files) and answered with a task; the
//! work goes on in the background and its progress and end reach the feed (`task.progress`,
//! `vm.power.changed`). Power-on runs the newest config version; the runtime state's
//! `running_version` says which, so a newer version means changes are pending until the next boot.

use covm_types::ErrorCode;
use std::time::Duration;

use covm_hv::{AccelChoice, KvmFacts, VmSpec, accel_choose};
use covm_store::{TaskRecord, VmRecord};
use covm_types::api::ObjectKind;
use covm_types::vm::{
    PowerAction, PowerRequest, PowerState, TaskQuery, TaskState, TaskView, VmConfig, VmRuntime, datastore_path,
};
use covm_types::{Error, ErrorKind, Privilege};
use serde_json::json;
use uuid::Uuid;

use super::agent::VmOp;
use super::node::{RuntimeFn, hv_error, runtime_of};
use super::transition::{PowerEvent, power_transition};
use super::{App, Ctx, EventExt, system_event};

const SHUTDOWN_TIMEOUT_S: u32 = 60;

/// The write that claims a VM for a power-on, a user's or autostart's: the transition
/// [`PowerEvent::Start`], at config `version` (a config changed since is refused: power on again).
fn start_claim(version: i64, reason: &'static str) -> RuntimeFn {
    Box::new(move |vm, old| {
        let Some(power_state) = power_transition(old.power_state, PowerEvent::Start) else {
            return Err(Error::conflict(ErrorCode::VmRunning, format!("{} is {}", vm.object.name, old.power_state)));
        };
        if vm.version != version {
            return Err(Error::conflict(ErrorCode::ConfigChanged, "the config changed; power on again"));
        }
        if vm.config["template"] == json!(true) {
            return Err(Error::conflict(
                ErrorCode::VmIsTemplate,
                format!("{} is a template: it is never powered on; clone it and power on the clone", vm.object.name),
            ));
        }
        let rt = VmRuntime { power_state, running_version: Some(version), ..Default::default() };
        Ok(Some((rt, json!({ "reason": reason }))))
    })
}

/// A forwarded host port must be free before QEMU starts (else QEMU fails with a message about
/// "host forwarding rules" that names no field).
pub(crate) fn port_free(f: &covm_types::vm::PortForward) -> Result<(), Error> {
    let addr = std::net::SocketAddr::new(f.host_addr, f.host_port);
    let free = match f.proto {
        covm_types::vm::Proto::Tcp => std::net::TcpListener::bind(addr).map(drop),
        covm_types::vm::Proto::Udp => std::net::UdpSocket::bind(addr).map(drop),
    };
    free.map_err(|e| {
        Error::conflict(
            ErrorCode::InUse,
            format!("{} port {} of {} cannot be forwarded: {e}", f.proto.as_str(), f.host_port, f.host_addr),
        )
    })
}

/// The NoCloud seed of a config: the VM's id is the instance id (a clone is a new instance), the host
/// name is the config's or the VM's name, and the user-data is the raw one or a `#cloud-config` made
/// of the users (JSON, which is YAML).
pub(crate) fn cloud_init_seed(
    id: uuid::Uuid,
    c: &VmConfig,
    ci: &covm_types::vm::CloudInit,
) -> Result<covm_hv::seed::Seed, Error> {
    let hostname = ci.hostname.clone().unwrap_or_else(|| super::clone::hostname_of(c.name.as_str()));
    // Quoted (JSON strings are YAML): a host name such as `123` stays a string.
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let meta_data = format!("instance-id: {}\nlocal-hostname: {}\n", q(&id.to_string()), q(&hostname));
    let user_data = match &ci.user_data {
        Some(u) => u.clone(),
        None => {
            let mut users = vec![json!("default")];
            for u in &ci.users {
                let mut user = json!({ "name": u.name, "lock_passwd": true, "shell": "/bin/sh" });
                if !u.ssh_authorized_keys.is_empty() {
                    user["ssh_authorized_keys"] = json!(u.ssh_authorized_keys);
                }
                if u.sudo {
                    user["sudo"] = json!("ALL=(ALL) NOPASSWD:ALL");
                }
                users.push(user);
            }
            let doc = json!({ "hostname": hostname, "preserve_hostname": false, "users": users });
            let body = serde_json::to_string_pretty(&doc).map_err(|_| Error::internal("could not render user-data"))?;
            format!("#cloud-config\n{body}\n")
        }
    };
    let network_config = match &ci.network {
        Some(n) => Some(
            serde_json::to_string_pretty(n).map_err(|_| Error::internal("could not render a network config"))? + "\n",
        ),
        None => None,
    };
    Ok(covm_hv::seed::Seed { meta_data, user_data, network_config })
}

pub fn task_view(t: &TaskRecord) -> TaskView {
    TaskView {
        id: t.id,
        kind: t.kind.clone(),
        object_id: t.object_id,
        object_name: t.object_name.clone(),
        actor: t.actor.clone(),
        state: t.state,
        progress: t.progress,
        message: t.message.clone(),
        error: t.error.clone(),
        cancelable: false,
        created_at: t.created_at,
        updated_at: t.updated_at,
    }
}

impl App {
    pub(crate) async fn task_new(&self, ctx: &Ctx, kind: &str, vm: &VmRecord) -> Result<TaskRecord, Error> {
        let now = covm_store::now();
        let t = TaskRecord {
            id: Uuid::now_v7(),
            kind: kind.into(),
            object_id: Some(vm.object.id),
            object_name: Some(vm.object.name.clone()),
            actor: ctx.user.clone(),
            request_id: Some(ctx.req.id.clone()),
            state: TaskState::Running,
            progress: 0,
            message: None,
            error: None,
            created_at: now,
            updated_at: now,
        };
        self.store().task_put(t.clone(), Some(self.task_event(&t))).await?;
        self.committed();
        Ok(t)
    }

    fn task_event(&self, t: &TaskRecord) -> covm_store::NewEvent {
        let ev = system_event("task.progress", "task", Some(t.id), &t.kind)
            .scope(t.object_id.unwrap_or(covm_types::ROOT_ID))
            .data(json!({ "task": t.id, "state": t.state, "progress": t.progress, "message": t.message, "error": t.error, "vm": t.object_name }));
        covm_store::NewEvent { actor: t.actor.clone(), request_id: t.request_id.clone(), ..ev }
    }

    /// Ends a task with its outcome.
    pub(crate) async fn task_end(&self, mut t: TaskRecord, r: Result<String, Error>) {
        t.updated_at = covm_store::now();
        t.progress = 100;
        match r {
            Ok(m) => {
                t.state = TaskState::Success;
                t.message = Some(m);
            }
            Err(e) => {
                t.state = TaskState::Error;
                t.message = Some(e.message.clone());
                t.error = Some(serde_json::to_value(e.body().error).unwrap_or_default());
            }
        }
        let ev = self.task_event(&t);
        if let Err(e) = self.store().task_put(t, Some(ev)).await {
            tracing::error!(error = %e, "could not record the end of a task");
        }
        self.committed();
    }

    pub async fn task_get(&self, ctx: &Ctx, id: Uuid) -> Result<TaskView, Error> {
        let t = self.store().task_get(id).await?.ok_or_else(|| Error::not_found("task", &id.to_string()))?;
        if let Some(o) = t.object_id
            && t.actor != ctx.user
            && let Some(obj) = self.store().object_get(o).await?
        {
            // Someone else's task on an object the caller may not view is not there: the answer names
            // the task, never the object.
            self.object_resolve(ctx, &obj.id.to_string(), None, "task").await.map_err(|e| match e.kind {
                covm_types::ErrorKind::NotFound => Error::not_found("task", &id.to_string()),
                _ => e,
            })?;
        }
        Ok(task_view(&t))
    }

    /// Tasks on objects I may view (and my own), newest first.
    pub async fn tasks_list(&self, ctx: &Ctx, q: TaskQuery) -> Result<Vec<TaskView>, Error> {
        let limit = q.limit.unwrap_or(50);
        if !(1..=1000).contains(&limit) {
            return Err(Error::invalid("limit", "limit is between 1 and 1000"));
        }
        let visible: std::collections::HashSet<Uuid> =
            self.store().objects_visible(&self.viewer(ctx).await?).await?.into_iter().collect();
        // TODO-perf: filtered after the read; a page may come back shorter than `limit`.
        let items = self.store().tasks_list(q.before, limit).await?;
        Ok(items
            .iter()
            .filter(|t| t.actor == ctx.user || t.object_id.is_some_and(|o| visible.contains(&o)))
            .map(task_view)
            .collect())
    }

    /// A file named `DATASTORE:path`, which must exist inside its datastore.
    async fn datastore_file(&self, field: &str, reference: &str) -> Result<std::path::PathBuf, Error> {
        let (ds, rel) = datastore_path(field, reference)?;
        let obj = self
            .object_lookup(&ds, Some(ObjectKind::Datastore))
            .await?
            .ok_or_else(|| Error::invalid(field, format!("there is no datastore {ds}")))?;
        let root = std::path::PathBuf::from(obj.spec["path"].as_str().unwrap_or_default());
        let path = root.join(&rel).canonicalize().map_err(|_| {
            Error::conflict(ErrorCode::FileMissing, format!("{reference} does not exist in datastore {ds}"))
                .with_field(field)
        })?;
        let root = root.canonicalize().unwrap_or(root);
        if !path.starts_with(&root) || !path.is_file() {
            return Err(Error::invalid(field, format!("{reference} is not a file inside datastore {ds}")));
        }
        // Checked again as resolved (a link inside the datastore, or a datastore that holds another
        // one, may lead to a disk's image): no datastore's disk folder.
        let mut disk_dirs = vec![root.join(super::refs::DISKS_DIR)];
        for d in self.store().objects_list(ObjectKind::Datastore, None, None, 1000).await? {
            let r = std::path::PathBuf::from(d.spec["path"].as_str().unwrap_or_default());
            disk_dirs.push(r.canonicalize().unwrap_or(r).join(super::refs::DISKS_DIR));
        }
        if disk_dirs.iter().any(|d| path.starts_with(d)) {
            return Err(Error::new(
                covm_types::ErrorKind::InvalidRequest,
                ErrorCode::ManagedDiskFile,
                format!("{reference} leads to a file where covm keeps disk images; attach a disk instead"),
            )
            .with_field(field));
        }
        Ok(path)
    }

    /// The accelerator for a VM: its config, `COVM_ACCEL` for `auto`, and what the host offers.
    pub(crate) fn accel_for(&self, c: &VmConfig) -> Result<AccelChoice, Error> {
        let wanted = match (c.accel, std::env::var("COVM_ACCEL").ok().as_deref()) {
            (covm_types::vm::Accel::Auto, Some("kvm")) => covm_types::vm::Accel::Kvm,
            (covm_types::vm::Accel::Auto, Some("tcg")) => covm_types::vm::Accel::Tcg,
            (a, _) => a,
        };
        accel_choose(wanted, KvmFacts::probe()).map_err(hv_error)
    }

    async fn spec_for(&self, vm: &VmRecord) -> Result<VmSpec, Error> {
        let config: VmConfig = serde_json::from_value(vm.config.clone()).map_err(|e| Error::internal(e.to_string()))?;
        // Refused before anything is made for it (NAT addresses, a seed); `start_claim` refuses it again
        // in the transaction.
        if config.template {
            return Err(Error::conflict(
                ErrorCode::VmIsTemplate,
                format!("{} is a template: it is never powered on; clone it and power on the clone", vm.object.name),
            ));
        }
        let kernel = match &config.kernel {
            Some(k) => Some(self.datastore_file("kernel", k).await?),
            None => None,
        };
        let initrd = match &config.initrd {
            Some(i) => Some(self.datastore_file("initrd", i).await?),
            None => None,
        };
        let cdrom = match &config.cdrom {
            Some(c) => Some(self.datastore_file("cdrom", c).await?),
            None => None,
        };
        let nic_bridges = self.nic_bridges_for(&vm.object.name, &config).await?;
        for (i, n) in config.nics.iter().enumerate() {
            for (j, f) in n.port_forwards.iter().enumerate() {
                port_free(f).map_err(|e| e.with_field(format!("nics[{i}].port_forwards[{j}].host_port")))?;
            }
        }
        let run_dir = self.agent().run_dir(vm.object.id);
        let seed = match &config.cloud_init {
            Some(ci) => {
                std::fs::create_dir_all(&run_dir)
                    .map_err(|e| Error::internal(format!("cannot make the VM's run directory: {e}")))?;
                let seed = cloud_init_seed(vm.object.id, &config, ci)?;
                Some(covm_hv::seed::make_iso(&run_dir, &seed).await.map_err(hv_error)?)
            }
            None => None,
        };
        let mut disks = Vec::new();
        for (i, d) in config.disks.iter().enumerate() {
            let field = format!("disks[{i}].disk");
            let obj = self.object_lookup(&d.disk, Some(ObjectKind::Disk)).await?.ok_or_else(|| {
                Error::conflict(
                    ErrorCode::DiskMissing,
                    format!("{} names disk {}, which no longer exists", vm.object.name, d.disk),
                )
                .with_field(field.clone())
            })?;
            let path = self.disk_file(&obj).await?;
            let bus = config.controllers.iter().find(|c| c.id == d.controller).map(|c| c.kind).ok_or_else(|| {
                Error::conflict(ErrorCode::UnknownController, format!("there is no controller {}", d.controller))
            })?;
            disks.push(covm_hv::DiskSpec {
                // QEMU node names have at most 31 characters: the id's random tail is enough in one VM.
                node: super::attach::disk_node(obj.id),
                path,
                format: obj.spec["format"].as_str().unwrap_or("qcow2").to_owned(),
                controller: d.controller.clone(),
                bus,
                unit: d.unit,
                read_only: d.read_only,
                key: self.disk_key(obj.id, &obj.spec)?,
                backing: self.disk_backing(&obj).await?,
            });
        }
        let accel = self.accel_for(&config)?;
        Ok(VmSpec {
            id: vm.object.id,
            name: vm.object.name.clone(),
            version: vm.version,
            config,
            kernel,
            initrd,
            cdrom,
            seed,
            disks,
            nic_bridges,
            run_dir,
            accel,
            restore: None,
        })
    }

    /// Admission control: the pool's vCPU and memory quotas hold with this VM running too.
    async fn pool_admit(&self, vm: &VmRecord, c: &VmConfig) -> Result<(), Error> {
        let Some(pool) = self.object_lookup(&c.pool, Some(ObjectKind::Pool)).await? else { return Ok(()) };
        let quota: covm_types::api::Quota = serde_json::from_value(pool.spec["quota"].clone()).unwrap_or_default();
        if quota.vcpus.is_none() && quota.memory_mib.is_none() {
            return Ok(());
        }
        // What the pool's other running VMs use, summed by the store (no scan of every VM).
        let used = self.store().pool_usage(&c.pool, Some(vm.object.id)).await?;
        let cpus = u64::from(c.cpus) + used.vcpus_running;
        let mem = c.memory_mib + used.memory_mib_running;
        if let Some(q) = quota.vcpus
            && cpus > u64::from(q)
        {
            return Err(Error::conflict(
                ErrorCode::QuotaExceeded,
                format!("pool {} allows {q} vCPUs; this would run {cpus}", c.pool),
            ));
        }
        if let Some(q) = quota.memory_mib
            && mem > q
        {
            return Err(Error::conflict(
                ErrorCode::QuotaExceeded,
                format!("pool {} allows {q} MiB of memory; this would run {mem} MiB", c.pool),
            ));
        }
        Ok(())
    }

    /// Powers a VM on, off, down (ACPI) or resets it; returns the task that does it.
    pub async fn vm_power(&self, ctx: &Ctx, vm: &str, p: PowerRequest) -> Result<TaskView, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        let privilege = match p.action {
            PowerAction::On => Privilege::VmInteractPowerOn,
            PowerAction::Off | PowerAction::Shutdown => Privilege::VmInteractPowerOff,
            PowerAction::Reset => Privilege::VmInteractReset,
        };
        self.require(ctx, &rec.object, privilege).await?;
        let timeout = p.timeout_s.unwrap_or(SHUTDOWN_TIMEOUT_S);
        if !(1..=3600).contains(&timeout) {
            return Err(Error::invalid("timeout_s", "timeout_s is between 1 and 3600"));
        }
        let id = rec.object.id;
        let state = runtime_of(&rec).power_state;
        let agent = self.agent_for(&rec)?;
        match p.action {
            PowerAction::On => {
                agent.check().map_err(hv_error)?;
                if power_transition(state, PowerEvent::Start).is_none() {
                    return Err(Error::conflict(ErrorCode::VmRunning, format!("{} is {state}", rec.object.name)));
                }
                // Not while an operation changes it (a revert putting its disks back, …).
                if let Some(l) = self.store().op_lock_get(id).await? {
                    return Err(self.lock_error(l).await);
                }
                let config: VmConfig =
                    serde_json::from_value(rec.config.clone()).map_err(|e| Error::internal(e.to_string()))?;
                self.pool_admit(&rec, &config).await?;
                let spec = self.spec_for(&rec).await?;
                // Off → starting, as one write: a second power-on finds the VM starting.
                let f = start_claim(rec.version, "power on");
                let after = self.runtime_write(id, None, true, Some((&ctx.user, &ctx.req.id)), f).await?;
                let generation = after.map_or(0, |a| a.generation);
                let task = self.task_new(ctx, "vm.power.on", &rec).await?;
                let view = task_view(&task);
                let app = self.clone();
                tokio::spawn(async move {
                    let r = app.power_on_run(id, generation, spec).await;
                    app.task_end(task, r).await;
                });
                Ok(view)
            }
            PowerAction::Off | PowerAction::Shutdown | PowerAction::Reset => {
                let task = self
                    .task_new(
                        ctx,
                        &format!(
                            "vm.power.{}",
                            serde_json::to_value(p.action).unwrap_or_default().as_str().unwrap_or("x")
                        ),
                        &rec,
                    )
                    .await?;
                let view = task_view(&task);
                let app = self.clone();
                let name = rec.object.name.clone();
                let action = p.action;
                tokio::spawn(async move {
                    let r = app.power_change_run(id, &name, state, action, timeout).await;
                    app.task_end(task, r).await;
                });
                Ok(view)
            }
        }
    }

    /// Powers a VM on from a memory snapshot (its config and disks already put back by a revert): the
    /// guest resumes where the snapshot left it. A `vm.power.on` task records it like any power-on.
    pub(crate) async fn power_on_restoring(&self, ctx: &Ctx, id: Uuid, m: covm_hv::MemoryState) -> Result<(), Error> {
        let rec = self.store().vm_get(id).await?.ok_or_else(|| Error::not_found("vm", &id.to_string()))?;
        self.agent_for(&rec)?.check().map_err(hv_error)?;
        let config: VmConfig =
            serde_json::from_value(rec.config.clone()).map_err(|e| Error::internal(e.to_string()))?;
        self.pool_admit(&rec, &config).await?;
        let mut spec = self.spec_for(&rec).await?;
        spec.restore = Some(m);
        let f = start_claim(rec.version, "revert to a memory snapshot");
        let after = self.runtime_write(id, None, true, Some((&ctx.user, &ctx.req.id)), f).await?;
        let generation = after.map_or(0, |a| a.generation);
        let task = self.task_new(ctx, "vm.power.on", &rec).await?;
        let r = self.power_on_run(id, generation, spec).await;
        let out = r.as_ref().map(drop).map_err(Clone::clone);
        self.task_end(task, r).await;
        out
    }

    /// Powers a running VM off at once and waits until its state says so.
    pub(crate) async fn vm_stop_and_wait(&self, id: Uuid) -> Result<(), Error> {
        match self.agent().ask(id, VmOp::Quit).await {
            Ok(()) | Err(covm_hv::HvError::Gone) => {}
            Err(e) => return Err(hv_error(e)),
        }
        let started = std::time::Instant::now();
        loop {
            let rec = self.store().vm_get(id).await?.ok_or_else(|| Error::not_found("vm", &id.to_string()))?;
            if !runtime_of(&rec).power_state.is_active() {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(Error::conflict(
                    ErrorCode::VmRunning,
                    format!("{} did not power off within 30 s", rec.object.name),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn power_on_run(&self, id: Uuid, generation: i64, spec: VmSpec) -> Result<String, Error> {
        let accel = spec.accel.as_str();
        tracing::info!(vm = %spec.name, accel, "powering on (accel {accel}: {})", if accel == "tcg" { "no fast KVM here" } else { "KVM" });
        match self.agent().start(&spec).await {
            Ok(run) => {
                let pid = run.pid;
                let host = super::host::host_facts().hostname;
                let node = self.config().node_id.clone();
                let simulated = self.agent().driver_name() == "sim";
                let f: RuntimeFn = Box::new(move |_, old| {
                    let Some(power_state) = power_transition(old.power_state, PowerEvent::Started) else {
                        return Ok(None);
                    };
                    Ok(Some((
                        VmRuntime {
                            simulated,
                            power_state,
                            pid,
                            host: Some(host),
                            node: Some(node),
                            accel: Some(accel.to_owned()),
                            since: Some(chrono::Utc::now()),
                            ..old.clone()
                        },
                        json!({ "pid": pid, "accel": accel }),
                    )))
                });
                self.runtime_write(id, Some(generation), false, None, f).await?;
                self.supervise(id, generation, run);
                Ok(format!("{} is running (accel {accel})", spec.name))
            }
            Err(e) => {
                let msg = e.to_string();
                let f: RuntimeFn = Box::new(move |_, old| {
                    let Some(power_state) = power_transition(old.power_state, PowerEvent::StartFailed) else {
                        return Ok(None);
                    };
                    let rt = VmRuntime { power_state, ..Default::default() };
                    Ok(Some((rt, json!({ "reason": "power on failed", "error": msg }))))
                });
                self.runtime_write(id, Some(generation), false, None, f).await?;
                Err(hv_error(e))
            }
        }
    }

    async fn power_change_run(
        &self,
        id: Uuid,
        name: &str,
        state: PowerState,
        action: PowerAction,
        timeout: u32,
    ) -> Result<String, Error> {
        let agent = self.agent();
        let (clear, stop, reset) = (
            power_transition(state, PowerEvent::Clear),
            power_transition(state, PowerEvent::Stop),
            power_transition(state, PowerEvent::Reset),
        );
        match action {
            PowerAction::Off if clear.is_some() => {
                let f: RuntimeFn = Box::new(|_, old| {
                    let Some(power_state) = power_transition(old.power_state, PowerEvent::Clear) else {
                        return Ok(None);
                    };
                    Ok(Some((
                        VmRuntime { power_state, ..Default::default() },
                        json!({ "reason": "cleared after a crash" }),
                    )))
                });
                self.runtime_write(id, None, false, None, f).await?;
                Ok(format!("{name} is off"))
            }
            PowerAction::Off if stop.is_some() => {
                agent.ask(id, VmOp::Quit).await.map_err(hv_error)?;
                Ok(format!("{name} is off"))
            }
            PowerAction::Off | PowerAction::Shutdown if stop.is_none() => Ok(format!("{name} is already off")),
            PowerAction::Shutdown => {
                // The guest agent first (it shuts down even a guest that ignores ACPI), else ACPI.
                let rec = self.store().vm_get(id).await?;
                let via_agent = match &rec {
                    Some(r) => self.guest_shutdown(r).await,
                    None => false,
                };
                let (op, how) =
                    if via_agent { (VmOp::AwaitExit, "the guest agent") } else { (VmOp::Powerdown, "ACPI") };
                match tokio::time::timeout(Duration::from_secs(timeout.into()), agent.ask(id, op)).await {
                    // Through the agent, the guest may be gone before covm asks to wait for it.
                    Ok(Err(covm_hv::HvError::Gone)) if via_agent => Ok(format!("{name} shut down (through {how})")),
                    Ok(r) => r.map_err(hv_error).map(|_| format!("{name} shut down (through {how})")),
                    Err(_) => Err(Error::new(
                        ErrorKind::Conflict,
                        ErrorCode::ShutdownTimeout,
                        format!(
                            "the guest of {name} did not shut down within {timeout} s; it is still running (power it off to stop it)"
                        ),
                    )),
                }
            }
            PowerAction::Reset if reset.is_some() => {
                agent.ask(id, VmOp::Reset).await.map_err(hv_error)?;
                Ok(format!("{name} was reset"))
            }
            PowerAction::Reset => Err(Error::conflict(ErrorCode::VmNotRunning, format!("{name} is {state}"))),
            PowerAction::On | PowerAction::Off => Err(Error::internal("power on is not a change run")),
        }
    }

    /// Starts the VMs with `autostart.enabled`, in `autostart.order`, waiting `delay_s` after each.
    pub async fn autostart(&self) -> Result<usize, Error> {
        let mut list = Vec::new();
        for vm in self.vms_all().await? {
            let Ok(c) = serde_json::from_value::<VmConfig>(vm.config.clone()) else { continue };
            if c.autostart.enabled && power_transition(runtime_of(&vm).power_state, PowerEvent::Start).is_some() {
                list.push((c.autostart.order, c.autostart.delay_s, vm));
            }
        }
        list.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.2.object.name.cmp(&b.2.object.name)));
        let mut started = 0;
        for (_, delay, vm) in list {
            let id = vm.object.id;
            let spec = match self.spec_for(&vm).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(vm = %vm.object.name, error = %e, "autostart skipped");
                    continue;
                }
            };
            // The same claim as a user's power-on; a VM started or changed meanwhile is left alone.
            let after = match self.runtime_write(id, None, true, None, start_claim(vm.version, "autostart")).await {
                Ok(Some(after)) => after,
                Ok(None) => continue,
                Err(e) if e.kind == ErrorKind::Conflict => continue,
                Err(e) => return Err(e),
            };
            if runtime_of(&after).power_state != PowerState::Starting {
                continue;
            }
            tracing::info!(vm = %vm.object.name, "autostart");
            if let Err(e) = self.power_on_run(id, after.generation, spec).await {
                tracing::warn!(vm = %vm.object.name, error = %e, "autostart failed");
            } else {
                started += 1;
            }
            if delay > 0 {
                tokio::time::sleep(Duration::from_secs(delay.into())).await;
            }
        }
        Ok(started)
    }
}

impl App {
    /// The serial log of a VM and its last `tail` lines; with `follow`, a stream guard for following
    /// it (counted against the caller's streams, ended when the caller loses the console privilege).
    pub async fn vm_serial(
        &self,
        ctx: &Ctx,
        vm: &str,
        tail: usize,
        follow: bool,
    ) -> Result<(std::path::PathBuf, Vec<String>, Option<super::streams::StreamGuard>), Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmInteractConsole).await?;
        let agent = self.agent_for(&rec)?;
        let guard = match follow {
            true => Some(self.stream_open(ctx, Some((rec.object.id, Privilege::VmInteractConsole)))?),
            false => None,
        };
        let path = agent.serial_log(rec.object.id);
        let lines = covm_hv::log_tail(&path, tail).into_iter().map(|l| l.trim_end_matches('\r').to_owned()).collect();
        Ok((path, lines, guard))
    }

    /// The VNC socket of a running VM, and the guard of the console stream.
    pub async fn vm_vnc_socket(
        &self,
        ctx: &Ctx,
        vm: &str,
        only: Option<Uuid>,
    ) -> Result<(std::path::PathBuf, super::streams::StreamGuard), Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        if only.is_some_and(|id| id != rec.object.id) {
            return Err(Error::unauthenticated("the console ticket is for another VM"));
        }
        self.require(ctx, &rec.object, Privilege::VmInteractConsole).await?;
        if !matches!(runtime_of(&rec).power_state, PowerState::Running | PowerState::Paused) {
            return Err(Error::conflict(ErrorCode::VmNotRunning, format!("{} is not running", rec.object.name)));
        }
        let agent = self.agent_for(&rec)?;
        let guard = self.stream_open(ctx, Some((rec.object.id, Privilege::VmInteractConsole)))?;
        Ok((agent.vnc_socket(rec.object.id), guard))
    }
}
