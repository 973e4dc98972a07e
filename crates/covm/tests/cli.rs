//! The `covm` binary end to end: `covm serve` as a child process and the CLI against it, as a person
//! following the README would use them.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_covm");

/// The OpenID Connect provider of the API tests (`covm-server/tests/api/idp.rs`).
#[path = "../../covm-server/tests/api/idp.rs"]
mod idp;

/// An operator's own CA and certificate (`covm-server/tests/api/certs.rs`).
#[path = "../../covm-server/tests/api/certs.rs"]
mod certs;

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn serve(data: &Path) -> Server {
    serve_with(data, &[])
}

fn serve_with(data: &Path, extra: &[&str]) -> Server {
    // A port from free_port() can be handed to two tests at once: the server that loses the race exits
    // (the address is in use) and is started again on another port. Ready means: still running, and
    // its own log says it listens.
    let log_path = data.with_extension("log");
    for _ in 0..5 {
        let port = free_port();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--demo", "--data-dir"])
            .arg(data)
            .args(extra)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("covm serve starts");
        let started = Instant::now();
        let listening = format!("127.0.0.1:{port}");
        loop {
            if child.try_wait().ok().flatten().is_some() {
                break; // it exited: try another port
            }
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.lines().any(|l| l.contains("covm is listening") && l.contains(&listening))
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                let scheme = if extra.contains(&"--tls") || extra.contains(&"--tls-cert") { "https" } else { "http" };
                return Server { child, url: format!("{scheme}://127.0.0.1:{port}") };
            }
            assert!(started.elapsed() < Duration::from_secs(30), "covm serve did not listen within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!(
        "covm serve did not start on any of five ports:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
}

/// Runs `covm ARGS` as the user whose config dir is `cfg`.
/// A covm on the simulated driver, and the admin signed in (its CLI config directory).
fn signed_in_admin() -> (tempfile::TempDir, Server, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = serve_with(&data, &["--driver", "sim"]);
    let admin = tmp.path().join("admin");
    let pwfile = data.join("initial-admin-password");
    ok(covm(&s, &admin, &["login", "--password-file", pwfile.to_str().unwrap()], None));
    (tmp, s, admin)
}

fn covm(s: &Server, cfg: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("COVM_URL", &s.url)
        .env("COVM_CONFIG_DIR", cfg)
        .env_remove("COVM_TOKEN")
        .env_remove("COVM_PASSWORD");
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn ok(o: Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "covm failed: {}\n{out}", String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn the_foundation_scenario_from_the_readme() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = serve(&data);
    let admin = tmp.path().join("admin");
    let bob = tmp.path().join("bob");
    let pwfile = data.join("initial-admin-password");
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&pwfile).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    let password = std::fs::read_to_string(&pwfile).unwrap();
    assert!(!log.contains(password.trim()), "the password is never in the log");
    assert!(log.contains("initial-admin-password"), "the log says where the password is");

    ok(covm(&s, &admin, &["login", "--password-file", pwfile.to_str().unwrap()], None));
    {
        use std::os::unix::fs::PermissionsExt;
        let creds = admin.join("credentials.json");
        assert_eq!(std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777, 0o600);
    }
    ok(covm(&s, &admin, &["user", "create", "bob"], Some("bob-password-1\n")));
    let demo = ok(covm(&s, &admin, &["ls"], None));
    assert!(demo.contains("/team-a") && demo.contains("/team-b"), "the demo inventory: {demo}");
    ok(covm(&s, &admin, &["permission", "grant", "bob", "ReadOnly", "/team-a"], None));

    ok(covm(&s, &bob, &["login", "-u", "bob"], Some("bob-password-1\n")));
    let ls = ok(covm(&s, &bob, &["ls"], None));
    assert!(ls.contains("/team-a") && !ls.contains("/team-b"), "{ls}");
    let denied = covm(&s, &bob, &["folder", "create", "/team-a/x"], None);
    assert_eq!(denied.status.code(), Some(4), "a denial exits 4");
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("Folder.Create") && err.contains("403"), "{err}");

    let audit = ok(covm(&s, &admin, &["audit", "--actor", "bob"], None));
    assert!(audit.contains("authz.denied") && audit.contains("Folder.Create"), "{audit}");
    let json: Vec<serde_json::Value> = ok(covm(&s, &admin, &["--json", "audit", "--kind", "authz.denied"], None))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json.len(), 1);
    assert_eq!(json[0]["data"]["privilege"], "Folder.Create");
    let verify = ok(covm(&s, &admin, &["audit", "verify"], None));
    assert!(verify.starts_with("ok:"), "{verify}");
    // bob may not verify: exit 4 again.
    assert_eq!(covm(&s, &bob, &["audit", "verify"], None).status.code(), Some(4));

    // Not found exits 3; signing out forgets the token.
    assert_eq!(covm(&s, &admin, &["folder", "rm", "/nope"], None).status.code(), Some(3));
    ok(covm(&s, &bob, &["logout"], None));
    assert!(!bob.join("credentials.json").exists());
    assert_eq!(covm(&s, &bob, &["ls"], None).status.code(), Some(1));
    let events = ok(covm(&s, &admin, &["events"], None));
    assert!(events.contains("permission.granted") && events.contains("bob ReadOnly on /team-a"), "{events}");
}

/// Issue 3's scenario: two users, a lease, the live feed, `vm edit` with a stale copy, history.
#[test]
fn two_users_edit_one_vm() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = serve(&data);
    let admin = tmp.path().join("admin");
    let (a, b) = (tmp.path().join("alice"), tmp.path().join("bob"));
    let pwfile = data.join("initial-admin-password");
    ok(covm(&s, &admin, &["login", "--password-file", pwfile.to_str().unwrap()], None));
    for (user, cfg) in [("alice", &a), ("bob", &b)] {
        ok(covm(&s, &admin, &["user", "create", user], Some("a-long-password\n")));
        ok(covm(&s, &admin, &["permission", "grant", user, "VMCreator", "/"], None));
        ok(covm(&s, cfg, &["login", "-u", user], Some("a-long-password\n")));
    }
    ok(covm(&s, &a, &["vm", "create", "app-1", "-m", "2048", "--folder", "/team-a"], None));

    // Bob follows the feed.
    let mut follow = Command::new(BIN)
        .args(["events", "-f"])
        .env("COVM_URL", &s.url)
        .env("COVM_CONFIG_DIR", &b)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    ok(covm(&s, &a, &["vm", "lease", "acquire", "app-1", "--ttl", "600"], None));
    let refused = covm(&s, &b, &["vm", "change", "app-1", "-m", "4096"], None);
    assert_eq!(refused.status.code(), Some(5));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("leased by alice until"), "{err}");
    ok(covm(&s, &a, &["vm", "change", "app-1", "-c", "2"], None));
    let line = loop {
        let l = rx.recv_timeout(Duration::from_secs(10)).expect("bob's feed shows alice's change");
        if l.contains("vm.config.changed") {
            break l;
        }
    };
    assert!(line.contains("alice") && line.contains("cpus: 1 → 2"), "{line}");
    let _ = follow.kill();
    let _ = follow.wait();
    ok(covm(&s, &a, &["vm", "lease", "release", "app-1"], None));

    // Bob edits a copy that goes stale while his editor is open: alice changes an annotation. The
    // 412 shows her change; the editor opens again with both, and the second save lands.
    let script = tmp.path().join("editor.sh");
    let alice_cfg = a.to_str().unwrap().to_owned();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\nif [ ! -e \"$0.once\" ]; then\n  touch \"$0.once\"\n  COVM_CONFIG_DIR={alice_cfg} COVM_URL={url} {BIN} vm change app-1 -e note=by-alice >/dev/null\n  sed -i 's/\"memory_mib\": 2048/\"memory_mib\": 4096/' \"$1\"\nelse\n  grep -q 'changed while you edited' \"$1\"\nfi\n",
            url = s.url
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cmd = Command::new(BIN);
    cmd.args(["vm", "edit", "app-1"]).env("COVM_URL", &s.url).env("COVM_CONFIG_DIR", &b).env("EDITOR", &script);
    let edit = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&edit.stderr);
    assert!(edit.status.success(), "{err}");
    assert!(err.contains("changed while you edited") && err.contains("annotations.note"), "{err}");
    let info: serde_json::Value =
        serde_json::from_str(&ok(covm(&s, &b, &["--json", "vm", "info", "app-1"], None))).unwrap();
    assert_eq!(info["config"]["memory_mib"], 4096);
    assert_eq!(info["config"]["annotations"]["note"], "by-alice");
    assert_eq!(info["version"], 4);

    let history = ok(covm(&s, &b, &["vm", "history", "app-1"], None));
    assert!(history.contains("alice") && history.contains("bob"), "{history}");
    let diff = ok(covm(&s, &b, &["vm", "diff", "app-1", "2", "4"], None));
    assert_eq!(
        diff.lines().collect::<Vec<_>>(),
        ["annotations.note: (none) → \"by-alice\"", "memory_mib: 2048 → 4096"]
    );
    ok(covm(&s, &b, &["vm", "revert", "app-1", "2"], None));
    let info: serde_json::Value =
        serde_json::from_str(&ok(covm(&s, &b, &["--json", "vm", "info", "app-1"], None))).unwrap();
    assert_eq!((info["version"].as_i64(), info["config"]["memory_mib"].as_i64()), (Some(5), Some(2048)));
    assert_eq!(info["config"]["cpus"], 2);
}

/// Issue 5's scenario from the CLI (simulated VMs; the QEMU tests see the same in a real guest): a disk
/// made for VM a goes to running VM b; attaching it to a third VM says exactly who holds it; it moves,
/// detaches by generation, and goes.
#[test]
fn a_disk_moves_between_vms() {
    let (_tmp, s, admin) = signed_in_admin();
    for vm in ["a", "b", "c"] {
        ok(covm(&s, &admin, &["vm", "create", vm, "-m", "64"], None));
    }
    ok(covm(&s, &admin, &["vm", "power", "b", "on"], None));
    ok(covm(&s, &admin, &["disk", "create", "data-1", "--size", "64M"], None));
    ok(covm(&s, &admin, &["vm", "disk", "attach", "a", "data-1"], None));
    let moved = ok(covm(&s, &admin, &["disk", "move", "data-1", "--to", "b"], None));
    assert!(moved.contains("data-1 is attached to b"), "{moved}");
    let held = covm(&s, &admin, &["vm", "disk", "attach", "c", "data-1"], None);
    assert_eq!(held.status.code(), Some(5), "a conflict exits 5");
    let err = String::from_utf8_lossy(&held.stderr);
    assert!(err.contains("disk_in_use") && err.contains("read-write to b (running, attachment generation"), "{err}");
    let ls = ok(covm(&s, &admin, &["vm", "disk", "ls", "b"], None));
    let generation = ls.split("generation ").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let stale = covm(&s, &admin, &["vm", "disk", "detach", "b", "data-1", "--generation", "1"], None);
    assert_eq!(stale.status.code(), Some(5), "{}", String::from_utf8_lossy(&stale.stderr));
    ok(covm(&s, &admin, &["vm", "disk", "detach", "b", "data-1", "--generation", &generation], None));
    let info = ok(covm(&s, &admin, &["disk", "info", "data-1"], None));
    assert!(info.contains("detached") && info.contains("64 MiB"), "{info}");
    ok(covm(&s, &admin, &["disk", "rm", "data-1"], None));
    assert_eq!(covm(&s, &admin, &["disk", "info", "data-1"], None).status.code(), Some(3));
}

/// Datastore files from the CLI: an upload in parts with its checksum, the listing with the VM that
/// names the file, a download that matches, and a delete refused while the VM names it.
#[test]
fn a_file_is_uploaded_listed_downloaded_and_removed() {
    let (tmp, s, admin) = signed_in_admin();
    let local = tmp.path().join("boot.img");
    let data: Vec<u8> = (0..(3u32 << 20) + 12345).map(|i| (i % 253) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let up = ok(covm(
        &s,
        &admin,
        &["datastore", "upload", "local", local.to_str().unwrap(), "iso/boot.img", "--part-mib", "1"],
        None,
    ));
    assert!(up.contains("local:iso/boot.img") && up.contains(&data.len().to_string()), "{up}");
    ok(covm(&s, &admin, &["vm", "create", "k", "-m", "64", "--kernel", "local:iso/boot.img"], None));
    let ls = ok(covm(&s, &admin, &["datastore", "ls", "local"], None));
    assert!(ls.contains("iso/boot.img") && ls.contains("3.01 MiB") && ls.contains(" k "), "{ls}");
    let back = tmp.path().join("back.img");
    ok(covm(&s, &admin, &["datastore", "download", "local", "iso/boot.img", back.to_str().unwrap()], None));
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let held = covm(&s, &admin, &["datastore", "rm", "local", "iso/boot.img"], None);
    assert_eq!(held.status.code(), Some(5), "a conflict exits 5");
    assert!(String::from_utf8_lossy(&held.stderr).contains("k"), "the error names the VM");
    ok(covm(&s, &admin, &["vm", "rm", "k"], None));
    ok(covm(&s, &admin, &["datastore", "rm", "local", "iso/boot.img"], None));
    assert!(!ok(covm(&s, &admin, &["datastore", "ls", "local"], None)).contains("boot.img"));
}

/// Snapshots from the CLI: taken, listed as a tree (a revert's safety snapshot hangs under the
/// snapshot the VM was at), reverted by scope, removed.
#[test]
fn snapshots_make_a_tree_and_revert_by_scope() {
    let (_tmp, s, admin) = signed_in_admin();
    ok(covm(&s, &admin, &["vm", "create", "a", "-m", "64"], None));
    ok(covm(&s, &admin, &["disk", "create", "d1", "--size", "8M"], None));
    ok(covm(&s, &admin, &["vm", "disk", "attach", "a", "d1"], None));
    let made = ok(covm(&s, &admin, &["vm", "snapshot", "create", "a", "base", "--description", "clean"], None));
    assert!(made.contains("base") && made.contains("d1"), "{made}");
    ok(covm(&s, &admin, &["vm", "change", "a", "-c", "2"], None));
    let back = ok(covm(&s, &admin, &["vm", "snapshot", "revert", "a", "base", "--scope", "data"], None));
    assert!(back.contains("back to base"), "{back}");
    let tree = ok(covm(&s, &admin, &["vm", "snapshot", "ls", "a"], None));
    let lines: Vec<&str> = tree.lines().collect();
    assert!(lines[0].starts_with("base (version"), "{tree}");
    assert!(lines[1].starts_with("  before-revert-") && lines[1].ends_with("[safety]"), "{tree}");
    ok(covm(&s, &admin, &["vm", "snapshot", "revert", "a", "base", "--scope", "config"], None));
    let info: serde_json::Value =
        serde_json::from_str(&ok(covm(&s, &admin, &["--json", "vm", "info", "a"], None))).unwrap();
    assert_eq!(info["config"]["cpus"], 1, "the config is the snapshot's");
    ok(covm(&s, &admin, &["vm", "snapshot", "rm", "a", "base"], None));
    assert_eq!(covm(&s, &admin, &["vm", "snapshot", "info", "a", "base"], None).status.code(), Some(3));
    // A risky change and its undo by the version it made.
    ok(covm(&s, &admin, &["vm", "change", "a", "--patch", r#"{"machine":"pc"}"#], None));
    let info: serde_json::Value =
        serde_json::from_str(&ok(covm(&s, &admin, &["--json", "vm", "info", "a"], None))).unwrap();
    let v = info["version"].as_i64().unwrap().to_string();
    let back = ok(covm(&s, &admin, &["vm", "revert", "a", "--before-version", &v, "--scope", "config"], None));
    assert!(back.contains(&format!("back to before version {v}")), "{back}");
    let info: serde_json::Value =
        serde_json::from_str(&ok(covm(&s, &admin, &["--json", "vm", "info", "a"], None))).unwrap();
    assert_eq!(info["config"]["machine"], "q35", "{info}");
    // A disk's own snapshots.
    let took = ok(covm(&s, &admin, &["disk", "snapshot", "create", "d1", "own"], None));
    assert!(took.contains("took snapshot own of d1"), "{took}");
    assert!(ok(covm(&s, &admin, &["disk", "snapshot", "ls", "d1"], None)).starts_with("own "));
    ok(covm(&s, &admin, &["disk", "snapshot", "revert", "d1", "own"], None));
    ok(covm(&s, &admin, &["disk", "snapshot", "rm", "d1", "own"], None));
    // The revert kept the present in a safety snapshot of the disk.
    let left = ok(covm(&s, &admin, &["disk", "snapshot", "ls", "d1"], None));
    assert!(left.starts_with("before-revert-") && left.trim_end().ends_with("[safety]"), "{left}");
    // A safety snapshot pinned stays past its expiry.
    ok(covm(&s, &admin, &["vm", "change", "a", "--patch", r#"{"cpus":3}"#, "--snapshot"], None));
    let all: serde_json::Value =
        serde_json::from_str(&ok(covm(&s, &admin, &["--json", "vm", "snapshot", "ls", "a"], None))).unwrap();
    let safety = all.as_array().unwrap().last().unwrap()["name"].as_str().unwrap().to_owned();
    let pinned: serde_json::Value =
        serde_json::from_str(&ok(covm(&s, &admin, &["--json", "vm", "snapshot", "pin", "a", &safety], None))).unwrap();
    assert_eq!((pinned["pinned"].as_bool(), pinned.get("expires_at")), (Some(true), None), "{pinned}");
}

/// The CA fingerprint a TLS server logged at start (`AB:CD:…`, 32 bytes).
fn logged_fingerprint(data: &Path) -> String {
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    log.split(|c: char| !(c.is_ascii_hexdigit() || c == ':'))
        .find(|w| w.len() == 95 && w.matches(':').count() == 31)
        .expect("covm serve logs its CA's fingerprint")
        .to_owned()
}

#[test]
fn the_cli_trusts_a_servers_own_ca_only_when_told() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = serve_with(&data, &["--driver", "sim", "--tls"]);
    assert!(s.url.starts_with("https://"));
    let fp = logged_fingerprint(&data);
    let pw = data.join("initial-admin-password");
    let pw = pw.to_str().unwrap();
    let cfg = tmp.path().join("cli");
    // Asked, the user says no: nothing is sent, nothing is kept.
    let o = covm(&s, &cfg, &["login", "--password-file", pw], Some("n\n"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&fp) && err.contains("not trusted"), "{err}");
    assert!(!cfg.join("credentials.json").exists() && !cfg.join("known_servers.json").exists());
    // A fingerprint that is not the server's is refused.
    let wrong = fp.replace(&fp[..2], if &fp[..2] == "00" { "11" } else { "00" });
    let o = covm(&s, &cfg, &["login", "--password-file", pw, "--trust", &wrong], None);
    assert!(!o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The right one: trusted for this server, and later commands use it.
    let out = ok(covm(&s, &cfg, &["login", "--password-file", pw, "--trust", &fp], None));
    assert!(out.contains("trusted the CA"), "{out}");
    assert!(ok(covm(&s, &cfg, &["whoami"], None)).contains("admin"));
    // Saying yes at the prompt, in another user's config.
    let cfg2 = tmp.path().join("cli2");
    ok(covm(&s, &cfg2, &["login", "--password-file", pw], Some("yes\n")));
    // --ca-file: no question at all.
    let cfg3 = tmp.path().join("cli3");
    let ca = data.join("tls/ca.pem");
    ok(covm(&s, &cfg3, &["--ca-file", ca.to_str().unwrap(), "login", "--password-file", pw], None));
    assert!(!cfg3.join("known_servers.json").exists());
    // Another server (another CA) where the trusted one was: refused, like ssh's changed host key.
    let data2 = tmp.path().join("data2");
    let s2 = serve_with(&data2, &["--driver", "sim", "--tls"]);
    let known = std::fs::read_to_string(cfg.join("known_servers.json")).unwrap();
    let origin = |u: &str| u.to_owned();
    std::fs::write(cfg.join("known_servers.json"), known.replace(&origin(&s.url), &origin(&s2.url))).unwrap();
    let pw2 = data2.join("initial-admin-password");
    let o = covm(&s2, &cfg, &["login", "--password-file", pw2.to_str().unwrap()], Some("yes\n"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("did not sign"), "{err}");
    let o = covm(&s2, &cfg, &["whoami"], None);
    assert!(!o.status.success(), "a pinned CA does not vouch for another server");
}

/// The current TOTP code of a base32 secret (`offset` steps from now), as an authenticator app shows it.
fn totp_code(secret: &str, offset: i64) -> String {
    let t = totp_rs::Builder::new().with_secret(totp_rs::Secret::try_from_base32(secret).unwrap()).build().unwrap();
    t.generate(u64::try_from(chrono::Utc::now().timestamp() + offset * 30).unwrap()).to_string()
}

#[test]
fn two_factor_sign_in_from_the_cli_and_no_secret_in_the_servers_log() {
    let (tmp, s, admin) = signed_in_admin();
    let data = tmp.path().join("data");
    let pw = std::fs::read_to_string(data.join("initial-admin-password")).unwrap();
    let pwf = data.join("initial-admin-password");
    let pwf = pwf.to_str().unwrap();
    let out = ok(covm(&s, &admin, &["--json", "user", "mfa", "enroll"], None));
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    let secret = e["secret"].as_str().unwrap().to_owned();
    let recovery = e["recovery_codes"][0].as_str().unwrap().to_owned();
    ok(covm(&s, &admin, &["user", "mfa", "confirm", &totp_code(&secret, 0)], None));
    // covm login asks for the code (here on stdin) and signs in with it.
    let other = tmp.path().join("other");
    let o = covm(&s, &other, &["login", "--password-file", pwf], Some(&format!("{}\n", totp_code(&secret, 1))));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("two-factor code"));
    // A wrong code is refused; a recovery code given as a flag works.
    let o = covm(&s, &other, &["login", "--password-file", pwf, "--totp", "000000"], None);
    assert!(!o.status.success());
    ok(covm(&s, &other, &["login", "--password-file", pwf, "--recovery-code", &recovery], None));
    let token = std::fs::read_to_string(other.join("credentials.json")).unwrap();
    let token: serde_json::Value = serde_json::from_str(&token).unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    // The policy from the CLI.
    ok(covm(&s, &admin, &["group", "create", "ops"], None));
    assert!(ok(covm(&s, &admin, &["policy", "mfa", "--required-for", "ops"], None)).contains("ops"));
    // Nothing secret in what the server wrote: not the password, a token, the TOTP secret or a code.
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(log.contains("covm is listening"), "the log was read");
    for (what, secret) in
        [("password", pw.trim()), ("token", &token), ("TOTP secret", &secret), ("recovery code", &recovery)]
    {
        assert!(!log.contains(secret), "the server's log holds a {what}");
    }
}

#[test]
fn a_grant_with_conditions_from_the_cli() {
    let (_tmp, s, admin) = signed_in_admin();
    ok(covm(&s, &admin, &["user", "create", "bob"], Some("bob-password-1\n")));
    let out = ok(covm(
        &s,
        &admin,
        &[
            "permission",
            "grant",
            "bob",
            "VMUser",
            "/team-a",
            "--if-annotation",
            "env=dev",
            "--if-source",
            "127.0.0.0/8",
            "--expires",
            "2099-01-01T00:00:00Z",
        ],
        None,
    ));
    assert!(out.contains("env=dev") && out.contains("from 127.0.0.0/8") && out.contains("until 2099"), "{out}");
    let o = covm(&s, &admin, &["permission", "grant", "bob", "VMUser", "/team-a", "--if-annotation", "env"], None);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("KEY=VALUE"));
    let o = covm(&s, &admin, &["permission", "grant", "bob", "VMUser", "/team-a", "--if-hours", "9 to 5"], None);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("hours"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn covm_login_sso_signs_in_through_the_device_flow() {
    use std::io::{BufRead, BufReader};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let provider = rt.block_on(idp::TestIdp::start());
    provider.user("erin", "erin-pw", &["idp-ops"]);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = serve_with(
        &data,
        &[
            "--driver",
            "sim",
            "--oidc-issuer",
            &provider.issuer,
            "--oidc-client-id",
            idp::CLIENT_ID,
            "--oidc-client-secret",
            idp::CLIENT_SECRET,
            "--oidc-group-map",
            "idp-ops=operators",
        ],
    );
    let admin = tmp.path().join("admin");
    let pw = data.join("initial-admin-password");
    ok(covm(&s, &admin, &["login", "--password-file", pw.to_str().unwrap()], None));
    ok(covm(&s, &admin, &["group", "create", "operators"], None));
    // erin runs covm login --sso; it prints a code, and waits.
    let cfg = tmp.path().join("erin");
    let mut child = Command::new(BIN)
        .args(["login", "--sso"])
        .env("COVM_URL", &s.url)
        .env("COVM_CONFIG_DIR", &cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let code = line.split("enter the code ").nth(1).map(|c| c.trim().to_owned()).unwrap_or_else(|| panic!("{line}"));
    // …and approves it at the provider, as in a browser.
    assert_eq!(rt.block_on(provider.approve(&code, "erin", "erin-pw")), 200);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("signed in as erin"));
    let who = ok(covm(&s, &cfg, &["whoami"], None));
    assert!(who.contains("erin") && who.contains("operators"), "{who}");
}

/// An operator's CA and certificate (the TLS tests' `certs.rs`): the CA's, the chain's and the key's paths.
fn operator_cert(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let c = certs::operator_cert(dir, tag);
    (c.ca, c.chain, c.key)
}

#[test]
fn sighup_makes_covm_serve_read_its_certificate_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca1, cert, key) = operator_cert(tmp.path(), "one");
    let data = tmp.path().join("data");
    let s = serve_with(
        &data,
        &["--driver", "sim", "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
    );
    assert!(s.url.starts_with("https://"));
    let pw = data.join("initial-admin-password");
    let login = |ca: &Path, cfg: &str| {
        covm(
            &s,
            &tmp.path().join(cfg),
            &["--ca-file", ca.to_str().unwrap(), "login", "--password-file", pw.to_str().unwrap()],
            None,
        )
    };
    ok(login(&ca1, "a"));
    // New files from another CA in the same place; until SIGHUP the old certificate is served.
    let (ca2, cert2, key2) = operator_cert(tmp.path(), "two");
    std::fs::rename(cert2, &cert).unwrap();
    std::fs::rename(key2, &key).unwrap();
    assert!(!login(&ca2, "b").status.success());
    let hup = Command::new("kill").args(["-HUP", &s.child.id().to_string()]).status().unwrap();
    assert!(hup.success());
    let t = Instant::now();
    while !login(&ca2, "c").status.success() {
        assert!(t.elapsed() < Duration::from_secs(10), "the new certificate was not served after SIGHUP");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!login(&ca1, "d").status.success(), "the old CA no longer vouches");
}

#[test]
fn templates_clones_nics_and_networks_from_the_cli() {
    let (_tmp, s, admin) = signed_in_admin();
    let run = |args: &[&str]| ok(covm(&s, &admin, args, None));
    // A NAT network (the simulated driver keeps it as a record: nothing is made on the host).
    let net = run(&["network", "create", "lab", "--kind", "nat", "--subnet", "10.88.0.0/24"]);
    assert!(net.contains("10.88.0.0/24 (gateway 10.88.0.1)"), "{net}");
    assert!(run(&["network", "ls"]).contains("lab"));
    run(&["vm", "create", "tpl", "--net", "lab"]);
    assert!(run(&["vm", "template", "tpl"]).contains("is a template"));
    let cloned =
        run(&["vm", "clone", "tpl", "web", "--user", "ann", "--ssh-key", "ssh-ed25519 AAAAC3Nz ann@laptop", "--sudo"]);
    assert!(cloned.contains("cloned tpl to web"), "{cloned}");
    let info = run(&["--json", "vm", "info", "web"]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["config"]["cloud_init"]["hostname"], "web");
    assert_eq!(v["config"]["cloud_init"]["users"][0]["name"], "ann");
    // A template takes no change.
    let refused = covm(&s, &admin, &["vm", "change", "tpl", "-c", "2"], None);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("template"));

    // NICs: add one on the user network with a forward, list, remove.
    run(&["vm", "nic", "add", "web", "user", "--forward", "2222:22"]);
    let nics = run(&["vm", "nic", "ls", "web"]);
    assert!(nics.contains("1  user") && nics.contains("2222->22/tcp"), "{nics}");
    run(&["vm", "nic", "change", "web", "1", "--connected", "false"]);
    assert!(run(&["vm", "nic", "ls", "web"]).contains("down"));
    run(&["vm", "nic", "rm", "web", "1"]);
    assert!(!run(&["vm", "nic", "ls", "web"]).contains("user"));

    // A forward of the network pins the VM's address.
    let fw = run(&["network", "forward", "lab", "8080=web:80"]);
    assert!(fw.contains("forward:  8080/tcp -> web:80") && fw.contains("address:  10.88.0.2"), "{fw}");
    // No guest agent in a simulated VM: `vm ip` says so when it gives up.
    let ip = covm(&s, &admin, &["vm", "ip", "web", "--timeout", "1"], None);
    assert!(!ip.status.success(), "{ip:?}");
    // A network in use stays.
    let rm = covm(&s, &admin, &["network", "rm", "lab"], None);
    assert!(!rm.status.success() && String::from_utf8_lossy(&rm.stderr).contains("web"));
    run(&["vm", "rm", "web"]);
    run(&["vm", "rm", "tpl"]);
    run(&["network", "rm", "lab"]);
}
