//! `snapshots`: what covm adds to a VM snapshot of a VM that is off, beside the floor (`qemu-img
//! snapshot` on a copy of the same image): create, a data revert (which first takes a safety snapshot
//! of the present) and delete, for a disk of `--disk-mib` with `--fill-mib` of it written.
//!
//! Runs alternate which goes first, so that neither gains from a warmer cache.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use covm_types::snapshot::{RevertScope, SnapshotCreate, SnapshotRevert};
use covm_types::vm::{DiskAttachment, VmConfig};

use crate::server::Server;
use crate::{Percentiles, Report};

#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotParams {
    pub runs: usize,
    pub disk_mib: u64,
    pub fill_mib: u64,
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().context("run a QEMU tool")?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn qemu_img_ms(args: &[&str], file: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    run(Command::new("qemu-img").args(args).arg(file))?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// A qcow2 disk of `disk_mib` with `fill_mib` of it written (a snapshot's cost grows with what is
/// allocated): its image file, and its attachment at scsi0 unit 0.
pub(crate) async fn disk_with_data(
    c: &covm_client::Client,
    data: &Path,
    name: &str,
    disk_mib: u64,
    fill_mib: u64,
) -> anyhow::Result<(std::path::PathBuf, DiskAttachment)> {
    let disk = c.disk_create(&crate::disk_spec(name, disk_mib << 20)).await?;
    let file = data.join("datastores/local").join(&disk.file);
    if fill_mib > 0 {
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c", &format!("write -P 0x5a 0 {fill_mib}M")]).arg(&file))?;
    }
    let attach =
        DiskAttachment { disk: name.into(), controller: "scsi0".into(), unit: 0, read_only: false, generation: 0 };
    Ok((file, attach))
}

pub async fn snapshots(server: &Server, p: &SnapshotParams) -> anyhow::Result<Report> {
    let c = &server.admin;
    let data = server.data_dir.clone().context("the snapshots scenario needs a covm it starts (no --url)")?;
    let (file, attach) = disk_with_data(c, &data, "snap-disk", p.disk_mib, p.fill_mib).await?;
    let cfg = VmConfig { memory_mib: 64, disks: vec![attach], ..VmConfig::named("snap-vm")? };
    c.vm_create(&cfg).await?;
    let floor_file = data.join("floor.qcow2");
    std::fs::copy(&file, &floor_file)?;

    let (mut create, mut revert, mut delete) = (Vec::new(), Vec::new(), Vec::new());
    let (mut f_create, mut f_apply, mut f_delete) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..p.runs {
        let covm_first = i % 2 == 0;
        for covm in [covm_first, !covm_first] {
            if covm {
                let name = format!("s{i}");
                let t = Instant::now();
                let s = c
                    .snapshot_create(
                        "snap-vm",
                        &SnapshotCreate {
                            name: covm_types::Name::parse(&name)?,
                            description: None,
                            memory: false,
                            exclude: vec![],
                            consistency: Default::default(),
                        },
                    )
                    .await?;
                create.push(t.elapsed().as_secs_f64() * 1000.0);
                let t = Instant::now();
                let r = SnapshotRevert { scope: RevertScope::Data, memory: false, skip_moved: false };
                c.snapshot_revert("snap-vm", &name, &r).await?;
                revert.push(t.elapsed().as_secs_f64() * 1000.0);
                let t = Instant::now();
                c.snapshot_delete("snap-vm", &s.id.to_string()).await?;
                delete.push(t.elapsed().as_secs_f64() * 1000.0);
                // The revert's safety snapshot goes too (not timed), so that every run starts alike.
                for x in c.snapshots("snap-vm").await? {
                    c.snapshot_delete("snap-vm", &x.id.to_string()).await?;
                }
            } else {
                let tag = format!("floor-{i}");
                f_create.push(qemu_img_ms(&["snapshot", "-q", "-c", &tag], &floor_file)?);
                f_apply.push(qemu_img_ms(&["snapshot", "-q", "-a", &tag], &floor_file)?);
                f_delete.push(qemu_img_ms(&["snapshot", "-q", "-d", &tag], &floor_file)?);
            }
        }
    }
    let figures = serde_json::json!({
        "covm_create_ms": Percentiles::of(create),
        "covm_revert_data_ms": Percentiles::of(revert),
        "covm_delete_ms": Percentiles::of(delete),
        "floor_create_ms": Percentiles::of(f_create),
        "floor_apply_ms": Percentiles::of(f_apply),
        "floor_delete_ms": Percentiles::of(f_delete),
    });
    Ok(Report {
        scenario: "snapshots".into(),
        params: serde_json::to_value(p)?,
        figures,
        violations: 0,
        violation_details: vec![],
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveParams {
    pub runs: usize,
    pub disk_mib: u64,
    pub fill_mib: u64,
    pub memory_mib: u64,
}

/// `snapshots-live`: snapshots of a running VM (real QEMU, the test guest booted): a disk-only
/// snapshot (one QMP `transaction`), a memory snapshot (`snapshot-save`) and their deletes, end to end
/// through the API, beside the part QEMU itself takes (`qemu_ms` of the `vm.snapshot.created` event):
/// the guest's I/O waits at most that long for a disk-only one, and is paused that long for one with
/// memory. Then a memory revert (QEMU restarted from the snapshot), timed until the API answers.
pub async fn snapshots_live(covm: &Path, guest: &Path, p: &LiveParams) -> anyhow::Result<Report> {
    let (server, data, _) = crate::power::with_guest(covm, guest).await?;
    let c = &server.admin;
    let (_, attach) = disk_with_data(c, &data, "live-disk", p.disk_mib, p.fill_mib).await?;
    let cfg = VmConfig {
        memory_mib: p.memory_mib,
        kernel: Some("local:guest/vmlinuz".into()),
        initrd: Some("local:guest/initrd.img".into()),
        cmdline: Some("console=ttyS0 quiet panic=-1".into()),
        disks: vec![attach],
        ..VmConfig::named("live-vm")?
    };
    let vm = c.vm_create(&cfg).await?;
    let t0 = Instant::now();
    let task = c.vm_power("live-vm", covm_types::vm::PowerAction::On, None).await?;
    c.task_done(task.id, std::time::Duration::from_secs(120)).await?;
    let serial = data.join("vms").join(vm.id.to_string()).join("serial.log");
    crate::power::ready(&serial, 1, t0).await?;

    let qemu_ms = |id: uuid::Uuid| async move {
        let q = covm_types::api::EventQuery { limit: Some(1000), object: Some(vm.id), ..Default::default() };
        let events = c.events(&q).await?.items;
        let e = events
            .iter()
            .rev()
            .find(|e| e.kind == "vm.snapshot.created" && e.data["snapshot"] == serde_json::json!(id))
            .context("the snapshot's event")?;
        e.data["qemu_ms"].as_f64().context("qemu_ms in the snapshot's event")
    };
    let create = |name: String, memory: bool| async move {
        let p = SnapshotCreate {
            name: covm_types::Name::parse(&name)?,
            description: None,
            memory,
            exclude: vec![],
            consistency: Default::default(),
        };
        let t = Instant::now();
        let s = c.snapshot_create("live-vm", &p).await?;
        anyhow::Ok((s, t.elapsed().as_secs_f64() * 1000.0))
    };
    let (mut disk_create, mut disk_qemu, mut disk_delete) = (Vec::new(), Vec::new(), Vec::new());
    let (mut mem_create, mut mem_qemu, mut mem_delete) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..p.runs {
        for memory in [false, true] {
            let (s, ms) = create(format!("{}{i}", if memory { "m" } else { "d" }), memory).await?;
            let q = qemu_ms(s.id).await?;
            let t = Instant::now();
            c.snapshot_delete("live-vm", &s.id.to_string()).await?;
            let del = t.elapsed().as_secs_f64() * 1000.0;
            let (cr, qm, de) = if memory {
                (&mut mem_create, &mut mem_qemu, &mut mem_delete)
            } else {
                (&mut disk_create, &mut disk_qemu, &mut disk_delete)
            };
            cr.push(ms);
            qm.push(q);
            de.push(del);
        }
    }
    // A memory revert: QEMU stopped, config and disk back, QEMU started paused, snapshot-load, run.
    let mut revert = Vec::new();
    let (target, _) = create("target".into(), true).await?;
    for _ in 0..p.runs.min(3) {
        let t = Instant::now();
        let r = SnapshotRevert { scope: RevertScope::Both, memory: true, skip_moved: false };
        c.snapshot_revert("live-vm", &target.id.to_string(), &r).await?;
        revert.push(t.elapsed().as_secs_f64() * 1000.0);
        // Its safety snapshot goes (not timed).
        for x in c.snapshots("live-vm").await? {
            if x.kind == covm_types::snapshot::SnapshotKind::Safety {
                c.snapshot_delete("live-vm", &x.id.to_string()).await?;
            }
        }
    }
    let state = data.join("vms").join(vm.id.to_string()).join("vmstate.qcow2");
    let state_bytes = std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0);
    let task = c.vm_power("live-vm", covm_types::vm::PowerAction::Off, None).await?;
    c.task_done(task.id, std::time::Duration::from_secs(60)).await?;
    let figures = serde_json::json!({
        "disk_only_create_ms": Percentiles::of(disk_create),
        "disk_only_qemu_transaction_ms": Percentiles::of(disk_qemu),
        "disk_only_delete_ms": Percentiles::of(disk_delete),
        "memory_create_ms": Percentiles::of(mem_create),
        "memory_snapshot_save_ms (guest paused)": Percentiles::of(mem_qemu),
        "memory_delete_ms": Percentiles::of(mem_delete),
        "memory_revert_ms": Percentiles::of(revert),
        "state_image_bytes_after": state_bytes,
    });
    Ok(Report {
        scenario: "snapshots-live".into(),
        params: serde_json::to_value(p)?,
        figures,
        violations: 0,
        violation_details: vec![],
    })
}
