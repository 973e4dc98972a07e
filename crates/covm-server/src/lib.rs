//! covm's server: the app layer (`app`: every rule), the HTTP API (`http`: thin handlers), and
//! [`start`]/[`serve`], which put them on a listening socket over a store in the data directory.

pub mod app;
pub mod files;
pub mod http;
pub mod listen;
pub mod tls;
pub mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use covm_store::{PgStore, SqliteStore, Store};
use tokio::sync::oneshot;

use app::{App, AppConfig};

/// Which hypervisor driver runs VMs.
#[derive(Clone, Default)]
pub enum Driver {
    /// Real QEMU processes (the default).
    #[default]
    Qemu,
    /// Simulated VMs, for machines without QEMU.
    Sim,
    /// A driver given by the caller (tests share one simulated driver across restarts).
    Custom(Arc<dyn covm_hv::Hypervisor>),
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Driver::Qemu => f.write_str("qemu"),
            Driver::Sim => f.write_str("sim"),
            Driver::Custom(d) => write!(f, "custom({})", d.name()),
        }
    }
}

/// How `covm serve` runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Create a small demo inventory on the first start.
    pub demo: bool,
    pub driver: Driver,
    /// A PostgreSQL URL (`postgres://…`) for several replicas on one database; `None`: SQLite in the
    /// data directory.
    pub db: Option<String>,
    /// The URL other replicas reach this one at (default `http://` and the address it listens on): a
    /// request about a VM this node runs is forwarded there.
    pub advertise: Option<String>,
    /// At most this many connections at once (default [`listen::CONNECTIONS_DEFAULT`], and never more
    /// than the open-file limit allows with room for work).
    pub max_connections: Option<usize>,
    /// How many days a safety snapshot is kept (default [`app::SAFETY_SNAPSHOT_DAYS`]).
    pub safety_snapshot_days: Option<u32>,
    /// Whether to serve TLS: by default whenever the listen address is not a loopback address.
    pub tls: TlsMode,
    /// The certificate (default: covm's own CA in the data directory) and the lowest version.
    pub tls_settings: tls::TlsSettings,
    /// Allow plain HTTP on an address beyond loopback (`--insecure-http`).
    pub insecure_http: bool,
    /// Request rate limits (default [`app::ratelimit::RateLimitConfig::default`]).
    pub rate_limits: app::ratelimit::RateLimitConfig,
    /// The master key of encrypted disks from a file (`--master-key-file`); else `master_key_env`
    /// (base64, `COVM_MASTER_KEY`); else `DATA/master.key`, made at the first start.
    pub master_key_file: Option<PathBuf>,
    pub master_key_env: Option<Hidden>,
    /// Single sign-on with an OpenID Connect provider (None: off).
    pub oidc: Option<app::sso::OidcConfig>,
    /// How long a presence heartbeat counts (default [`app::presence::PRESENCE_TTL_DEFAULT`]).
    pub presence_ttl: std::time::Duration,
    /// VMs' QEMUs, their taps and the networks covm makes live in this network namespace (made with
    /// `ip netns add`; `--netns`). None: the host's own.
    pub netns: Option<String>,
}

/// A secret in a configuration: printed as `<hidden>`.
#[derive(Clone)]
pub struct Hidden(pub String);

impl std::fmt::Debug for Hidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

/// Whether `covm serve` speaks TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS beyond loopback (unless `insecure_http`) or with a certificate given; plain on loopback.
    #[default]
    Auto,
    /// Always TLS (`--tls`).
    On,
    /// Never (`--no-tls`): refused beyond loopback unless `insecure_http`.
    Off,
}

impl ServeConfig {
    /// A configuration with the defaults for everything but where the data is and where to listen.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> ServeConfig {
        ServeConfig {
            data_dir,
            listen,
            demo: false,
            driver: Driver::default(),
            db: None,
            advertise: None,
            max_connections: None,
            safety_snapshot_days: None,
            tls: TlsMode::Auto,
            tls_settings: tls::TlsSettings::default(),
            insecure_http: false,
            rate_limits: app::ratelimit::RateLimitConfig::default(),
            master_key_file: None,
            master_key_env: None,
            oidc: None,
            presence_ttl: app::presence::PRESENCE_TTL_DEFAULT,
            netns: None,
        }
    }

    /// Whether this configuration serves TLS, or why it may not start.
    pub fn tls_on(&self) -> anyhow::Result<bool> {
        let loopback = self.listen.ip().is_loopback();
        let given = self.tls_settings.cert.is_some() || self.tls_settings.key.is_some();
        let on = match self.tls {
            TlsMode::On => true,
            TlsMode::Off => false,
            TlsMode::Auto => given || (!loopback && !self.insecure_http),
        };
        if !on && !loopback && !self.insecure_http {
            anyhow::bail!(
                "refusing to serve plain HTTP on {}, which is not a loopback address: passwords and tokens \
                 would cross the network in clear text. Leave TLS on (the default beyond loopback), or pass \
                 --insecure-http if something in front of covm encrypts the traffic",
                self.listen
            );
        }
        if !on && given {
            anyhow::bail!("--tls-cert and --tls-key need TLS; they cannot go with --no-tls or --insecure-http");
        }
        Ok(on)
    }
}

/// A server that is listening.
pub struct Running {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    pub app: App,
    /// Where the first start wrote the admin password, if this start created the admin.
    pub initial_password_file: Option<PathBuf>,
    /// The listener's TLS, when it serves TLS (`reload` after the certificate files change).
    pub tls: Option<Arc<tls::Tls>>,
    shutdown: oneshot::Sender<()>,
    join: tokio::task::JoinHandle<std::io::Result<()>>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets requests in flight finish, and returns.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        self.app.quiesce();
        for t in &self.background {
            t.abort();
        }
        let r = match tokio::time::timeout(std::time::Duration::from_secs(10), self.join).await {
            Ok(r) => r.context("the server task failed")?.context("the server failed"),
            Err(_) => {
                tracing::warn!("requests still running after 10 s; stopping anyway");
                Ok(())
            }
        };
        self.app.close().await;
        r
    }

    /// Waits until the server ends by itself (it does not, short of an error).
    pub async fn wait(self) -> anyhow::Result<()> {
        let Running { join, shutdown, .. } = self;
        let r = join.await;
        drop(shutdown);
        r.context("the server task failed")?.context("the server failed")
    }
}

/// Opens the data directory and the store, bootstraps, and starts listening.
pub async fn start(config: ServeConfig) -> anyhow::Result<Running> {
    let tls_on = config.tls_on()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("could not create the data directory {}", config.data_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700));
    }
    let data_dir = config.data_dir.canonicalize().unwrap_or(config.data_dir.clone());
    let store: Arc<dyn Store> = match &config.db {
        Some(url) => Arc::new(
            PgStore::connect(url)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))
                .context("could not open the PostgreSQL database")?,
        ),
        None => {
            let db = data_dir.join("covm.db");
            Arc::new(
                SqliteStore::open(&db)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", e.message))
                    .with_context(|| format!("could not open the database {}", db.display()))?,
            )
        }
    };
    let driver: Arc<dyn covm_hv::Hypervisor> = match &config.driver {
        Driver::Qemu => Arc::new(covm_hv::qemu::QemuDriver::default().in_netns(config.netns.clone())),
        Driver::Sim => Arc::new(covm_hv::sim::SimDriver::default()),
        Driver::Custom(d) => d.clone(),
    };
    match driver.check() {
        Ok(()) => tracing::info!(driver = driver.name(), "hypervisor driver ready"),
        Err(e) => tracing::warn!(driver = driver.name(), "VMs cannot be powered on: {e}"),
    }
    if driver.name() == "sim" {
        tracing::warn!("the simulated driver runs no real VMs; runtime state is labelled simulated");
    }
    let node_id = node_id(&data_dir)?;
    let mut app_config = AppConfig::new(data_dir.clone(), node_id);
    app_config.rate_limits = config.rate_limits;
    app_config.oidc = config.oidc.clone();
    app_config.presence_ttl = config.presence_ttl;
    app_config.netns = config.netns.clone();
    app_config.listen_port = Some(config.listen.port());
    app_config.keys = Some(Arc::new(
        app::keys::KeyRing::load(
            &data_dir,
            config.master_key_file.as_deref(),
            config.master_key_env.as_ref().map(|h| h.0.as_str()),
        )
        .context("could not load the master key of encrypted disks")?,
    ));
    if let Some(days) = config.safety_snapshot_days {
        app_config.safety_snapshot_ttl = chrono::Duration::days(days.into());
    }
    let app = App::new(store.clone(), app_config, driver);
    store.replica_register(app.replica()).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let initial_password_file = app.bootstrap(&data_dir).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    if let Some(f) = &initial_password_file {
        tracing::info!(file = %f.display(), "created the user admin; its initial password is in this file (mode 0600)");
    }
    app.inventory_bootstrap(&data_dir, config.demo).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let tailer = app.hub().start().await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    app.presence_listen().await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    app.node_recover().await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    {
        let hub = app.hub().clone();
        store.log_watch(Arc::new(move || hub.wake())).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    }
    // With the running VMs adopted, the sagas a crash interrupted are finished or undone (by the one
    // replica that runs background work; on SQLite, this process).
    let leader = store.leader_try().await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    if leader {
        match app.sagas_recover().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sagas = n, "recovered interrupted sagas"),
            Err(e) => tracing::error!(error = %e, "saga recovery failed"),
        }
        let app = app.clone();
        tokio::spawn(async move {
            match app.autostart().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(started = n, "autostart done"),
                Err(e) => tracing::warn!(error = %e, "autostart failed"),
            }
        });
    }
    let background = {
        let app = app.clone();
        tokio::spawn(async move { app.background(leader).await })
    };

    let tls = match tls_on {
        true => {
            let tls = tls::Tls::setup(&data_dir, &app.config().node_id, config.listen.ip(), &config.tls_settings)?;
            tracing::info!(fingerprint = %tls.fingerprint(), "serving TLS; clients trust the certificate with this SHA-256 fingerprint");
            Some(Arc::new(tls))
        }
        false => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("could not listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let advertise = config.advertise.clone().unwrap_or_else(|| match addr.ip().is_unspecified() {
        true => format!("{scheme}://127.0.0.1:{}", addr.port()),
        false => format!("{scheme}://{addr}"),
    });
    let trust = tls.as_ref().map(|t| t.trust_pem());
    app.node_advertise(&advertise, trust.as_deref()).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    tracing::info!(%addr, tls = tls.is_some(), data_dir = %data_dir.display(), store = store.backend(), replica = %app.replica(), "covm is listening");
    let (shutdown, rx) = oneshot::channel::<()>();
    let cap = listen::connection_cap(config.max_connections);
    let join = tokio::spawn(listen::serve(listener, http::router(app.clone()), cap, tls.clone(), rx));
    Ok(Running { addr, app, initial_password_file, tls, shutdown, join, background: vec![tailer, background] })
}

/// Runs until SIGINT or SIGTERM.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let running = start(config).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; stopping");
                break;
            }
            _ = term.recv() => {
                tracing::info!("terminated; stopping");
                break;
            }
            _ = hup.recv() => match &running.tls {
                Some(tls) => match tls.reload() {
                    Ok(()) => tracing::info!(fingerprint = %tls.fingerprint(), "SIGHUP: read the TLS certificate and key again"),
                    Err(e) => tracing::error!(error = format!("{e:#}"), "SIGHUP: the TLS certificate or key could not be read; the current ones stay"),
                },
                None => tracing::info!("SIGHUP: nothing to reload (no TLS)"),
            },
        }
    }
    running.stop().await
}

/// The node id of a data directory (made on its first start): which VMs this node's agent runs.
fn node_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let f = data_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&f)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_owned());
    }
    let id = uuid::Uuid::now_v7().to_string();
    std::fs::write(&f, &id).with_context(|| format!("could not write {}", f.display()))?;
    Ok(id)
}
