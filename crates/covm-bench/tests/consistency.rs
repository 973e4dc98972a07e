//! Short runs of the consistency scenarios in the test suite. They fail only on a violation, never on
//! speed (speed is the benchmark's business: docs/BENCHMARKS.md).

use covm_bench::storm::{AttachParams, LeaseParams, StormParams, attach_race, edit_storm, lease_contention};
use covm_client::Client;

async fn server() -> (covm_server::Running, Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let running = covm_server::start(covm_server::ServeConfig {
        driver: covm_server::Driver::Sim,
        // Storms by design: the limits are not what these runs check.
        rate_limits: covm_server::app::ratelimit::RateLimitConfig::UNLIMITED,
        ..covm_server::ServeConfig::new(dir.path().to_owned(), "127.0.0.1:0".parse().unwrap())
    })
    .await
    .unwrap();
    let url = format!("http://{}", running.addr);
    let pw = std::fs::read_to_string(dir.path().join("initial-admin-password")).unwrap();
    let (admin, _) = Client::new(&url).login("admin", pw.trim()).await.unwrap();
    (running, admin, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_edit_storm_has_no_violations() {
    let (_running, admin, _dir) = server().await;
    let r = edit_storm(&admin, &StormParams { users: 12, vms: 3, subscribers: 4, duration_s: 3.0, replicas: vec![] })
        .await
        .unwrap();
    assert_eq!(r.violations, 0, "{:#?}", r.violation_details);
    assert!(r.figures["edits_committed"].as_u64().unwrap() > 0, "{}", r.figures);
    assert!(r.figures["feed_events_expected_per_subscriber"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lease_contention_has_no_violations() {
    let (_running, admin, _dir) = server().await;
    let r =
        lease_contention(&admin, &LeaseParams { clients: 8, vms: 2, duration_s: 3.0, replicas: vec![] }).await.unwrap();
    assert_eq!(r.violations, 0, "{:#?}", r.violation_details);
    assert!(r.figures["leases_acquired"].as_u64().unwrap() > 1, "{}", r.figures);
    assert!(r.figures["writes_accepted_under_lease"].as_u64().unwrap() > 0, "{}", r.figures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_attach_race_has_one_winner_every_round() {
    let (_running, admin, _dir) = server().await;
    let r = attach_race(&admin, &AttachParams { clients: 8, rounds: 5, replicas: vec![] }).await.unwrap();
    assert_eq!(r.violations, 0, "{:#?}", r.violation_details);
}

/// The `tls` scenario runs (its figures are the benchmark's business).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_tls_run_measures_both_servers() {
    let r = covm_bench::tls::tls(&covm_bench::tls::TlsParams { handshakes: 5, patches: 5 }).await.unwrap();
    assert!(r.figures["tls13_handshakes_per_s"].as_f64().unwrap() > 0.0, "{}", r.figures);
    assert_eq!(r.figures["patch_kept_alive_tls_ms"]["count"], 5, "{}", r.figures);
}
