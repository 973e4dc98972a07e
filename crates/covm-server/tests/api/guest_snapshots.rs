//! Snapshots as the guest sees them (real QEMU and the test guest, typed into its serial console): a
//! marker written by the guest comes back with a data revert, a counter the guest writes to two disks
//! stays consistent across a live snapshot, and a memory revert resumes the same processes.

use std::time::{Duration, Instant};

use covm_client::Client;
use covm_types::snapshot::{RevertScope, SnapshotCreate, SnapshotRevert};
use covm_types::vm::{PowerAction, PowerState, TaskState, VmChange};

use crate::common::{TestServer, attachment, name, new_disk, task_done};
use crate::qemu::{guest_vm, qemu_server, serial_wait, skip, state_wait};

/// The guest's shell, through its serial socket. The connection stays open (QEMU reads the socket only
/// as fast as the guest's UART takes bytes, and drops what is unread when the client goes) and what
/// comes back is drained (unread, it fills the socket and stalls the guest's console; the test reads
/// the console's log instead).
pub struct Tty {
    sock: std::path::PathBuf,
    stream: Option<tokio::net::unix::OwnedWriteHalf>,
}

impl Tty {
    pub async fn open(s: &TestServer, c: &Client, vm: &str) -> Tty {
        let sock = s.dir.path().join("vms").join(c.vm(vm).await.unwrap().id.to_string()).join("serial.sock");
        // The shell is there once it has said hello.
        serial_wait(c, vm, "Enter 'help'", 1).await;
        Tty { sock, stream: None }
    }

    /// Connects again (a new QEMU process has a new socket).
    pub fn reconnect(&mut self) {
        self.stream = None;
    }

    pub async fn line(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;
        let started = Instant::now();
        loop {
            if self.stream.is_none()
                && let Ok(st) = tokio::net::UnixStream::connect(&self.sock).await
            {
                let (mut r, w) = st.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
                });
                self.stream = Some(w);
            }
            if let Some(st) = &mut self.stream
                && st.write_all(format!("{line}\n").as_bytes()).await.is_ok()
            {
                return;
            }
            self.stream = None;
            assert!(started.elapsed() < Duration::from_secs(10), "the serial socket does not take a client");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a command in the guest and returns what it printed after `TAG-` (a fresh tag each time).
    pub async fn ask(&mut self, c: &Client, vm: &str, tag: &str, command: &str) -> String {
        // The tag is split in the typed line (`T""AG-`), so only the output has it whole.
        let (a, b) = tag.split_at(1);
        self.line(&format!("echo {a}\"\"{b}-$( {command} )-END")).await;
        let line = serial_wait(c, vm, &format!("{tag}-"), 1).await;
        let rest = line.split(&format!("{tag}-")).nth(1).unwrap_or_default();
        // No answer has a `-` in it; the line may be cut short of `-END` by other console output
        // (seen once under load after a memory revert: `MARKA-EN`).
        rest.split('-').next().unwrap_or_default().trim().to_owned()
    }
}

// The disks by SCSI target (0: gs-a, 1: gs-b): their sdX names can change from one boot to the next.
const A: &str = "/dev/$(ls /sys/bus/scsi/devices/*:0:0:0/block)";
const B: &str = "/dev/$(ls /sys/bus/scsi/devices/*:0:1:0/block)";

fn counter(dev: &str) -> String {
    format!("dd if={dev} bs=16 count=1 2>/dev/null | tr -dc 0-9")
}

fn marker() -> String {
    format!("dd if={A} bs=512 skip=2048 count=1 2>/dev/null | tr -dc A-Z")
}

fn write_marker(m: &str) -> String {
    format!("echo {m} | dd of={A} bs=512 seek=2048 count=1 conv=sync,fsync 2>/dev/null")
}

#[tokio::test]
async fn the_guest_sees_its_disks_and_its_memory_come_back() {
    if skip() {
        return;
    }
    let s = qemu_server().await;
    let c = &s.admin;
    guest_vm(c, "gs").await;
    for d in ["gs-a", "gs-b"] {
        c.disk_create(&new_disk(d, 16 << 20)).await.unwrap();
    }
    let disks = VmChange {
        disks: Some(vec![attachment("gs-a", "scsi0", 0), attachment("gs-b", "scsi0", 1)]),
        ..Default::default()
    };
    c.vm_change("gs", &disks, &Default::default()).await.unwrap();
    let t = task_done(c, &c.vm_power("gs", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    serial_wait(c, "gs", "COVM-GUEST-READY", 1).await;
    let mut tty = Tty::open(&s, c, "gs").await;

    // Marker A at 1 MiB of the first disk; a process to recognise; a loop writing a counter to both
    // disks (the first, then the second, each flushed), running on through the snapshots.
    tty.line(&write_marker("MARKA")).await;
    assert_eq!(tty.ask(c, "gs", "M1", &marker()).await, "MARKA");
    let sleeper = tty.ask(c, "gs", "P1", "sleep 100000 </dev/null >/dev/null 2>&1 & echo $!").await;
    assert!(sleeper.parse::<u32>().is_ok(), "a pid: {sleeper:?}");
    let looper = tty.ask(
        c,
        "gs",
        "P2",
        &format!("a={A}; b={B}; (i=0; while true; do i=$((i+1)); for d in $a $b; do printf '%015d\\n' $i | dd of=$d bs=16 count=1 conv=fsync 2>/dev/null; done; done) </dev/null >/dev/null 2>&1 & echo $!"),
    )
    .await;
    assert!(looper.parse::<u32>().is_ok(), "a pid: {looper:?}");
    // The loop is under way.
    let started = Instant::now();
    while tty
        .ask(c, "gs", &format!("C{}", started.elapsed().as_millis()), &counter(A))
        .await
        .parse::<u64>()
        .unwrap_or(0)
        < 3
    {
        assert!(started.elapsed() < Duration::from_secs(60), "the guest's counter loop does not run");
    }

    // A live snapshot of both disks (one QMP transaction) and a memory snapshot, the loop running.
    let disk_only = c
        .snapshot_create(
            "gs",
            &SnapshotCreate {
                name: name("both-disks"),
                description: None,
                memory: false,
                exclude: vec![],
                consistency: Default::default(),
            },
        )
        .await
        .unwrap();
    assert_eq!(disk_only.disks.len(), 2);
    let mem = c
        .snapshot_create(
            "gs",
            &SnapshotCreate {
                name: name("with-memory"),
                description: None,
                memory: true,
                exclude: vec![],
                consistency: Default::default(),
            },
        )
        .await
        .unwrap();
    assert!(mem.memory);
    assert_eq!(c.vm("gs").await.unwrap().runtime.power_state, PowerState::Running, "running on after snapshot-save");

    // Afterwards: the loop and the process end, marker B replaces A.
    tty.line(&format!("kill {looper} {sleeper}")).await;
    tty.line(&write_marker("MARKB")).await;
    assert_eq!(tty.ask(c, "gs", "M2", &marker()).await, "MARKB");
    assert_eq!(
        tty.ask(c, "gs", "K1", &format!("kill -0 {sleeper} 2>/dev/null && echo alive || echo gone")).await,
        "gone"
    );

    // Memory revert: the running VM goes back to the moment of the snapshot, the same processes in it
    // (no new boot), marker A on its disk.
    let boots = c.serial("gs", 10_000).await.unwrap().matches("COVM-GUEST-READY").count();
    let pid = c.vm("gs").await.unwrap().runtime.pid;
    let back = SnapshotRevert { scope: RevertScope::Both, memory: true, skip_moved: false };
    let v = c.snapshot_revert("gs", "with-memory", &back).await.unwrap();
    assert_eq!(v.runtime.power_state, PowerState::Running);
    tty.reconnect();
    assert_ne!(v.runtime.pid, pid, "a new QEMU process, loaded from the snapshot");
    assert_eq!(
        tty.ask(c, "gs", "K2", &format!("kill -0 {sleeper} 2>/dev/null && echo alive || echo gone")).await,
        "alive"
    );
    assert_eq!(tty.ask(c, "gs", "M3", &marker()).await, "MARKA");
    assert_eq!(c.serial("gs", 10_000).await.unwrap().matches("COVM-GUEST-READY").count(), boots, "no new boot");
    // The memory revert took a safety snapshot of the present first.
    assert!(c.snapshots("gs").await.unwrap().iter().any(|x| x.name.starts_with("before-revert")));

    // Data revert to the disk-only snapshot (the VM off): after a boot, both counters are from one
    // instant (they differ by at most the one write between the two disks), and marker A is there.
    task_done(c, &c.vm_power("gs", PowerAction::Off, None).await.unwrap()).await;
    state_wait(c, "gs", PowerState::Off).await;
    let data = SnapshotRevert { scope: RevertScope::Data, memory: false, skip_moved: false };
    c.snapshot_revert("gs", "both-disks", &data).await.unwrap();
    task_done(c, &c.vm_power("gs", PowerAction::On, None).await.unwrap()).await;
    serial_wait(c, "gs", "COVM-GUEST-READY", boots + 1).await;
    serial_wait(c, "gs", "Enter 'help'", boots + 1).await;
    tty.reconnect();
    let a: u64 = tty.ask(c, "gs", "CA", &counter(A)).await.parse().unwrap();
    let b: u64 = tty.ask(c, "gs", "CB", &counter(B)).await.parse().unwrap();
    eprintln!("counters after the data revert: gs-a {a}, gs-b {b}");
    assert!(a >= 3 && (a == b || a == b + 1), "the counters {a} (gs-a) and {b} (gs-b) are not from one instant");
    assert_eq!(tty.ask(c, "gs", "M4", &marker()).await, "MARKA");
    task_done(c, &c.vm_power("gs", PowerAction::Off, None).await.unwrap()).await;
    state_wait(c, "gs", PowerState::Off).await;

    // "Put it back to how it was before version N": a change made with ?snapshot=true (two vCPUs),
    // the guest writes marker D; reverted before that version, the guest boots with one vCPU again
    // and reads marker A.
    let two = VmChange { cpus: Some(2), ..Default::default() };
    let opts = covm_client::ChangeOptions { snapshot: true, ..Default::default() };
    let n = c.vm_change("gs", &two, &opts).await.unwrap().version;
    task_done(c, &c.vm_power("gs", PowerAction::On, None).await.unwrap()).await;
    assert!(serial_wait(c, "gs", "COVM-GUEST-READY", boots + 2).await.contains("cpus=2"));
    serial_wait(c, "gs", "Enter 'help'", boots + 2).await;
    tty.reconnect();
    tty.line(&write_marker("MARKD")).await;
    assert_eq!(tty.ask(c, "gs", "M5", &marker()).await, "MARKD");
    task_done(c, &c.vm_power("gs", PowerAction::Off, None).await.unwrap()).await;
    state_wait(c, "gs", PowerState::Off).await;
    let v = c.vm_revert_before("gs", n, RevertScope::Both).await.unwrap();
    assert_eq!(v.config.cpus, 1);
    task_done(c, &c.vm_power("gs", PowerAction::On, None).await.unwrap()).await;
    assert!(serial_wait(c, "gs", "COVM-GUEST-READY", boots + 3).await.contains("cpus=1"));
    serial_wait(c, "gs", "Enter 'help'", boots + 3).await;
    tty.reconnect();
    assert_eq!(tty.ask(c, "gs", "M6", &marker()).await, "MARKA");
    task_done(c, &c.vm_power("gs", PowerAction::Off, None).await.unwrap()).await;
    let verify = c.audit_verify().await.unwrap();
    assert!(verify.ok, "{verify:?}");
}
