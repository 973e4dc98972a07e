//! `disk-ops`: what covm adds to disk work, each beside its floor (real QEMU, the test guest).
//! - hot attach: the API request to the guest printing the new disk (`COVM-BLOCKS …=<bytes>`), against
//!   the same QMP commands (`blockdev-add` ×2 + `device_add`) sent by hand to a VM started from the
//!   same command line, watched the same way;
//! - hot detach: the API request to its answer (the guest let go, `DEVICE_DELETED`, `blockdev-del`, the
//!   config version written), against `device_del`, waiting for `DEVICE_DELETED`, then `blockdev-del`;
//! - disk create: the API request to its answer (checks, saga log, `qemu-img create`, record), against
//!   `qemu-img create` alone.
//!
//! Runs alternate which goes first, so that neither gains from a warmer cache.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use covm_hv::{DiskSpec, HvEvent, Hypervisor, KvmFacts, VmSpec, accel_choose};
use covm_types::vm::{ControllerType, PowerAction, TaskState};
use serde_json::{Value, json};

use crate::power::with_guest;
use crate::{Percentiles, Report};

#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskParams {
    pub runs: usize,
    pub disk_mib: u64,
}

fn config(name: &str) -> Value {
    json!({
        "name": name, "memory_mib": 128, "kernel": "local:guest/vmlinuz", "initrd": "local:guest/initrd.img",
        "cmdline": "console=ttyS0 quiet panic=-1"
    })
}

/// Waits until the serial log, past `from` bytes, has a `COVM-BLOCKS` line for which `want` holds.
async fn blocks_line(file: &Path, from: usize, want: impl Fn(&str) -> bool, t0: Instant) -> anyhow::Result<Duration> {
    loop {
        let text = std::fs::read(file).unwrap_or_default();
        let tail = String::from_utf8_lossy(text.get(from..).unwrap_or_default()).into_owned();
        if tail.lines().any(|l| l.contains("COVM-BLOCKS") && want(l)) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the guest did not report the disk in {} within 60 s", file.display());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn len(file: &Path) -> usize {
    std::fs::metadata(file).map(|m| m.len() as usize).unwrap_or(0)
}

async fn ready(file: &Path) -> anyhow::Result<()> {
    blocks_line(file, 0, |_| true, Instant::now()).await.map(|_| ())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn disk_ops(covm: &Path, guest: &Path, p: &DiskParams) -> anyhow::Result<Report> {
    let (server, data, ds) = with_guest(covm, guest).await?;
    let c = &server.admin;
    let bytes = p.disk_mib << 20;
    let size_tag = format!("={bytes}");

    // covm's VM, running, and one disk to attach and detach.
    let vm = c.vm_create(&config("bench-disk")).await?;
    let t = c.vm_power("bench-disk", PowerAction::On, None).await?;
    if c.task_wait(t.id, Duration::from_secs(120), |_| {}).await?.state != TaskState::Success {
        bail!("bench-disk did not start");
    }
    let serial = data.join("vms").join(vm.id.to_string()).join("serial.log");
    ready(&serial).await?;
    c.disk_create(&crate::disk_spec("hot", bytes)).await?;

    // The floor's VM: the same command line, started directly, and an image of the same size.
    let driver = covm_hv::qemu::QemuDriver::default();
    let floor_dir = tempfile::tempdir()?;
    let mut spec = VmSpec {
        id: uuid::Uuid::now_v7(),
        name: "floor".into(),
        version: 1,
        config: serde_json::from_value(config("floor"))?,
        kernel: Some(ds.join("vmlinuz")),
        initrd: Some(ds.join("initrd.img")),
        cdrom: None,
        disks: vec![],
        nic_bridges: vec![],
        seed: None,
        run_dir: floor_dir.path().join("run"),
        accel: accel_choose(covm_types::vm::Accel::Auto, KvmFacts::probe())?,
        restore: None,
    };
    spec.config.nics.clear();
    let mut h = driver.start(&spec).await?;
    let floor_serial = spec.run_dir.join("serial.log");
    ready(&floor_serial).await?;
    let floor_img = floor_dir.path().join("floor.qcow2");
    covm_hv::img::create(&floor_img, "qcow2", bytes, None).await?;
    let floor_disk = DiskSpec {
        node: "dfloor".into(),
        path: floor_img,
        format: "qcow2".into(),
        controller: "scsi0".into(),
        bus: ControllerType::VirtioScsi,
        unit: 0,
        read_only: false,
        key: None,
        backing: None,
    };

    let (mut attach, mut attach_floor, mut detach, mut detach_floor) = (vec![], vec![], vec![], vec![]);
    let (mut create, mut create_floor) = (vec![], vec![]);
    for i in 0..p.runs {
        for covm_first in [i % 2 == 0, i % 2 != 0] {
            if covm_first {
                let from = len(&serial);
                let t0 = Instant::now();
                c.vm_disk_attach(
                    "bench-disk",
                    &covm_types::disk::DiskAttach {
                        disk: "hot".into(),
                        controller: None,
                        unit: None,
                        read_only: false,
                        next_boot: false,
                    },
                )
                .await?;
                attach.push(ms(blocks_line(&serial, from, |l| l.contains(&size_tag), t0).await?));
                let t0 = Instant::now();
                c.vm_disk_detach("bench-disk", "hot", &Default::default()).await?;
                detach.push(ms(t0.elapsed()));
                // Let the guest settle before the next round.
                blocks_line(&serial, from, |l| !l.contains(&size_tag), Instant::now()).await?;

                let t0 = Instant::now();
                c.disk_create(&crate::disk_spec(&format!("new-{i}"), bytes)).await?;
                create.push(ms(t0.elapsed()));
            } else {
                let from = len(&floor_serial);
                let t0 = Instant::now();
                h.blockdev_add(&floor_disk).await?;
                h.device_add(&floor_disk).await?;
                attach_floor.push(ms(blocks_line(&floor_serial, from, |l| l.contains(&size_tag), t0).await?));
                let t0 = Instant::now();
                h.device_del("dfloor").await?;
                loop {
                    match tokio::time::timeout(Duration::from_secs(30), h.next_event()).await {
                        Ok(HvEvent::DeviceDeleted(d)) if d == "dfloor" => break,
                        Ok(HvEvent::Exited { .. }) | Err(_) => bail!("the floor VM did not release its disk"),
                        Ok(_) => {}
                    }
                }
                h.blockdev_del("dfloor").await?;
                detach_floor.push(ms(t0.elapsed()));
                blocks_line(&floor_serial, from, |l| !l.contains(&size_tag), Instant::now()).await?;

                let f = floor_dir.path().join(format!("create-{i}.qcow2"));
                let t0 = Instant::now();
                covm_hv::img::create(&f, "qcow2", bytes, None).await?;
                create_floor.push(ms(t0.elapsed()));
            }
        }
    }
    h.quit().await?;
    let t = c.vm_power("bench-disk", PowerAction::Off, None).await?;
    c.task_wait(t.id, Duration::from_secs(60), |_| {}).await?;
    let pair = |covm: Vec<f64>, floor: Vec<f64>| {
        let (covm, floor) = (Percentiles::of(covm), Percentiles::of(floor));
        json!({ "covm_ms": covm, "floor_ms": floor, "overhead_p50_ms": ((covm.p50 - floor.p50) * 10.0).round() / 10.0 })
    };
    Ok(Report {
        scenario: "disk-ops".into(),
        params: serde_json::to_value(p)?,
        figures: json!({
            "accel": spec.accel.as_str(),
            "hot_attach_to_guest": pair(attach, attach_floor),
            "hot_detach": pair(detach, detach_floor),
            "create": pair(create, create_floor),
        }),
        violations: 0,
        violation_details: vec![],
    })
}
