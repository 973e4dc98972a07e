//! First-class disks with real qemu-img images: lifecycle, checks before changes, bad input.

use covm_client::ClientError;
use covm_types::api::{PoolCreate, Quota};
use covm_types::disk::{
    DetachQuery, DiskAttach, DiskClone, DiskCreate, DiskFormat, DiskImport, DiskListQuery, DiskMove, DiskState, Sharing,
};
use covm_types::vm::{PowerAction, VmConfig};
use serde_json::json;

use crate::common::{TestServer, attach, attachment, ide_vm, name, new_disk, task_done, vm_named};

fn err<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String, Option<String>) {
    match r {
        Err(ClientError::Api { status, error, .. }) => (status, error.code.to_string(), error.field),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_disk_is_created_grown_cloned_and_deleted_with_its_image() {
    let s = TestServer::start().await;
    let c = &s.admin;
    let d = c.disk_create(&new_disk("data-1", 64 << 20)).await.unwrap();
    let file = s.dir.path().join("datastores/local").join(&d.file);
    assert!(file.is_file(), "{}", file.display());
    assert!(d.file.starts_with("disks/") && d.file.ends_with(".qcow2"), "covm names the file: {}", d.file);
    let info = c.disk("data-1").await.unwrap();
    let image = info.image.unwrap();
    assert_eq!((image.format.as_str(), image.virtual_size), ("qcow2", 64 << 20));

    let grown = c.disk_resize("data-1", 128 << 20).await.unwrap();
    assert_eq!(grown.capacity_bytes, 128 << 20);
    let info = c.disk("data-1").await.unwrap();
    assert_eq!(info.image.unwrap().virtual_size, 128 << 20);
    assert_eq!(err(c.disk_resize("data-1", 64 << 20).await).1, "shrink_refused");
    // The same size is already done.
    c.disk_resize("data-1", 128 << 20).await.unwrap();

    let copy = c.disk_clone("data-1", &DiskClone { name: name("data-2"), encryption: None }).await.unwrap();
    assert_ne!(copy.file, d.file);
    assert_eq!(copy.capacity_bytes, 128 << 20);
    assert!(s.dir.path().join("datastores/local").join(&copy.file).is_file());

    // A VM whose config holds the disk keeps it from being deleted, and the error names the VM.
    c.vm_create(&VmConfig { disks: vec![attachment("data-2", "scsi0", 0)], ..vm_named("web-1") }).await.unwrap();
    let Err(ClientError::Api { status: 409, error, .. }) = c.disk_delete("data-2").await else { panic!() };
    assert_eq!(error.code, "disk_in_use");
    assert!(error.message.contains("web-1"), "{}", error.message);
    let listed = c.disks(&DiskListQuery::default()).await.unwrap();
    let held = listed.items.iter().find(|x| x.name == "data-2").unwrap();
    assert_eq!(held.attachments[0].vm, "web-1");

    c.disk_delete("data-1").await.unwrap();
    assert!(!file.exists(), "the image goes with the disk");
    assert_eq!(err(c.disk("data-1").await).0, 404);
    // (The feed hides events of objects that are gone; the audit log keeps them.)
    let q = covm_types::api::AuditQuery { kind: Some("disk.".into()), limit: Some(1000), ..Default::default() };
    let kinds: Vec<String> = c.audit(&q).await.unwrap().items.into_iter().map(|e| e.kind).collect();
    for k in ["disk.created", "disk.resized", "disk.deleted"] {
        assert!(kinds.contains(&k.to_string()), "{k} not in {kinds:?}");
    }
}

#[tokio::test]
async fn bad_disk_requests_change_nothing() {
    let s = TestServer::start().await;
    let c = &s.admin;
    let before = s.count("objects").await;
    // Raw bodies on purpose: these are refusals of what the typed request cannot even hold (a negative
    // size, a bad name, an unknown field) beside out-of-range values, each checked at the wire.
    let cases = [
        (
            json!({ "name": "d", "datastore": "local", "capacity_bytes": -1 }),
            400,
            "invalid_value",
            Some("capacity_bytes"),
        ),
        (
            json!({ "name": "d", "datastore": "local", "capacity_bytes": 0 }),
            400,
            "invalid_capacity",
            Some("capacity_bytes"),
        ),
        (
            json!({ "name": "d", "datastore": "local", "capacity_bytes": 1000 }),
            400,
            "invalid_capacity",
            Some("capacity_bytes"),
        ),
        (
            json!({ "name": "d", "datastore": "local", "capacity_bytes": 1u64 << 50 }),
            400,
            "invalid_capacity",
            Some("capacity_bytes"),
        ),
        (json!({ "name": "d", "datastore": "local", "capacity_bytes": 60u64 << 40 }), 409, "insufficient_space", None),
        (
            json!({ "name": "d", "datastore": "nope", "capacity_bytes": 1u64 << 20 }),
            404,
            "not_found",
            Some("datastore"),
        ),
        (
            json!({ "name": "d", "datastore": "local", "capacity_bytes": 1u64 << 20, "sharing": "multi_writer" }),
            400,
            "invalid_value",
            Some("sharing"),
        ),
        (
            json!({ "name": "../d", "datastore": "local", "capacity_bytes": 1u64 << 20 }),
            400,
            "invalid_name",
            Some("name"),
        ),
        (
            json!({ "name": "d", "datastore": "local", "capacity_bytes": 1u64 << 20, "path": "/etc" }),
            400,
            "unknown_field",
            Some("path"),
        ),
    ];
    for (body, status, code, field) in cases {
        let resp = c.request(reqwest::Method::POST, "/disks").json(&body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{body}");
        let e = resp.json::<covm_types::ErrorBody>().await.unwrap().error;
        assert_eq!((e.code.as_str(), e.field.as_deref()), (code, field), "{body}");
    }
    assert_eq!(s.count("objects").await, before);
    let files = std::fs::read_dir(s.dir.path().join("datastores/local")).unwrap().count();
    assert!(files <= 1, "no image was left behind");

    // Imports: a path out of the datastore, through a link, or not an image.
    let ds = s.dir.path().join("datastores/local");
    std::fs::write(s.dir.path().join("outside.img"), b"x").unwrap();
    std::os::unix::fs::symlink(s.dir.path().join("outside.img"), ds.join("link.img")).unwrap();
    for path in ["../outside.img", "link.img", "missing.img", "/etc/passwd"] {
        let r = c
            .disk_import("imp", &DiskImport { datastore: "local".into(), path: path.into(), ..Default::default() })
            .await;
        let (status, _, field) = err(r);
        assert_eq!((status, field.as_deref()), (400, Some("path")), "{path}");
    }
    // A real image inside the datastore is imported (moved under a covm name).
    covm_hv::img::create(&ds.join("mine.qcow2"), "qcow2", 2 << 20, None).await.unwrap();
    let d = c
        .disk_import("imp", &DiskImport { datastore: "local".into(), path: "mine.qcow2".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!((d.capacity_bytes, d.format), (2 << 20, DiskFormat::Qcow2));
    assert!(!ds.join("mine.qcow2").exists() && ds.join(&d.file).is_file());

    // The pool's disk quota is checked before anything is made.
    let quota = Quota { disk_bytes: Some(4 << 20), ..Default::default() };
    c.pool_create(&PoolCreate { name: name("tiny"), quota, folder: None }).await.unwrap();
    c.disk_create(&DiskCreate { pool: Some("tiny".into()), ..new_disk("q1", 3 << 20) }).await.unwrap();
    let r = c.disk_create(&DiskCreate { pool: Some("tiny".into()), ..new_disk("q2", 2 << 20) }).await;
    assert_eq!(err(r).1, "quota_exceeded");
}

async fn disk(c: &covm_client::Client, name: &str) {
    c.disk_create(&new_disk(name, 1 << 20)).await.unwrap();
}

#[tokio::test]
async fn attach_rules_are_checked_before_anything_changes() {
    let s = TestServer::start().await;
    let c = &s.admin;
    for n in ["a", "b"] {
        c.vm_create(&vm_named(n)).await.unwrap();
    }
    c.vm_create(&ide_vm("old")).await.unwrap();
    disk(c, "d1").await;
    disk(c, "d2").await;
    let v = c.vm_disk_attach("a", &attach("d1")).await.unwrap();
    assert_eq!((v.version, v.config.disks[0].controller.as_str(), v.config.disks[0].unit), (2, "scsi0", 0));
    // One writer: b gets disk_in_use naming a.
    let Err(ClientError::Api { status: 409, error, .. }) = c.vm_disk_attach("b", &attach("d1")).await else { panic!() };
    assert_eq!(error.code, "disk_in_use");
    let generation = v.config.disks[0].generation;
    assert!(generation > 0);
    assert!(error.message.contains(&format!(" a (off, attachment generation {generation})")), "{}", error.message);
    assert_eq!(error.details.as_ref().unwrap()["generation"], generation);
    assert!(
        c.vm_disk_attach("b", &DiskAttach { read_only: true, ..attach("d1") }).await.is_err(),
        "not read-only beside a writer"
    );
    for (body, code) in [
        (DiskAttach { controller: Some("nope".into()), ..attach("d2") }, "unknown_controller"),
        (DiskAttach { unit: Some(0), ..attach("d2") }, "unit_taken"),
        (DiskAttach { unit: Some(256), ..attach("d2") }, "unit_out_of_range"),
        (attach("d1"), "already_attached"),
    ] {
        assert_eq!(err(c.vm_disk_attach("a", &body).await).1, code, "{body:?}");
    }
    assert_eq!(c.vm("a").await.unwrap().version, 2, "nothing changed");
    // On a running VM: virtio-scsi hot-plugs; IDE does not (unless next_boot).
    let t = c.vm_power("a", PowerAction::On, None).await.unwrap();
    task_done(c, &t).await;
    let v = c.vm_disk_attach("a", &attach("d2")).await.unwrap();
    assert_eq!(v.runtime.running_version, Some(v.version), "a hot-plug is live, not pending");
    let t = c.vm_power("old", PowerAction::On, None).await.unwrap();
    task_done(c, &t).await;
    disk(c, "d3").await;
    assert_eq!(err(c.vm_disk_attach("old", &attach("d3")).await).1, "hotplug_unsupported");
    let v = c.vm_disk_attach("old", &DiskAttach { next_boot: true, ..attach("d3") }).await.unwrap();
    assert!(v.runtime.running_version < Some(v.version), "pending");
    // Detach: hot on virtio-scsi; detaching what is not attached is done already.
    let v = c.vm_disk_detach("a", "d2", &DetachQuery::default()).await.unwrap();
    assert_eq!(v.config.disks.len(), 1);
    let again = c.vm_disk_detach("a", "d2", &DetachQuery::default()).await.unwrap();
    assert_eq!(again.version, v.version);
    // Multi-writer disks take several writers.
    let shared = DiskCreate { format: DiskFormat::Raw, sharing: Sharing::MultiWriter, ..new_disk("shared", 1 << 20) };
    c.disk_create(&shared).await.unwrap();
    c.vm_disk_attach("a", &attach("shared")).await.unwrap();
    c.vm_disk_attach("b", &attach("shared")).await.unwrap();
}

#[tokio::test]
async fn twenty_clients_attach_one_disk_read_write_and_exactly_one_wins() {
    let s = TestServer::start().await;
    let c = &s.admin;
    disk(c, "hot").await;
    for i in 0..20 {
        c.vm_create(&vm_named(&format!("vm{i}"))).await.unwrap();
    }
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { (i, c.vm_disk_attach(&format!("vm{i}"), &attach("hot")).await) })
        })
        .collect();
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (i, Ok(_)) => winners.push(format!("vm{i}")),
            (_, Err(ClientError::Api { status: 409, error, .. })) => losers.push(error),
            (i, Err(e)) => panic!("vm{i}: {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(losers.len(), 19);
    for e in losers {
        assert_eq!(e.code, "disk_in_use");
        assert!(e.message.contains(&winners[0]), "{} names {}", e.message, winners[0]);
    }
}

#[tokio::test]
async fn a_move_lands_on_the_target_or_goes_back() {
    let s = TestServer::start().await;
    let c = &s.admin;
    c.vm_create(&vm_named("src")).await.unwrap();
    c.vm_create(&vm_named("dst")).await.unwrap();
    c.vm_create(&ide_vm("old")).await.unwrap();
    disk(c, "mv").await;
    c.vm_disk_attach("src", &DiskAttach { unit: Some(3), ..attach("mv") }).await.unwrap();
    for vm in ["dst", "old"] {
        task_done(c, &c.vm_power(vm, PowerAction::On, None).await.unwrap()).await;
    }
    let to = |vm: &str| DiskMove { to_vm: vm.into(), ..Default::default() };
    // From a stopped VM to a running one: hot-plugged there, gone from the source.
    let v = c.disk_move("mv", &to("dst")).await.unwrap();
    assert_eq!(v.config.disks[0].disk, "mv");
    assert_eq!(v.runtime.running_version, Some(v.version));
    assert!(c.vm("src").await.unwrap().config.disks.is_empty());
    // To a running VM that cannot hot-plug: refused, and the disk is back where it was.
    let r = c.disk_move("mv", &to("old")).await;
    assert_eq!(err(r).1, "hotplug_unsupported");
    let back = c.vm("dst").await.unwrap();
    assert_eq!(back.config.disks.len(), 1, "the disk went back to dst");
    assert!(c.vm("old").await.unwrap().config.disks.is_empty());
    // Moving to where it is already is done.
    let again = c.disk_move("mv", &to("dst")).await.unwrap();
    assert_eq!(again.version, back.version);
}

#[tokio::test]
async fn a_detach_names_its_generation_and_a_stale_one_changes_nothing() {
    let s = TestServer::start().await;
    let c = &s.admin;
    c.vm_create(&vm_named("a")).await.unwrap();
    disk(c, "g").await;
    let v = c.vm_disk_attach("a", &attach("g")).await.unwrap();
    let g1 = v.config.disks[0].generation;
    let of = |generation: u64| DetachQuery { generation: Some(generation), ..Default::default() };
    let r = c.vm_disk_detach("a", "g", &of(g1 + 1000)).await;
    assert_eq!(err(r), (409, "stale_generation".into(), Some("generation".into())));
    assert_eq!(c.vm("a").await.unwrap().version, v.version, "nothing changed");
    c.vm_disk_detach("a", "g", &of(g1)).await.unwrap();
    // Attached again: a newer generation; a late detach of the old one is refused.
    let v2 = c.vm_disk_attach("a", &attach("g")).await.unwrap();
    let g2 = v2.config.disks[0].generation;
    assert!(g2 > g1, "{g2} > {g1}");
    let r = c.vm_disk_detach("a", "g", &of(g1)).await;
    assert_eq!(err(r).1, "stale_generation");
    assert_eq!(c.vm("a").await.unwrap().config.disks.len(), 1);
    let d = c.disk("g").await.unwrap();
    assert_eq!(d.attachments[0].generation, g2);
    disk(c, "other").await;
    let on_a = c.disks(&DiskListQuery { vm: Some("a".into()), ..Default::default() }).await.unwrap();
    assert_eq!(on_a.items.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["g"]);
    let detached = c.disks(&DiskListQuery { state: Some(DiskState::Detached), ..Default::default() }).await.unwrap();
    assert_eq!(detached.items.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["other"]);
}

/// A guest that does not let go: the detach fails after its timeout and the disk stays attached; when
/// the guest lets go later, the config still holds the disk, so covm plugs it back.
#[tokio::test]
async fn a_guest_that_holds_on_keeps_the_disk_attached() {
    let sim = std::sync::Arc::new(covm_hv::sim::SimDriver::default());
    let s = TestServer::start_with(covm_server::Driver::Custom(sim.clone())).await;
    let c = &s.admin;
    let vm = c.vm_create(&vm_named("a")).await.unwrap();
    task_done(c, &c.vm_power("a", PowerAction::On, None).await.unwrap()).await;
    disk(c, "held").await;
    let v = c.vm_disk_attach("a", &attach("held")).await.unwrap();
    let block = c.vm_block_state("a").await.unwrap();
    assert_eq!(block.devices.len(), 1);
    sim.sticky_devices.store(true, std::sync::atomic::Ordering::Relaxed);
    let r = c.vm_disk_detach("a", "held", &DetachQuery::default()).await;
    assert_eq!(err(r).1, "detach_timeout");
    let after = c.vm("a").await.unwrap();
    assert_eq!((after.config.disks.len(), after.version), (1, v.version), "the disk stays attached");
    // The guest lets go late: the device is plugged back, since the config holds it.
    let dev = block.devices[0].clone();
    sim.release_devices(vm.id, &[dev.as_str()]);
    let started = std::time::Instant::now();
    loop {
        let b = c.vm_block_state("a").await.unwrap();
        if b == block {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "not plugged back: {b:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Attach, detach and move are events of the disk's own, in the feed beside the VM's config change.
#[tokio::test]
async fn attach_detach_and_move_are_disk_events_in_the_feed() {
    let s = crate::common::TestServer::start().await;
    let c = &s.admin;
    c.disk_create(&new_disk("dd", 1 << 20)).await.unwrap();
    for vm in ["va", "vb"] {
        c.vm_create(&vm_named(vm)).await.unwrap();
    }
    let head = c.events(&Default::default()).await.unwrap().items.last().map_or(0, |e| e.seq);
    c.vm_disk_attach("va", &attach("dd")).await.unwrap();
    c.disk_move("dd", &DiskMove { to_vm: "vb".into(), ..Default::default() }).await.unwrap();
    c.vm_disk_detach("vb", "dd", &DetachQuery::default()).await.unwrap();
    let q = covm_types::api::EventQuery { after: Some(head), ..Default::default() };
    let events = c.events(&q).await.unwrap().items;
    let disk: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e.object_kind == "disk")
        .map(|e| (e.kind.as_str(), e.data["vm"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(
        disk,
        [("disk.attached", "va"), ("disk.detached", "va"), ("disk.moved", "vb"), ("disk.detached", "vb")],
        "{events:?}"
    );
    let moved = events.iter().find(|e| e.kind == "disk.moved").unwrap();
    assert_eq!(moved.data["from_vm"], "va");
    assert_eq!(moved.object_name.as_deref(), Some("dd"));
}
