//! Several replicas on one database: only in the `api_postgres` target (a SQLite file has one
//! process). The bench's tests add the consistency checks with writes on every replica and a replica
//! killed mid-run (crates/covm-bench/tests/replicas.rs).

use std::time::{Duration, Instant};

use covm_types::api::EventQuery;
use futures::StreamExt;

use crate::common::{TestServer, attach, new_disk, on_postgres, vm_named};

#[tokio::test]
async fn a_write_on_one_replica_reaches_the_feed_of_the_other() {
    if !on_postgres() {
        return;
    }
    let a = TestServer::start().await;
    let b = a.replica().await;
    assert!(!b.dir.path().join("initial-admin-password").exists(), "only the replica that made admin has it");
    let head = b.admin.events(&EventQuery { after: None, limit: Some(1000), object: None }).await.unwrap();
    let after = head.items.last().map_or(0, |e| e.seq);
    let mut feed = b.admin.events_follow(Some(after), None).await.unwrap();
    let t0 = Instant::now();
    a.admin.vm_create(&vm_named("made-on-a")).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ev = feed.next().await.unwrap().unwrap();
            if ev.kind == "vm.created" {
                return ev;
            }
        }
    })
    .await
    .expect("b's feed shows a's write");
    assert_eq!(ev.object_name.as_deref(), Some("made-on-a"));
    eprintln!("a's write reached b's feed in {:?}", t0.elapsed());
    // One log: the chain verifies from either replica.
    assert!(b.admin.audit_verify().await.unwrap().ok);
    assert!(a.admin.audit_verify().await.unwrap().ok);
}

#[tokio::test]
async fn background_work_moves_to_a_live_replica() {
    if !on_postgres() {
        return;
    }
    let a = TestServer::start().await;
    let b = a.replica().await;
    b.admin.vm_create(&vm_named("leased")).await.unwrap();
    // a started first: it reports lease expiries. It goes away; b takes over.
    a.stop().await;
    b.admin.lease_acquire("leased", 1).await.unwrap();
    let started = Instant::now();
    loop {
        let page = b.admin.events(&EventQuery { after: None, limit: Some(1000), object: None }).await.unwrap();
        if page.items.iter().any(|e| e.kind == "vm.lease.expired") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no replica reported the expiry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn requests_about_a_running_vm_are_forwarded_to_its_node() {
    if !on_postgres() {
        return;
    }
    let a = TestServer::start().await;
    let b = a.replica().await;
    a.admin.vm_create(&vm_named("on-a")).await.unwrap();
    let t = a.admin.vm_power("on-a", covm_types::vm::PowerAction::On, None).await.unwrap();
    crate::common::task_done(&a.admin, &t).await;
    // Through b: a hot attach and the block state go to a's agent, and come back.
    b.admin.disk_create(&new_disk("d", 1 << 20)).await.unwrap();
    let v = b.admin.vm_disk_attach("on-a", &attach("d")).await.unwrap();
    assert_eq!(v.runtime.running_version, Some(v.version), "hot-plugged by a's agent");
    let block = b.admin.vm_block_state("on-a").await.unwrap();
    assert_eq!(block.devices.len(), 1, "{block:?}");
    // A power-off sent to b: a's agent does it; the task is in the shared store.
    let t = b.admin.vm_power("on-a", covm_types::vm::PowerAction::Off, None).await.unwrap();
    let done = crate::common::task_done(&b.admin, &t).await;
    assert_eq!(done.state, covm_types::vm::TaskState::Success, "{done:?}");
    assert_eq!(b.admin.vm("on-a").await.unwrap().runtime.power_state, covm_types::vm::PowerState::Off);
    // Every request went through b; a's agent did the work (the runtime names a's node).
    assert_eq!(v.runtime.node.as_deref(), Some(std::fs::read_to_string(a.dir.path().join("node-id")).unwrap().trim()));
}

#[tokio::test]
async fn presence_on_one_replica_reaches_the_feed_and_the_list_of_the_other() {
    if !on_postgres() {
        return;
    }
    let a = TestServer::start_options(crate::common::Options {
        presence_ttl: Duration::from_secs(3),
        ..crate::common::Options::default()
    })
    .await;
    let b = a.replica().await;
    let vm = a.admin.vm_create(&vm_named("shared")).await.unwrap();
    a.admin.user_create("ann", crate::common::PASSWORD).await.unwrap();
    a.admin.permission_grant("ann", "Admin", "/", true).await.unwrap();
    let ann_on_a = a.login("ann").await;
    let mut feed_on_b = b.admin.feed_follow(None, Some(vm.id)).await.unwrap();
    let mut next_presence = async || loop {
        let item = tokio::time::timeout(Duration::from_secs(10), feed_on_b.next()).await.expect("presence on b");
        if let covm_client::FeedItem::Presence(p) = item.unwrap().unwrap() {
            return p;
        }
    };

    ann_on_a.presence_set("shared", covm_types::vm::PresenceState::Editing).await.unwrap();
    let p = next_presence().await;
    assert_eq!(p.entries.iter().map(|e| e.user.as_str()).collect::<Vec<_>>(), ["ann"]);
    b.admin.presence_set("shared", covm_types::vm::PresenceState::Viewing).await.unwrap();
    let both: Vec<String> = b.admin.presence("shared").await.unwrap().into_iter().map(|e| e.user).collect();
    assert_eq!(both, ["admin", "ann"]);
    // Told again while it lives: still there after more than the TTL of heartbeats.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        ann_on_a.presence_set("shared", covm_types::vm::PresenceState::Editing).await.unwrap();
        b.admin.presence_set("shared", covm_types::vm::PresenceState::Viewing).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let users: Vec<String> = a.admin.presence("shared").await.unwrap().into_iter().map(|e| e.user).collect();
    assert_eq!(users, ["admin", "ann"], "each replica sees the other's heartbeats");
    // Leaving on a reaches b.
    ann_on_a.presence_leave("shared").await.unwrap();
    let started = Instant::now();
    while b.admin.presence("shared").await.unwrap().iter().any(|e| e.user == "ann") {
        assert!(started.elapsed() < Duration::from_secs(5), "ann's leaving did not reach b");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
