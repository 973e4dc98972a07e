//! Encrypted disks (issue 16): LUKS in qcow2 with a key per disk wrapped by the master key. Create,
//! clone, resize, snapshots and a key rotation keep working; the key never shows; and with the test
//! guest, what the guest writes is not in the file in clear and reads back after a rotation and a
//! restart of covm, and after a hot attach to a QEMU that covm adopted.

use std::time::Duration;

use covm_types::ErrorCode;
use covm_types::disk::{DiskClone, DiskEncryption, DiskFormat};
use covm_types::snapshot::{RevertScope, SnapshotCreate, SnapshotRevert};
use covm_types::vm::{PowerAction, PowerState, TaskState, VmChange};

use crate::common::{TestServer, attachment, name, new_disk, task_done, vm_named};
use crate::guest_snapshots::Tty;
use crate::qemu::{guest_vm, qemu_server, serial_wait, skip, state_wait};

fn encrypted(disk: &str, bytes: u64) -> covm_types::disk::DiskCreate {
    covm_types::disk::DiskCreate { encryption: Some(DiskEncryption::Luks), ..new_disk(disk, bytes) }
}

async fn image_info(s: &TestServer, disk: &str) -> covm_hv::img::ImageInfo {
    let d = s.admin.disk(disk).await.unwrap();
    covm_hv::img::info(&s.dir.path().join("datastores/local").join(&d.file)).await.unwrap()
}

/// Every disk's wrapped key as the database holds it.
async fn wrapped_keys(s: &TestServer) -> Vec<String> {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", s.db_path().display())).await.unwrap();
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT spec FROM objects WHERE kind = 'disk'").fetch_all(&pool).await.unwrap();
    pool.close().await;
    rows.iter()
        .filter_map(|(spec,)| {
            let v: serde_json::Value = serde_json::from_str(spec).unwrap();
            v["encryption"]["wrapped"].as_str().map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn encrypted_disks_keep_working_through_clone_resize_snapshots_and_a_rotation() {
    if crate::common::on_postgres() {
        return;
    }
    let mut s = TestServer::start().await;
    let c = s.admin.clone();
    let raw = covm_types::disk::DiskCreate { format: DiskFormat::Raw, ..encrypted("r", 1 << 20) };
    let e = c.disk_create(&raw).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some(ErrorCode::InvalidValue)), "{e}");
    let d = c.disk_create(&encrypted("sec", 4 << 20)).await.unwrap();
    assert_eq!(d.encryption, Some(DiskEncryption::Luks));
    assert!(covm_hv::img::encrypted(&image_info(&s, "sec").await));
    // A clone is encrypted too, under a key of its own; a resize works.
    let cl = c.disk_clone("sec", &DiskClone { name: name("sec-copy"), encryption: None }).await.unwrap();
    assert_eq!(cl.encryption, Some(DiskEncryption::Luks));
    assert!(covm_hv::img::encrypted(&image_info(&s, "sec-copy").await));
    let keys = wrapped_keys(&s).await;
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1]);
    c.disk_resize("sec", 8 << 20).await.unwrap();
    assert_eq!(image_info(&s, "sec").await.virtual_size, 8 << 20);
    // Snapshots of a VM that is off go through qemu-img, which needs the key.
    c.vm_create(&vm_named("v")).await.unwrap();
    let with = VmChange { disks: Some(vec![attachment("sec", "scsi0", 0)]), ..Default::default() };
    c.vm_change("v", &with, &Default::default()).await.unwrap();
    let snap = c
        .snapshot_create(
            "v",
            &SnapshotCreate {
                name: name("s1"),
                description: None,
                memory: false,
                exclude: vec![],
                consistency: Default::default(),
            },
        )
        .await
        .unwrap();
    assert!(image_info(&s, "sec").await.snapshots.iter().any(|t| t.name == format!("covm-{}", snap.id)));
    let r = SnapshotRevert { scope: RevertScope::Data, memory: false, skip_moved: false };
    c.snapshot_revert("v", "s1", &r).await.unwrap();
    // A simulated VM powers on with it (its spec carries the key).
    let t = task_done(&c, &c.vm_power("v", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    task_done(&c, &c.vm_power("v", PowerAction::Off, None).await.unwrap()).await;
    // A rotation rewraps both keys under a new master key, touching no image.
    let before = std::fs::read(s.dir.path().join("master.key")).unwrap();
    let image_before = std::fs::read(s.dir.path().join("datastores/local").join(&d.file)).unwrap();
    let rot = c.keys_rotate().await.unwrap();
    assert_eq!(rot.disks, 2);
    assert_ne!(std::fs::read(s.dir.path().join("master.key")).unwrap(), before);
    // The key before stays as master.key.old until the next rotation (for a disk made meanwhile).
    assert!(s.dir.path().join("master.key.old").exists() && !s.dir.path().join("master.key.new").exists());
    assert_eq!(std::fs::read(s.dir.path().join("master.key.old")).unwrap(), before);
    assert_eq!(std::fs::read(s.dir.path().join("datastores/local").join(&d.file)).unwrap(), image_before);
    assert!(wrapped_keys(&s).await.iter().all(|k| !keys.contains(k)));
    // After a restart the new master key opens them.
    s.restart().await;
    let c = s.admin.clone();
    c.disk_resize("sec-copy", 8 << 20).await.unwrap();
    // A plain disk's copy is encrypted when asked.
    c.disk_create(&new_disk("plain", 2 << 20)).await.unwrap();
    let enc = c
        .disk_clone("plain", &DiskClone { name: name("plain-enc"), encryption: Some(DiskEncryption::Luks) })
        .await
        .unwrap();
    assert_eq!(enc.encryption, Some(DiskEncryption::Luks));
    assert!(covm_hv::img::encrypted(&image_info(&s, "plain-enc").await));
    // An encrypted image cannot be imported (covm does not know its passphrase).
    let ds = s.dir.path().join("datastores/local");
    std::fs::copy(ds.join(&cl.file), ds.join("stray.qcow2")).unwrap();
    let imp = covm_types::disk::DiskImport {
        datastore: "local".into(),
        path: "stray.qcow2".into(),
        folder: None,
        pool: None,
    };
    let e = c.disk_import("stray", &imp).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    // No key anywhere a person or a log sees: not in answers, events or the audit log.
    let log = s.log_text().await;
    for k in wrapped_keys(&s).await.iter().chain(&keys) {
        assert!(!log.contains(k.as_str()), "a wrapped key reached the log");
    }
    let views = serde_json::to_string(&c.disks(&Default::default()).await.unwrap()).unwrap();
    assert!(!views.contains("wrapped"), "{views}");
    // Only an admin rotates.
    let bob = s.user("bob").await;
    assert_eq!(bob.keys_rotate().await.unwrap_err().status(), Some(403));
}

/// A 4 KiB run of `marker` written by the guest: the file must not hold it in clear.
fn in_clear(file: &std::path::Path, marker: &str) -> bool {
    let raw = std::fs::read(file).unwrap();
    raw.windows(marker.len()).any(|w| w == marker.as_bytes())
}

const A: &str = "/dev/$(ls /sys/bus/scsi/devices/*:0:0:0/block)";
const B: &str = "/dev/$(ls /sys/bus/scsi/devices/*:0:1:0/block)";

#[tokio::test]
async fn the_guest_writes_an_encrypted_disk_that_reads_back_after_a_rotation_and_a_restart() {
    if skip() {
        return;
    }
    let mut s = qemu_server().await;
    let c = s.admin.clone();
    guest_vm(&c, "ge").await;
    let d = c.disk_create(&encrypted("ge-a", 16 << 20)).await.unwrap();
    let file = s.dir.path().join("datastores/local").join(&d.file);
    let with = VmChange { disks: Some(vec![attachment("ge-a", "scsi0", 0)]), ..Default::default() };
    c.vm_change("ge", &with, &Default::default()).await.unwrap();
    let t = task_done(&c, &c.vm_power("ge", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    serial_wait(&c, "ge", "COVM-GUEST-READY", 1).await;
    let mut tty = Tty::open(&s, &c, "ge").await;
    const MARK: &str = "COVMSECRETMARKER";
    tty.line(&format!("yes {MARK} | head -c 65536 | dd of={A} bs=4096 seek=256 conv=fsync 2>/dev/null")).await;
    let read = format!("dd if={A} bs=4096 skip=256 count=1 2>/dev/null | head -c 16");
    assert_eq!(tty.ask(&c, "ge", "R1", &read).await, MARK);
    // The QEMU process got no passphrase in clear: its command line names only its key file.
    let id = c.vm("ge").await.unwrap().id;
    let run = s.dir.path().join("vms").join(id.to_string());
    let pid: u32 = std::fs::read_to_string(run.join("qemu.pid")).unwrap().trim().parse().unwrap();
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).into_owned();
    assert!(cmdline.contains("master.key") && !cmdline.contains("key-secret"), "{cmdline}");
    task_done(&c, &c.vm_power("ge", PowerAction::Off, None).await.unwrap()).await;
    state_wait(&c, "ge", PowerState::Off).await;
    assert!(!in_clear(&file, MARK), "the guest's data is in the file in clear");
    let info = covm_hv::img::info(&file).await.unwrap();
    assert!(covm_hv::img::encrypted(&info), "qemu-img info reports LUKS: {info:?}");
    // Rotate, restart covm, and the guest reads its marker again.
    assert_eq!(c.keys_rotate().await.unwrap().disks, 1);
    s.restart().await;
    let c = s.admin.clone();
    let t = task_done(&c, &c.vm_power("ge", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Success, "{t:?}");
    serial_wait(&c, "ge", "COVM-GUEST-READY", 2).await;
    tty.reconnect();
    assert_eq!(tty.ask(&c, "ge", "R2", &read).await, MARK);
    // covm restarts while the VM runs; the adopted QEMU takes a hot-attached encrypted disk (its own
    // key file is still in its run directory).
    s.restart().await;
    let c = s.admin.clone();
    c.disk_create(&encrypted("ge-b", 16 << 20)).await.unwrap();
    let hot = covm_types::disk::DiskAttach {
        disk: "ge-b".into(),
        controller: Some("scsi0".into()),
        unit: Some(1),
        ..Default::default()
    };
    let v = c.vm_disk_attach("ge", &hot).await.unwrap();
    assert_eq!(v.runtime.running_version, Some(v.version), "hot-plugged into the adopted QEMU");
    tty.reconnect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tty.line(&format!("echo {MARK} | dd of={B} bs=512 count=1 conv=sync,fsync 2>/dev/null")).await;
    let read_b = format!("dd if={B} bs=512 count=1 2>/dev/null | head -c 16");
    assert_eq!(tty.ask(&c, "ge", "R3", &read_b).await, MARK);
    task_done(&c, &c.vm_power("ge", PowerAction::Off, None).await.unwrap()).await;
}
