//! `encrypted-io`: what LUKS costs the guest (issue 16). One VM of the test guest with two disks of the
//! same size on the same datastore, one plain qcow2 and one encrypted (LUKS in qcow2, AES-256-XTS);
//! the guest writes and reads each with busybox `dd` (`oflag=direct`/`iflag=direct`, 1 MiB blocks)
//! and prints what `dd` measured. Runs alternate which disk goes first.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use covm_types::vm::{PowerAction, TaskState};
use serde_json::json;

use crate::power::with_guest;
use crate::{Percentiles, Report};

#[derive(Debug, Clone, serde::Serialize)]
pub struct IoParams {
    pub runs: usize,
    pub mib: u64,
}

/// Sends a line to the guest's shell and waits for the line that starts with `tag` in its console log.
async fn ask(sock: &Path, log: &Path, tag: &str, command: &str) -> anyhow::Result<String> {
    use tokio::io::AsyncWriteExt;
    let from = std::fs::metadata(log).map(|m| m.len() as usize).unwrap_or(0);
    let (a, b) = tag.split_at(1);
    let mut s = tokio::net::UnixStream::connect(sock).await.context("the guest's serial socket")?;
    s.write_all(format!("echo {a}\"\"{b} $( {command} )\n").as_bytes()).await?;
    let t0 = Instant::now();
    loop {
        let text = std::fs::read(log).unwrap_or_default();
        let tail = String::from_utf8_lossy(text.get(from..).unwrap_or_default()).into_owned();
        if let Some(l) = tail.lines().find(|l| l.starts_with(tag)) {
            return Ok(l[tag.len()..].trim().to_owned());
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the guest did not answer {tag}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// MiB/s from the guest's uptime before and after (`/proc/uptime`, 10 ms steps; this busybox's dd
/// prints no time of its own).
fn mib_per_s(times: &str, mib: u64) -> anyhow::Result<f64> {
    let t: Vec<f64> = times.split_whitespace().filter_map(|n| n.parse().ok()).collect();
    let [a, b] = t[..] else { bail!("no times in {times:?}") };
    Ok((mib as f64 / (b - a).max(0.01) * 10.0).round() / 10.0)
}

pub async fn encrypted_io(covm: &Path, guest: &Path, p: &IoParams) -> anyhow::Result<Report> {
    let (server, data, _) = with_guest(covm, guest).await?;
    let c = &server.admin;
    let bytes = p.mib << 20;
    c.disk_create(&crate::disk_spec("io-plain", bytes + (16 << 20))).await?;
    let luks = covm_types::disk::DiskCreate {
        encryption: Some(covm_types::disk::DiskEncryption::Luks),
        ..crate::disk_spec("io-luks", bytes + (16 << 20))
    };
    c.disk_create(&luks).await?;
    let vm = c
        .vm_create(&serde_json::from_value::<covm_types::vm::VmConfig>(json!({
            "name": "bench-io", "memory_mib": 128, "kernel": "local:guest/vmlinuz", "initrd": "local:guest/initrd.img",
            "cmdline": "console=ttyS0 quiet panic=-1",
            "disks": [
                { "disk": "io-plain", "controller": "scsi0", "unit": 0 },
                { "disk": "io-luks", "controller": "scsi0", "unit": 1 },
            ],
        }))?)
        .await?;
    let t = c.vm_power("bench-io", PowerAction::On, None).await?;
    if c.task_wait(t.id, Duration::from_secs(120), |_| {}).await?.state != TaskState::Success {
        bail!("bench-io did not start");
    }
    let run = data.join("vms").join(vm.id.to_string());
    let (sock, log) = (run.join("serial.sock"), run.join("serial.log"));
    crate::power::ready(&log, 1, Instant::now()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dev = |unit: u32| format!("/dev/$(ls /sys/bus/scsi/devices/*:0:{unit}:0/block)");
    let mut figures: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut n = 0;
    for i in 0..p.runs {
        let order = if i % 2 == 0 { [(0, "plain"), (1, "luks")] } else { [(1, "luks"), (0, "plain")] };
        for (unit, kind) in order {
            for (op, cmd) in [
                (
                    "write",
                    format!("dd if=/dev/zero of={} bs=1M count={} oflag=direct 2>&1 | tail -1", dev(unit), p.mib),
                ),
                ("read", format!("dd if={} of=/dev/null bs=1M count={} iflag=direct 2>&1 | tail -1", dev(unit), p.mib)),
            ] {
                n += 1;
                let up = "cut -d' ' -f1 /proc/uptime";
                let timed = format!("a=$({up}); {cmd} >/dev/null 2>&1; b=$({up}); echo $a $b");
                let out = ask(&sock, &log, &format!("IO{n}"), &timed).await?;
                let key = match (kind, op) {
                    ("plain", "write") => "plain_write_mib_s",
                    ("plain", _) => "plain_read_mib_s",
                    (_, "write") => "luks_write_mib_s",
                    _ => "luks_read_mib_s",
                };
                figures.entry(key).or_default().push(mib_per_s(&out, p.mib)?);
            }
        }
    }
    let t = c.vm_power("bench-io", PowerAction::Off, None).await?;
    c.task_wait(t.id, Duration::from_secs(120), |_| {}).await?;
    let p50 = |k: &str| Percentiles::of(figures.get(k).cloned().unwrap_or_default()).p50;
    let ratio = |a: &str, b: &str| ((p50(a) / p50(b)) * 1000.0).round() / 1000.0;
    let mut out = serde_json::Map::new();
    for (k, v) in &figures {
        out.insert((*k).into(), json!(Percentiles::of(v.clone())));
    }
    out.insert("luks_over_plain_write".into(), json!(ratio("luks_write_mib_s", "plain_write_mib_s")));
    out.insert("luks_over_plain_read".into(), json!(ratio("luks_read_mib_s", "plain_read_mib_s")));
    Ok(Report {
        scenario: "encrypted-io".into(),
        params: serde_json::to_value(p)?,
        figures: serde_json::Value::Object(out),
        violations: 0,
        violation_details: vec![],
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn uptimes_are_read() {
        assert_eq!(super::mib_per_s("100.50 102.50", 64).unwrap(), 32.0);
        assert!(super::mib_per_s("dd: error", 64).is_err());
    }
}
