//! covm killed in the middle of a hot attach (at each step of the saga's own plan) and started again. `COVM_FAULT=disk.attach:STEP:AT:crash`
//! makes the `covm serve` process abort at that point (as `kill -9` would: no cleanup runs); the next
//! start finds the saga in its log and finishes or undoes it. Every point is tried in turn, against real
//! QEMU (a VM with firmware only: the block layer is what the steps touch), and each time the store and
//! QEMU must agree: the config holds the disk exactly when QEMU has its block node and device.
//! Set `COVM_SKIP_QEMU=1` to skip on a machine without QEMU.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use covm_client::Client;
use covm_server::app::saga::plan_of;
use covm_server::app::saga::plug::{AttachSaga, HotDisk, Plug};
use covm_types::Name;
use covm_types::disk::{DetachQuery, DiskAttach, DiskCreate};
use covm_types::vm::{ControllerType, DiskAttachment, PowerAction, TaskState, VmConfig, VmView};

const BIN: &str = env!("CARGO_BIN_EXE_covm");

struct Covm {
    child: Child,
    port: u16,
}

impl Covm {
    fn start(data: &Path, port: u16, fault: Option<&str>) -> Covm {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data.with_extension("log")).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--driver", "qemu", "--data-dir"])
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        match fault {
            Some(f) => cmd.env("COVM_FAULT", f),
            None => cmd.env_remove("COVM_FAULT"),
        };
        let mut child = cmd.spawn().expect("covm serve starts");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "covm serve exited at start; see {}",
                data.with_extension("log").display()
            );
            assert!(started.elapsed() < Duration::from_secs(60), "covm serve did not listen within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Covm { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn wait_dead(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "covm did not die at the fault");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Covm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the QEMUs this test started (a failing test must not leave them running).
struct QemuReaper(PathBuf);

impl Drop for QemuReaper {
    fn drop(&mut self) {
        let Ok(dirs) = std::fs::read_dir(self.0.join("vms")) else { return };
        for d in dirs.flatten() {
            if let Ok(pid) = std::fs::read_to_string(d.path().join("qemu.pid")) {
                let _ = Command::new("sh").args(["-c", &format!("kill -9 {} 2>/dev/null", pid.trim())]).status();
            }
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The config holds the disk, and QEMU's block node and device for it: (in config, node, device).
async fn agreement(c: &Client) -> (bool, bool, bool) {
    let vm: VmView = c.vm("b").await.unwrap();
    let block = c.vm_block_state("b").await.unwrap();
    let has_node = block.nodes.iter().any(|n| n.starts_with('d') && !n.ends_with("-file"));
    let has_device = !block.devices.is_empty();
    (!vm.config.disks.is_empty(), has_node, has_device)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covm_killed_at_each_step_of_a_hot_attach_recovers_to_agreement() {
    if std::env::var_os("COVM_SKIP_QEMU").is_some() {
        eprintln!("COVM_SKIP_QEMU is set: skipping a real-QEMU test");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _reaper = QemuReaper(data.clone());
    let port = free_port();
    let mut covm = Covm::start(&data, port, None);
    let password = std::fs::read_to_string(data.join("initial-admin-password")).unwrap();
    let (c, _) = Client::new(&covm.url()).login("admin", password.trim()).await.unwrap();
    c.vm_create(&VmConfig { memory_mib: 64, ..VmConfig::named("b").unwrap() }).await.unwrap();
    let t = c.vm_power("b", PowerAction::On, None).await.unwrap();
    assert_eq!(c.task_wait(t.id, Duration::from_secs(60), |_| {}).await.unwrap().state, TaskState::Success);
    c.disk_create(&DiskCreate::new(Name::parse("d1").unwrap(), "local", 64 << 20)).await.unwrap();
    let d1 = DiskAttach { disk: "d1".into(), ..Default::default() };

    // The steps of a hot attach, from the saga itself.
    let plan = plan_of(&AttachSaga {
        plug: Plug {
            vm: uuid::Uuid::nil(),
            vm_name: "b".into(),
            disk: uuid::Uuid::nil(),
            disk_name: "d1".into(),
            attachment: DiskAttachment {
                disk: "d1".into(),
                controller: "scsi0".into(),
                unit: 0,
                read_only: false,
                generation: 1,
            },
            hot: Some(HotDisk {
                node: "d1".into(),
                path: "d1.qcow2".into(),
                format: "qcow2".into(),
                bus: ControllerType::VirtioScsi,
                key: None,
                backing: None,
            }),
            next_boot: false,
            moved_from: None,
        },
    });
    assert!(plan.steps.len() > 1, "a hot attach has steps before its pivot: {plan:?}");
    for step in &plan.steps {
        for at in ["before", "after"] {
            let fault = format!("disk.attach:{step}:{at}:crash");
            drop(covm);
            covm = Covm::start(&data, port, Some(&fault));
            let r = c.vm_disk_attach("b", &d1).await;
            assert!(r.is_err(), "{fault}: the attach must not answer (covm died)");
            let status = covm.wait_dead();
            assert!(!status.success(), "{fault}: covm aborted ({status})");
            // The saga's log says where it stopped; the restart finishes or undoes it.
            drop(covm);
            covm = Covm::start(&data, port, None);
            let (in_config, node, device) = agreement(&c).await;
            assert_eq!((node, device), (in_config, in_config), "{fault}: QEMU and the store disagree");
            let pivot = plan.steps.iter().position(|s| *s == plan.pivot).unwrap_or(usize::MAX);
            let here = plan.steps.iter().position(|s| s == step).unwrap_or(0);
            let committed = here > pivot || (here == pivot && at == "after");
            assert_eq!(in_config, committed, "{fault}: finished only if the config version was written");
            // No lock is left: the disk can be detached (if attached) and attached again at once.
            let started = Instant::now();
            if in_config {
                c.vm_disk_detach("b", "d1", &DetachQuery::default()).await.unwrap();
            }
            c.vm_disk_attach("b", &d1).await.unwrap();
            assert_eq!(agreement(&c).await, (true, true, true), "{fault}: attach after recovery");
            c.vm_disk_detach("b", "d1", &DetachQuery::default()).await.unwrap();
            assert_eq!(agreement(&c).await, (false, false, false), "{fault}: detach after recovery");
            assert!(started.elapsed() < Duration::from_secs(20), "{fault}: something waited on a stale lock");
        }
    }
    let t = c.vm_power("b", PowerAction::Off, None).await.unwrap();
    c.task_wait(t.id, Duration::from_secs(60), |_| {}).await.unwrap();
}

/// Writes 4 KiB of `byte` at the start of a qcow2 image, or checks them (no VM runs it).
fn qemu_io(f: &Path, op: &str, byte: u8) -> bool {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("{op} -P {byte} 0 4096")])
        .arg(f)
        .output()
        .expect("qemu-io runs");
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed")
}

/// A VM with one 8 MiB disk at scsi0 unit 0: the disk's image file, and the VM.
async fn vm_with_disk(c: &Client, data: &Path, vm: &str, disk: &str) -> (PathBuf, covm_types::vm::VmView) {
    let d = c.disk_create(&DiskCreate::new(Name::parse(disk).unwrap(), "local", 8 << 20)).await.unwrap();
    let disks = vec![DiskAttachment {
        disk: disk.into(),
        controller: "scsi0".into(),
        unit: 0,
        read_only: false,
        generation: 0,
    }];
    let v = c.vm_create(&VmConfig { memory_mib: 64, disks, ..VmConfig::named(vm).unwrap() }).await.unwrap();
    (data.join("datastores/local").join(&d.file), v)
}

/// The snapshot tags inside an image, sorted.
fn tags_of(file: &Path) -> Vec<String> {
    let info = Command::new("qemu-img").args(["info", "--output=json", "-U"]).arg(file).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap_or_default();
    let mut tags: Vec<String> = info["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    tags.sort();
    tags
}

/// The tags a VM's recorded snapshots have, sorted.
async fn recorded_tags(c: &Client, vm: &str) -> Vec<String> {
    let mut tags: Vec<String> = c.snapshots(vm).await.unwrap().iter().map(|s| format!("covm-{}", s.id)).collect();
    tags.sort();
    tags
}

/// covm killed at each step of a snapshot, and of a data revert: the next start leaves no tag without
/// its record (and the reverse), no lock, and a revert either done or undone to the safety snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covm_killed_in_a_snapshot_or_a_revert_recovers_cleanly() {
    use covm_server::app::saga::snapshot::{SnapshotCreateSaga, SnapshotRevertSaga, Tagged};
    use covm_types::snapshot::{RevertScope, SnapshotCreate, SnapshotKind, SnapshotRevert, SnapshotView};
    if std::env::var_os("COVM_SKIP_QEMU").is_some() {
        eprintln!("COVM_SKIP_QEMU is set: skipping a real-QEMU test");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let mut covm = Covm::start(&data, port, None);
    let password = std::fs::read_to_string(data.join("initial-admin-password")).unwrap();
    let (c, _) = Client::new(&covm.url()).login("admin", password.trim()).await.unwrap();
    let (file, _) = vm_with_disk(&c, &data, "v", "s1").await;
    let snap = |n: &str| SnapshotCreate {
        name: Name::parse(n).unwrap(),
        description: None,
        memory: false,
        exclude: vec![],
        consistency: Default::default(),
    };

    // The steps, from the sagas themselves.
    let view = SnapshotView {
        id: uuid::Uuid::nil(),
        vm: "v".into(),
        name: "x".into(),
        description: None,
        kind: SnapshotKind::Manual,
        config_version: 1,
        protects_version: None,
        memory: false,
        consistency: Default::default(),
        frozen_filesystems: None,
        disks: vec![],
        excluded: vec![],
        parent: None,
        created_by: "admin".into(),
        created_at: chrono::Utc::now(),
        expires_at: None,
        pinned: false,
        partial: false,
    };
    let tagged = Tagged {
        vm_id: uuid::Uuid::nil(),
        view,
        files: vec![],
        live: false,
        via: None,
        disk: false,
        state: None,
        qemu_ms: None,
    };
    let create_plan = plan_of(&SnapshotCreateSaga(tagged.clone()));
    let revert_plan = plan_of(&SnapshotRevertSaga {
        to: tagged.clone(),
        safety_tags: vec![],
        data: true,
        config: None,
        safety: Some(tagged),
    });

    // The tags in the file are exactly those of the snapshots on record.
    let consistent = |c: Client, file: PathBuf| async move { (recorded_tags(&c, "v").await, tags_of(&file)) };
    for (i, step) in create_plan.steps.iter().enumerate() {
        for at in ["before", "after"] {
            let fault = format!("vm.snapshot.create:{step}:{at}:crash");
            drop(covm);
            covm = Covm::start(&data, port, Some(&fault));
            assert!(c.snapshot_create("v", &snap(&format!("c{i}{at}"))).await.is_err(), "{fault}: covm died");
            assert!(!covm.wait_dead().success(), "{fault}");
            drop(covm);
            covm = Covm::start(&data, port, None);
            let (recorded, tags) = consistent(c.clone(), file.clone()).await;
            assert_eq!(recorded, tags, "{fault}: tags and records agree");
            let pivot = create_plan.steps.iter().position(|s| *s == create_plan.pivot).unwrap();
            let committed = i > pivot || (i == pivot && at == "after");
            assert_eq!(c.snapshot("v", &format!("c{i}{at}")).await.is_ok(), committed, "{fault}");
            // No lock is left.
            let started = Instant::now();
            c.snapshot_create("v", &snap(&format!("ok{i}{at}"))).await.unwrap();
            assert!(started.elapsed() < Duration::from_secs(20), "{fault}: a stale lock");
        }
    }
    // A data revert killed at each step: done or undone, never half.
    assert!(qemu_io(&file, "write", 0x41));
    c.snapshot_create("v", &snap("base")).await.unwrap();
    for step in &revert_plan.steps {
        for at in ["before", "after"] {
            assert!(qemu_io(&file, "write", 0x42));
            let fault = format!("vm.snapshot.revert:{step}:{at}:crash");
            drop(covm);
            covm = Covm::start(&data, port, Some(&fault));
            let p = SnapshotRevert { scope: RevertScope::Data, memory: false, skip_moved: false };
            assert!(c.snapshot_revert("v", "base", &p).await.is_err(), "{fault}: covm died");
            assert!(!covm.wait_dead().success(), "{fault}");
            drop(covm);
            covm = Covm::start(&data, port, None);
            let (recorded, tags) = consistent(c.clone(), file.clone()).await;
            assert_eq!(recorded, tags, "{fault}: tags and records agree");
            // Interrupted at its one step, a data revert is put back to the present it kept.
            assert!(qemu_io(&file, "read", 0x42), "{fault}: the data is the present's");
            c.snapshot_revert("v", "base", &p).await.unwrap();
            assert!(qemu_io(&file, "read", 0x41), "{fault}: a revert after recovery works");
        }
    }

    // A memory snapshot of a running VM (which outlives covm and is adopted) killed at each step: the
    // tags in its disk and in its hidden state image are exactly those of the snapshots on record.
    let (file2, vr) = vm_with_disk(&c, &data, "vr", "s2").await;
    let task = c.vm_power("vr", covm_types::vm::PowerAction::On, None).await.unwrap();
    c.task_done(task.id, Duration::from_secs(60)).await.unwrap();
    let state = data.join("vms").join(vr.id.to_string()).join("vmstate.qcow2");
    let memory = |n: &str| SnapshotCreate { memory: true, ..snap(n) };
    for (i, step) in create_plan.steps.iter().enumerate() {
        for at in ["before", "after"] {
            let fault = format!("vm.snapshot.create:{step}:{at}:crash");
            drop(covm);
            covm = Covm::start(&data, port, Some(&fault));
            assert!(c.snapshot_create("vr", &memory(&format!("m{i}{at}"))).await.is_err(), "{fault}: covm died");
            assert!(!covm.wait_dead().success(), "{fault}");
            drop(covm);
            covm = Covm::start(&data, port, None);
            let recorded = recorded_tags(&c, "vr").await;
            assert_eq!(tags_of(&file2), recorded, "{fault}: the disk's tags and the records agree");
            assert_eq!(tags_of(&state), recorded, "{fault}: the state image's tags and the records agree");
            assert_eq!(c.vm("vr").await.unwrap().runtime.power_state, covm_types::vm::PowerState::Running);
        }
    }
    let task = c.vm_power("vr", covm_types::vm::PowerAction::Off, None).await.unwrap();
    c.task_done(task.id, Duration::from_secs(60)).await.unwrap();
}
