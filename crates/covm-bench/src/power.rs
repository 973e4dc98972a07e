//! `power-on`: how long from the API request to the guest's `COVM-GUEST-READY` on its serial console,
//! beside the floor — the same QEMU command line (covm's own builder) started directly, resumed over
//! QMP, and watched the same way. Also the server's resident memory with many VMs running.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use covm_client::Client;
use covm_hv::{Hypervisor, KvmFacts, VmSpec, accel_choose};
use covm_types::vm::{PowerAction, TaskState};
use serde_json::json;

use crate::server::Server;
use crate::{Percentiles, Report};

#[derive(Debug, Clone, serde::Serialize)]
pub struct PowerParams {
    pub runs: usize,
    /// How many VMs to keep running while measuring the server's memory.
    pub idle_vms: usize,
    pub memory_mib: u64,
}

/// Waits until `file` holds `count` lines with the marker; returns how long that took from `t0`.
pub async fn ready(file: &Path, count: usize, t0: Instant) -> anyhow::Result<Duration> {
    loop {
        let n =
            std::fs::read(file).map(|b| String::from_utf8_lossy(&b).matches("COVM-GUEST-READY").count()).unwrap_or(0);
        if n >= count {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("no COVM-GUEST-READY in {} after 120 s", file.display());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn config(name: &str, memory: u64) -> serde_json::Value {
    json!({
        "name": name, "memory_mib": memory, "kernel": "local:guest/vmlinuz", "initrd": "local:guest/initrd.img",
        "cmdline": "console=ttyS0 quiet panic=-1"
    })
}

async fn power(c: &Client, vm: &str, action: PowerAction) -> anyhow::Result<()> {
    let t = c.vm_power(vm, action, None).await?;
    let t = c.task_wait(t.id, Duration::from_secs(120), |_| {}).await?;
    if t.state != TaskState::Success {
        bail!("power {action:?} of {vm} failed: {:?}", t.message);
    }
    Ok(())
}

/// A local covm on real QEMU with the test guest in its `local` datastore (`local:guest/vmlinuz`,
/// `local:guest/initrd.img`): the server, its data dir and the guest's directory.
pub async fn with_guest(covm: &Path, guest: &Path) -> anyhow::Result<(Server, PathBuf, PathBuf)> {
    let server = Server::start(covm, "qemu").await?;
    let data = server.data_dir.clone().context("a local server")?;
    let ds = data.join("datastores/local/guest");
    std::fs::create_dir_all(&ds)?;
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(guest.join(f), ds.join(f))
            .with_context(|| format!("{} (build it with scripts/build-test-guest)", guest.join(f).display()))?;
    }
    Ok((server, data, ds))
}

pub async fn power_on(covm: &Path, guest: &Path, p: &PowerParams) -> anyhow::Result<Report> {
    let (server, data, ds) = with_guest(covm, guest).await?;
    let c = &server.admin;
    let driver = covm_hv::qemu::QemuDriver::default();
    let floor_dir = tempfile::tempdir()?;
    let (mut covm_ms, mut floor_ms) = (Vec::new(), Vec::new());
    let vm = c.vm_create(&config("bench-power", p.memory_mib)).await?;
    let serial = data.join("vms").join(vm.id.to_string()).join("serial.log");
    for i in 0..p.runs {
        // Alternate which goes first, so that neither gains from a warmer cache.
        for first in [i % 2 == 0, i % 2 != 0] {
            if first {
                // covm: the API request to READY.
                let t0 = Instant::now();
                c.vm_power("bench-power", PowerAction::On, None).await?;
                covm_ms.push(ready(&serial, covm_ms.len() + 1, t0).await?.as_secs_f64() * 1000.0);
                power(c, "bench-power", PowerAction::Off).await?;
            } else {
                // The floor: the same command line (covm's builder), started directly.
                let mut spec = VmSpec {
                    id: uuid::Uuid::now_v7(),
                    name: "floor".into(),
                    version: 1,
                    config: serde_json::from_value(config("floor", p.memory_mib))?,
                    kernel: Some(ds.join("vmlinuz")),
                    initrd: Some(ds.join("initrd.img")),
                    cdrom: None,
                    disks: vec![],
                    nic_bridges: vec![],
                    seed: None,
                    run_dir: floor_dir.path().join(format!("run{i}")),
                    accel: accel_choose(covm_types::vm::Accel::Auto, KvmFacts::probe())?,
                    restore: None,
                };
                spec.config.nics.clear();
                let t0 = Instant::now();
                let mut h = driver.start(&spec).await?;
                floor_ms.push(ready(&spec.run_dir.join("serial.log"), 1, t0).await?.as_secs_f64() * 1000.0);
                h.quit().await?;
            }
        }
    }
    let accel = accel_choose(covm_types::vm::Accel::Auto, KvmFacts::probe())?.as_str();
    let covm = Percentiles::of(covm_ms);
    let floor = Percentiles::of(floor_ms);
    let overhead = covm.p50 - floor.p50;
    let budget = floor.p50 * 0.10 + 20.0;

    // Memory with many VMs running.
    let mut rss_idle_vms = None;
    if p.idle_vms > 0 {
        let rss_before = server.rss_mib();
        for i in 0..p.idle_vms {
            let name = format!("idle-{i}");
            let v = c.vm_create(&config(&name, p.memory_mib)).await?;
            power(c, &name, PowerAction::On).await?;
            ready(&data.join("vms").join(v.id.to_string()).join("serial.log"), 1, Instant::now()).await?;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        rss_idle_vms =
            Some(json!({ "vms": p.idle_vms, "server_rss_mib": server.rss_mib(), "server_rss_mib_before": rss_before }));
        for i in 0..p.idle_vms {
            power(c, &format!("idle-{i}"), PowerAction::Off).await?;
        }
    }
    Ok(Report {
        scenario: "power-on".into(),
        params: serde_json::to_value(p)?,
        figures: json!({
            "accel": accel,
            "covm_api_to_ready_ms": covm,
            "floor_qemu_to_ready_ms": floor,
            "overhead_p50_ms": (overhead * 10.0).round() / 10.0,
            "overhead_budget_ms": (budget * 10.0).round() / 10.0,
            "within_budget": overhead <= budget,
            "idle": rss_idle_vms,
        }),
        violations: 0,
        violation_details: vec![],
    })
}
