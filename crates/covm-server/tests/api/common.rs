//! A real covm server on a loopback port over a SQLite file in a temporary directory (or, in the
//! `api_postgres` test target, a database of its own on a real PostgreSQL server the tests start), and
//! clients signed in to it.

use covm_client::Client;
use covm_server::{Running, ServeConfig};
use tempfile::TempDir;

pub const PASSWORD: &str = "test-password-1";

pub struct TestServer {
    pub dir: TempDir,
    running: Option<Running>,
    pub url: String,
    pub admin: Client,
    pub admin_password: String,
    driver: covm_server::Driver,
    /// The PostgreSQL database (None: SQLite in `dir`).
    pub db: Option<String>,
    opts: Options,
}

/// A test leaves nothing running: the QEMU processes of its server's VMs (which outlive covm by
/// design, to be adopted at its next start) end with the test.
impl Drop for TestServer {
    fn drop(&mut self) {
        let Ok(vms) = std::fs::read_dir(self.dir.path().join("vms")) else { return };
        for vm in vms.flatten() {
            let Ok(pid) = std::fs::read_to_string(vm.path().join("qemu.pid")) else { continue };
            let pid = pid.trim();
            // Only a QEMU that still runs this VM's files (the pid may have been reused).
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*vm.path().to_string_lossy()));
            if ours {
                let _ = std::process::Command::new("kill").args(["-9", pid]).status();
            }
        }
    }
}

/// How a test server runs, beyond its driver and database.
#[derive(Clone)]
pub struct Options {
    pub tls: bool,
    pub rate_limits: covm_server::app::ratelimit::RateLimitConfig,
    pub oidc: Option<covm_server::app::sso::OidcConfig>,
    pub presence_ttl: std::time::Duration,
    /// `--netns`: VMs and covm's networks in this network namespace.
    pub netns: Option<String>,
}

impl Default for Options {
    fn default() -> Options {
        // Many of these tests are storms of requests by one user; tests/api/ratelimits.rs tests the
        // limits themselves.
        Options {
            tls: false,
            rate_limits: covm_server::app::ratelimit::RateLimitConfig::UNLIMITED,
            oidc: None,
            presence_ttl: covm_server::app::presence::PRESENCE_TTL_DEFAULT,
            netns: None,
        }
    }
}

/// Whether these tests run on PostgreSQL (the `api_postgres` target compiles this same file).
pub fn on_postgres() -> bool {
    module_path!().starts_with("api_postgres")
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(covm_server::Driver::Sim).await
    }

    pub async fn start_with(driver: covm_server::Driver) -> TestServer {
        let db = match on_postgres() {
            true => Some(covm_store::testing::postgres_database().await.expect("PostgreSQL for tests")),
            false => None,
        };
        Self::start_at(tempfile::tempdir().expect("tempdir"), driver, db).await
    }

    /// A server with the data directory `dir` and the database `db` (None: SQLite in `dir`).
    pub async fn start_at(dir: TempDir, driver: covm_server::Driver, db: Option<String>) -> TestServer {
        Self::start_full_with(dir, driver, db, Options::default()).await
    }

    /// A server that serves TLS on loopback (`--tls`), with covm's own CA.
    pub async fn start_tls() -> TestServer {
        Self::start_options(Options { tls: true, ..Options::default() }).await
    }

    /// A server with these request rate limits.
    pub async fn start_limited(limits: covm_server::app::ratelimit::RateLimitConfig) -> TestServer {
        Self::start_options(Options { rate_limits: limits, ..Options::default() }).await
    }

    /// A server with single sign-on through this identity provider.
    pub async fn start_sso(oidc: covm_server::app::sso::OidcConfig) -> TestServer {
        Self::start_options(Options { oidc: Some(oidc), ..Options::default() }).await
    }

    /// A server on the simulated driver with these options.
    pub async fn start_options(opts: Options) -> TestServer {
        let db = match on_postgres() {
            true => Some(covm_store::testing::postgres_database().await.expect("PostgreSQL for tests")),
            false => None,
        };
        Self::start_full_with(tempfile::tempdir().expect("tempdir"), covm_server::Driver::Sim, db, opts).await
    }

    /// A server on the QEMU driver with these options.
    pub async fn start_qemu_options(opts: Options) -> TestServer {
        Self::start_full_with(tempfile::tempdir().expect("tempdir"), covm_server::Driver::Qemu, None, opts).await
    }

    async fn start_full_with(
        dir: TempDir,
        driver: covm_server::Driver,
        db: Option<String>,
        opts: Options,
    ) -> TestServer {
        let running = Self::boot(&dir, 0, driver.clone(), db.clone(), &opts).await;
        let url = format!("{}://{}", if opts.tls { "https" } else { "http" }, running.addr);
        let admin_password = std::fs::read_to_string(dir.path().join("initial-admin-password"))
            .expect("the first start writes the admin password")
            .trim()
            .to_owned();
        let mut s = TestServer {
            dir,
            running: Some(running),
            url,
            admin: Client::new("http://-"),
            admin_password,
            driver,
            db,
            opts,
        };
        s.admin = s.anonymous().login("admin", &s.admin_password).await.expect("admin signs in").0;
        s
    }

    /// The certificate clients trust when the server serves TLS: its CA.
    pub fn ca_pem(&self) -> Option<String> {
        self.opts.tls.then(|| std::fs::read_to_string(self.dir.path().join("tls/ca.pem")).expect("covm's CA"))
    }

    /// Another replica on the same database (PostgreSQL), with a data directory of its own; its admin
    /// client signs in with the first replica's password.
    pub async fn replica(&self) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let running = Self::boot(&dir, 0, self.driver.clone(), self.db.clone(), &self.opts).await;
        assert!(running.initial_password_file.is_none(), "only the first replica creates admin");
        let url = format!("{}://{}", if self.opts.tls { "https" } else { "http" }, running.addr);
        let mut s = TestServer {
            dir,
            running: Some(running),
            url,
            admin: Client::new("http://-"),
            admin_password: self.admin_password.clone(),
            driver: self.driver.clone(),
            db: self.db.clone(),
            opts: self.opts.clone(),
        };
        s.admin = s.anonymous().login("admin", &s.admin_password).await.expect("admin signs in").0;
        s
    }

    async fn boot(
        dir: &TempDir,
        port: u16,
        driver: covm_server::Driver,
        db: Option<String>,
        opts: &Options,
    ) -> Running {
        covm_server::start(ServeConfig {
            driver,
            db,
            rate_limits: opts.rate_limits,
            oidc: opts.oidc.clone(),
            presence_ttl: opts.presence_ttl,
            netns: opts.netns.clone(),
            tls: if opts.tls { covm_server::TlsMode::On } else { covm_server::TlsMode::Auto },
            ..ServeConfig::new(dir.path().to_owned(), format!("127.0.0.1:{port}").parse().unwrap())
        })
        .await
        .expect("covm starts")
    }

    /// Stops this server (a replica that goes away).
    pub async fn stop(mut self) {
        self.running.take().expect("running").stop().await.expect("covm stops");
    }

    /// Stops the server and starts it again on the same port and data directory.
    pub async fn restart(&mut self) {
        self.restart_with(|| {}).await
    }

    /// Like [`restart`](Self::restart), doing `between` while covm is down.
    pub async fn restart_with(&mut self, between: impl FnOnce()) {
        let running = self.running.take().expect("running");
        let port = running.addr.port();
        running.stop().await.expect("covm stops");
        between();
        self.running = Some(Self::boot(&self.dir, port, self.driver.clone(), self.db.clone(), &self.opts).await);
    }

    /// The app inside the server (for the fault switch).
    pub fn app(&self) -> &covm_server::app::App {
        &self.running.as_ref().expect("running").app
    }

    pub fn db_path(&self) -> std::path::PathBuf {
        self.dir.path().join("covm.db")
    }

    pub fn anonymous(&self) -> Client {
        match self.ca_pem() {
            Some(ca) => Client::with_ca(&self.url, &ca).expect("covm's CA is a CA"),
            None => Client::new(&self.url),
        }
    }

    /// Creates a user (as admin) and signs it in.
    pub async fn user(&self, name: &str) -> Client {
        self.admin.user_create(name, PASSWORD).await.expect("user created");
        self.login(name).await
    }

    pub async fn login(&self, name: &str) -> Client {
        self.anonymous().login(name, PASSWORD).await.expect("user signs in").0
    }

    /// How many rows a table has, read straight from the database file.
    pub async fn count(&self, table: &str) -> i64 {
        self.scalar(&format!("SELECT COUNT(*) FROM {table}")).await
    }

    /// Runs one statement straight on the database (as someone with the file or the credentials).
    pub async fn execute(&self, sql: &str) -> Result<u64, String> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.db {
            Some(url) => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                let r = sqlx::query(sql).execute(&pool).await.map(|r| r.rows_affected()).map_err(|e| e.to_string());
                pool.close().await;
                r
            }
            None => {
                let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", self.db_path().display())).await.unwrap();
                let r = sqlx::query(sql).execute(&pool).await.map(|r| r.rows_affected()).map_err(|e| e.to_string());
                pool.close().await;
                r
            }
        }
    }

    /// One number, read straight from the database.
    /// Every entry of the log (change feed and audit) as text: its data, actor and object name.
    pub async fn log_text(&self) -> String {
        let sql = "SELECT CAST(data AS TEXT) || ' ' || actor || ' ' || COALESCE(object_name, '') FROM events";
        let rows: Vec<(String,)> = match &self.db {
            Some(url) => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                let r = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
                pool.close().await;
                r
            }
            None => {
                let pool =
                    sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", self.db_path().display())).await.unwrap();
                let r = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
                pool.close().await;
                r
            }
        };
        rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("\n")
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        if let Some(url) = &self.db {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let n: (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&pool).await.unwrap();
            pool.close().await;
            return n.0;
        }
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", self.db_path().display())).await.unwrap();
        let n: (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&pool).await.unwrap();
        pool.close().await;
        n.0
    }
}

/// Waits for a task to end.
pub async fn task_done(c: &Client, task: &covm_types::vm::TaskView) -> covm_types::vm::TaskView {
    c.task_wait(task.id, std::time::Duration::from_secs(120), |_| {}).await.expect("the task ends")
}

/// A valid name (panics on an invalid one: for tests that mean to send a good name).
pub fn name(s: &str) -> covm_types::Name {
    covm_types::Name::parse(s).unwrap_or_else(|e| panic!("{s:?} is not a valid name: {e}"))
}

/// A new disk on the `local` datastore (qcow2, not shared, in `/` and the default pool).
pub fn new_disk(disk: &str, capacity_bytes: u64) -> covm_types::disk::DiskCreate {
    covm_types::disk::DiskCreate::new(name(disk), "local", capacity_bytes)
}

/// A VM config with every default and this name.
pub fn vm_named(vm: &str) -> covm_types::vm::VmConfig {
    covm_types::vm::VmConfig::named(vm).expect("a valid VM name")
}

/// A `pc` VM with one IDE controller (a bus that cannot hot-plug).
pub fn ide_vm(vm: &str) -> covm_types::vm::VmConfig {
    use covm_types::vm::{Controller, ControllerType, Machine};
    covm_types::vm::VmConfig {
        machine: Machine::Pc,
        controllers: vec![Controller { id: "ide0".into(), kind: ControllerType::Ide }],
        ..vm_named(vm)
    }
}

/// A disk attachment to send (its generation is covm's to set).
pub fn attachment(disk: &str, controller: &str, unit: u32) -> covm_types::vm::DiskAttachment {
    covm_types::vm::DiskAttachment {
        disk: disk.into(),
        controller: controller.into(),
        unit,
        read_only: false,
        generation: 0,
    }
}

/// Attach `disk` where covm chooses (the first virtio-scsi controller, the lowest free unit).
pub fn attach(disk: &str) -> covm_types::disk::DiskAttach {
    covm_types::disk::DiskAttach { disk: disk.into(), ..Default::default() }
}
