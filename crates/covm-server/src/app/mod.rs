//! The app layer: every rule of covm lives here — who may do what (`authz`), sign-in and tokens
//! (`auth`), the inventory tree (`inventory`), principals and grants (`principals`), VMs and their
//! versions (`vms`, `leases`), the node agent and power (`node`, `power`), disks (`disks`, `attach`),
//! multi-step operations and their recovery (`saga`), and the log that feeds the live event stream and
//! the audit trail (`events`).
//!
//! Rules:
//! - No HTTP types here. Functions take a [`Ctx`] (who asks, which request) and typed parameters, and
//!   return API views or a [`covm_types::Error`]; the HTTP layer picks status codes from the error kind.
//! - Every change is written together with its log entry (the store appends both in one transaction).
//! - Every denial is written to the log (audit only) before the error is returned; the request is then
//!   marked as audited so that the HTTP layer does not log it twice.

pub mod agent;
pub mod anon;
pub mod attach;
pub mod auth;
pub mod authz;
pub mod cache;
pub mod change;
pub mod clone;
pub mod consoles;
pub mod datastore_files;
pub mod disks;
pub mod events;
pub mod guest;
pub mod host;
pub mod inventory;
pub mod json;
pub mod keys;
pub mod leases;
pub mod mfa;
pub mod networks;
pub mod nics;
pub mod node;
pub mod power;
pub mod presence;
pub mod principals;
pub mod ratelimit;
pub mod refs;
pub mod saga;
pub mod snapshots;
pub mod sso;
pub mod streams;
pub mod transition;
pub mod vms;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use covm_store::{NewEvent, Store};
use uuid::Uuid;

pub use auth::RateLimiter;
pub use events::EventHub;

/// What the app layer needs to know of the process it runs in.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub data_dir: PathBuf,
    /// This node's id (kept in the data directory): which VMs its agent runs and adopts.
    pub node_id: String,
    /// How long a safety snapshot is kept before the reaper deletes it (unless pinned).
    pub safety_snapshot_ttl: chrono::Duration,
    /// Request rate limits per user and per address.
    pub rate_limits: ratelimit::RateLimitConfig,
    /// The master keys of encrypted disks (`start` loads them; None: encrypted disks are refused).
    pub keys: Option<Arc<keys::KeyRing>>,
    /// Single sign-on with an OpenID Connect provider (None: off).
    pub oidc: Option<sso::OidcConfig>,
    /// How long a presence heartbeat counts.
    pub presence_ttl: std::time::Duration,
    /// The network namespace of VMs and covm's networks (None: the host's).
    pub netns: Option<String>,
    /// The port covm listens on (a NAT forward may not take it).
    pub listen_port: Option<u16>,
}

/// The default of [`AppConfig::safety_snapshot_ttl`], in days.
pub const SAFETY_SNAPSHOT_DAYS: u32 = 7;

impl AppConfig {
    /// A config with the defaults.
    pub fn new(data_dir: PathBuf, node_id: String) -> AppConfig {
        AppConfig {
            data_dir,
            node_id,
            safety_snapshot_ttl: chrono::Duration::days(SAFETY_SNAPSHOT_DAYS.into()),
            rate_limits: ratelimit::RateLimitConfig::default(),
            keys: None,
            oidc: None,
            presence_ttl: presence::PRESENCE_TTL_DEFAULT,
            netns: None,
            listen_port: None,
        }
    }
}

/// The app: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct App {
    inner: Arc<AppInner>,
}

struct AppInner {
    store: Arc<dyn Store>,
    /// Fault injection for tests (empty unless `COVM_FAULT` or a test sets it).
    faults: saga::Faults,
    /// Wakes sagas waiting for operation locks when one of this process ends.
    saga_ended: tokio::sync::Notify,
    /// This process, as one replica among those on the database (new at every start).
    replica: Uuid,
    caches: cache::Caches,
    node: node::LocalAgent,
    hub: EventHub,
    limiter: RateLimiter,
    /// Request rate limits (per user, per address).
    rates: ratelimit::RateLimits,
    /// Single sign-ons in progress.
    sso: sso::SsoState,
    /// The URL other replicas (and identity providers) reach this one at.
    advertised: OnceLock<String>,
    config: AppConfig,
    /// A write failed for want of space and none has succeeded since (readiness says so).
    storage_full: AtomicBool,
    /// What requests without a session may write to the log.
    anon: anon::AnonBudget,
    /// Open streams per user.
    streams: streams::Streams,
    /// Who is viewing or editing which VM.
    presence: presence::Presence,
    /// Console tickets and the shared connections to serial consoles.
    consoles: consoles::Consoles,
    /// Datastore files being uploaded now.
    uploads: datastore_files::Uploads,
}

impl App {
    pub fn new(store: Arc<dyn Store>, config: AppConfig, driver: Arc<dyn covm_hv::Hypervisor>) -> App {
        let hub = EventHub::new(store.clone());
        let node = node::LocalAgent::new(driver, &config.data_dir);
        let caches = cache::Caches::default();
        let presence = presence::Presence::new(config.presence_ttl);
        let app = App {
            inner: Arc::new(AppInner {
                store,
                faults: saga::Faults::from_env(),
                saga_ended: tokio::sync::Notify::new(),
                replica: Uuid::now_v7(),
                caches,
                node,
                hub,
                limiter: RateLimiter::default(),
                rates: ratelimit::RateLimits::new(config.rate_limits),
                sso: sso::SsoState::default(),
                advertised: OnceLock::new(),
                config,
                storage_full: AtomicBool::new(false),
                anon: anon::AnonBudget::default(),
                streams: streams::Streams::default(),
                presence,
                consoles: consoles::Consoles::default(),
                uploads: datastore_files::Uploads::default(),
            }),
        };
        let weak = Arc::downgrade(&app.inner);
        app.inner.hub.on_authz_change(Box::new(move || {
            if let Some(inner) = weak.upgrade() {
                inner.caches.authz_changed();
                inner.caches.tokens_clear();
            }
        }));
        app
    }

    /// Notes how the last write ended: out of space (`true`) or written.
    pub fn storage_note(&self, full: bool) {
        if self.inner.storage_full.swap(full, Ordering::Relaxed) != full {
            match full {
                true => tracing::error!("writes fail: the file system that holds covm's data is full"),
                false => tracing::info!("writes succeed again"),
            }
        }
    }

    /// Whether covm can serve: the store answers, its storage has room, the driver works. The second
    /// value lists what a person should know.
    pub async fn readiness(&self) -> (bool, Vec<String>) {
        let mut ready = true;
        let mut details =
            vec![format!("store: {}", self.store().backend()), format!("driver: {}", self.agent().driver_name())];
        if let Err(e) = self.agent().check() {
            details.push(format!("driver: {e}"));
        }
        details.extend(self.agent().leftovers());
        if let Err(e) = self.store().ping().await {
            ready = false;
            details.push(format!("store: {}", e.message));
        }
        let free = host::fs_capacity(&self.config().data_dir).map(|(_, free)| free).unwrap_or(u64::MAX);
        if self.inner.storage_full.load(Ordering::Relaxed) || free < 64 * 1024 {
            ready = false;
            details.push(format!(
                "storage full: the file system of the data directory {} has {free} bytes free; writes fail until space is freed",
                self.config().data_dir.display()
            ));
        }
        (ready, details)
    }

    /// This process's replica id.
    pub fn replica(&self) -> Uuid {
        self.inner.replica
    }

    /// The fault switch (tests).
    pub fn faults(&self) -> &saga::Faults {
        &self.inner.faults
    }

    fn presence(&self) -> &presence::Presence {
        &self.inner.presence
    }

    fn consoles(&self) -> &consoles::Consoles {
        &self.inner.consoles
    }

    fn uploads(&self) -> &datastore_files::Uploads {
        &self.inner.uploads
    }

    pub fn caches(&self) -> &cache::Caches {
        &self.inner.caches
    }

    /// Effective privileges of the caller on an object, cached until something that decides them
    /// changes.
    pub(crate) async fn privileges_of(&self, ctx: &Ctx, object: Uuid) -> Result<Vec<String>, covm_types::Error> {
        let viewer = self.viewer(ctx).await?;
        if let Some(p) = self.caches().privileges_get(&viewer, object) {
            return Ok(p);
        }
        let epoch = self.caches().epoch();
        let p = self.store().privileges_effective(&viewer, object).await?;
        self.caches().privileges_put(epoch, &viewer, object, p.clone());
        Ok(p)
    }

    /// The caller as the store's rules see it: its grants whose conditions on this request (address,
    /// hours, expiry) fail are left out.
    pub(crate) async fn viewer(&self, ctx: &Ctx) -> Result<covm_store::Viewer, covm_types::Error> {
        let grants = self.conditional_grants(ctx.user_id).await?;
        let now = chrono::Utc::now();
        let excluded =
            grants.iter().filter(|(_, c)| c.request_failure(ctx.req.addr, now).is_some()).map(|(id, _)| *id).collect();
        Ok(covm_store::Viewer { user: ctx.user_id, excluded })
    }

    /// The user's grants with conditions (cached under the authorization epoch).
    pub(crate) async fn conditional_grants(&self, user: Uuid) -> Result<cache::Conditional, covm_types::Error> {
        if let Some(c) = self.caches().conditional_get(user) {
            return Ok(c);
        }
        let epoch = self.caches().epoch();
        let c: cache::Conditional = Arc::new(
            self.store()
                .grants_conditional(user)
                .await?
                .into_iter()
                .filter_map(|g| g.conditions.map(|c| (g.id, c)))
                .collect(),
        );
        self.caches().conditional_put(epoch, user, c.clone());
        Ok(c)
    }

    /// Every VM, paged from the store. TODO-perf: the callers (quotas, autostart, recovery, a disk's
    /// attachments) want indexes of their own once there are many VMs.
    pub(crate) async fn vms_all(&self) -> Result<Vec<covm_store::VmRecord>, covm_types::Error> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page =
                self.store().vms_list(None, covm_store::VmFilter { after, limit: 1000, ..Default::default() }).await?;
            let full = page.len() == 1000;
            after = page.last().map(|v| v.object.name.clone());
            out.extend(page);
            if !full {
                return Ok(out);
            }
        }
    }

    /// The node agent: reachable from the app layer only (the HTTP layer asks the app).
    /// This host's agent as itself (the app reaches it through [`App::agent`] and [`App::agent_for`]).
    pub(in crate::app) fn node(&self) -> &node::LocalAgent {
        &self.inner.node
    }

    /// The store: reachable from the app layer only (the HTTP layer asks the app).
    pub(in crate::app) fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The store, for tests that look at what was written.
    #[doc(hidden)]
    pub fn store_for_tests(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The first step of a stop: every stream ends and the VMs' supervisors let go of QEMU (the VMs
    /// keep running, and the next start adopts them).
    pub fn quiesce(&self) {
        self.hub().close();
        self.agent().release_all();
    }

    /// The last step of a stop: the store releases this replica's locks.
    pub async fn close(&self) {
        self.store().close().await;
    }

    /// Records the URL at which other replicas reach this node, and the certificate they trust it by
    /// when it serves TLS.
    pub async fn node_advertise(&self, url: &str, ca_pem: Option<&str>) -> Result<(), covm_types::Error> {
        let _ = self.inner.advertised.set(url.to_owned());
        self.store().node_register(&self.config().node_id, url, ca_pem).await
    }

    /// The URL this replica is reached at.
    pub fn advertised(&self) -> String {
        self.inner.advertised.get().cloned().unwrap_or_default()
    }

    fn sso(&self) -> &sso::SsoState {
        &self.inner.sso
    }

    pub fn hub(&self) -> &EventHub {
        &self.inner.hub
    }

    pub fn config(&self) -> &AppConfig {
        &self.inner.config
    }

    fn limiter(&self) -> &RateLimiter {
        &self.inner.limiter
    }

    /// The master keys of encrypted disks.
    pub fn keys(&self) -> Result<&keys::KeyRing, covm_types::Error> {
        self.inner.config.keys.as_deref().ok_or_else(|| {
            covm_types::Error::conflict(covm_types::ErrorCode::KeyUnavailable, "this server has no master key")
        })
    }

    pub fn rates(&self) -> &ratelimit::RateLimits {
        &self.inner.rates
    }

    /// Takes this replica's share of the rate limits (the live replicas counted) and forgets buckets
    /// that are full again; the background loop does it once a minute.
    pub async fn rates_upkeep(&self) {
        match self.store().replicas_live().await {
            Ok(n) => self.inner.rates.set_replicas(n),
            Err(e) => tracing::warn!(error = %e, "could not count the replicas"),
        }
        self.inner.rates.shrink();
    }

    /// Draws `cost` from the signed-in caller's bucket (429 `rate_limited` when it is empty).
    pub fn request_admit(&self, ctx: &Ctx, cost: u32) -> Result<(), covm_types::Error> {
        let r = self.inner.rates.admit_user(ctx.user_id, cost);
        Self::rate_noted(&ctx.req, r)
    }

    /// Draws `cost` from the bucket of a request without a session, by its address.
    pub fn anonymous_admit(&self, req: &RequestInfo, cost: u32) -> Result<(), covm_types::Error> {
        match req.addr {
            Some(addr) => Self::rate_noted(req, self.inner.rates.admit_addr(addr, cost)),
            None => Ok(()),
        }
    }

    fn rate_noted(
        req: &RequestInfo,
        r: Result<ratelimit::RateState, (ratelimit::RateState, covm_types::Error)>,
    ) -> Result<(), covm_types::Error> {
        match r {
            Ok(state) => {
                let _ = req.rate.set(state);
                Ok(())
            }
            Err((state, e)) => {
                let _ = req.rate.set(state);
                Err(e)
            }
        }
    }

    /// Tells the feed that something was committed.
    fn committed(&self) {
        self.inner.hub.wake();
    }
}

/// Facts about one request that the HTTP layer and the app layer share: its id, the caller's address,
/// who the caller turned out to be, and whether an audit entry was already written for its failure.
#[derive(Debug, Default)]
pub struct RequestInfo {
    pub id: String,
    pub addr: Option<std::net::IpAddr>,
    pub actor: OnceLock<String>,
    audited: AtomicBool,
    /// The caller's rate-limit bucket after this request (for the `RateLimit-*` headers).
    pub rate: OnceLock<ratelimit::RateState>,
}

impl RequestInfo {
    pub fn new(id: String, addr: Option<std::net::IpAddr>) -> RequestInfo {
        RequestInfo { id, addr, ..Default::default() }
    }

    pub fn mark_audited(&self) {
        self.audited.store(true, Ordering::Relaxed);
    }

    pub fn audited(&self) -> bool {
        self.audited.load(Ordering::Relaxed)
    }
}

/// The signed-in caller of one request.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub user_id: Uuid,
    pub user: String,
    /// The token this request was authenticated with (to sign out).
    pub token_id: Uuid,
    pub req: Arc<RequestInfo>,
    /// covm acting for this user on its own (a saga's undo, a recovery after a crash): what the user
    /// began was checked then, so privileges and leases are not checked again.
    pub system: bool,
    /// The session may only enroll in two-factor sign-in (a policy requires it; `http` refuses the
    /// rest with 403 `mfa_enrollment_required`).
    pub enroll_only: bool,
}

impl Ctx {
    /// covm finishing or undoing what `actor` began (request `request_id`).
    pub fn system(actor: &str, request_id: Option<&str>) -> Ctx {
        let req = RequestInfo::new(
            request_id.map_or_else(|| format!("sys-{}", Uuid::now_v7().simple()), str::to_owned),
            None,
        );
        Ctx {
            user_id: Uuid::nil(),
            user: actor.to_owned(),
            token_id: Uuid::nil(),
            req: Arc::new(req),
            system: true,
            enroll_only: false,
        }
    }

    /// The same caller, as covm acting on its own (for undo steps).
    pub fn as_system(&self) -> Ctx {
        Ctx { system: true, ..self.clone() }
    }

    /// A log entry by this caller about an object.
    pub fn event(&self, kind: &str, object_kind: &str, object_id: Option<Uuid>, object_name: &str) -> NewEvent {
        NewEvent {
            actor: self.user.clone(),
            request_id: Some(self.req.id.clone()),
            ..system_event(kind, object_kind, object_id, object_name)
        }
    }
}

/// A log entry by covm itself (start-up, bootstrap).
pub fn system_event(kind: &str, object_kind: &str, object_id: Option<Uuid>, object_name: &str) -> NewEvent {
    NewEvent {
        actor: "-".to_owned(),
        kind: kind.to_owned(),
        object_kind: object_kind.to_owned(),
        object_id,
        object_name: Some(object_name.to_owned()),
        scope_id: object_id,
        feed: true,
        data: serde_json::json!({}),
        ..Default::default()
    }
}

/// Builder-style helpers on log entries.
pub trait EventExt {
    fn data(self, data: serde_json::Value) -> Self;
    fn scope(self, scope: Uuid) -> Self;
    fn audit_only(self) -> Self;
}

impl EventExt for NewEvent {
    fn data(mut self, data: serde_json::Value) -> Self {
        self.data = data;
        self
    }
    fn scope(mut self, scope: Uuid) -> Self {
        self.scope_id = Some(scope);
        self
    }
    fn audit_only(mut self) -> Self {
        self.feed = false;
        self
    }
}
