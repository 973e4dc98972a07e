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

pub async fn snapshots(server: &Server, p: &SnapshotParams) -> anyhow::Result<Report> {
    let c = &server.admin;
    let data = server.data_dir.clone().context("the snapshots scenario needs a covm it starts (no --url)")?;
    let disk = c.disk_create(&crate::disk_spec("snap-disk", p.disk_mib << 20)).await?;
    let file = data.join("datastores/local").join(&disk.file);
    // Data in the image: the snapshot's cost grows with what is allocated.
    if p.fill_mib > 0 {
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -P 0x5a 0 {}M", p.fill_mib)])
            .arg(&file))?;
    }
    let attach = DiskAttachment {
        disk: "snap-disk".into(),
        controller: "scsi0".into(),
        unit: 0,
        read_only: false,
        generation: 0,
    };
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
