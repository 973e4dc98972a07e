//! Templates and clones: a template is read-only and never powered on; a linked clone's disks are
//! qcow2 overlays on the template's (which then cannot go, and the error names the clones); a full
//! clone copies; a clone has new MAC addresses and, customized, a new cloud-init identity. (A linked
//! clone that boots the test guest is in `qemu.rs`; failures at every step are in `sagas.rs`.)

use covm_client::{Client, ClientError};
use covm_types::ErrorCode;
use covm_types::vm::{CloneCustomize, CloudInitUser, Nic, PowerAction, VmClone, VmConfig};

use crate::common::{TestServer, attachment, name, new_disk, task_done, vm_named};

fn clone_of(n: &str, linked: Option<bool>) -> VmClone {
    VmClone { name: name(n), linked, folder: None, pool: None, customize: None, description: None }
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, ErrorCode, String) {
    match r {
        Err(ClientError::Api { status, error, .. }) => (status, error.code, error.message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A VM with one 16 MiB qcow2 disk on which a pattern was written, and a NIC.
async fn base(s: &TestServer, vm: &str) {
    let c = &s.admin;
    c.disk_create(&new_disk(&format!("{vm}-root"), 16 << 20)).await.unwrap();
    let file = s.dir.path().join("datastores/local").join(c.disk(&format!("{vm}-root")).await.unwrap().file);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 1M"])
        .arg(&file)
        .output()
        .expect("qemu-io runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let nic: Nic = serde_json::from_value(serde_json::json!({ "network": "user" })).unwrap();
    let cfg = VmConfig {
        memory_mib: 64,
        disks: vec![attachment(&format!("{vm}-root"), "scsi0", 0)],
        nics: vec![nic],
        ..vm_named(vm)
    };
    c.vm_create(&cfg).await.unwrap();
}

/// What qemu-img says of a disk's image: (format, backing file).
async fn image(s: &TestServer, c: &Client, disk: &str) -> (String, Option<String>) {
    let file = s.dir.path().join("datastores/local").join(c.disk(disk).await.unwrap().file);
    let i = covm_hv::img::info(&file).await.unwrap();
    (i.format.clone(), i.backing_filename.clone())
}

#[tokio::test]
async fn a_template_is_read_only_and_its_linked_clones_hold_it() {
    let s = TestServer::start().await;
    let c = &s.admin;
    base(&s, "tpl").await;
    let before = c.vm("tpl").await.unwrap();
    // Not a template yet: a linked clone is refused, naming the field.
    let (st, cd, msg) = code(c.vm_clone("tpl", &clone_of("x", Some(true))).await);
    assert_eq!((st, cd), (409, ErrorCode::NotATemplate), "{msg}");
    // A change cannot make a template.
    let (st, _, _) = code(c.vm_change("tpl", &serde_json::json!({ "template": true }), &Default::default()).await);
    assert_eq!(st, 400);

    let t = c.vm_template("tpl").await.unwrap();
    assert!(t.config.template);
    assert_eq!(t.version, before.version + 1, "a new version says so");
    assert_eq!(c.vm_template("tpl").await.unwrap().version, t.version, "idempotent");
    // Read-only, and never powered on.
    let (st, cd, _) = code(c.vm_change("tpl", &serde_json::json!({ "cpus": 2 }), &Default::default()).await);
    assert_eq!((st, cd), (409, ErrorCode::VmIsTemplate));
    // The power-on is refused at once (409) or its task fails: either way the template stays off.
    match c.vm_power("tpl", PowerAction::On, None).await {
        Err(ClientError::Api { status: 409, error, .. }) => assert_eq!(error.code, ErrorCode::VmIsTemplate),
        Ok(t) => {
            let t = task_done(c, &t).await;
            assert_eq!(t.state, covm_types::vm::TaskState::Error, "{t:?}");
            assert!(t.error.unwrap().to_string().contains("vm_is_template"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.vm("tpl").await.unwrap().runtime.power_state, covm_types::vm::PowerState::Off);

    // A linked clone (the default for a template): an overlay on the template's disk, same data.
    let cz = CloneCustomize {
        hostname: None,
        users: Some(vec![CloudInitUser {
            name: "ann".into(),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9 ann@laptop".into()],
            sudo: true,
        }]),
        network: None,
    };
    let web = c.vm_clone("tpl", &VmClone { customize: Some(cz), ..clone_of("web", None) }).await.unwrap();
    assert_eq!(web.version, 1);
    assert!(!web.config.template);
    assert_eq!(web.config.disks.len(), 1);
    assert_eq!(web.config.disks[0].disk, "web-1");
    assert_ne!(web.config.nics[0].mac, before.config.nics[0].mac, "a clone has MAC addresses of its own");
    let ci = web.config.cloud_init.clone().expect("customized");
    assert_eq!(ci.hostname.as_deref(), Some("web"), "the host name is the new VM's name");
    assert_eq!(ci.users[0].name, "ann");
    let tpl_file = c.disk("tpl-root").await.unwrap().file;
    let (fmt, backing) = image(&s, c, "web-1").await;
    assert_eq!(fmt, "qcow2");
    assert_eq!(backing.as_deref(), std::path::Path::new(&tpl_file).file_name().and_then(|f| f.to_str()));
    let web_file = s.dir.path().join("datastores/local").join(c.disk("web-1").await.unwrap().file);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-c", "read -P 0x5a 0 1M"])
        .arg(&web_file)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 1048576/1048576"),
        "the clone reads the template's data"
    );
    assert!(std::fs::metadata(&web_file).unwrap().len() < 2 << 20, "an overlay holds only its own writes");
    // The clone is an ordinary VM: it changes.
    c.vm_change("web", &serde_json::json!({ "cpus": 2 }), &Default::default()).await.unwrap();
    // A template made of a linked clone gives full clones only (a linked one would need the chain),
    // and a full copy of it reads no other disk.
    c.vm_template("web").await.unwrap();
    let (st, cd, msg) = code(c.vm_clone("web", &clone_of("web-2", Some(true))).await);
    assert_eq!((st, cd), (409, ErrorCode::NotATemplate), "{msg}");
    assert!(c.vm("web-2").await.is_err() && c.disk("web-2-1").await.is_err(), "nothing is left");
    c.vm_clone("web", &clone_of("web-2", Some(false))).await.unwrap();
    assert_eq!(image(&s, c, "web-2-1").await.1, None, "a full copy reads no other disk");
    c.vm_delete("web-2").await.unwrap();
    c.disk_delete("web-2-1").await.unwrap();

    // Its data stays as the clone reads it: no snapshot of the template or of its disk, no revert.
    let snap = covm_types::snapshot::SnapshotCreate {
        name: name("s"),
        description: None,
        memory: false,
        exclude: vec![],
        consistency: Default::default(),
    };
    let (st, cd, _) = code(c.snapshot_create("tpl", &snap).await);
    assert_eq!((st, cd), (409, ErrorCode::VmIsTemplate));
    let dsnap = covm_types::snapshot::DiskSnapshotCreate { name: name("s"), description: None };
    let (st, cd, _) = code(c.disk_snapshot_create("tpl-root", &dsnap).await);
    assert_eq!((st, cd), (409, ErrorCode::TemplateInUse));

    // The template and its disk cannot go while the clone reads them; the error names the clone.
    let (st, cd, msg) = code(c.vm_delete("tpl").await);
    assert_eq!((st, cd), (409, ErrorCode::TemplateInUse), "{msg}");
    assert!(msg.contains("web"), "{msg}");
    let (st, cd, msg) = code(c.disk_delete("tpl-root").await.map(drop));
    assert_eq!((st, cd), (409, ErrorCode::DiskInUse), "attached to the template first: {msg}");
    let (st, cd, _) = code(c.disk_resize("tpl-root", 32 << 20).await);
    assert_eq!((st, cd), (409, ErrorCode::TemplateInUse));

    // A full clone copies: no backing file; the template does not hold it.
    let full = c.vm_clone("tpl", &clone_of("db", Some(false))).await.unwrap();
    assert_eq!(full.config.disks[0].disk, "db-1");
    assert_eq!(image(&s, c, "db-1").await.1, None);
    // Taken names are refused before anything is made.
    let (st, cd, _) = code(c.vm_clone("tpl", &clone_of("db", None)).await);
    assert_eq!((st, cd), (409, ErrorCode::AlreadyExists));

    // Once the linked clone and its disk are gone, the template can go (the full clone stays).
    c.vm_delete("web").await.unwrap();
    c.disk_delete("web-1").await.unwrap();
    c.vm_delete("tpl").await.unwrap();
    c.disk_delete("tpl-root").await.unwrap();
    assert!(c.vm("db").await.is_ok());
    let t = task_done(c, &c.vm_power("db", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, covm_types::vm::TaskState::Success, "{t:?}");
}

#[tokio::test]
async fn cloning_needs_its_privileges_and_a_valid_customization() {
    let s = TestServer::start().await;
    let c = &s.admin;
    base(&s, "src").await;
    // A running VM's disk is not copied (it would not be consistent).
    let t = task_done(c, &c.vm_power("src", PowerAction::On, None).await.unwrap()).await;
    assert_eq!(t.state, covm_types::vm::TaskState::Success);
    let (st, cd, msg) = code(c.vm_clone("src", &clone_of("copy", None)).await);
    assert_eq!((st, cd), (409, ErrorCode::DiskInUse), "{msg}");
    assert!(c.vm("copy").await.is_err() && c.disk("copy-1").await.is_err(), "nothing is left");
    task_done(c, &c.vm_power("src", PowerAction::Off, None).await.unwrap()).await;
    // A bad host name names its field.
    let cz = CloneCustomize { hostname: Some("-bad-".into()), users: None, network: None };
    match c.vm_clone("src", &VmClone { customize: Some(cz), ..clone_of("copy", None) }).await {
        Err(ClientError::Api { status: 400, error, .. }) => {
            assert_eq!(error.field.as_deref(), Some("cloud_init.hostname"))
        }
        other => panic!("{other:?}"),
    }
    // A read-only user may not clone.
    let rita = s.user("rita").await;
    let (st, _, _) = code(rita.vm_clone("src", &clone_of("copy", None)).await);
    assert_eq!(st, 404, "she cannot see it");
    // A reference that does not hold is refused before any disk is copied.
    let bad_pool = VmClone { pool: Some("nope".into()), ..clone_of("copy", None) };
    let (st, _, msg) = code(c.vm_clone("src", &bad_pool).await);
    assert_eq!(st, 404, "{msg}");
    assert!(c.disk("copy-1").await.is_err(), "no disk was made");
    // A full clone of a VM that is off.
    let v = c.vm_clone("src", &clone_of("copy", None)).await.unwrap();
    assert_eq!(v.config.disks[0].disk, "copy-1");
    assert_eq!(image(&s, c, "copy-1").await.1, None);
}
