//! Faults of what covm stands on: a file system that fills up, a database that goes away. covm
//! answers them with a code of their own, says so at `/readyz`, and resumes by itself.

use std::process::Command;
use std::time::{Duration, Instant};

use covm_client::Client;
use serde_json::{Value, json};

use crate::common::{TestServer, on_postgres};

async fn readyz(url: &str) -> (u16, Value) {
    let resp = reqwest::get(format!("{url}/readyz")).await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn folder_create(c: &Client, name: &str) -> (u16, Value, Option<String>) {
    let resp = c.request(reqwest::Method::POST, "/folders").json(&json!({ "name": name })).send().await.unwrap();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null), retry)
}

/// A tmpfs the test mounts (root only), unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: skipping the full-disk test (it mounts a tmpfs)");
            return None;
        }
        let d = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(d.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs");
        Some(Tmpfs(d))
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.0.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[tokio::test]
async fn a_full_disk_is_answered_507_and_writes_resume_when_space_is_freed() {
    if on_postgres() {
        return; // the file system that fills is SQLite's
    }
    let Some(fs) = Tmpfs::mount("24m") else { return };
    let dir = tempfile::tempdir_in(fs.0.path()).unwrap();
    let s = TestServer::start_at(dir, covm_server::Driver::Sim, None).await;
    // Fill the file system but for a little, then write until a write fails.
    let filler = fs.0.path().join("filler");
    let free = nix::sys::statvfs::statvfs(fs.0.path()).unwrap();
    let room = free.blocks_available() as u64 * free.fragment_size() as u64;
    std::fs::write(&filler, vec![1u8; room.saturating_sub(256 << 10) as usize]).unwrap();
    let mut acknowledged = Vec::new();
    let mut full = None;
    for i in 0..5000 {
        let name = format!("f{i}-{}", "x".repeat(50));
        let (status, body, _) = folder_create(&s.admin, &name).await;
        match status {
            201 => acknowledged.push(name),
            _ => {
                full = Some((status, body));
                break;
            }
        }
    }
    let (status, body) = full.expect("the file system filled up");
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "storage_full", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("full"), "{body}");
    let (status, ready) = readyz(&s.url).await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready["details"].to_string().contains("storage full"), "{ready}");
    // Space comes back (the tmpfs grows, the filler goes): writes resume without a restart, sign-in too.
    fs.resize("64m");
    std::fs::remove_file(&filler).unwrap();
    let started = Instant::now();
    loop {
        let (status, body, _) = folder_create(&s.admin, "after").await;
        if status == 201 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "writes did not resume: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.anonymous().login("admin", &s.admin_password).await.expect("sign-in works again");
    let (status, ready) = readyz(&s.url).await;
    assert_eq!(status, 200, "{ready}");
    // Nothing acknowledged was lost, and the chain verifies.
    let names: Vec<String> = s.admin.folders().await.unwrap().items.into_iter().map(|f| f.name).collect();
    for n in acknowledged.iter().take(100) {
        assert!(names.contains(n), "{n} was acknowledged and is gone");
    }
    assert!(s.admin.audit_verify().await.unwrap().ok);
    s.stop().await;
}

#[tokio::test]
async fn a_lost_database_is_answered_503_within_seconds_and_writes_resume() {
    if !on_postgres() {
        return;
    }
    let pg = covm_store::testing::OwnPostgres::start().expect("a PostgreSQL of the test's own");
    let db = pg.database().await.unwrap();
    let s = TestServer::start_at(tempfile::tempdir().unwrap(), covm_server::Driver::Sim, Some(db)).await;
    assert_eq!(folder_create(&s.admin, "before").await.0, 201);
    pg.stop().unwrap();
    let started = Instant::now();
    let (status, body, retry) = folder_create(&s.admin, "during").await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(retry.is_some(), "Retry-After");
    assert!(took < Duration::from_secs(6), "the answer took {took:?}");
    let started = Instant::now();
    let (status, ready) = readyz(&s.url).await;
    assert_eq!(status, 503, "{ready}");
    assert!(started.elapsed() < Duration::from_secs(6));
    pg.resume().unwrap();
    let started = Instant::now();
    loop {
        let (status, body, _) = folder_create(&s.admin, "after").await;
        if status == 201 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "writes did not resume: {status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(readyz(&s.url).await.0, 200);
    s.stop().await;
}
