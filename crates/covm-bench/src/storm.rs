//! `edit-storm` and `lease-contention`: many clients changing a few VMs at once, subscribers following
//! the feed, and a checker that proves from the stored history and the event log that nothing was lost,
//! duplicated, reordered, or written under a lease that was not live.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use covm_client::{ChangeOptions, Client, ClientError};
use covm_types::api::{EventQuery, EventView};
use covm_types::vm::VersionQuery;
use futures::StreamExt;
use rand::Rng;
use serde_json::json;
use uuid::Uuid;

use crate::{Percentiles, Report, Violations};

pub const PASSWORD: &str = "bench-password-1";

#[derive(Debug, Clone, serde::Serialize)]
pub struct StormParams {
    pub users: usize,
    pub vms: usize,
    pub subscribers: usize,
    pub duration_s: f64,
    /// The replicas to spread clients and subscribers over (URLs; empty: the admin's server). A client
    /// whose replica stops answering moves to the next one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
}

/// The replicas of a run: the given URLs, or the admin's server alone.
fn replicas_of(admin: &Client, given: &[String]) -> Vec<String> {
    if given.is_empty() { vec![admin.base().to_owned()] } else { given.to_vec() }
}

/// `c` (its token) on replica `i` of `urls`.
fn on_replica(c: &Client, urls: &[String], i: usize) -> Client {
    let c2 = Client::new(&urls[i % urls.len()]);
    match c.token() {
        Some(t) => c2.with_token(t),
        None => c2,
    }
}

/// The bench's own corner of the inventory: a folder, VMs in it, users granted VMCreator on it.
pub struct Setup {
    pub tag: String,
    pub vms: Vec<(String, Uuid)>,
    pub users: Vec<(String, Client)>,
    /// The log's sequence number when the setup was done: the scenario's events come after it.
    pub start_seq: i64,
}

pub async fn setup(admin: &Client, users: usize, vms: usize) -> anyhow::Result<Setup> {
    let tag = format!("b{:06x}", rand::rng().random::<u32>() & 0xffffff);
    let folder = format!("/{tag}");
    admin.folder_create(&tag, "/").await?;
    let mut list = Vec::with_capacity(vms);
    for i in 0..vms {
        let name = format!("{tag}-vm{i}");
        let v = admin.vm_create(&json!({ "name": name, "folder": folder, "annotations": { "counter": "0" } })).await?;
        list.push((name, v.id));
    }
    let anon = Client::new(admin.base());
    let mut principals = Vec::new();
    for i in 0..users.clamp(1, 16) {
        let name = format!("{tag}-u{i}");
        admin.user_create(&name, PASSWORD).await?;
        admin.permission_grant(&name, "VMCreator", &folder, true).await?;
        let (c, _) = anon.login(&name, PASSWORD).await?;
        principals.push((name, c));
    }
    // The newest version of the last VM links to its event: nothing of the scenario comes before it.
    let last = &list.last().context("at least one VM")?.0;
    let mut start_seq =
        admin.vm_versions(last, &VersionQuery { before: None, limit: Some(1) }).await?.items[0].event_seq.unwrap_or(0);
    // The grants came after the VMs.
    let page = admin.events(&EventQuery { after: Some(start_seq), limit: Some(1000), object: None }).await?;
    if let Some(e) = page.items.last() {
        start_seq = e.seq;
    }
    Ok(Setup { tag, vms: list, users: principals, start_seq })
}

/// Every feed event after `after`, as admin sees them.
pub async fn log_after(admin: &Client, after: i64) -> anyhow::Result<Vec<EventView>> {
    let mut out = Vec::new();
    let mut cursor = after;
    loop {
        let page = admin.events(&EventQuery { after: Some(cursor), limit: Some(1000), object: None }).await?;
        let full = page.next.is_some();
        if let Some(n) = page.next.as_deref().and_then(|n| n.parse().ok()) {
            cursor = n;
        }
        out.extend(page.items);
        if !full {
            return Ok(out);
        }
    }
}

/// What a subscriber received: (seq, kind, object, delay in ms from commit to arrival).
type Received = Arc<Mutex<Vec<(i64, String, Option<Uuid>, f64)>>>;

struct Subscriber {
    received: Received,
    task: tokio::task::JoinHandle<()>,
}

fn subscribe(c: Client, urls: Vec<String>, first: usize, after: i64) -> Subscriber {
    let received: Received = Arc::default();
    let r2 = received.clone();
    let task = tokio::spawn(async move {
        let mut cursor = after;
        let mut replica = first;
        // Reconnects resume from the last sequence number seen, on the next replica if this one is gone.
        loop {
            let c = on_replica(&c, &urls, replica);
            let Ok(mut stream) = c.events_follow(Some(cursor), None).await else {
                replica += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { break };
                let delay = (chrono::Utc::now() - ev.time).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                cursor = ev.seq;
                r2.lock().unwrap_or_else(|p| p.into_inner()).push((ev.seq, ev.kind, ev.object_id, delay));
            }
        }
    });
    Subscriber { received, task }
}

/// Waits until every subscriber has seen `last` (or 20 s pass), then stops them.
async fn drain(subs: &[Subscriber], last: i64) {
    let started = Instant::now();
    for s in subs {
        while s.received.lock().unwrap_or_else(|p| p.into_inner()).last().is_none_or(|e| e.0 < last)
            && started.elapsed() < Duration::from_secs(20)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.task.abort();
    }
}

/// What a client was told: (vm, version) committed by this user.
type Acks = Arc<Mutex<Vec<(Uuid, i64, String)>>>;

pub async fn edit_storm(admin: &Client, p: &StormParams) -> anyhow::Result<Report> {
    let s = setup(admin, p.users, p.vms).await?;
    let urls = replicas_of(admin, &p.replicas);
    let subs: Vec<Subscriber> = (0..p.subscribers)
        .map(|i| subscribe(s.users[i % s.users.len()].1.clone(), urls.clone(), i, s.start_seq))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Edits whose outcome a client never learned (its replica died before it answered).
    let uncertain = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let acks: Acks = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let stale = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(p.duration_s);
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 0..p.users {
        let (user, token) = s.users[i % s.users.len()].clone();
        let vms = s.vms.clone();
        let (acks, latencies, stale, errors) = (acks.clone(), latencies.clone(), stale.clone(), errors.clone());
        let (urls, uncertain) = (urls.clone(), uncertain.clone());
        clients.push(tokio::spawn(async move {
            let mut cache: HashMap<Uuid, (i64, u64)> = HashMap::new();
            let mut lat = Vec::new();
            let mut replica = i;
            let mut c = on_replica(&token, &urls, replica);
            while Instant::now() < deadline {
                let pick = rand::rng().random_range(0..vms.len());
                let (name, id) = &vms[pick];
                let (version, n) = match cache.get(id) {
                    Some(v) => *v,
                    None => match c.vm(name).await {
                        Ok(v) => {
                            (v.version, v.config.annotations.get("counter").and_then(|n| n.parse().ok()).unwrap_or(0))
                        }
                        Err(e) => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if matches!(e, ClientError::Transport(_)) {
                                replica += 1;
                                c = on_replica(&token, &urls, replica);
                            }
                            continue;
                        }
                    },
                };
                let patch = json!({ "annotations": { "counter": (n + 1).to_string() } });
                let t0 = Instant::now();
                let r =
                    c.vm_change(name, &patch, &ChangeOptions { if_match: Some(version), ..Default::default() }).await;
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                match r {
                    Ok(v) => {
                        let counter = v.config.annotations.get("counter").and_then(|n| n.parse().ok()).unwrap_or(0);
                        cache.insert(*id, (v.version, counter));
                        acks.lock().unwrap_or_else(|p| p.into_inner()).push((*id, v.version, user.clone()));
                    }
                    Err(ClientError::Api { status: 412, error, .. }) => {
                        stale.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        // Rebase from the 412 alone: the current version and the counter it set.
                        let d = error.details.unwrap_or_default();
                        let current = d["current_version"].as_i64();
                        let counter = d["patch"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .rev()
                            .find(|op| op["path"] == "/annotations/counter")
                            .and_then(|op| op["value"].as_str()?.parse().ok());
                        match (current, counter) {
                            (Some(v), Some(n)) => {
                                cache.insert(*id, (v, n));
                            }
                            _ => {
                                cache.remove(id);
                            }
                        }
                    }
                    Err(e) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        cache.remove(id);
                        if matches!(e, ClientError::Transport(_)) {
                            // The replica went away: the edit may or may not have committed.
                            uncertain.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            replica += 1;
                            c = on_replica(&token, &urls, replica);
                        }
                    }
                }
            }
            latencies.lock().unwrap_or_else(|p| p.into_inner()).extend(lat);
        }));
    }
    for c in clients {
        c.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();

    // The checker.
    let mut v = Violations::default();
    let log = log_after(admin, s.start_seq).await?;
    let bench_vms: HashMap<Uuid, String> = s.vms.iter().map(|(n, id)| (*id, n.clone())).collect();
    let expected: Vec<i64> = log
        .iter()
        .filter(|e| e.kind == "vm.config.changed" && e.object_id.is_some_and(|o| bench_vms.contains_key(&o)))
        .map(|e| e.seq)
        .collect();
    drain(&subs, expected.last().copied().unwrap_or(s.start_seq)).await;

    let acks = acks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let uncertain = uncertain.load(std::sync::atomic::Ordering::Relaxed);
    let mut by_vm: HashMap<Uuid, Vec<(i64, String)>> = HashMap::new();
    for (vm, version, user) in &acks {
        by_vm.entry(*vm).or_default().push((*version, user.clone()));
    }
    for (name, id) in &s.vms {
        let mut acked = by_vm.remove(id).unwrap_or_default();
        acked.sort();
        let vm = admin.vm(name).await?;
        let versions = history(admin, name).await?;
        // Every acknowledged edit is there; an edit whose answer was lost with its replica may be too.
        let (low, high) = (acked.len() as i64, (acked.len() + uncertain) as i64);
        if !(low..=high).contains(&(vm.version - 1)) {
            v.add(format!(
                "{name}: {} acknowledged edits ({uncertain} unanswered) but version {} (expected {})",
                acked.len(),
                vm.version,
                acked.len() + 1
            ));
        }
        for w in acked.windows(2) {
            if w[0].0 == w[1].0 {
                v.add(format!("{name}: version {} acknowledged twice", w[0].0));
            }
        }
        let numbers: Vec<i64> = versions.iter().map(|x| x.version).collect();
        if numbers != (1..=vm.version).collect::<Vec<_>>() {
            v.add(format!("{name}: stored versions are not 1..={}", vm.version));
        }
        for (ver, user) in &acked {
            match versions.iter().find(|x| x.version == *ver) {
                Some(x) if &x.author == user => {}
                Some(x) => v.add(format!("{name}: version {ver} acknowledged to {user} but written by {}", x.author)),
                None => v.add(format!("{name}: acknowledged version {ver} is not in the history")),
            }
        }
        // Replaying every stored patch from {} gives the current document.
        let mut doc = json!({});
        for x in &versions {
            match serde_json::from_value::<json_patch::Patch>(x.patch.clone()) {
                Ok(p) if json_patch::patch(&mut doc, &p).is_ok() => {}
                _ => v.add(format!(
                    "{name}: the patch of version {} does not apply to version {}",
                    x.version,
                    x.version - 1
                )),
            }
        }
        if doc != serde_json::to_value(&vm.config)? {
            v.add(format!("{name}: replaying the history does not give the current config"));
        }
        let counter: u64 = vm.config.annotations.get("counter").and_then(|n| n.parse().ok()).unwrap_or(0);
        if counter as i64 != vm.version - 1 {
            v.add(format!("{name}: the counter is {counter} after {} edits (a lost update)", vm.version - 1));
        }
    }
    let mut delays = Vec::new();
    for (i, sub) in subs.iter().enumerate() {
        let got = sub.received.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let seen: Vec<i64> = got
            .iter()
            .filter(|e| e.1 == "vm.config.changed" && e.2.is_some_and(|o| bench_vms.contains_key(&o)))
            .map(|e| e.0)
            .collect();
        delays.extend(got.iter().filter(|e| e.1 == "vm.config.changed").map(|e| e.3));
        if seen != expected {
            let missing = expected.iter().filter(|s| !seen.contains(s)).count();
            v.add(format!(
                "subscriber {i}: saw {} change events, the log has {} ({missing} missing, or duplicated or out of order)",
                seen.len(),
                expected.len()
            ));
        }
    }
    let attempts = latencies.lock().unwrap_or_else(|p| p.into_inner()).len();
    let stale = stale.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Report {
        scenario: "edit-storm".into(),
        params: serde_json::to_value(p)?,
        figures: json!({
            "edits_per_s": (acks.len() as f64 / elapsed).round(),
            "edits_committed": acks.len(),
            "edit_latency_ms": Percentiles::of(latencies.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            "rejected_412_rate": if attempts == 0 { 0.0 } else { (stale as f64 / attempts as f64 * 1000.0).round() / 1000.0 },
            "errors": errors.load(std::sync::atomic::Ordering::Relaxed),
            "unanswered_edits": uncertain,
            "replicas": urls.len(),
            "feed_delay_ms": Percentiles::of(delays),
            "feed_events_expected_per_subscriber": expected.len(),
        }),
        violations: v.count,
        violation_details: v.details,
    })
}

async fn history(admin: &Client, vm: &str) -> anyhow::Result<Vec<covm_types::vm::VersionView>> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = admin.vm_versions(vm, &VersionQuery { before, limit: Some(1000) }).await?;
        out.extend(page.items);
        match page.next.and_then(|n| n.parse().ok()) {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    out.reverse();
    Ok(out)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LeaseParams {
    pub clients: usize,
    pub vms: usize,
    pub duration_s: f64,
    /// Replicas to spread the clients over (empty: the admin's server).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
}

/// Clients race for 1-second leases and write under them, sometimes after they expired. The checker
/// replays the lease events of each VM: never two live leases, tokens only grow, and every write
/// under a token landed while that token's lease was live.
pub async fn lease_contention(admin: &Client, p: &LeaseParams) -> anyhow::Result<Report> {
    let s = setup(admin, p.clients, p.vms).await?;
    let deadline = Instant::now() + Duration::from_secs_f64(p.duration_s);
    // (vm, version written, token it was written under)
    let writes: Arc<Mutex<Vec<(Uuid, i64, i64)>>> = Arc::default();
    let counts = Arc::new(Mutex::new((0usize, 0usize, 0usize))); // acquired, refused 423, fenced 409
    let urls = replicas_of(admin, &p.replicas);
    let mut tasks = Vec::new();
    for i in 0..p.clients {
        let c = on_replica(&s.users[i % s.users.len()].1, &urls, i);
        let vms = s.vms.clone();
        let (writes, counts) = (writes.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let pick = rand::rng().random_range(0..vms.len());
                let (name, id) = vms[pick].clone();
                let lease = match c.lease_acquire(&name, 1).await {
                    Ok(l) => l,
                    Err(ClientError::Api { status: 423, .. }) => {
                        counts.lock().unwrap_or_else(|p| p.into_inner()).1 += 1;
                        let pause = rand::rng().random_range(5..40);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                        continue;
                    }
                    Err(_) => continue,
                };
                counts.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
                let token = lease.token.unwrap_or_default();
                let opts = ChangeOptions { lease: Some(token), ..Default::default() };
                let late = rand::rng().random_bool(0.3);
                for j in 0..3 {
                    if late && j == 2 {
                        // Past the lease's end: this write must be refused.
                        tokio::time::sleep(Duration::from_millis(1100)).await;
                    }
                    let patch = json!({ "annotations": { "writer": format!("c{i}-{token}-{j}") } });
                    match c.vm_change(&name, &patch, &opts).await {
                        Ok(v) => writes.lock().unwrap_or_else(|p| p.into_inner()).push((id, v.version, token)),
                        Err(ClientError::Api { status: 409 | 423, .. }) => {
                            counts.lock().unwrap_or_else(|p| p.into_inner()).2 += 1
                        }
                        Err(_) => {}
                    }
                }
                let release = rand::rng().random_bool(0.5);
                if release {
                    let _ = c.lease_release(&name, false).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    // Let the sweeper report the last expiries.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut v = Violations::default();
    let log = log_after(admin, s.start_seq).await?;
    let writes = writes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let write_token: HashMap<(Uuid, i64), i64> = writes.iter().map(|(vm, ver, t)| ((*vm, *ver), *t)).collect();
    for (name, id) in &s.vms {
        let events: Vec<&EventView> = log.iter().filter(|e| e.object_id == Some(*id)).collect();
        check_leases(name, *id, &events, &write_token, &mut v);
    }
    let (acquired, refused, fenced) = *counts.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Report {
        scenario: "lease-contention".into(),
        params: serde_json::to_value(p)?,
        figures: json!({
            "leases_acquired": acquired,
            "acquire_refused_423": refused,
            "writes_accepted_under_lease": writes.len(),
            "writes_refused": fenced,
            "lease_events_checked": log.iter().filter(|e| e.kind.starts_with("vm.lease.")).count(),
        }),
        violations: v.count,
        violation_details: v.details,
    })
}

/// Replays one VM's lease events in log order: at most one live lease, tokens only grow, renewals and
/// ends name the live token, and every write made under a token landed while that lease was live.
pub fn check_leases(
    name: &str,
    id: Uuid,
    events: &[&EventView],
    write_token: &HashMap<(Uuid, i64), i64>,
    v: &mut Violations,
) {
    // (holder, token, expires_at)
    let mut live: Option<(String, i64, chrono::DateTime<chrono::Utc>)> = None;
    let mut last_token = 0;
    for e in events {
        let token = e.data["token"].as_i64().unwrap_or(-1);
        let holder = e.data["holder"].as_str().unwrap_or("").to_owned();
        let expires: Option<chrono::DateTime<chrono::Utc>> = e.data["expires_at"].as_str().and_then(|t| t.parse().ok());
        match e.kind.as_str() {
            "vm.lease.acquired" => {
                if let Some((h, t, _)) = &live {
                    v.add(format!("{name} #{}: {holder} acquired token {token} while {h} held {t}", e.seq));
                }
                if token <= last_token {
                    v.add(format!("{name} #{}: token {token} after {last_token}", e.seq));
                }
                last_token = token;
                live = expires.map(|x| (holder, token, x));
            }
            "vm.lease.renewed" => match &mut live {
                Some((_, t, x)) if *t == token => *x = expires.unwrap_or(*x),
                _ => v.add(format!("{name} #{}: renewal of token {token}, which is not live", e.seq)),
            },
            "vm.lease.released" | "vm.lease.broken" | "vm.lease.expired" => match &live {
                Some((_, t, _)) if *t == token => live = None,
                _ => v.add(format!("{name} #{}: {} of token {token}, which is not live", e.seq, e.kind)),
            },
            "vm.config.changed" => {
                let Some(t) = e.version_after.and_then(|ver| write_token.get(&(id, ver))) else { continue };
                match &live {
                    Some((_, lt, x)) if lt == t && e.time <= *x => {}
                    _ => v.add(format!(
                        "{name} #{}: a write under token {t} was accepted while that lease was not live",
                        e.seq
                    )),
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, kind: &str, data: serde_json::Value, version_after: Option<i64>, secs: i64) -> EventView {
        EventView {
            seq,
            time: chrono::DateTime::from_timestamp(1_000 + secs, 0).unwrap(),
            actor: "a".into(),
            request_id: None,
            kind: kind.into(),
            object_kind: "vm".into(),
            object_id: Some(Uuid::nil()),
            object_name: Some("v".into()),
            version_before: None,
            version_after,
            patch: None,
            data,
            hash: String::new(),
        }
    }

    fn lease(holder: &str, token: i64, expires: i64) -> serde_json::Value {
        json!({ "holder": holder, "token": token, "expires_at": chrono::DateTime::from_timestamp(1_000 + expires, 0).unwrap() })
    }

    fn check(events: &[EventView], writes: &[(i64, i64)]) -> usize {
        let refs: Vec<&EventView> = events.iter().collect();
        let w: HashMap<(Uuid, i64), i64> = writes.iter().map(|(ver, t)| ((Uuid::nil(), *ver), *t)).collect();
        let mut v = Violations::default();
        check_leases("v", Uuid::nil(), &refs, &w, &mut v);
        v.count
    }

    #[test]
    fn a_clean_history_passes() {
        let log = [
            ev(1, "vm.lease.acquired", lease("a", 1, 10), None, 0),
            ev(2, "vm.config.changed", json!({}), Some(2), 1),
            ev(3, "vm.lease.expired", lease("a", 1, 10), None, 11),
            ev(4, "vm.lease.acquired", lease("b", 2, 20), None, 12),
            ev(5, "vm.lease.released", lease("b", 2, 20), None, 13),
        ];
        assert_eq!(check(&log, &[(2, 1)]), 0);
    }

    #[test]
    fn two_holders_a_stale_write_and_a_shrinking_token_are_caught() {
        let two = [
            ev(1, "vm.lease.acquired", lease("a", 1, 10), None, 0),
            ev(2, "vm.lease.acquired", lease("b", 2, 10), None, 1),
        ];
        assert_eq!(check(&two, &[]), 1);
        let stale = [
            ev(1, "vm.lease.acquired", lease("a", 1, 10), None, 0),
            ev(2, "vm.lease.released", lease("a", 1, 10), None, 1),
            ev(3, "vm.config.changed", json!({}), Some(2), 2),
        ];
        assert_eq!(check(&stale, &[(2, 1)]), 1);
        let late = [
            ev(1, "vm.lease.acquired", lease("a", 1, 10), None, 0),
            ev(2, "vm.config.changed", json!({}), Some(2), 11),
        ];
        assert_eq!(check(&late, &[(2, 1)]), 1);
        let shrinking = [
            ev(1, "vm.lease.acquired", lease("a", 5, 10), None, 0),
            ev(2, "vm.lease.released", lease("a", 5, 10), None, 1),
            ev(3, "vm.lease.acquired", lease("b", 3, 10), None, 2),
        ];
        assert_eq!(check(&shrinking, &[]), 1);
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AttachParams {
    /// Clients (each with its own VM) racing per round.
    pub clients: usize,
    pub rounds: usize,
    /// Replicas to spread the clients over (empty: the admin's server).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
}

/// Each round, every client attaches the same disk read-write to its own VM at once: exactly one may
/// win, and every loser's error must name the winner. The winner then detaches for the next round.
pub async fn attach_race(admin: &Client, p: &AttachParams) -> anyhow::Result<Report> {
    let s = setup(admin, p.clients, p.clients).await?;
    let disk = format!("{}-disk", s.tag);
    let spec = covm_types::disk::DiskCreate { folder: Some(format!("/{}", s.tag)), ..crate::disk_spec(&disk, 1 << 20) };
    admin.disk_create(&spec).await?;
    let mut v = Violations::default();
    let mut latencies = Vec::new();
    let urls = replicas_of(admin, &p.replicas);
    for round in 0..p.rounds {
        let mut tasks = Vec::new();
        for i in 0..p.clients {
            let c = on_replica(&s.users[i % s.users.len()].1, &urls, i);
            let (vm, _) = s.vms[i].clone();
            let disk = disk.clone();
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let p = covm_types::disk::DiskAttach {
                    disk,
                    controller: None,
                    unit: None,
                    read_only: false,
                    next_boot: false,
                };
                let r = c.vm_disk_attach(&vm, &p).await;
                (vm, r, t0.elapsed().as_secs_f64() * 1000.0)
            }));
        }
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for t in tasks {
            let (vm, r, ms) = t.await?;
            latencies.push(ms);
            match r {
                Ok(_) => winners.push(vm),
                Err(ClientError::Api { status: 409, error, .. }) if error.code == "disk_in_use" => {
                    losers.push((vm, error.message))
                }
                Err(e) => v.add(format!("round {round}: {vm}: unexpected {e}")),
            }
        }
        if winners.len() != 1 {
            v.add(format!("round {round}: {} winners ({winners:?})", winners.len()));
        }
        if let Some(w) = winners.first() {
            for (vm, msg) in &losers {
                if !msg.contains(w.as_str()) {
                    v.add(format!("round {round}: {vm} was refused without naming the holder {w}: {msg}"));
                }
            }
            admin.vm_disk_detach(w, &disk, &Default::default()).await?;
        }
    }
    Ok(Report {
        scenario: "attach-race".into(),
        params: serde_json::to_value(p)?,
        figures: json!({ "attach_latency_ms": Percentiles::of(latencies), "rounds": p.rounds }),
        violations: v.count,
        violation_details: v.details,
    })
}
