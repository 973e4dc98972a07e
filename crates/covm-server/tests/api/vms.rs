//! VMs as versioned documents: no lost updates, leases and fencing, per-field privileges, history.

use std::time::Duration;

use std::collections::BTreeMap;

use covm_client::{ChangeOptions, Client, ClientError};
use covm_types::Privilege;
use covm_types::error::{LeasedDetails, StaleDetails};
use covm_types::vm::{Nic, VersionQuery, VmChange, VmConfig};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::common::{TestServer, vm_named};

fn api_err<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String, Option<Value>) {
    match r {
        Err(ClientError::Api { status, error, .. }) => (status, error.code.to_string(), error.details),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Every stored version, oldest first, with its whole document.
async fn history(c: &Client, vm: &str) -> Vec<covm_types::vm::VersionView> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = c.vm_versions(vm, &VersionQuery { before, limit: Some(1000) }).await.unwrap();
        out.extend(page.items);
        match page.next {
            Some(n) => before = n.parse().ok(),
            None => break,
        }
    }
    out.reverse();
    let mut full = Vec::with_capacity(out.len());
    for v in out {
        full.push(c.vm_version(vm, v.version).await.unwrap());
    }
    full
}

/// Versions are 1..=n, and each stored patch applied to its predecessor gives the next document.
async fn assert_history_replays(c: &Client, vm: &str, n: i64) {
    let h = history(c, vm).await;
    assert_eq!(h.iter().map(|v| v.version).collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>(), "contiguous versions");
    let mut doc = json!({});
    for v in &h {
        let p: json_patch::Patch = serde_json::from_value(v.patch.clone()).unwrap();
        json_patch::patch(&mut doc, &p).unwrap();
        assert_eq!(doc, serde_json::to_value(v.config.as_ref().unwrap()).unwrap(), "replay of version {}", v.version);
    }
}

// The server runs as it does in covm: on a runtime with threads of its own. On a single-threaded
// test runtime, 50 busy clients and the server share one thread, every step of the one SQLite
// writer's transaction waits behind all of them, and on a loaded 2-core CI machine a write waited
// more than the pool's 30 s (503 store_unavailable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_editing_with_if_match_lose_nothing() {
    let s = TestServer::start().await;
    let annotations = BTreeMap::from([("counter".into(), "0".into())]);
    s.admin.vm_create(&VmConfig { annotations, ..vm_named("hot") }).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let c = s.admin.clone();
        tasks.push(tokio::spawn(async move {
            let vm = c.vm("hot").await.unwrap();
            let mut doc = serde_json::to_value(&vm.config).unwrap();
            let mut version = vm.version;
            let mut retries = 0u32;
            for _ in 0..20 {
                loop {
                    let n: u64 = doc["annotations"]["counter"].as_str().unwrap().parse().unwrap();
                    let patch = annotate("counter", &(n + 1).to_string());
                    let opts = ChangeOptions { if_match: Some(version), ..Default::default() };
                    match c.vm_change("hot", &patch, &opts).await {
                        Ok(v) => {
                            doc = serde_json::to_value(&v.config).unwrap();
                            version = v.version;
                            break;
                        }
                        Err(ClientError::Api { status: 412, error, .. }) => {
                            // Rebase from the 412 alone: apply what changed since my version.
                            let d = error.details.unwrap();
                            let p: json_patch::Patch = serde_json::from_value(d["patch"].clone()).unwrap();
                            json_patch::patch(&mut doc, &p).unwrap();
                            version = d["current_version"].as_i64().unwrap();
                            retries += 1;
                            tokio::time::sleep(Duration::from_micros(rand_jitter())).await;
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
            }
            retries
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    let vm = s.admin.vm("hot").await.unwrap();
    assert_eq!(vm.version, 1001);
    assert_eq!(vm.config.annotations["counter"], "1000");
    assert!(retries > 0, "50 clients on one VM must have collided");
    assert_history_replays(&s.admin, "hot", 1001).await;
}

/// A patch that sets one annotation.
fn annotate(key: &str, value: &str) -> VmChange {
    VmChange { annotations: Some(BTreeMap::from([(key.into(), Some(value.into()))])), ..Default::default() }
}

fn rand_jitter() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64 % 3000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_editing_without_if_match_lose_nothing() {
    let s = TestServer::start().await;
    s.admin.vm_create(&vm_named("warm")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let c = s.admin.clone();
        tasks.push(tokio::spawn(async move {
            for j in 1..=20 {
                let patch = annotate(&format!("c{i}"), &j.to_string());
                c.vm_change("warm", &patch, &ChangeOptions::default()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let vm = s.admin.vm("warm").await.unwrap();
    assert_eq!(vm.version, 1001);
    for i in 0..50 {
        assert_eq!(vm.config.annotations[&format!("c{i}")], "20", "client {i}'s last edit");
    }
    assert_history_replays(&s.admin, "warm", 1001).await;
}

#[tokio::test]
async fn a_stale_if_match_gets_412_with_what_changed() {
    let s = TestServer::start().await;
    let v1 = s.admin.vm_create(&VmConfig { memory_mib: 2048, ..vm_named("web-1") }).await.unwrap();
    let alice = s.user("alice").await;
    s.admin.permission_grant("alice", "VMCreator", "/", true).await.unwrap();
    alice
        .vm_change(
            "web-1",
            &VmChange { cpus: Some(2), ..Default::default() },
            &ChangeOptions { message: Some("more".into()), ..Default::default() },
        )
        .await
        .unwrap();
    let (status, code, d) = api_err(
        s.admin
            .vm_change(
                "web-1",
                &VmChange { memory_mib: Some(4096), ..Default::default() },
                &ChangeOptions { if_match: Some(v1.version), ..Default::default() },
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (412, "version_mismatch"));
    let d: StaleDetails = serde_json::from_value(d.unwrap()).unwrap();
    assert_eq!(d.current_version, 2);
    assert_eq!(d.author.as_deref(), Some("alice"));
    assert_eq!(d.message.as_deref(), Some("more"));
    assert_eq!(d.summary, Some(vec!["cpus: 1 → 2".to_string()]));
    // The patch is RFC 6902, a JSON document in the typed details too.
    assert_eq!(d.patch, Some(json!([{ "op": "replace", "path": "/cpus", "value": 2 }])));
    // Nothing was written.
    assert_eq!(s.admin.vm("web-1").await.unwrap().config.memory_mib, 2048);
    // The ETag header is the version; a bad If-Match is a 400 naming it (raw: the headers are the point).
    let resp = s.admin.request(reqwest::Method::GET, "/vms/web-1").send().await.unwrap();
    assert_eq!(resp.headers()["etag"], "\"2\"");
    let resp = s
        .admin
        .request(reqwest::Method::PATCH, "/vms/web-1")
        .header("If-Match", "abc")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<covm_types::ErrorBody>().await.unwrap().error.field.as_deref(), Some("If-Match"));
}

#[tokio::test]
async fn leases_lock_out_others_and_fence_stale_holders() {
    let s = TestServer::start().await;
    s.admin.vm_create(&vm_named("web-1")).await.unwrap();
    let a = s.user("alice").await;
    let b = s.user("bob").await;
    for u in ["alice", "bob"] {
        s.admin.permission_grant(u, "VMCreator", "/", true).await.unwrap();
    }
    let lease = a.lease_acquire("web-1", 1).await.unwrap();
    let t1 = lease.token.unwrap();
    // Others: 423 naming the holder and expiry.
    let (status, code, d) = api_err(
        b.vm_change("web-1", &VmChange { memory_mib: Some(4096), ..Default::default() }, &Default::default()).await,
    );
    assert_eq!((status, code.as_str()), (423, "leased"));
    // Read as LeasedDetails: the expiry must be a time.
    let d: LeasedDetails = serde_json::from_value(d.unwrap()).unwrap();
    assert_eq!(d.holder, "alice");
    assert_eq!(api_err(b.lease_acquire("web-1", 60).await).0, 423);
    // Bob sees the lease, but not its token.
    let seen = b.lease("web-1").await.unwrap().unwrap();
    assert_eq!((seen.holder.as_str(), seen.token), ("alice", None));
    // The holder writes under the token.
    let under = ChangeOptions { lease: Some(t1), ..Default::default() };
    a.vm_change("web-1", &VmChange { cpus: Some(2), ..Default::default() }, &under).await.unwrap();
    // After expiry the token is refused, and Bob may write and lease; his token is newer.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, code, _) =
        api_err(a.vm_change("web-1", &VmChange { cpus: Some(3), ..Default::default() }, &under).await);
    assert_eq!((status, code.as_str()), (409, "lease_expired"));
    b.vm_change("web-1", &VmChange { memory_mib: Some(1024), ..Default::default() }, &Default::default())
        .await
        .unwrap();
    let t2 = b.lease_acquire("web-1", 60).await.unwrap().token.unwrap();
    assert!(t2 > t1, "fencing tokens only grow");
    // A break by an admin fences the holder; the holder hears of it in the feed.
    let mut feed = b.events_follow(None, None).await.unwrap();
    s.admin.lease_release("web-1", true).await.unwrap();
    let bt = ChangeOptions { lease: Some(t2), ..Default::default() };
    assert_eq!(
        api_err(b.vm_change("web-1", &VmChange { cpus: Some(4), ..Default::default() }, &bt).await).1,
        "lease_expired"
    );
    let ev = tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(ev.kind, "vm.lease.broken");
    assert_eq!((ev.data["holder"].as_str(), ev.data["broken_by"].as_str()), (Some("bob"), Some("admin")));
    // Breaking needs its privilege (VMCreator lacks it); releasing someone else's lease is a 423.
    let t3 = a.lease_acquire("web-1", 60).await.unwrap().token.unwrap();
    assert!(t3 > t2);
    assert_eq!(api_err(b.lease_release("web-1", true).await).0, 403);
    assert_eq!(api_err(b.lease_release("web-1", false).await).0, 423);
    // Renewing keeps the token; a bad TTL is a 400 naming ttl_s.
    assert_eq!(a.lease_renew("web-1", 120, Some(t3)).await.unwrap().token, Some(t3));
    assert_eq!(api_err(a.lease_acquire("web-1", 0).await).0, 400);
    a.lease_release("web-1", false).await.unwrap();
    assert!(a.lease("web-1").await.unwrap().is_none());
    assert_eq!(api_err(a.lease_renew("web-1", 60, Some(t3)).await).1, "lease_expired");
}

#[tokio::test]
async fn expired_leases_are_reported_to_the_feed() {
    let s = TestServer::start().await;
    s.admin.vm_create(&vm_named("web-1")).await.unwrap();
    let mut feed = s.admin.events_follow(None, None).await.unwrap();
    s.admin.lease_acquire("web-1", 1).await.unwrap();
    let kinds: Vec<String> = async {
        let mut k = Vec::new();
        while k.len() < 2 {
            let ev = tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap().unwrap().unwrap();
            k.push(ev.kind);
        }
        k
    }
    .await;
    assert_eq!(kinds, ["vm.lease.acquired", "vm.lease.expired"]);
}

#[tokio::test]
async fn each_field_needs_its_privilege() {
    let s = TestServer::start().await;
    s.admin.vm_create(&vm_named("web-1")).await.unwrap();
    let ed = s.user("ed").await;
    s.admin.role_create("editor", &[Privilege::SystemView, Privilege::VmConfigEdit]).await.unwrap();
    s.admin.permission_grant("ed", "editor", "/web-1", false).await.unwrap();
    ed.vm_change("web-1", &VmChange { description: Some("mine".into()), ..annotate("k", "v") }, &Default::default())
        .await
        .unwrap();
    let nic =
        Nic { network: "user".into(), model: Default::default(), mac: None, connected: true, port_forwards: vec![] };
    for (patch, privilege) in [
        (VmChange { cpus: Some(2), ..Default::default() }, "VirtualMachine.Config.CPUCount"),
        (VmChange { memory_mib: Some(1024), ..Default::default() }, "VirtualMachine.Config.Memory"),
        (VmChange { nics: Some(vec![nic]), ..Default::default() }, "VirtualMachine.Config.AddRemoveDevice"),
        (VmChange { controllers: Some(vec![]), ..Default::default() }, "VirtualMachine.Config.AddRemoveDevice"),
    ] {
        let r = ed.vm_change("web-1", &patch, &Default::default()).await;
        let Err(ClientError::Api { status: 403, error, .. }) = r else { panic!("{patch:?}: {r:?}") };
        assert!(error.message.contains(privilege), "{}", error.message);
    }
    assert_eq!(s.admin.vm("web-1").await.unwrap().version, 2);
}

#[tokio::test]
async fn bad_configs_are_refused_with_the_field() {
    let s = TestServer::start().await;
    // A reference to nothing is "not found" (404), as at the reference's own endpoint. Raw bodies on
    // purpose: out-of-range values beside an unknown field and an invalid name, each refused at the wire.
    let cases = [
        (json!({ "name": "a", "cpus": 0 }), 400, "cpus"),
        (json!({ "name": "a", "cpus": 257 }), 400, "cpus"),
        (json!({ "name": "a", "memory_mib": 8 }), 400, "memory_mib"),
        (json!({ "name": "a", "memory_mib": 1u64 << 40 }), 400, "memory_mib"),
        (json!({ "name": "a", "nics": [{ "network": "nope" }] }), 404, "nics[0].network"),
        (json!({ "name": "a", "pool": "nope" }), 404, "pool"),
        (json!({ "name": "a", "colour": "red" }), 400, "colour"),
        (json!({ "name": "A" }), 400, "name"),
        (json!({ "name": "a", "kernel": "local:../../etc/shadow" }), 400, "kernel"),
        (json!({ "name": "a", "kernel": "local:disks/x.qcow2" }), 400, "kernel"),
        (json!({ "name": "a", "disks": [{ "disk": "nope", "controller": "scsi0", "unit": 0 }] }), 404, "disks[0].disk"),
    ];
    for (body, status, field) in cases {
        let resp = s.admin.request(reqwest::Method::POST, "/vms").json(&body).send().await.unwrap();
        assert_eq!(resp.status(), status, "{body}");
        assert_eq!(resp.json::<covm_types::ErrorBody>().await.unwrap().error.field.as_deref(), Some(field), "{body}");
    }
    assert!(s.admin.vms(&Default::default()).await.unwrap().items.is_empty());
    s.admin.vm_create(&vm_named("a")).await.unwrap();
    assert_eq!(api_err(s.admin.vm_create(&vm_named("a")).await).0, 409);
    // Raw: a wrong type and a patch that is not an object.
    assert_eq!(api_err(s.admin.vm_change("a", &json!({ "cpus": "two" }), &Default::default()).await).0, 400);
    assert_eq!(api_err(s.admin.vm_change("a", &json!([1]), &Default::default()).await).1, "invalid_json");
    assert_eq!(s.admin.vm("a").await.unwrap().version, 1);
}

#[tokio::test]
async fn history_diff_and_revert_do_what_they_say() {
    let s = TestServer::start().await;
    s.admin.folder_create("tmp", "/").await.unwrap();
    s.admin.vm_create(&VmConfig { memory_mib: 2048, folder: "/tmp".into(), ..vm_named("web-1") }).await.unwrap();
    let c = &s.admin;
    c.vm_change(
        "web-1",
        &VmChange { cpus: Some(2), ..Default::default() },
        &ChangeOptions { message: Some("two".into()), ..Default::default() },
    )
    .await
    .unwrap();
    c.vm_change("web-1", &VmChange { memory_mib: Some(4096), ..Default::default() }, &Default::default())
        .await
        .unwrap();
    c.vm_change("web-1", &VmChange { cpus: Some(4), ..annotate("x", "y") }, &Default::default()).await.unwrap();
    let d = c.vm_diff("web-1", 2, 4).await.unwrap();
    assert_eq!(d.summary, ["annotations.x: (none) → \"y\"", "cpus: 2 → 4", "memory_mib: 2048 → 4096"]);
    let reverted = c.vm_revert("web-1", 2, None).await.unwrap();
    assert_eq!(reverted.version, 5);
    assert_eq!((reverted.config.cpus, reverted.config.memory_mib), (2, 2048));
    assert!(reverted.config.annotations.is_empty());
    let h = c.vm_versions("web-1", &Default::default()).await.unwrap().items;
    assert_eq!(h[0].message.as_deref(), Some("revert to version 2"));
    assert_eq!(h[3].message.as_deref(), Some("two"));
    assert!(h.iter().all(|v| v.event_seq.is_some() && v.author == "admin"));
    // A no-op change writes no version.
    c.vm_change("web-1", &VmChange { cpus: Some(2), ..Default::default() }, &Default::default()).await.unwrap();
    assert_eq!(c.vm("web-1").await.unwrap().version, 5);
    // Move out of /tmp, delete it; a revert into the deleted folder is refused and says which.
    let moved = c
        .vm_change("web-1", &VmChange { folder: Some("/".into()), ..Default::default() }, &Default::default())
        .await
        .unwrap();
    assert_eq!(moved.path, "/web-1");
    c.folder_delete("tmp").await.unwrap();
    let Err(ClientError::Api { error, .. }) = c.vm_revert("web-1", 5, None).await else { panic!() };
    assert_eq!(error.field.as_deref(), Some("folder"));
    assert!(error.message.contains("/tmp"), "{}", error.message);
    assert_eq!(api_err(c.vm_revert("web-1", 99, None).await).0, 400);
    // Deleting: the VM and its history go.
    c.vm_delete("web-1").await.unwrap();
    assert_eq!(api_err(c.vm("web-1").await).0, 404);
}

#[tokio::test]
async fn others_see_changes_in_the_feed_with_the_patch() {
    let s = TestServer::start().await;
    s.admin.folder_create("team-a", "/").await.unwrap();
    s.admin.vm_create(&VmConfig { folder: "/team-a".into(), ..vm_named("web-1") }).await.unwrap();
    s.admin.vm_create(&vm_named("secret")).await.unwrap();
    let b = s.user("bob").await;
    s.admin.permission_grant("bob", "ReadOnly", "/team-a", true).await.unwrap();
    let mut feed = b.events_follow(None, None).await.unwrap();
    s.admin.vm_change("secret", &VmChange { cpus: Some(3), ..Default::default() }, &Default::default()).await.unwrap();
    s.admin.vm_change("web-1", &VmChange { cpus: Some(2), ..Default::default() }, &Default::default()).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((ev.kind.as_str(), ev.object_name.as_deref()), ("vm.config.changed", Some("web-1")));
    assert_eq!((ev.version_before, ev.version_after), (Some(1), Some(2)));
    assert_eq!(ev.patch, Some(json!([{ "op": "replace", "path": "/cpus", "value": 2 }])));
    assert_eq!(ev.data["summary"], json!(["cpus: 1 → 2"]));
    // Bob lists only what he may view; filters work.
    let names: Vec<String> = b.vms(&Default::default()).await.unwrap().items.into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["web-1"]);
    let q = covm_types::vm::VmListQuery { name: Some("sec".into()), ..Default::default() };
    assert_eq!(s.admin.vms(&q).await.unwrap().items.len(), 1);
    let q = covm_types::vm::VmListQuery { folder: Some("/team-a".into()), ..Default::default() };
    assert_eq!(s.admin.vms(&q).await.unwrap().items[0].name, "web-1");
}
