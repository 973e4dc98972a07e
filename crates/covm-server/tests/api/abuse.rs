//! What a stranger can make covm do is bounded: the log cannot be grown at will without a session,
//! sign-in guesses are limited per account across addresses (and replicas), streams are capped.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use covm_types::api::AuditQuery;
use serde_json::{Value, json};

use crate::common::{PASSWORD, TestServer, on_postgres};

/// A client whose connections come from `addr` (any 127.0.0.0/8 address is this machine).
fn from(addr: &str) -> reqwest::Client {
    covm_client::tls::install_provider();
    reqwest::Client::builder().local_address(addr.parse::<IpAddr>().unwrap()).build().unwrap()
}

async fn sign_in(c: &reqwest::Client, url: &str, user: &str, password: &str) -> (u16, Option<u64>) {
    let resp = c
        .post(format!("{url}/api/v1/session"))
        .json(&json!({ "user": user, "password": password }))
        .send()
        .await
        .unwrap();
    let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    (resp.status().as_u16(), retry)
}

/// (entries, bytes of their data) in the log.
async fn log_size(s: &TestServer) -> (i64, i64) {
    (
        s.count("events").await,
        s.scalar("SELECT COALESCE(SUM(LENGTH(data) + LENGTH(COALESCE(object_name, ''))), 0) FROM events").await,
    )
}

#[tokio::test]
async fn anonymous_requests_cannot_grow_the_log_at_will() {
    let s = TestServer::start().await;
    let (n0, bytes0) = log_size(&s).await;
    let started = Instant::now();
    let huge = "u".repeat(100 << 10);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..60 {
        let c = from(&format!("127.0.1.{}", i % 250 + 1));
        // A name of 100 KiB (refused before anything), one of 200 bytes (cut and digested), a short
        // unknown name, a body that is not JSON.
        let name = if i % 2 == 0 { huge.clone() } else { "u".repeat(200) };
        let (a, _) = sign_in(&c, &s.url, &name, "whatever-pw").await;
        let (b, _) = sign_in(&c, &s.url, &format!("nobody-{i}"), "whatever-pw").await;
        let d = c
            .post(format!("{}/api/v1/session", s.url))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        for st in [a, b, d] {
            *statuses.entry(st).or_insert(0) += 1;
        }
    }
    // 30 long names are refused (400), 60 bad bodies too; the rest are wrong guesses, or refused by the
    // per-address limit once an address has guessed too often.
    assert_eq!(statuses.get(&400), Some(&90), "{statuses:?}");
    assert_eq!(statuses.values().sum::<i32>(), 180, "{statuses:?}");
    s.app().audit_anonymous_flush(true).await.unwrap();
    let (n1, bytes1) = log_size(&s).await;
    // 180 failed anonymous requests: a burst of 30 entries, one a second after it, and one summary.
    let allowed = 30 + started.elapsed().as_secs() as i64 + 2;
    assert!(n1 - n0 <= allowed, "{} entries for 180 anonymous requests (allowed {allowed})", n1 - n0);
    assert!(bytes1 - bytes0 < 32 << 10, "the log grew by {} bytes", bytes1 - bytes0);
    // What was written is small: the long name is cut and digested.
    let q = AuditQuery { kind: Some("session.failed".into()), limit: Some(1000), ..Default::default() };
    let mut digested = 0;
    for e in s.admin.audit(&q).await.unwrap().items {
        assert!(e.data.to_string().len() < 1024, "{}", e.data);
        assert!(e.object_name.as_deref().unwrap_or_default().len() <= 70);
        if e.actor.starts_with("uuu") {
            assert!(e.actor.len() <= 70, "{}", e.actor);
            assert_eq!(e.data["user_sha256"].as_str().map(str::len), Some(64));
            digested += 1;
        }
    }
    assert!(digested > 0, "a 200-byte name was written cut, with its digest");
    let q = AuditQuery { kind: Some("audit.suppressed".into()), ..Default::default() };
    let summary = &s.admin.audit(&q).await.unwrap().items[0];
    assert!(summary.data["suppressed"].as_u64().unwrap() >= 100, "{}", summary.data);
    assert!(s.admin.audit_verify().await.unwrap().ok);
}

#[tokio::test]
async fn guesses_at_one_account_are_limited_across_addresses_and_replicas() {
    let s = TestServer::start().await;
    s.admin.user_create("carol", PASSWORD).await.unwrap();
    // On PostgreSQL, half of the guesses go to a second replica: the count is in the store.
    let replica = match on_postgres() {
        true => Some(s.replica().await),
        false => None,
    };
    let urls: Vec<String> =
        [Some(s.url.clone()), replica.as_ref().map(|r| r.url.clone())].into_iter().flatten().collect();
    for i in 0..10 {
        let c = from(&format!("127.0.2.{}", i + 1));
        assert_eq!(sign_in(&c, &urls[i % urls.len()], "carol", "wrong-guess").await.0, 401, "guess {i}");
    }
    // The eleventh guess, from an address never seen, on either replica, waits.
    let c = from("127.0.2.200");
    let (status, retry) = sign_in(&c, urls.last().unwrap(), "carol", "wrong-guess").await;
    assert_eq!(status, 429);
    let retry = retry.expect("Retry-After");
    assert!((1..=2).contains(&retry), "{retry}");
    // A name that is no account is limited the same way (the answers do not tell accounts apart).
    for i in 0..10 {
        assert_eq!(sign_in(&from(&format!("127.0.3.{}", i + 1)), &s.url, "nobody", "x-guess-x").await.0, 401);
    }
    assert_eq!(sign_in(&from("127.0.3.200"), &s.url, "nobody", "x-guess-x").await.0, 429);
    // The owner is slowed, not locked out: after the wait, her password works from anywhere.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(sign_in(&from("127.0.2.201"), &s.url, "carol", PASSWORD).await.0, 201);
    let _: Value = s.admin.get("/users/carol").await.unwrap();
}

/// Guesses sent all at once are counted as they arrive: the per-account limit holds for parallel
/// guesses too, and an address that signed in to the account before is not held by it.
#[tokio::test]
async fn parallel_guesses_are_held_and_the_owners_address_is_not() {
    let s = TestServer::start().await;
    s.admin.user_create("dora", PASSWORD).await.unwrap();
    // Dora signs in once from her usual address.
    assert_eq!(sign_in(&from("127.0.4.1"), &s.url, "dora", PASSWORD).await.0, 201);
    let guesses = (0..30).map(|i| {
        let url = s.url.clone();
        async move { sign_in(&from(&format!("127.0.5.{}", i + 1)), &url, "dora", "a-wrong-guess").await.0 }
    });
    let statuses = futures::future::join_all(guesses).await;
    let wrong = statuses.iter().filter(|s| **s == 401).count();
    let held = statuses.iter().filter(|s| **s == 429).count();
    assert!(wrong <= 11, "{wrong} parallel guesses were checked: {statuses:?}");
    assert_eq!(wrong + held, 30, "{statuses:?}");
    // A new address waits; Dora's own address is not held by the account's limit.
    assert_eq!(sign_in(&from("127.0.5.200"), &s.url, "dora", PASSWORD).await.0, 429);
    assert_eq!(sign_in(&from("127.0.4.1"), &s.url, "dora", PASSWORD).await.0, 201);
}
