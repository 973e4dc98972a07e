//! Several covm replicas on one PostgreSQL (a real server the tests start: `covm_store::testing`):
//! the consistency checks of the bench with clients and subscribers spread over two replicas, once
//! with one replica killed (`kill -9`) in the middle; and two replicas racing for one lease and one
//! disk. They fail only on a violation, never on speed.

use covm_bench::server::{Server, covm_binary};
use covm_bench::storm::{AttachParams, LeaseParams, StormParams, attach_race, edit_storm, lease_contention};

async fn two_replicas() -> (Server, Server) {
    let db = covm_store::testing::postgres_database().await.expect("PostgreSQL for tests (Debian package postgresql)");
    let covm = covm_binary();
    let a = Server::start_on(&covm, "sim", Some(&db), None, &[]).await.expect("replica a starts");
    let b = a.replica(&covm, "sim", &db).await.expect("replica b starts");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_storm_over_two_replicas_has_no_violations() {
    let (a, b) = two_replicas().await;
    let p = StormParams {
        users: 12,
        vms: 3,
        subscribers: 4,
        duration_s: 3.0,
        replicas: vec![a.url.clone(), b.url.clone()],
    };
    let r = edit_storm(&a.admin, &p).await.unwrap();
    assert_eq!(r.violations, 0, "{:#?}", r.violation_details);
    assert!(r.figures["edits_committed"].as_u64().unwrap() > 0, "{}", r.figures);
    assert_eq!(r.figures["unanswered_edits"], 0);
    // One log, written from both replicas: gap-free and one hash chain, from either side.
    for s in [&a, &b] {
        let v = s.admin.audit_verify().await.unwrap();
        assert!(v.ok && v.broken_seq.is_none(), "{v:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_storm_loses_nothing_it_acknowledged() {
    let (a, mut b) = two_replicas().await;
    let p = StormParams {
        users: 12,
        vms: 3,
        subscribers: 4,
        duration_s: 4.0,
        replicas: vec![b.url.clone(), a.url.clone()],
    };
    let admin = a.admin.clone();
    let storm = tokio::spawn(async move { edit_storm(&admin, &p).await });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    b.kill();
    let r = storm.await.unwrap().unwrap();
    eprintln!("{}", r.figures);
    assert_eq!(r.violations, 0, "{:#?}", r.violation_details);
    assert!(r.figures["edits_committed"].as_u64().unwrap() > 0, "{}", r.figures);
    // The kill happened mid-run: clients of b saw it go and moved to a.
    assert!(r.figures["errors"].as_u64().unwrap() > 0, "{}", r.figures);
    assert!(a.admin.audit_verify().await.unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_race_for_leases_and_one_disk() {
    let (a, b) = two_replicas().await;
    let urls = vec![a.url.clone(), b.url.clone()];
    let r = lease_contention(&a.admin, &LeaseParams { clients: 8, vms: 2, duration_s: 3.0, replicas: urls.clone() })
        .await
        .unwrap();
    assert_eq!(r.violations, 0, "{:#?}", r.violation_details);
    assert!(r.figures["leases_acquired"].as_u64().unwrap() > 1, "{}", r.figures);
    let r = attach_race(&a.admin, &AttachParams { clients: 8, rounds: 5, replicas: urls }).await.unwrap();
    assert_eq!(r.violations, 0, "{:#?}", r.violation_details);
}

/// A replica dies in the middle of an attach (the fault switch aborts it before the config version is
/// written); the replica that runs background work sees it gone and undoes its saga, and the disk's
/// lock is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_saga_is_undone_by_another() {
    let db = covm_store::testing::postgres_database().await.expect("PostgreSQL for tests");
    let covm = covm_binary();
    let a = Server::start_on(&covm, "sim", Some(&db), None, &[]).await.unwrap();
    let fault = [("COVM_FAULT", "disk.attach:commit:before:crash")];
    let mut b = Server::start_on(&covm, "sim", Some(&db), Some(&a.password), &fault).await.unwrap();
    let c = &a.admin;
    c.vm_create(&serde_json::json!({ "name": "x" })).await.unwrap();
    c.post::<_, serde_json::Value>(
        "/disks",
        &serde_json::json!({ "name": "d", "datastore": "local", "capacity_bytes": 1u64 << 20 }),
    )
    .await
    .unwrap();
    let r = b.admin.post::<_, serde_json::Value>("/vms/x/disks", &serde_json::json!({ "disk": "d" })).await;
    assert!(r.is_err(), "b died in the middle of the attach");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!b.alive(), "b aborted at the fault");
    // a undoes b's saga (within its next background rounds) and the disk can be attached through a.
    let v: covm_types::vm::VmView = c.post("/vms/x/disks", &serde_json::json!({ "disk": "d" })).await.unwrap();
    assert_eq!(v.config.disks.len(), 1);
    let d: covm_types::disk::DiskView = c.get("/disks/d").await.unwrap();
    assert_eq!(d.attachments.len(), 1);
}
