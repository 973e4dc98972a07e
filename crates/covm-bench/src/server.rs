//! A covm server for a benchmark: the `covm` binary started as a child process on a temporary data
//! directory (so its memory can be measured apart from the load generator), or one given by URL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use covm_client::Client;

pub struct Server {
    pub url: String,
    pub admin: Client,
    /// The child process and its data dir, when the bench started it.
    pub child: Option<Child>,
    pub data_dir: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
    /// The admin's password.
    pub password: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            // SIGTERM first: covm stops cleanly; QEMUs it started stay up only if the scenario left them.
            let _ = nix_term(c.id());
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn nix_term(pid: u32) -> std::io::Result<()> {
    let status = Command::new("kill").arg("-TERM").arg(pid.to_string()).status()?;
    if status.success() { Ok(()) } else { Err(std::io::Error::other("kill failed")) }
}

/// The `covm` binary next to this one (both are built by `cargo build --release`), or, for a test
/// binary in `target/*/deps`, the one a directory up.
pub fn covm_binary() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let dirs = exe.iter().flat_map(|p| p.ancestors().skip(1).take(2));
    dirs.map(|d| d.join("covm")).find(|p| p.is_file()).unwrap_or_else(|| PathBuf::from("covm"))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    /// Starts `covm serve` on a fresh data dir with the given driver (`sim` or `qemu`).
    pub async fn start(covm: &Path, driver: &str) -> anyhow::Result<Server> {
        Self::start_on(covm, driver, None, None, &[]).await
    }

    /// Starts `covm serve` on a fresh data dir, on PostgreSQL at `db` if given; `password`: the admin's
    /// (a further replica on a database where admin exists), else the one the first start writes.
    pub async fn start_on(
        covm: &Path,
        driver: &str,
        db: Option<&str>,
        password: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let tmp = tempfile::Builder::new().prefix("covm-bench-").tempdir()?;
        let data = tmp.path().join("data");
        let port = free_port()?;
        let log = std::fs::File::create(tmp.path().join("server.log"))?;
        let mut cmd = Command::new(covm);
        cmd.args(["serve", "--driver", driver, "--listen", &format!("127.0.0.1:{port}"), "--data-dir"]).arg(&data);
        // The benchmarks measure what the server can do; its per-user limits (policy, 50 requests a
        // second by default) would measure themselves instead.
        for flag in ["--rate-limit", "--rate-burst", "--anonymous-rate-limit", "--anonymous-rate-burst"] {
            cmd.args([flag, "1000000"]);
        }
        match db {
            Some(url) => cmd.env("COVM_DB", url),
            None => cmd.env_remove("COVM_DB"),
        };
        cmd.envs(env.iter().copied());
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("could not start {}", covm.display()))?;
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("covm did not listen within 30 s (see {})", tmp.path().join("server.log").display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let password = match password {
            Some(p) => p.to_owned(),
            None => std::fs::read_to_string(data.join("initial-admin-password"))?.trim().to_owned(),
        };
        let (admin, _) = Client::new(&url).login("admin", &password).await?;
        Ok(Server { url, admin, child: Some(child), data_dir: Some(data), _tmp: Some(tmp), password })
    }

    /// Another replica of this server's database (PostgreSQL at `db`).
    pub async fn replica(&self, covm: &Path, driver: &str, db: &str) -> anyhow::Result<Server> {
        Self::start_on(covm, driver, Some(db), Some(&self.password), &[]).await
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the server at once (`kill -9`): nothing of it runs after this returns.
    pub fn kill(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.child = None;
    }

    /// A running covm at `url`, signed in as admin with the password given.
    pub async fn remote(url: &str, password: &str) -> anyhow::Result<Server> {
        let (admin, _) = Client::new(url).login("admin", password).await?;
        Ok(Server {
            url: url.to_owned(),
            admin,
            child: None,
            data_dir: None,
            _tmp: None,
            password: password.to_owned(),
        })
    }

    /// The server's resident memory in MiB (a child only).
    pub fn rss_mib(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
        Some((kb / 1024.0 * 10.0).round() / 10.0)
    }
}
