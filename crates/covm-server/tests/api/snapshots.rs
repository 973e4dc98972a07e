//! VM snapshots of a VM that is off: the tags in its disks' files, the data and the config reverted
//! together or apart, the safety snapshot every revert takes, and the refusals.

use std::path::PathBuf;
use std::process::Command;

use covm_client::ChangeOptions;
use covm_client::ClientError;
use covm_types::ErrorCode;
use covm_types::disk::{DiskFormat, DiskView};
use covm_types::snapshot::{RevertScope, SnapshotCreate, SnapshotKind, SnapshotRevert};
use covm_types::vm::{PowerAction, VmChange, VmConfig};

use crate::common::{TestServer, attachment, name, new_disk, task_done, vm_named};

fn file(s: &TestServer, d: &DiskView) -> PathBuf {
    s.dir.path().join("datastores/local").join(&d.file)
}

/// Writes 4 KiB of `byte` at the start of a qcow2 image (no VM runs it).
fn write(f: &PathBuf, byte: u8) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("write -P {byte} 0 4096")])
        .arg(f)
        .output()
        .expect("qemu-io runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Whether the first 4 KiB of the image are all `byte`.
fn holds(f: &PathBuf, byte: u8) -> bool {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("read -P {byte} 0 4096")])
        .arg(f)
        .output()
        .expect("qemu-io runs");
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed")
}

fn create(n: &str) -> SnapshotCreate {
    SnapshotCreate { name: name(n), description: None, memory: false, exclude: vec![], consistency: Default::default() }
}

fn revert(scope: RevertScope) -> SnapshotRevert {
    SnapshotRevert { scope, memory: false, skip_moved: false }
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, ErrorCode) {
    match r {
        Err(ClientError::Api { status, error, .. }) => (status, error.code),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn config_and_data_come_back_together_or_apart_and_every_revert_keeps_the_present() {
    let s = TestServer::start().await;
    let c = &s.admin;
    let d1 = c.disk_create(&new_disk("d1", 8 << 20)).await.unwrap();
    let d2 = c.disk_create(&new_disk("d2", 8 << 20)).await.unwrap();
    c.disk_create(&covm_types::disk::DiskCreate { format: DiskFormat::Raw, ..new_disk("r", 1 << 20) }).await.unwrap();
    let disks = vec![attachment("d1", "scsi0", 0), attachment("d2", "scsi0", 1), attachment("r", "scsi0", 2)];
    c.vm_create(&VmConfig { memory_mib: 64, disks, ..vm_named("a") }).await.unwrap();
    let (f1, f2) = (file(&s, &d1), file(&s, &d2));
    write(&f1, 0x41);
    write(&f2, 0x41);

    // A raw disk cannot hold a snapshot: it must be excluded; a VM that is off has no memory to keep.
    assert_eq!(code(c.snapshot_create("a", &create("s1")).await), (409, ErrorCode::SnapshotUnsupported));
    let no_memory = SnapshotCreate { memory: true, exclude: vec!["r".into()], ..create("s1") };
    assert_eq!(code(c.snapshot_create("a", &no_memory).await), (409, ErrorCode::VmNotRunning));
    assert_eq!(
        code(c.snapshot_create("a", &SnapshotCreate { exclude: vec!["nope".into()], ..create("s1") }).await).0,
        400
    );
    let v1 = c.vm("a").await.unwrap().version;
    let s1 = c.snapshot_create("a", &SnapshotCreate { exclude: vec!["r".into()], ..create("s1") }).await.unwrap();
    assert_eq!((s1.kind, s1.config_version, s1.memory), (SnapshotKind::Manual, v1, false));
    assert_eq!(s1.disks.iter().map(|d| d.disk.as_str()).collect::<Vec<_>>(), ["d1", "d2"]);
    assert_eq!((s1.excluded[0].disk.as_str(), s1.excluded[0].reason.as_str()), ("r", "excluded"));
    for f in [&f1, &f2] {
        assert_eq!(covm_hv::img::snapshot_tags(f).await.unwrap(), [format!("covm-{}", s1.id)]);
    }
    assert_eq!(
        code(c.snapshot_create("a", &SnapshotCreate { exclude: vec!["r".into()], ..create("s1") }).await),
        (409, ErrorCode::AlreadyExists)
    );

    // The present moves on: new data, a new config.
    write(&f1, 0x42);
    write(&f2, 0x42);
    let two = VmChange { cpus: Some(2), ..Default::default() };
    c.vm_change("a", &two, &ChangeOptions::default()).await.unwrap();

    // Data only: the disks go back, the config stays.
    let vm = c.snapshot_revert("a", "s1", &revert(RevertScope::Data)).await.unwrap();
    assert!(holds(&f1, 0x41) && holds(&f2, 0x41), "the data is the snapshot's");
    assert_eq!(vm.config.cpus, 2, "a data revert keeps the config");
    let safety: Vec<_> =
        c.snapshots("a").await.unwrap().into_iter().filter(|x| x.kind == SnapshotKind::Safety).collect();
    assert_eq!(safety.len(), 1, "a revert first keeps the present");
    assert!(safety[0].expires_at.is_some());
    assert_eq!(safety[0].parent, Some(s1.id), "the tree: the present came from s1");

    // Config only: a new version equal to the snapshot's; the data stays.
    write(&f1, 0x43);
    let before = c.vm("a").await.unwrap().version;
    let vm = c.snapshot_revert("a", "s1", &revert(RevertScope::Config)).await.unwrap();
    assert_eq!((vm.config.cpus, vm.version), (1, before + 1));
    assert!(holds(&f1, 0x43), "a config revert keeps the data");

    // Both; and the safety snapshot of the first revert brings the present of then back (B).
    c.vm_change("a", &two, &ChangeOptions::default()).await.unwrap();
    let vm = c.snapshot_revert("a", "s1", &revert(RevertScope::Both)).await.unwrap();
    assert!(holds(&f1, 0x41) && holds(&f2, 0x41));
    assert_eq!(vm.config.cpus, 1);
    let vm = c.snapshot_revert("a", &safety[0].name, &revert(RevertScope::Both)).await.unwrap();
    assert!(holds(&f1, 0x42) && holds(&f2, 0x42), "the safety snapshot held the data of then");
    assert_eq!(vm.config.cpus, 2, "and the config of then");

    // Deleting a snapshot removes its tags; it is gone.
    c.snapshot_delete("a", "s1").await.unwrap();
    assert_eq!(code(c.snapshot("a", "s1").await), (404, ErrorCode::NotFound));
    for f in [&f1, &f2] {
        let tags = covm_hv::img::snapshot_tags(f).await.unwrap();
        assert!(!tags.contains(&format!("covm-{}", s1.id)), "{tags:?}");
    }
    assert!(c.audit_verify().await.unwrap().ok);
}

async fn live_snapshots(s: &TestServer) {
    let c = &s.admin;
    let d1 = c.disk_create(&new_disk("l1", 8 << 20)).await.unwrap();
    let d2 = c.disk_create(&new_disk("l2", 8 << 20)).await.unwrap();
    c.disk_create(&new_disk("l3", 8 << 20)).await.unwrap();
    let ro = covm_types::vm::DiskAttachment { read_only: true, ..attachment("l3", "scsi0", 2) };
    let disks = vec![attachment("l1", "scsi0", 0), attachment("l2", "scsi0", 1), ro];
    c.vm_create(&VmConfig { memory_mib: 64, disks, ..vm_named("b") }).await.unwrap();
    let (f1, f2) = (file(s, &d1), file(s, &d2));
    write(&f1, 0x41);
    write(&f2, 0x41);
    let t = task_done(c, &c.vm_power("b", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, covm_types::vm::TaskState::Success, "{t:?}");
    // Taken through the running VM, in both disks at once.
    let snap = c.snapshot_create("b", &create("live")).await.unwrap();
    let tag = format!("covm-{}", snap.id);
    // A disk attached read-only is left out (its QEMU holds it read-only; the VM cannot change it).
    assert_eq!(
        snap.excluded,
        [covm_types::snapshot::SnapshotExcluded { disk: "l3".into(), reason: "read_only".into() }]
    );
    for f in [&f1, &f2] {
        assert_eq!(covm_hv::img::snapshot_tags(f).await.unwrap(), std::slice::from_ref(&tag), "{}", f.display());
    }
    // The data goes back only with the VM off; a config revert is a change like any other.
    assert_eq!(code(c.snapshot_revert("b", "live", &revert(RevertScope::Data)).await), (409, ErrorCode::VmRunning));
    c.snapshot_revert("b", &snap.id.to_string(), &revert(RevertScope::Config)).await.unwrap();
    assert_eq!(c.snapshots("b").await.unwrap().len(), 1, "a config revert keeps the present in the config's history");
    // Memory: only with scope both, only from a snapshot that holds it, never with a disk the VM
    // writes to left out.
    let with_memory = |scope| SnapshotRevert { memory: true, ..revert(scope) };
    assert_eq!(code(c.snapshot_revert("b", "live", &with_memory(RevertScope::Data)).await).0, 400);
    assert_eq!(
        code(c.snapshot_revert("b", "live", &with_memory(RevertScope::Both)).await),
        (409, ErrorCode::SnapshotUnsupported)
    );
    let partial = SnapshotCreate { memory: true, exclude: vec!["l2".into()], ..create("m") };
    assert_eq!(code(c.snapshot_create("b", &partial).await), (409, ErrorCode::SnapshotUnsupported));
    // A memory snapshot: the tag in both disks and in the VM's hidden state image; deleted from all.
    let m = c.snapshot_create("b", &SnapshotCreate { memory: true, ..create("m") }).await.unwrap();
    let state = s.dir.path().join("vms").join(c.vm("b").await.unwrap().id.to_string()).join("vmstate.qcow2");
    let mtag = format!("covm-{}", m.id);
    for f in [&f1, &f2, &state] {
        assert!(covm_hv::img::snapshot_tags(f).await.unwrap().contains(&mtag), "{}", f.display());
    }
    // A memory revert that its rules refuse leaves the running VM running: l2, which m covers, is
    // another VM's now.
    c.vm_create(&VmConfig { memory_mib: 64, ..vm_named("b2") }).await.unwrap();
    let to = |vm: &str| covm_types::disk::DiskMove { to_vm: vm.into(), ..Default::default() };
    c.disk_move("l2", &to("b2")).await.unwrap();
    let back = SnapshotRevert { memory: true, ..revert(RevertScope::Both) };
    assert_eq!(code(c.snapshot_revert("b", "m", &back).await), (409, ErrorCode::DiskInUse));
    assert_eq!(c.vm("b").await.unwrap().runtime.power_state, covm_types::vm::PowerState::Running);
    c.disk_move("l2", &to("b")).await.unwrap();
    c.snapshot_delete("b", "m").await.unwrap();
    for f in [&f1, &f2, &state] {
        assert!(!covm_hv::img::snapshot_tags(f).await.unwrap().contains(&mtag), "{}", f.display());
    }
    // Deleted through the QEMU that holds the disks.
    let again = c.snapshot_create("b", &create("again")).await.unwrap();
    c.snapshot_delete("b", "again").await.unwrap();
    for f in [&f1, &f2] {
        let tags = covm_hv::img::snapshot_tags(f).await.unwrap();
        assert!(!tags.contains(&format!("covm-{}", again.id)), "{tags:?}");
    }
    // Off, the data the live snapshot held comes back.
    task_done(c, &c.vm_power("b", PowerAction::Off, None).await.unwrap()).await;
    write(&f1, 0x42);
    c.snapshot_revert("b", "live", &revert(RevertScope::Data)).await.unwrap();
    assert!(holds(&f1, 0x41) && holds(&f2, 0x41));
}

#[tokio::test]
async fn a_running_simulated_vm_is_snapshotted_live() {
    live_snapshots(&TestServer::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_qemu_takes_the_tags_in_one_transaction() {
    if crate::qemu::skip() {
        return;
    }
    live_snapshots(&TestServer::start_with(covm_server::Driver::Qemu).await).await;
}

/// "Put this VM back to how it was before version N": a risky change (a disk detached, the machine
/// type, firmware or boot order changed) first takes a safety snapshot that names the version it
/// protects; a harmless one does not; the policy and `?snapshot=true` say otherwise.
#[tokio::test]
async fn a_risky_change_is_protected_and_undone_by_the_version_it_made() {
    let s = TestServer::start().await;
    let c = &s.admin;
    let d = c.disk_create(&new_disk("sd", 8 << 20)).await.unwrap();
    c.disk_create(&new_disk("extra", 8 << 20)).await.unwrap();
    let disks = vec![attachment("sd", "scsi0", 0), attachment("extra", "scsi0", 1)];
    c.vm_create(&VmConfig { memory_mib: 64, disks, ..vm_named("v") }).await.unwrap();
    let f = file(&s, &d);
    write(&f, 0x41);
    let safety = |v: i64| async move {
        c.snapshots("v")
            .await
            .unwrap()
            .into_iter()
            .filter(|x| x.kind == SnapshotKind::Safety && x.protects_version == Some(v))
            .count()
    };
    let count = || async { c.snapshots("v").await.unwrap().len() };

    // Harmless: no snapshot.
    let v = c
        .vm_change("v", &VmChange { description: Some("web".into()), ..Default::default() }, &ChangeOptions::default())
        .await
        .unwrap();
    assert_eq!(count().await, 0, "a description change is not risky");
    // Risky: the machine type.
    let machine = VmChange { machine: Some(covm_types::vm::Machine::Pc), ..Default::default() };
    let risky = c.vm_change("v", &machine, &ChangeOptions::default()).await.unwrap();
    assert_eq!(safety(risky.version).await, 1, "the machine type change is protected");
    write(&f, 0x42);
    // Undone, config and data, by the version the change made.
    let back = c.vm_revert_before("v", risky.version, RevertScope::Both).await.unwrap();
    assert_eq!(back.config.machine, covm_types::vm::Machine::default());
    assert!(holds(&f, 0x41), "the data of before the change");
    assert_eq!(back.config.description, v.config.description);

    // A detach is risky.
    let before = c.vm("v").await.unwrap().version;
    let after = c.vm_disk_detach("v", "extra", &covm_types::disk::DetachQuery::default()).await.unwrap();
    assert_eq!(after.version, before + 1);
    assert_eq!(safety(after.version).await, 1, "the detach is protected");
    // Undone: the disk comes back as a new attachment (a generation of its own, as an attach gives);
    // the disk the VM kept keeps its generation.
    let gen_of = |cfg: &VmConfig, d: &str| cfg.disks.iter().find(|a| a.disk == d).map(|a| a.generation);
    let old = c.vm_version("v", before).await.unwrap().config.unwrap();
    let undone = c.vm_revert_before("v", after.version, RevertScope::Config).await.unwrap();
    assert_eq!(gen_of(&undone.config, "sd"), gen_of(&after.config, "sd"));
    assert!(gen_of(&undone.config, "extra").unwrap() > gen_of(&old, "extra").unwrap(), "a new attachment");
    c.vm_disk_detach("v", "extra", &covm_types::disk::DetachQuery::default()).await.unwrap();

    // Policy off: a risky change takes none, unless asked.
    let off = VmChange { safety_snapshots: Some(covm_types::vm::SafetyPolicy::Off), ..Default::default() };
    c.vm_change("v", &off, &ChangeOptions::default()).await.unwrap();
    let n = count().await;
    let firmware = VmChange { firmware: Some(covm_types::vm::Firmware::Uefi), ..Default::default() };
    let changed = c.vm_change("v", &firmware, &ChangeOptions::default()).await.unwrap();
    assert_eq!(count().await, n, "off means off");
    let boot = VmChange { boot: Some(vec![covm_types::vm::BootDevice::Cdrom]), ..Default::default() };
    let asked = c.vm_change("v", &boot, &ChangeOptions { snapshot: true, ..Default::default() }).await.unwrap();
    assert_eq!((asked.version, safety(asked.version).await), (changed.version + 1, 1), "asked for with ?snapshot=true");
    // Nothing protects a version no risky change made.
    assert_eq!(code(c.vm_revert_before("v", changed.version, RevertScope::Both).await), (404, ErrorCode::NotFound));
    assert!(c.audit_verify().await.unwrap().ok);
}

/// A disk covered by A's snapshot and then moved to B keeps its tag; A's snapshot says it is partial,
/// and A's data revert leaves B's disk alone: refused naming B, or done for the rest when told.
#[tokio::test]
async fn a_moved_disk_keeps_its_tag_and_is_not_reverted_under_another_vm() {
    let s = TestServer::start().await;
    let c = &s.admin;
    let keep = c.disk_create(&new_disk("keep", 8 << 20)).await.unwrap();
    let mv = c.disk_create(&new_disk("mv", 8 << 20)).await.unwrap();
    let disks = vec![attachment("keep", "scsi0", 0), attachment("mv", "scsi0", 1)];
    c.vm_create(&VmConfig { memory_mib: 64, disks, ..vm_named("a") }).await.unwrap();
    c.vm_create(&VmConfig { memory_mib: 64, ..vm_named("b") }).await.unwrap();
    let (fk, fm) = (file(&s, &keep), file(&s, &mv));
    write(&fk, 0x41);
    write(&fm, 0x41);
    let snap = c.snapshot_create("a", &create("s")).await.unwrap();
    c.disk_move("mv", &covm_types::disk::DiskMove { to_vm: "b".into(), ..Default::default() }).await.unwrap();
    assert!(c.snapshot("a", "s").await.unwrap().partial, "a covered disk is now b's");
    assert!(
        covm_hv::img::snapshot_tags(&fm).await.unwrap().contains(&format!("covm-{}", snap.id)),
        "the tag moved with it"
    );
    write(&fk, 0x42);
    write(&fm, 0x42);
    let r = c.snapshot_revert("a", "s", &revert(RevertScope::Data)).await;
    match r {
        Err(ClientError::Api { status: 409, error, .. }) => {
            assert_eq!(error.code, ErrorCode::DiskInUse);
            assert!(error.message.contains("mv is now attached to b"), "{}", error.message);
        }
        other => panic!("expected 409 disk_in_use, got {other:?}"),
    }
    assert!(holds(&fk, 0x42), "a refused revert changes nothing");
    let p = SnapshotRevert { scope: RevertScope::Data, memory: false, skip_moved: true };
    c.snapshot_revert("a", "s", &p).await.unwrap();
    assert!(holds(&fk, 0x41), "a's own disk went back");
    assert!(holds(&fm, 0x42), "b's disk was left alone");
}

/// A disk on its own (a First Class Disk) has snapshots too: taken and deleted through the QEMU of the
/// VM running it, or with qemu-img; reverted only while no running VM holds it.
async fn disk_snapshots(s: &TestServer) {
    use covm_types::snapshot::DiskSnapshotCreate;
    let c = &s.admin;
    let d = c.disk_create(&new_disk("fcd", 8 << 20)).await.unwrap();
    let f = file(s, &d);
    write(&f, 0x41);
    let p = |n: &str| DiskSnapshotCreate { name: name(n), description: None };
    let snap = c.disk_snapshot_create("fcd", &p("one")).await.unwrap();
    assert_eq!((snap.disk.as_str(), snap.tag.clone()), ("fcd", format!("covm-{}", snap.id)));
    assert_eq!(code(c.disk_snapshot_create("fcd", &p("one")).await), (409, ErrorCode::AlreadyExists));
    write(&f, 0x42);
    c.disk_snapshot_revert("fcd", "one").await.unwrap();
    assert!(holds(&f, 0x41));
    // The revert kept the present first, in a safety snapshot of the disk, which undoes it.
    let kept: Vec<_> =
        c.disk_snapshots("fcd").await.unwrap().into_iter().filter(|x| x.kind == SnapshotKind::Safety).collect();
    assert_eq!(kept.len(), 1);
    assert!(kept[0].expires_at.is_some() && kept[0].name.starts_with("before-revert"));
    c.disk_snapshot_revert("fcd", &kept[0].name).await.unwrap();
    assert!(holds(&f, 0x42), "the revert was undone");
    for x in c.disk_snapshots("fcd").await.unwrap().into_iter().filter(|x| x.kind == SnapshotKind::Safety) {
        c.disk_snapshot_delete("fcd", &x.name).await.unwrap();
    }
    c.disk_snapshot_revert("fcd", "one").await.unwrap();
    for x in c.disk_snapshots("fcd").await.unwrap().into_iter().filter(|x| x.kind == SnapshotKind::Safety) {
        c.disk_snapshot_delete("fcd", &x.name).await.unwrap();
    }
    // Held by a running VM: taken live; a revert is refused, naming the VM.
    c.vm_create(&VmConfig { memory_mib: 64, disks: vec![attachment("fcd", "scsi0", 0)], ..vm_named("h") })
        .await
        .unwrap();
    let t = task_done(c, &c.vm_power("h", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, covm_types::vm::TaskState::Success, "{t:?}");
    let live = c.disk_snapshot_create("fcd", &p("live")).await.unwrap();
    assert!(covm_hv::img::snapshot_tags(&f).await.unwrap().contains(&live.tag));
    match c.disk_snapshot_revert("fcd", "one").await {
        Err(ClientError::Api { status: 409, error, .. }) => assert!(error.message.contains('h'), "{}", error.message),
        other => panic!("expected 409, got {other:?}"),
    }
    c.disk_snapshot_delete("fcd", "live").await.unwrap();
    assert!(!covm_hv::img::snapshot_tags(&f).await.unwrap().contains(&live.tag));
    assert_eq!(c.disk_snapshots("fcd").await.unwrap().len(), 1);
    // A raw disk cannot hold one.
    c.disk_create(&covm_types::disk::DiskCreate { format: DiskFormat::Raw, ..new_disk("rawd", 1 << 20) })
        .await
        .unwrap();
    assert_eq!(code(c.disk_snapshot_create("rawd", &p("x")).await), (409, ErrorCode::SnapshotUnsupported));
}

#[tokio::test]
async fn a_disk_on_its_own_has_snapshots_simulated() {
    disk_snapshots(&TestServer::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_on_its_own_has_snapshots_with_qemu() {
    if crate::qemu::skip() {
        return;
    }
    disk_snapshots(&TestServer::start_with(covm_server::Driver::Qemu).await).await;
}

/// Nobody takes a snapshot with a change they may not make; a VM with snapshots of its own is not
/// deleted from under them (their tags live in disks that outlive it), its safety snapshots go with it.
#[tokio::test]
async fn snapshots_follow_the_rules_of_the_change_and_of_the_delete() {
    let s = TestServer::start().await;
    let c = &s.admin;
    c.disk_create(&new_disk("rd", 8 << 20)).await.unwrap();
    c.vm_create(&VmConfig { memory_mib: 64, disks: vec![attachment("rd", "scsi0", 0)], ..vm_named("r") })
        .await
        .unwrap();
    let reader = s.user("reader").await;
    c.permission_grant("reader", "ReadOnly", "/", true).await.unwrap();
    let asked = ChangeOptions { snapshot: true, ..Default::default() };
    let r = reader.vm_change("r", &VmChange { description: Some("x".into()), ..Default::default() }, &asked).await;
    assert_eq!(code(r).0, 403);
    assert!(c.snapshots("r").await.unwrap().is_empty(), "no snapshot for a refused change");

    let own = c.snapshot_create("r", &create("own")).await.unwrap();
    c.vm_change("r", &VmChange { description: Some("y".into()), ..Default::default() }, &asked).await.unwrap();
    assert_eq!(c.snapshots("r").await.unwrap().len(), 2);
    // Someone else's edit lease refuses a revert like any change.
    let creator = s.user("creator").await;
    c.permission_grant("creator", "VMCreator", "/", true).await.unwrap();
    c.lease_acquire("r", 600).await.unwrap();
    assert_eq!(code(creator.snapshot_revert("r", "own", &revert(RevertScope::Config)).await).0, 423);
    c.lease_release("r", false).await.unwrap();
    match c.vm_delete("r").await {
        Err(ClientError::Api { status: 409, error, .. }) => assert!(error.message.contains("own"), "{}", error.message),
        other => panic!("expected 409, got {other:?}"),
    }
    c.snapshot_delete("r", "own").await.unwrap();
    c.vm_delete("r").await.unwrap();
    let f = file(&s, &c.disk("rd").await.unwrap());
    assert!(covm_hv::img::snapshot_tags(&f).await.unwrap().is_empty(), "no tag outlives its snapshot: {own:?}");
}

/// A snapshot whose config holds a disk that was deleted since: it is partial, and its config cannot
/// come back (409 `disk_missing` naming the disk).
#[tokio::test]
async fn a_snapshot_of_a_deleted_disk_is_partial_and_its_config_cannot_come_back() {
    let s = TestServer::start().await;
    let c = &s.admin;
    c.disk_create(&new_disk("gone", 8 << 20)).await.unwrap();
    c.vm_create(&VmConfig { memory_mib: 64, disks: vec![attachment("gone", "scsi0", 0)], ..vm_named("g") })
        .await
        .unwrap();
    c.snapshot_create("g", &create("then")).await.unwrap();
    let off = VmChange { safety_snapshots: Some(covm_types::vm::SafetyPolicy::Off), ..Default::default() };
    c.vm_change("g", &off, &ChangeOptions::default()).await.unwrap();
    c.vm_disk_detach("g", "gone", &covm_types::disk::DetachQuery::default()).await.unwrap();
    c.disk_delete("gone").await.unwrap();
    assert!(c.snapshot("g", "then").await.unwrap().partial);
    assert_eq!(code(c.snapshot_revert("g", "then", &revert(RevertScope::Config)).await), (409, ErrorCode::DiskMissing));
}

/// Safety snapshots expire the configured time after they are taken, and the reaper deletes them
/// (record and tags); a pinned one stays until deleted by hand.
#[tokio::test]
async fn safety_snapshots_expire_unless_pinned() {
    let s = TestServer::start().await;
    let c = &s.admin;
    let d = c.disk_create(&new_disk("ex", 8 << 20)).await.unwrap();
    let disks = vec![attachment("ex", "scsi0", 0)];
    c.vm_create(&VmConfig { memory_mib: 64, disks, ..vm_named("e") }).await.unwrap();
    let forced = ChangeOptions { snapshot: true, ..Default::default() };
    for cpus in [2, 3] {
        c.vm_change("e", &VmChange { cpus: Some(cpus), ..Default::default() }, &forced).await.unwrap();
    }
    let all = c.snapshots("e").await.unwrap();
    assert_eq!(all.len(), 2);
    for x in &all {
        assert_eq!(x.kind, SnapshotKind::Safety);
        assert!(!x.pinned);
        assert_eq!(x.expires_at, Some(x.created_at + chrono::Duration::days(7)), "the default: 7 days");
    }
    let (keep, lose) = (&all[0], &all[1]);

    // Pinned: no expiry; unpinned: the expiry again; pinned once more.
    let pin = |pinned| covm_types::snapshot::SnapshotUpdate { pinned: Some(pinned), description: None };
    let p = c.snapshot_update("e", &keep.name, &pin(true)).await.unwrap();
    assert!(p.pinned && p.expires_at.is_none(), "{p:?}");
    let p = c.snapshot_update("e", &keep.id.to_string(), &pin(false)).await.unwrap();
    assert_eq!((p.pinned, p.expires_at), (false, keep.expires_at));
    c.snapshot_update("e", &keep.name, &pin(true)).await.unwrap();
    let described = covm_types::snapshot::SnapshotUpdate { pinned: None, description: Some("keep me".into()) };
    let p = c.snapshot_update("e", &keep.name, &described).await.unwrap();
    assert!(p.pinned && p.description.as_deref() == Some("keep me"), "{p:?}");
    assert_eq!(code(c.snapshot_update("e", "nope", &pin(true)).await), (404, ErrorCode::NotFound));
    let bob = s.user("bob").await;
    c.permission_grant("bob", "VMUser", "vm:e", false).await.unwrap();
    assert_eq!(code(bob.snapshot_update("e", &keep.name, &pin(false)).await).0, 403);

    // Eight days on: the unpinned one goes, record and tag; the pinned one stays.
    let reaped = s.app().snapshots_reap_at(chrono::Utc::now() + chrono::Duration::days(8)).await.unwrap();
    assert_eq!(reaped, 1);
    let left: Vec<String> = c.snapshots("e").await.unwrap().into_iter().map(|x| x.name).collect();
    assert_eq!(left, std::slice::from_ref(&keep.name));
    let tags = covm_hv::img::snapshot_tags(&file(&s, &d)).await.unwrap();
    assert_eq!(tags, [format!("covm-{}", keep.id)], "{} was reaped with its tag", lose.name);
    let events =
        c.events(&covm_types::api::EventQuery { limit: Some(1000), ..Default::default() }).await.unwrap().items;
    assert!(events.iter().any(|e| e.kind == "vm.snapshot.updated" && e.data["pinned"] == true));
    assert!(c.audit_verify().await.unwrap().ok);
}
