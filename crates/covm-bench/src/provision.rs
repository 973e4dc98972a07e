//! `provision` (issue 17): a linked clone of a template against a full clone (the API call, to the new
//! VM), and the time from power-on to the clone's address — the guest's DHCP answer (its serial line
//! `COVM-GUEST-IP`) and the address known to covm through the guest agent (`GET /vms/{vm}/guest`).
//! Real QEMU and the test guest (TCG here), a template with one qcow2 disk holding `fill_mib` of data.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use covm_types::vm::{CloudInit, PowerAction, VmClone, VmConfig};

use crate::{Percentiles, Report};

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProvisionParams {
    pub runs: usize,
    pub disk_mib: u64,
    pub fill_mib: u64,
}

fn clone_req(name: &str, linked: bool) -> anyhow::Result<VmClone> {
    Ok(VmClone {
        name: covm_types::Name::parse(name)?,
        linked: Some(linked),
        folder: None,
        pool: None,
        customize: None,
        description: None,
    })
}

async fn serial_has(file: &Path, needle: &str, t0: Instant) -> anyhow::Result<Duration> {
    loop {
        if std::fs::read(file).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle)) {
            return Ok(t0.elapsed());
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(120), "no {needle} in {} after 120 s", file.display());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn provision(covm: &Path, guest: &Path, p: &ProvisionParams) -> anyhow::Result<Report> {
    let (server, data, _) = crate::power::with_guest(covm, guest).await?;
    let c = &server.admin;
    let (_, attach) = crate::snapshots::disk_with_data(c, &data, "tpl-root", p.disk_mib, p.fill_mib).await?;
    let nic = serde_json::from_value(serde_json::json!({ "network": "user" }))?;
    let cfg = VmConfig {
        memory_mib: 128,
        kernel: Some("local:guest/vmlinuz".into()),
        initrd: Some("local:guest/initrd.img".into()),
        cmdline: Some("console=ttyS0 quiet panic=-1".into()),
        disks: vec![attach],
        nics: vec![nic],
        cloud_init: Some(CloudInit::default()),
        ..VmConfig::named("tpl")?
    };
    c.vm_create(&cfg).await?;
    c.vm_template("tpl").await?;
    let (mut linked, mut full, mut dhcp, mut agent) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..p.runs {
        let t = Instant::now();
        c.vm_clone("tpl", &clone_req(&format!("full-{run}"), false)?).await?;
        full.push(t.elapsed().as_secs_f64() * 1000.0);
        let name = format!("linked-{run}");
        let t = Instant::now();
        let vm = c.vm_clone("tpl", &clone_req(&name, true)?).await?;
        linked.push(t.elapsed().as_secs_f64() * 1000.0);

        let serial = data.join("vms").join(vm.id.to_string()).join("serial.log");
        let t0 = Instant::now();
        let task = c.vm_power(&name, PowerAction::On, None).await?;
        c.task_done(task.id, Duration::from_secs(120)).await?;
        dhcp.push(serial_has(&serial, "COVM-GUEST-IP eth0=", t0).await?.as_secs_f64());
        loop {
            if c.vm_guest(&name).await.ok().and_then(|g| g.ipv4()).is_some() {
                agent.push(t0.elapsed().as_secs_f64());
                break;
            }
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(120), "the agent of {name} told no address");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let task = c.vm_power(&name, PowerAction::Off, None).await?;
        c.task_done(task.id, Duration::from_secs(60)).await?;
        for (v, d) in [(name.clone(), format!("{name}-1")), (format!("full-{run}"), format!("full-{run}-1"))] {
            c.vm_delete(&v).await.with_context(|| format!("deleting {v}"))?;
            c.disk_delete(&d).await.with_context(|| format!("deleting {d}"))?;
        }
    }
    let l = Percentiles::of(linked);
    let f = Percentiles::of(full);
    let ratio = (f.p50 / l.p50 * 10.0).round() / 10.0;
    Ok(Report {
        scenario: "provision".into(),
        params: serde_json::to_value(p)?,
        figures: serde_json::json!({
            "linked_clone_ms": l,
            "full_clone_ms": f,
            "full_over_linked_p50": ratio,
            "power_on_to_dhcp_address_s": Percentiles::of(dhcp),
            "power_on_to_address_through_agent_s": Percentiles::of(agent),
        }),
        violations: 0,
        violation_details: vec![],
    })
}
