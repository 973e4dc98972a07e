//! `covm vm …`: VMs, their history and their edit leases.
//!
//! Lease tokens from `covm vm lease acquire` are kept in the config dir (`leases.json`) and sent as
//! `Covm-Lease` with later changes of that VM, so a write after the lease was lost is refused instead
//! of landing unfenced.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, bail};
use clap::Subcommand;
use covm_client::{ChangeOptions, Client, ClientError, merge_diff};
use covm_types::vm::{PowerAction, PowerState, TaskState, VersionQuery, VmListQuery, VmView};
use serde_json::{Value, json};

use crate::output::Out;

#[derive(Subcommand)]
pub enum VmCmd {
    /// Create a VM.
    Create {
        name: String,
        #[arg(short = 'c', long)]
        cpus: Option<u32>,
        /// Memory in MiB.
        #[arg(short = 'm', long)]
        memory: Option<u64>,
        #[arg(long)]
        folder: Option<String>,
        #[arg(long)]
        pool: Option<String>,
        /// Add a NIC on this network (repeatable).
        #[arg(long = "net")]
        nets: Vec<String>,
        /// Direct kernel boot: DATASTORE:path.
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long)]
        initrd: Option<String>,
        #[arg(long)]
        cmdline: Option<String>,
        /// An annotation key=value (repeatable).
        #[arg(short = 'e', long = "extra")]
        annotations: Vec<String>,
        /// The whole config as a JSON file (flags override it).
        #[arg(long)]
        from_file: Option<std::path::PathBuf>,
    },
    /// List VMs.
    Ls {
        #[arg(long)]
        folder: Option<String>,
        /// Only names starting with this.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        power_state: Option<String>,
    },
    /// A VM's config, runtime state and lease.
    Info { name: String },
    /// Delete a VM.
    Rm { name: String },
    /// Change fields, like govc vm.change.
    Change {
        name: String,
        #[arg(short = 'c', long)]
        cpus: Option<u32>,
        #[arg(short = 'm', long)]
        memory: Option<u64>,
        /// key=value sets an annotation, key= removes it (repeatable).
        #[arg(short = 'e', long = "extra")]
        annotations: Vec<String>,
        #[arg(long)]
        description: Option<String>,
        /// A JSON Merge Patch of your own, merged with the flags.
        #[arg(long)]
        patch: Option<String>,
        /// A note for the history.
        #[arg(long)]
        message: Option<String>,
        /// On a running VM, keep changes that need a power cycle pending instead of refusing them.
        #[arg(long)]
        next_boot: bool,
        /// Refuse the change unless the VM is still at this version.
        #[arg(long)]
        if_match: Option<i64>,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Take a safety snapshot first, whatever the VM's policy.
        #[arg(long)]
        snapshot: bool,
    },
    /// Edit the config in $EDITOR; on a conflict, show the other change and edit again.
    Edit {
        name: String,
        #[arg(long)]
        message: Option<String>,
    },
    /// The config history, newest first.
    History {
        name: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// What changed between two versions.
    Diff { name: String, from: i64, to: i64 },
    /// Write a new version equal to an old one; or, with --before-version N, put the VM back to how
    /// it was before version N (the safety snapshot that protects it), config, data or both.
    Revert {
        name: String,
        #[arg(required_unless_present = "before_version")]
        version: Option<i64>,
        #[arg(long)]
        message: Option<String>,
        #[arg(long, conflicts_with = "version")]
        before_version: Option<i64>,
        #[arg(long, value_parser = ["config", "data", "both"], default_value = "both")]
        scope: String,
    },
    /// Edit leases.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Snapshots of a VM that is off: create, list (as a tree), show, revert, remove.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Power on, off (at once), shutdown (ask the guest) or reset; waits for the task.
    Power {
        name: String,
        #[arg(value_parser = ["on", "off", "shutdown", "reset"])]
        action: String,
        /// For shutdown: seconds to wait for the guest.
        #[arg(long)]
        timeout: Option<u32>,
        /// Return at once with the task instead of waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Attach, detach and list a VM's disks.
    #[command(subcommand)]
    Disk(VmDiskCmd),
    /// A new VM from a VM or a template: linked (qcow2 overlays on the template's disks, the default
    /// for a template) or --full; with --hostname/--user/--ssh-key, a new cloud-init identity.
    Clone {
        source: String,
        name: String,
        /// Copy the disks (the default for a VM that is not a template).
        #[arg(long)]
        full: bool,
        #[arg(long)]
        folder: Option<String>,
        #[arg(long)]
        pool: Option<String>,
        /// The guest's host name (default with any customization: the new VM's name).
        #[arg(long)]
        hostname: Option<String>,
        /// A user cloud-init makes in the guest.
        #[arg(long)]
        user: Option<String>,
        /// That user's SSH public key, or @FILE (repeatable).
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<String>,
        /// That user may use sudo without a password.
        #[arg(long)]
        sudo: bool,
    },
    /// Make a VM (powered off) a template: read-only, the source of clones.
    Template { name: String },
    /// Add, remove, change and list a VM's NICs.
    #[command(subcommand)]
    Nic(crate::provision::VmNicCmd),
    /// Wait until the VM's IPv4 address is known (through its guest agent) and print it.
    Ip {
        name: String,
        /// Seconds to wait.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// The guest agent: what it tells, passwords and SSH keys.
    #[command(subcommand)]
    Guest(crate::provision::VmGuestCmd),
    /// Follow the serial console.
    Console {
        name: String,
        /// Lines of history to show first.
        #[arg(long, default_value_t = 50)]
        tail: u32,
        /// Print the history and exit instead of following.
        #[arg(long)]
        no_follow: bool,
    },
}

#[derive(Subcommand)]
pub enum VmDiskCmd {
    /// Attach a disk (hot-plugged on a running VM's virtio-scsi bus).
    Attach {
        vm: String,
        disk: String,
        #[arg(long)]
        controller: Option<String>,
        #[arg(long)]
        unit: Option<u32>,
        #[arg(long)]
        read_only: bool,
        /// Keep it pending until the next power-on where the bus cannot hot-plug.
        #[arg(long)]
        next_boot: bool,
    },
    Detach {
        vm: String,
        disk: String,
        #[arg(long)]
        next_boot: bool,
        /// Remove only this attachment (as `vm disk ls` shows it); refused if the disk was detached
        /// and attached again since.
        #[arg(long)]
        generation: Option<u64>,
    },
    Ls {
        vm: String,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot: the config version and a tag in every qcow2 disk.
    Create {
        vm: String,
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// Leave a disk out (a raw disk must be); repeat for several.
        #[arg(long)]
        exclude: Vec<String>,
        /// The running guest's memory too (its RAM and devices; the guest pauses while it is saved).
        #[arg(long)]
        memory: bool,
        /// Freeze the guest's file systems through its guest agent while the disks are snapshotted.
        #[arg(long)]
        quiesce: bool,
    },
    /// The snapshots, as a tree.
    Ls {
        vm: String,
    },
    Info {
        vm: String,
        snapshot: String,
    },
    /// Put the VM back: its config, its data, or both.
    Revert {
        vm: String,
        snapshot: String,
        #[arg(long, value_parser = ["config", "data", "both"], default_value = "both")]
        scope: String,
        /// Resume the guest from the snapshot's memory (scope both; a running VM is replaced).
        #[arg(long)]
        memory: bool,
        /// Revert the disks the VM still holds, leaving those another VM holds now.
        #[arg(long)]
        skip_moved: bool,
    },
    Rm {
        vm: String,
        snapshot: String,
    },
    /// Keep a snapshot until it is deleted by hand (a safety snapshot then never expires).
    Pin {
        vm: String,
        snapshot: String,
    },
    /// Let a safety snapshot expire again (the configured time after it was taken).
    Unpin {
        vm: String,
        snapshot: String,
    },
}

#[derive(Subcommand)]
pub enum LeaseCmd {
    /// Check the VM out; others' changes are refused until the lease ends.
    Acquire {
        name: String,
        #[arg(long, default_value_t = 600)]
        ttl: u32,
    },
    Renew {
        name: String,
        #[arg(long, default_value_t = 600)]
        ttl: u32,
    },
    Release {
        name: String,
    },
    /// Break someone else's lease (needs VirtualMachine.Lease.Break).
    Break {
        name: String,
    },
    Show {
        name: String,
    },
}

fn leases_file() -> anyhow::Result<std::path::PathBuf> {
    Ok(crate::creds::dir()?.join("leases.json"))
}

fn leases_load() -> BTreeMap<String, i64> {
    leases_file()
        .ok()
        .and_then(|f| std::fs::read(f).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn leases_save(m: &BTreeMap<String, i64>) -> anyhow::Result<()> {
    let f = leases_file()?;
    if let Some(d) = f.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(f, serde_json::to_vec_pretty(m)?)?;
    Ok(())
}

fn annotations_patch(items: &[String]) -> anyhow::Result<Value> {
    let mut m = serde_json::Map::new();
    for a in items {
        let Some((k, v)) = a.split_once('=') else { bail!("an annotation is key=value (or key= to remove it): {a}") };
        m.insert(k.to_owned(), if v.is_empty() { Value::Null } else { json!(v) });
    }
    Ok(Value::Object(m))
}

fn print_vm(out: &Out, v: &VmView) -> anyhow::Result<()> {
    if out.json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let c = &v.config;
    let r = &v.runtime;
    println!("name:        {}", v.name);
    println!("path:        {}", v.path);
    println!("id:          {}", v.id);
    println!("version:     {}", v.version);
    println!("power:       {}", r.power_state.as_str());
    if let Some(rv) = r.running_version {
        let pending =
            if rv < v.version { format!(" (changes pending: version {} is newer)", v.version) } else { String::new() };
        println!("running:     version {rv}{pending}");
    }
    if let Some(a) = &r.accel {
        println!("accel:       {a}");
    }
    println!("cpus:        {}", c.cpus);
    println!("memory:      {} MiB", c.memory_mib);
    println!(
        "machine:     {} / {}",
        json!(c.machine).as_str().unwrap_or("-"),
        json!(c.firmware).as_str().unwrap_or("-")
    );
    if r.simulated {
        println!("driver:      simulated (no QEMU process)");
    }
    if let Some(pid) = r.pid {
        println!("pid:         {pid}");
    }
    println!("pool:        {}", c.pool);
    if c.template {
        println!("template:    yes (read-only; clone it)");
    }
    for (i, n) in c.nics.iter().enumerate() {
        println!("nic{i}:        {} {:?} {}", n.network, n.model, n.mac.as_deref().unwrap_or("-"));
    }
    if let Some(g) = &r.guest {
        match (g.agent, g.ipv4()) {
            (true, Some(ip)) => println!("guest:       {ip} ({})", g.hostname.as_deref().unwrap_or("-")),
            (true, None) => println!("guest:       agent, no address yet"),
            (false, _) => println!("guest:       no guest agent"),
        }
    }
    for d in &c.disks {
        println!(
            "disk:        {} on {} unit {}{}",
            d.disk,
            d.controller,
            d.unit,
            if d.read_only { " (read-only)" } else { "" }
        );
    }
    if let Some(k) = &c.kernel {
        println!("kernel:      {k}");
    }
    for (k, val) in &c.annotations {
        println!("annotation:  {k}={val}");
    }
    match &v.lease {
        Some(l) => println!("lease:       held by {} until {}", l.holder, l.expires_at.format("%F %T UTC")),
        None => println!("lease:       none"),
    }
    Ok(())
}

/// Runs `$EDITOR` (or vi) on a file.
fn editor(path: &std::path::Path) -> anyhow::Result<()> {
    let ed = std::env::var("VISUAL").or_else(|_| std::env::var("EDITOR")).unwrap_or_else(|_| "vi".into());
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{ed} \"$1\""))
        .arg("sh")
        .arg(path)
        .status()
        .with_context(|| format!("could not run the editor {ed}"))?;
    if !status.success() {
        bail!("the editor {ed} failed; nothing was changed");
    }
    Ok(())
}

fn read_edited(path: &std::path::Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)?;
    let body: String = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    serde_json::from_str(&body).context("the edited config is not valid JSON; nothing was changed")
}

async fn edit(c: &Client, out: &Out, name: &str, message: Option<String>) -> anyhow::Result<()> {
    let vm = c.vm(name).await?;
    let mut base = serde_json::to_value(&vm.config)?;
    let mut version = vm.version;
    let mut doc = base.clone();
    let mut header = format!("# {} at version {version}. Lines starting with # are ignored.\n", vm.name);
    let file = tempfile::Builder::new().prefix("covm-edit-").suffix(".json").tempfile()?;
    loop {
        {
            let mut f = std::fs::File::create(file.path())?;
            f.write_all(header.as_bytes())?;
            f.write_all(serde_json::to_string_pretty(&doc)?.as_bytes())?;
            f.write_all(b"\n")?;
        }
        editor(file.path())?;
        let edited = read_edited(file.path())?;
        let patch = merge_diff(&base, &edited);
        if patch.as_object().is_some_and(|m| m.is_empty()) {
            out.message("no changes");
            return Ok(());
        }
        let opts = ChangeOptions {
            if_match: Some(version),
            lease: leases_load().get(name).copied(),
            message: message.clone(),
            ..Default::default()
        };
        match c.vm_change(name, &patch, &opts).await {
            Ok(v) => {
                out.message(&format!("{} is now at version {}", v.name, v.version));
                return Ok(());
            }
            Err(ClientError::Api { status: 412, error, .. }) => {
                let d = error.details.unwrap_or_default();
                let current = c.vm(name).await?;
                let summary: Vec<String> = serde_json::from_value(d["summary"].clone()).unwrap_or_default();
                eprintln!(
                    "covm: {} changed while you edited: version {} by {}:",
                    current.name,
                    current.version,
                    d["author"].as_str().unwrap_or("someone")
                );
                for s in &summary {
                    eprintln!("  {s}");
                }
                // Both: their version with my changes on top; edit again.
                base = serde_json::to_value(&current.config)?;
                version = current.version;
                doc = base.clone();
                json_patch::merge(&mut doc, &patch);
                header = format!(
                    "# {} changed while you edited: now version {version} by {}.\n# Their change:\n{}\n# Below: their version with your changes applied. Save to send it, or empty the file to give up.\n",
                    current.name,
                    d["author"].as_str().unwrap_or("someone"),
                    summary.iter().map(|s| format!("#   {s}")).collect::<Vec<_>>().join("\n")
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
}

pub async fn run(c: &Client, out: &Out, cmd: VmCmd) -> anyhow::Result<()> {
    match cmd {
        VmCmd::Create { name, cpus, memory, folder, pool, nets, kernel, initrd, cmdline, annotations, from_file } => {
            let mut cfg: Value = match from_file {
                Some(f) => serde_json::from_slice(&std::fs::read(&f)?)
                    .with_context(|| format!("{} is not JSON", f.display()))?,
                None => json!({}),
            };
            cfg["name"] = json!(name);
            let set = |cfg: &mut Value, k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    cfg[k] = v;
                }
            };
            set(&mut cfg, "cpus", cpus.map(|v| json!(v)));
            set(&mut cfg, "memory_mib", memory.map(|v| json!(v)));
            set(&mut cfg, "folder", folder.map(|v| json!(v)));
            set(&mut cfg, "pool", pool.map(|v| json!(v)));
            set(&mut cfg, "kernel", kernel.map(|v| json!(v)));
            set(&mut cfg, "initrd", initrd.map(|v| json!(v)));
            set(&mut cfg, "cmdline", cmdline.map(|v| json!(v)));
            if !nets.is_empty() {
                cfg["nics"] = json!(nets.iter().map(|n| json!({ "network": n })).collect::<Vec<_>>());
            }
            if !annotations.is_empty() {
                cfg["annotations"] = annotations_patch(&annotations)?;
            }
            print_vm(out, &c.vm_create(&cfg).await?)
        }
        VmCmd::Ls { folder, name, power_state } => {
            let power_state = match power_state {
                Some(p) => Some(
                    serde_json::from_value::<PowerState>(json!(p))
                        .map_err(|_| anyhow::anyhow!("unknown power state {p}"))?,
                ),
                None => None,
            };
            let mut q = VmListQuery { folder, name, power_state, after: None, limit: Some(1000) };
            let mut all = Vec::new();
            loop {
                let page = c.vms(&q).await?;
                all.extend(page.items);
                match page.next {
                    Some(n) => q.after = Some(n),
                    None => break,
                }
            }
            out.vms(&all)
        }
        VmCmd::Info { name } => {
            let v = c.vm(&name).await?;
            print_vm(out, &v)?;
            if let Some(rv) = v.runtime.running_version.filter(|rv| *rv < v.version && !out.json) {
                println!("pending (applied at the next power-on):");
                for line in c.vm_diff(&name, rv, v.version).await?.summary {
                    println!("  {line}");
                }
            }
            Ok(())
        }
        VmCmd::Rm { name } => {
            c.vm_delete(&name).await?;
            out.message(&format!("deleted {name}"));
            Ok(())
        }
        VmCmd::Change {
            name,
            cpus,
            memory,
            annotations,
            description,
            patch,
            message,
            next_boot,
            if_match,
            dry_run,
            snapshot,
        } => {
            let mut p: Value = match patch {
                Some(p) => serde_json::from_str(&p).context("--patch is not JSON")?,
                None => json!({}),
            };
            if let Some(v) = cpus {
                p["cpus"] = json!(v);
            }
            if let Some(v) = memory {
                p["memory_mib"] = json!(v);
            }
            if let Some(v) = description {
                p["description"] = json!(v);
            }
            if !annotations.is_empty() {
                p["annotations"] = annotations_patch(&annotations)?;
            }
            if p.as_object().is_some_and(|m| m.is_empty()) {
                bail!("nothing to change: give -c, -m, -e, --description or --patch");
            }
            let opts = ChangeOptions {
                if_match,
                lease: leases_load().get(&name).copied(),
                message,
                dry_run,
                next_boot,
                snapshot,
            };
            if dry_run {
                let plan = c.vm_change_plan(&name, &p, &opts).await?;
                if out.json {
                    println!("{}", serde_json::to_string_pretty(&plan)?);
                } else {
                    println!("from version {}:", plan["from_version"]);
                    for s in plan["summary"].as_array().into_iter().flatten() {
                        println!("  {}", s.as_str().unwrap_or_default());
                    }
                }
                return Ok(());
            }
            let before = c.vm(&name).await.map(|v| v.version).ok();
            let v = c.vm_change(&name, &p, &opts).await?;
            if out.json {
                return print_vm(out, &v);
            }
            match before {
                Some(b) if b == v.version => {
                    out.message(&format!("{} already so; still at version {}", v.name, v.version))
                }
                _ => out.message(&format!("{} is now at version {}", v.name, v.version)),
            }
            Ok(())
        }
        VmCmd::Edit { name, message } => edit(c, out, &name, message).await,
        VmCmd::History { name, limit } => {
            let page = c.vm_versions(&name, &VersionQuery { before: None, limit: Some(limit.clamp(1, 1000)) }).await?;
            out.versions(&page.items)
        }
        VmCmd::Diff { name, from, to } => {
            let d = c.vm_diff(&name, from, to).await?;
            if out.json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else if d.summary.is_empty() {
                println!("versions {from} and {to} are the same");
            } else {
                for s in &d.summary {
                    println!("{s}");
                }
            }
            Ok(())
        }
        VmCmd::Revert { name, version, message, before_version, scope } => {
            if let Some(n) = before_version {
                let scope = revert_scope(&scope);
                let v = c.vm_revert_before(&name, n, scope).await?;
                out.message(&format!(
                    "{} is back to before version {n} ({scope:?}); it is at version {}",
                    v.name, v.version
                ));
                return Ok(());
            }
            let version = version.unwrap_or_default();
            let v = c.vm_revert(&name, version, message.as_deref()).await?;
            out.message(&format!("{} is now at version {} (equal to version {version})", v.name, v.version));
            Ok(())
        }
        VmCmd::Lease(cmd) => lease(c, out, cmd).await,
        VmCmd::Snapshot(cmd) => snapshot(c, out, cmd).await,
        VmCmd::Power { name, action, timeout, no_wait } => {
            let action: PowerAction = serde_json::from_value(json!(action))?;
            let task = c.vm_power(&name, action, timeout).await?;
            if no_wait {
                if out.json {
                    println!("{}", serde_json::to_string_pretty(&task)?);
                } else {
                    println!("task {} started", task.id);
                }
                return Ok(());
            }
            let wait = std::time::Duration::from_secs(u64::from(timeout.unwrap_or(60)) + 600);
            // A bar on stderr for people (indicatif draws nothing when stderr is not a terminal).
            let bar = match out.json {
                true => indicatif::ProgressBar::hidden(),
                false => indicatif::ProgressBar::new(100),
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template("[{bar:20}] {pos:>3}% {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("#> "),
            );
            let t = c
                .task_wait(task.id, wait, |t| {
                    bar.set_position(t.progress.clamp(0, 100).unsigned_abs());
                    bar.set_message(format!("{:?}", t.state));
                })
                .await?;
            bar.finish_and_clear();
            match t.state {
                TaskState::Success => {
                    out.message(t.message.as_deref().unwrap_or("done"));
                    Ok(())
                }
                _ => {
                    let e: covm_client::ErrorDetail = serde_json::from_value(t.error.clone().unwrap_or_default())
                        .unwrap_or(covm_client::ErrorDetail {
                            code: covm_types::ErrorCode::TaskFailed,
                            message: t.message.clone().unwrap_or_default(),
                            field: None,
                            details: None,
                        });
                    Err(ClientError::Api { status: 409, error: e, retry_after_s: None }.into())
                }
            }
        }
        VmCmd::Disk(cmd) => match cmd {
            VmDiskCmd::Attach { vm, disk, controller, unit, read_only, next_boot } => {
                let p = covm_types::disk::DiskAttach { disk: disk.clone(), controller, unit, read_only, next_boot };
                let v = c.vm_disk_attach(&vm, &p).await?;
                out.message(&format!("{disk} is attached to {} (version {})", v.name, v.version));
                Ok(())
            }
            VmDiskCmd::Detach { vm, disk, next_boot, generation } => {
                let v = c.vm_disk_detach(&vm, &disk, &covm_types::disk::DetachQuery { next_boot, generation }).await?;
                out.message(&format!("{disk} is detached from {} (version {})", v.name, v.version));
                Ok(())
            }
            VmDiskCmd::Ls { vm } => {
                let v = c.vm(&vm).await?;
                if out.json {
                    println!("{}", serde_json::to_string_pretty(&v.config.disks)?);
                } else {
                    for d in &v.config.disks {
                        println!(
                            "{:<20} {}:{}  generation {}{}",
                            d.disk,
                            d.controller,
                            d.unit,
                            d.generation,
                            if d.read_only { "  read-only" } else { "" }
                        );
                    }
                }
                Ok(())
            }
        },
        VmCmd::Clone { source, name, full, folder, pool, hostname, user, ssh_keys, sudo } => {
            let v = crate::provision::clone(c, out, source, name, full, folder, pool, hostname, user, ssh_keys, sudo)
                .await?;
            print_vm(out, &v)
        }
        VmCmd::Template { name } => {
            let v = c.vm_template(&name).await?;
            out.message(&format!("{name} is a template (version {})", v.version));
            Ok(())
        }
        VmCmd::Nic(cmd) => crate::provision::nic(c, out, cmd).await,
        VmCmd::Ip { name, timeout } => crate::provision::ip(c, out, &name, timeout).await,
        VmCmd::Guest(cmd) => crate::provision::guest(c, out, cmd).await,
        VmCmd::Console { name, tail, no_follow } => {
            if no_follow {
                print!("{}", c.serial(&name, tail).await?);
                return Ok(());
            }
            let mut lines = c.serial_follow(&name, tail).await?;
            use futures::StreamExt;
            while let Some(l) = lines.next().await {
                println!("{}", l?);
            }
            Ok(())
        }
    }
}

/// `--scope` as clap checked it (`config`, `data` or `both`).
fn revert_scope(scope: &str) -> covm_types::snapshot::RevertScope {
    use covm_types::snapshot::RevertScope;
    match scope {
        "config" => RevertScope::Config,
        "data" => RevertScope::Data,
        _ => RevertScope::Both,
    }
}

async fn snapshot_pin(c: &Client, out: &Out, vm: &str, snapshot: &str, pinned: bool) -> anyhow::Result<()> {
    let p = covm_types::snapshot::SnapshotUpdate { pinned: Some(pinned), description: None };
    out.snapshot(&c.snapshot_update(vm, snapshot, &p).await?)
}

async fn snapshot(c: &Client, out: &Out, cmd: SnapshotCmd) -> anyhow::Result<()> {
    use covm_types::snapshot::{SnapshotCreate, SnapshotRevert};
    match cmd {
        SnapshotCmd::Create { vm, name, description, exclude, memory, quiesce } => {
            let name = covm_types::Name::parse(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
            let consistency = if quiesce {
                covm_types::snapshot::Consistency::Quiesced
            } else {
                covm_types::snapshot::Consistency::Crash
            };
            let s = c.snapshot_create(&vm, &SnapshotCreate { name, description, memory, exclude, consistency }).await?;
            out.snapshot(&s)
        }
        SnapshotCmd::Pin { vm, snapshot } => snapshot_pin(c, out, &vm, &snapshot, true).await,
        SnapshotCmd::Unpin { vm, snapshot } => snapshot_pin(c, out, &vm, &snapshot, false).await,
        SnapshotCmd::Ls { vm } => out.snapshots(&c.snapshots(&vm).await?),
        SnapshotCmd::Info { vm, snapshot } => out.snapshot(&c.snapshot(&vm, &snapshot).await?),
        SnapshotCmd::Revert { vm, snapshot, scope, memory, skip_moved } => {
            let scope = revert_scope(&scope);
            let v = c.snapshot_revert(&vm, &snapshot, &SnapshotRevert { scope, memory, skip_moved }).await?;
            out.message(&format!("{vm} is back to {snapshot} ({scope:?}); it is at version {}", v.version));
            Ok(())
        }
        SnapshotCmd::Rm { vm, snapshot } => {
            c.snapshot_delete(&vm, &snapshot).await?;
            out.message(&format!("removed snapshot {snapshot} of {vm}"));
            Ok(())
        }
    }
}

async fn lease(c: &Client, out: &Out, cmd: LeaseCmd) -> anyhow::Result<()> {
    let mut tokens = leases_load();
    match cmd {
        LeaseCmd::Acquire { name, ttl } => {
            let l = c.lease_acquire(&name, ttl).await?;
            if let Some(t) = l.token {
                tokens.insert(name.clone(), t);
                leases_save(&tokens)?;
            }
            out.lease(&name, Some(&l))
        }
        LeaseCmd::Renew { name, ttl } => {
            let l = c.lease_renew(&name, ttl, tokens.get(&name).copied()).await?;
            out.lease(&name, Some(&l))
        }
        LeaseCmd::Release { name } => {
            c.lease_release(&name, false).await?;
            tokens.remove(&name);
            leases_save(&tokens)?;
            out.message(&format!("released the lease on {name}"));
            Ok(())
        }
        LeaseCmd::Break { name } => {
            c.lease_release(&name, true).await?;
            out.message(&format!("broke the lease on {name}"));
            Ok(())
        }
        LeaseCmd::Show { name } => out.lease(&name, c.lease(&name).await?.as_ref()),
    }
}
