//! A real PostgreSQL server for tests (of the store, the server and the bench): Debian's `postgresql`
//! package, `initdb` in a temporary directory (as user `postgres` when the tests run as root), on a
//! free loopback port; one server per test process, a fresh database per caller. The server ends with
//! the test process (it gets SIGTERM when the process goes) and removes its directory.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;

pub struct TestPostgres {
    pub port: u16,
}

static SERVER: OnceLock<Result<TestPostgres, String>> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The newest installed server's `bin` directory (`COVM_PG_BINDIR` overrides).
fn bindir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("COVM_PG_BINDIR") {
        return Ok(d.into());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| "PostgreSQL is not installed (Debian package postgresql)".to_owned())?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).ok_or_else(|| "no initdb under /usr/lib/postgresql/*/bin".to_owned())
}

/// The user the server runs as: `postgres` when we are root (initdb refuses root), else ourselves.
fn server_user() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    nix::unistd::User::from_name("postgres").ok().flatten().map(|u| (u.uid.as_raw(), u.gid.as_raw()))
}

fn as_server_user(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// A new cluster in `data` (user `covm`, trust on loopback), as the server's user.
fn initdb(bin: &std::path::Path, data: &std::path::Path) -> Result<(), String> {
    let out = as_server_user(Command::new(bin.join("initdb")).arg("-D").arg(data))
        .args(["-U", "covm", "--auth=trust", "--no-sync", "--no-locale", "-E", "UTF8"])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr))),
    }
}

fn start() -> Result<TestPostgres, String> {
    let bin = bindir()?;
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
    let dir = std::env::temp_dir().join(format!("covm-pg-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Some((uid, gid)) = server_user() {
        nix::unistd::chown(&dir, Some(uid.into()), Some(gid.into())).map_err(|e| e.to_string())?;
    }
    let data = dir.join("data");
    initdb(&bin, &data)?;
    // The server lives as long as this process: a thread that never ends starts it with a parent-death
    // signal, and the shell around it removes the directory when it stops.
    let script = format!(
        "{pg} -D {data} -p {port} -k {dir} -h 127.0.0.1 -c fsync=off -c full_page_writes=off \
         -c max_connections=400 -c shared_buffers=64MB >{dir}/log 2>&1 & p=$!; \
         trap 'kill -INT $p' INT TERM HUP; wait $p; wait $p; rm -rf {dir}",
        pg = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // setpriv (util-linux) sets the parent-death signal and execs the shell.
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "TERM", "--", "sh", "-c", &script]);
        as_server_user(&mut cmd);
        let _ = tx.send(cmd.spawn().map(|_| ()).map_err(|e| e.to_string()));
        loop {
            std::thread::park();
        }
    });
    rx.recv().map_err(|e| e.to_string())??;
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            return Err(format!("PostgreSQL did not listen within 30 s:\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(TestPostgres { port })
}

impl TestPostgres {
    /// The process's server (started on first use).
    pub fn get() -> Result<&'static TestPostgres, String> {
        SERVER.get_or_init(start).as_ref().map_err(Clone::clone)
    }

    /// A new, empty database on the server; its URL.
    pub async fn database(&self) -> Result<String, String> {
        let n = DATABASES.fetch_add(1, Ordering::Relaxed);
        let name = format!("covm_t{}_{n}", std::process::id());
        let admin = format!("postgres://covm@127.0.0.1:{}/postgres", self.port);
        // The server listens before it accepts sessions: "the database system is starting up"
        // (57P03) is waited out.
        let started = Instant::now();
        let mut conn = loop {
            match sqlx::PgConnection::connect(&admin).await {
                Ok(c) => break c,
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("57P03") && started.elapsed() < Duration::from_secs(30) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let _ = conn.close().await;
        Ok(format!("postgres://covm@127.0.0.1:{}/{name}", self.port))
    }
}

/// A fresh database URL, or the reason there is none (PostgreSQL not installed).
pub async fn postgres_database() -> Result<String, String> {
    TestPostgres::get()?.database().await
}

/// A PostgreSQL server of a test's own, which the test may stop and start again (a database that goes
/// away and comes back). It is stopped, and its directory removed, when dropped.
pub struct OwnPostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl OwnPostgres {
    pub fn start() -> Result<OwnPostgres, String> {
        let bin = bindir()?;
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let dir = std::env::temp_dir().join(format!("covm-own-pg-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some((uid, gid)) = server_user() {
            nix::unistd::chown(&dir, Some(uid.into()), Some(gid.into())).map_err(|e| e.to_string())?;
        }
        initdb(&bin, &dir.join("data"))?;
        let pg = OwnPostgres { port, dir, bin };
        pg.resume()?;
        Ok(pg)
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let opts = format!("-p {} -k {} -h 127.0.0.1 -c fsync=off", self.port, self.dir.display());
        let out = as_server_user(Command::new(self.bin.join("pg_ctl")).arg("-D").arg(self.dir.join("data")))
            .args(args)
            .args(["-o", &opts, "-l"])
            .arg(self.dir.join("log"))
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!("pg_ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr))),
        }
    }

    /// Stops the server at once (as a crash or a power cut would).
    pub fn stop(&self) -> Result<(), String> {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"])
    }

    /// Starts it (again), waiting until it answers.
    pub fn resume(&self) -> Result<(), String> {
        self.pg_ctl(&["start", "-w", "-t", "30"])
    }

    /// A new, empty database on it; its URL.
    pub async fn database(&self) -> Result<String, String> {
        TestPostgres { port: self.port }.database().await
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
