//! A typed HTTP client for the covm API, used by the CLI, the benchmark and the tests.
//!
//! Every API error comes back as [`ClientError::Api`] with the HTTP status and the server's error body
//! (code, message, field, details), so that callers can match on the stable `code`.

pub mod tls;

use std::time::Duration;

use covm_types::api::*;
use covm_types::disk::*;
use covm_types::vm::*;
use covm_types::{ErrorBody, ErrorCode, Privilege};
use futures::StreamExt;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use covm_types::error::ErrorDetail;

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{}", .error.message)]
    Api {
        status: u16,
        error: ErrorDetail,
        /// `Retry-After`, in seconds (429).
        retry_after_s: Option<u64>,
    },
    /// The server could not be reached or the answer could not be read.
    #[error("{0}")]
    Transport(String),
    /// A task the server accepted ended in an error.
    #[error("{}", .error.message)]
    Task { task: Box<TaskView>, error: ErrorDetail },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::Transport(_) | ClientError::Task { .. } => None,
        }
    }

    /// The stable error code of an API error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { error, .. } | ClientError::Task { error, .. } => Some(error.code),
            ClientError::Transport(_) => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

fn transport(e: reqwest::Error) -> ClientError {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    ClientError::Transport(msg)
}

/// Conditions and notes of a VM change.
#[derive(Debug, Clone, Default)]
pub struct ChangeOptions {
    /// `If-Match`: the version the change is based on.
    pub if_match: Option<i64>,
    /// `Covm-Lease`: my lease's fencing token.
    pub lease: Option<i64>,
    pub message: Option<String>,
    pub dry_run: bool,
    /// `apply=next_boot`.
    pub next_boot: bool,
    /// `snapshot=true`: a safety snapshot first, whatever the VM's policy.
    pub snapshot: bool,
}

/// The JSON Merge Patch (RFC 7386) that turns `from` into `to`: removed keys become null, changed
/// values are replaced (arrays whole), objects recurse.
pub fn merge_diff(from: &serde_json::Value, to: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            let mut out = serde_json::Map::new();
            for (k, av) in a {
                match b.get(k) {
                    None => {
                        out.insert(k.clone(), Value::Null);
                    }
                    Some(bv) if bv != av => {
                        let d = if av.is_object() && bv.is_object() { merge_diff(av, bv) } else { bv.clone() };
                        out.insert(k.clone(), d);
                    }
                    Some(_) => {}
                }
            }
            for (k, bv) in b {
                if !a.contains_key(k) {
                    out.insert(k.clone(), bv.clone());
                }
            }
            Value::Object(out)
        }
        _ => to.clone(),
    }
}

/// A connection to one covm server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Client").field("base", &self.base).field("signed_in", &self.token.is_some()).finish()
    }
}

impl Client {
    /// `base` is the server's URL, such as `http://127.0.0.1:8006`; an `https://` server must have a
    /// certificate the system trusts (see [`Client::with_ca`] for covm's own CA).
    pub fn new(base: &str) -> Client {
        tls::install_provider();
        let http = Self::builder().build().expect("a client with the system's roots always builds");
        Client { http, base: base.trim_end_matches('/').to_owned(), token: None }
    }

    /// A client that trusts exactly the CA certificate(s) in `ca_pem` (covm's own CA, pinned).
    pub fn with_ca(base: &str, ca_pem: &str) -> Result<Client> {
        tls::install_provider();
        let config = tls::pinned_config(ca_pem).map_err(ClientError::Transport)?;
        let http = Self::builder().tls_backend_preconfigured(config).build().map_err(transport)?;
        Ok(Client { http, base: base.trim_end_matches('/').to_owned(), token: None })
    }

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).pool_max_idle_per_host(64)
    }

    pub fn with_token(mut self, token: impl Into<String>) -> Client {
        self.token = Some(token.into());
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A request to `/api/v1{path}` with the bearer token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = if path.starts_with("/api/")
            || path.starts_with("/healthz")
            || path.starts_with("/readyz")
            || path.starts_with("/metrics")
        {
            format!("{}{path}", self.base)
        } else {
            format!("{}/api/v1{path}", self.base)
        };
        let rb = self.http.request(method, url).timeout(Duration::from_secs(120));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Sends a request and decodes a JSON answer (or nothing, for 204).
    pub async fn send<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T> {
        let resp = rb.send().await.map_err(transport)?;
        let status = resp.status();
        if status.is_success() {
            let bytes = resp.bytes().await.map_err(transport)?;
            let bytes = if bytes.is_empty() { &b"null"[..] } else { &bytes[..] };
            return serde_json::from_slice(bytes)
                .map_err(|e| ClientError::Transport(format!("could not read the answer: {e}")));
        }
        Err(error_from(resp).await)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    pub async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.request(Method::PUT, path).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send::<serde_json::Value>(self.request(Method::DELETE, path)).await.map(|_| ())
    }

    // --- session ------------------------------------------------------------------------------

    /// Signs in; the returned client carries the session token.
    pub async fn login(&self, user: &str, password: &str) -> Result<(Client, SessionToken)> {
        self.login_with(&SessionCreate {
            user: user.into(),
            password: password.into(),
            totp: None,
            recovery_code: None,
            cookie: false,
        })
        .await
    }

    /// Signs in with a second factor (`totp` or `recovery_code`) where two-factor sign-in is on.
    pub async fn login_with(&self, p: &SessionCreate) -> Result<(Client, SessionToken)> {
        let t: SessionToken = self.post("/session", p).await?;
        Ok((self.clone().with_token(t.token.clone()), t))
    }

    /// Begins two-factor sign-in for `user` (oneself, or with `Users.Manage`).
    pub async fn mfa_enroll(&self, user: &str) -> Result<MfaEnrollment> {
        self.send(self.request(Method::POST, &format!("/users/{user}/mfa"))).await
    }

    /// Turns two-factor sign-in on with a current code.
    pub async fn mfa_confirm(&self, user: &str, code: &str) -> Result<()> {
        self.post::<_, serde_json::Value>(&format!("/users/{user}/mfa/confirm"), &MfaCode { code: code.into() })
            .await
            .map(|_| ())
    }

    /// Turns two-factor sign-in off: with a current code, or (`None`) as holder of `Permissions.Modify`.
    pub async fn mfa_disable(&self, user: &str, code: Option<&str>) -> Result<()> {
        let body = MfaDisable { code: code.map(str::to_owned) };
        self.send::<serde_json::Value>(self.request(Method::DELETE, &format!("/users/{user}/mfa")).json(&body))
            .await
            .map(|_| ())
    }

    /// Begins a device sign-in through the server's identity provider.
    pub async fn sso_device_start(&self) -> Result<SsoDeviceStart> {
        self.send(self.request(Method::POST, "/sso/device")).await
    }

    /// Whether the user approved a device sign-in (`pending`), or its session.
    pub async fn sso_device_poll(&self, id: uuid::Uuid) -> Result<SsoDevicePoll> {
        self.post("/sso/device/poll", &SsoDevicePollRequest { id }).await
    }

    /// Wraps every encrypted disk's key again under a new master key.
    pub async fn keys_rotate(&self) -> Result<KeysRotated> {
        self.send(self.request(Method::POST, "/keys/rotate")).await
    }

    pub async fn mfa_policy(&self) -> Result<MfaPolicy> {
        self.send(self.request(Method::GET, "/policies/mfa")).await
    }

    pub async fn mfa_policy_set(&self, required_for: &[&str]) -> Result<MfaPolicy> {
        self.post("/policies/mfa", &MfaPolicy { required_for: required_for.iter().map(|g| (*g).to_owned()).collect() })
            .await
    }

    /// Whether the server answers (`/healthz`): over TLS, also whether its certificate is trusted.
    pub async fn health(&self) -> Result<()> {
        self.send::<serde_json::Value>(self.request(Method::GET, "/healthz")).await.map(|_| ())
    }

    pub async fn logout(&self) -> Result<()> {
        self.delete("/session").await
    }

    pub async fn whoami(&self, object: Option<&str>) -> Result<Whoami> {
        self.send(self.request(Method::GET, "/session").query(&SessionQuery { object: object.map(str::to_owned) }))
            .await
    }

    // --- principals ---------------------------------------------------------------------------

    pub async fn user_create(&self, name: &str, password: &str) -> Result<UserView> {
        self.post("/users", &serde_json::json!({ "name": name, "password": password })).await
    }

    pub async fn users(&self) -> Result<Vec<UserView>> {
        self.get("/users").await
    }

    pub async fn user(&self, name: &str) -> Result<UserView> {
        self.get(&format!("/users/{name}")).await
    }

    /// Every privilege there is.
    pub async fn privileges(&self) -> Result<Vec<Privilege>> {
        self.get("/privileges").await
    }

    /// My API tokens (without their secrets).
    pub async fn tokens(&self) -> Result<Vec<TokenView>> {
        self.get("/tokens").await
    }

    /// A new API token for me; the answer carries its secret, once.
    pub async fn token_create(&self, p: &TokenCreate) -> Result<TokenView> {
        self.post("/tokens", p).await
    }

    pub async fn token_delete(&self, id: uuid::Uuid) -> Result<()> {
        self.delete(&format!("/tokens/{id}")).await
    }

    pub async fn user_password_set(&self, user: &str, password: &str) -> Result<()> {
        self.put::<_, serde_json::Value>(&format!("/users/{user}/password"), &PasswordSet { password: password.into() })
            .await
            .map(|_| ())
    }

    pub async fn user_delete(&self, user: &str) -> Result<()> {
        self.delete(&format!("/users/{user}")).await
    }

    pub async fn group_create(&self, name: &str) -> Result<GroupView> {
        self.post("/groups", &serde_json::json!({ "name": name })).await
    }

    pub async fn group_member_add(&self, group: &str, user: &str) -> Result<GroupView> {
        self.post(&format!("/groups/{group}/members"), &GroupMemberAdd { user: user.into() }).await
    }

    pub async fn groups(&self) -> Result<Vec<GroupView>> {
        self.get("/groups").await
    }

    pub async fn role_create(&self, name: &str, privileges: &[Privilege]) -> Result<RoleView> {
        self.post("/roles", &RoleCreate { name: name.into(), privileges: privileges.to_vec() }).await
    }

    pub async fn roles(&self) -> Result<Vec<RoleView>> {
        self.get("/roles").await
    }

    pub async fn role(&self, name: &str) -> Result<RoleView> {
        self.get(&format!("/roles/{name}")).await
    }

    pub async fn permission_grant(
        &self,
        principal: &str,
        role: &str,
        object: &str,
        propagate: bool,
    ) -> Result<PermissionView> {
        self.permission_grant_if(principal, role, object, propagate, None).await
    }

    /// A grant that applies only where and when `conditions` hold.
    pub async fn permission_grant_if(
        &self,
        principal: &str,
        role: &str,
        object: &str,
        propagate: bool,
        conditions: Option<covm_types::conditions::GrantConditions>,
    ) -> Result<PermissionView> {
        let p = PermissionCreate {
            principal: principal.into(),
            role: role.into(),
            object: object.into(),
            propagate,
            conditions,
        };
        self.post("/permissions", &p).await
    }

    pub async fn permissions(&self, q: &PermissionQuery) -> Result<Vec<PermissionView>> {
        self.send(self.request(Method::GET, "/permissions").query(q)).await
    }

    pub async fn permission_revoke(&self, id: &str) -> Result<()> {
        self.delete(&format!("/permissions/{id}")).await
    }

    // --- inventory ----------------------------------------------------------------------------

    pub async fn ls(&self, path: Option<&str>) -> Result<Vec<ObjectRef>> {
        self.send(self.request(Method::GET, "/inventory").query(&InventoryQuery { path: path.map(str::to_owned) }))
            .await
    }

    pub async fn folder_create(&self, name: &str, parent: &str) -> Result<FolderView> {
        self.post("/folders", &serde_json::json!({ "name": name, "parent": parent })).await
    }

    pub async fn folder_delete(&self, folder: &str) -> Result<()> {
        self.delete(&format!("/folders/{folder}")).await
    }

    pub async fn folders(&self) -> Result<Page<FolderView>> {
        self.get("/folders").await
    }

    /// A folder by path (`/a/b`).
    pub async fn folder(&self, path: &str) -> Result<FolderView> {
        self.get(&format!("/folders/{}", path.trim_start_matches('/'))).await
    }

    // --- VMs ----------------------------------------------------------------------------------

    /// A new VM from its config: a [`VmConfig`] (see [`VmConfig::named`]) or a JSON document.
    pub async fn vm_create<B: Serialize + ?Sized>(&self, config: &B) -> Result<VmView> {
        self.post("/vms", config).await
    }

    pub async fn vms(&self, q: &VmListQuery) -> Result<Page<VmView>> {
        self.send(self.request(Method::GET, "/vms").query(q)).await
    }

    pub async fn vm(&self, vm: &str) -> Result<VmView> {
        self.get(&format!("/vms/{vm}")).await
    }

    /// A JSON Merge Patch; `if_match` and `lease` become `If-Match` and `Covm-Lease`.
    pub async fn vm_change<P: Serialize + ?Sized>(&self, vm: &str, patch: &P, opts: &ChangeOptions) -> Result<VmView> {
        self.send(self.change_request(vm, patch, opts)).await
    }

    /// The plan of a change, changing nothing.
    pub async fn vm_change_plan<P: Serialize + ?Sized>(
        &self,
        vm: &str,
        patch: &P,
        opts: &ChangeOptions,
    ) -> Result<serde_json::Value> {
        let opts = ChangeOptions { dry_run: true, ..opts.clone() };
        self.send(self.change_request(vm, patch, &opts)).await
    }

    fn change_request<P: Serialize + ?Sized>(&self, vm: &str, patch: &P, opts: &ChangeOptions) -> RequestBuilder {
        let mut rb = self
            .request(Method::PATCH, &format!("/vms/{vm}"))
            .header(reqwest::header::CONTENT_TYPE, "application/merge-patch+json")
            .body(serde_json::to_vec(patch).unwrap_or_default());
        if let Some(v) = opts.if_match {
            rb = rb.header(reqwest::header::IF_MATCH, format!("\"{v}\""));
        }
        if let Some(t) = opts.lease {
            rb = rb.header("Covm-Lease", t.to_string());
        }
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(m) = &opts.message {
            q.push(("message", m.clone()));
        }
        if opts.snapshot {
            q.push(("snapshot", "true".into()));
        }
        if opts.dry_run {
            q.push(("dry_run", "true".into()));
        }
        if opts.next_boot {
            q.push(("apply", "next_boot".into()));
        }
        rb.query(&q)
    }

    pub async fn vm_delete(&self, vm: &str) -> Result<()> {
        self.delete(&format!("/vms/{vm}")).await
    }

    pub async fn vm_versions(&self, vm: &str, q: &VersionQuery) -> Result<Page<VersionView>> {
        self.send(self.request(Method::GET, &format!("/vms/{vm}/versions")).query(q)).await
    }

    pub async fn vm_version(&self, vm: &str, n: i64) -> Result<VersionView> {
        self.get(&format!("/vms/{vm}/versions/{n}")).await
    }

    pub async fn vm_diff(&self, vm: &str, from: i64, to: i64) -> Result<DiffView> {
        self.send(self.request(Method::GET, &format!("/vms/{vm}/diff")).query(&DiffQuery { from, to })).await
    }

    pub async fn vm_revert(&self, vm: &str, version: i64, message: Option<&str>) -> Result<VmView> {
        let r = RevertRequest {
            version: Some(version),
            before_version: None,
            scope: None,
            message: message.map(str::to_owned),
            next_boot: false,
        };
        self.post(&format!("/vms/{vm}/revert"), &r).await
    }

    /// Makes a VM a template (read-only, the source of clones).
    pub async fn vm_template(&self, vm: &str) -> Result<VmView> {
        self.post(&format!("/vms/{vm}/template"), &serde_json::json!(null)).await
    }

    /// What the guest agent tells of the running guest now.
    pub async fn vm_guest(&self, vm: &str) -> Result<covm_types::vm::GuestInfo> {
        self.get(&format!("/vms/{vm}/guest")).await
    }

    /// Sets a guest user's password through the guest agent.
    pub async fn vm_guest_password(&self, vm: &str, p: &covm_types::vm::GuestPassword) -> Result<()> {
        let rb = self.request(Method::POST, &format!("/vms/{vm}/guest/password")).json(p);
        self.send::<serde_json::Value>(rb).await.map(drop)
    }

    /// Adds SSH keys to a guest user's `authorized_keys` through the guest agent.
    pub async fn vm_guest_ssh_keys(&self, vm: &str, p: &covm_types::vm::GuestSshKeys) -> Result<()> {
        let rb = self.request(Method::POST, &format!("/vms/{vm}/guest/ssh-keys")).json(p);
        self.send::<serde_json::Value>(rb).await.map(drop)
    }

    /// Adds a NIC (plugged into a running VM unless `next_boot`).
    pub async fn vm_nic_add(&self, vm: &str, nic: &serde_json::Value, next_boot: bool) -> Result<VmView> {
        let rb = self.request(Method::POST, &format!("/vms/{vm}/nics")).query(&[("next_boot", next_boot)]).json(nic);
        self.send(rb).await
    }

    /// Removes the NIC with this MAC (unplugged from a running VM unless `next_boot`).
    pub async fn vm_nic_remove(&self, vm: &str, mac: &str, next_boot: bool) -> Result<VmView> {
        let rb = self.request(Method::DELETE, &format!("/vms/{vm}/nics/{mac}")).query(&[("next_boot", next_boot)]);
        self.send(rb).await
    }

    /// A new VM from a VM or a template.
    pub async fn vm_clone(&self, vm: &str, p: &covm_types::vm::VmClone) -> Result<VmView> {
        self.post(&format!("/vms/{vm}/clone"), p).await
    }

    /// Puts a VM back to how it was before version `n` (the safety snapshot that protects it).
    pub async fn vm_revert_before(&self, vm: &str, n: i64, scope: covm_types::snapshot::RevertScope) -> Result<VmView> {
        let r = RevertRequest {
            version: None,
            before_version: Some(n),
            scope: Some(scope),
            message: None,
            next_boot: false,
        };
        self.post(&format!("/vms/{vm}/revert"), &r).await
    }

    /// Starts a power action; returns its task.
    pub async fn vm_power(&self, vm: &str, action: PowerAction, timeout_s: Option<u32>) -> Result<TaskView> {
        self.post(&format!("/vms/{vm}/power"), &PowerRequest { action, timeout_s }).await
    }

    pub async fn task(&self, id: uuid::Uuid) -> Result<TaskView> {
        self.get(&format!("/tasks/{id}")).await
    }

    pub async fn tasks(&self, q: &TaskQuery) -> Result<Vec<TaskView>> {
        self.send(self.request(Method::GET, "/tasks").query(q)).await
    }

    /// Waits until a task ends (polling), calling `progress` on each change.
    pub async fn task_wait(
        &self,
        id: uuid::Uuid,
        timeout: Duration,
        mut progress: impl FnMut(&TaskView),
    ) -> Result<TaskView> {
        let started = std::time::Instant::now();
        let mut last = None;
        let mut pause = Duration::from_millis(5);
        loop {
            let t = self.task(id).await?;
            if last != Some((t.state, t.progress)) {
                progress(&t);
                last = Some((t.state, t.progress));
            }
            if matches!(t.state, TaskState::Success | TaskState::Error | TaskState::Cancelled) {
                return Ok(t);
            }
            if started.elapsed() > timeout {
                return Err(ClientError::Transport(format!("task {id} did not end within {timeout:?}")));
            }
            // Short tasks end in milliseconds: ask again soon, then less often (5 ms doubling to 50).
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The last `tail` lines of a VM's serial console.
    pub async fn serial(&self, vm: &str, tail: u32) -> Result<String> {
        let rb = self
            .request(Method::GET, &format!("/vms/{vm}/console/serial"))
            .query(&SerialQuery { tail: Some(tail), ..Default::default() });
        let resp = rb.send().await.map_err(transport)?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        resp.text().await.map_err(transport)
    }

    /// Follows a VM's serial console: its last `tail` lines, then every new line.
    pub async fn serial_follow(
        &self,
        vm: &str,
        tail: u32,
    ) -> Result<futures::stream::BoxStream<'static, Result<String>>> {
        let resp = self
            .request(Method::GET, &format!("/vms/{vm}/console/serial"))
            .query(&SerialQuery { tail: Some(tail), ..Default::default() })
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .timeout(Duration::from_secs(365 * 24 * 3600))
            .send()
            .await
            .map_err(transport)?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        use eventsource_stream::Eventsource;
        Ok(Box::pin(
            resp.bytes_stream()
                .eventsource()
                .map(|ev| ev.map(|e| e.data).map_err(|e| ClientError::Transport(format!("the console broke: {e}")))),
        ))
    }

    pub async fn lease(&self, vm: &str) -> Result<Option<LeaseView>> {
        self.get(&format!("/vms/{vm}/lease")).await
    }

    pub async fn lease_acquire(&self, vm: &str, ttl_s: u32) -> Result<LeaseView> {
        self.post(&format!("/vms/{vm}/lease"), &LeaseRequest { ttl_s }).await
    }

    pub async fn lease_renew(&self, vm: &str, ttl_s: u32, token: Option<i64>) -> Result<LeaseView> {
        let mut rb = self.request(Method::PUT, &format!("/vms/{vm}/lease")).json(&LeaseRequest { ttl_s });
        if let Some(t) = token {
            rb = rb.header("Covm-Lease", t.to_string());
        }
        self.send(rb).await
    }

    pub async fn lease_release(&self, vm: &str, force: bool) -> Result<()> {
        let rb = self.request(Method::DELETE, &format!("/vms/{vm}/lease")).query(&LeaseReleaseQuery { force });
        self.send::<serde_json::Value>(rb).await.map(|_| ())
    }

    // --- datastore files ----------------------------------------------------------------------

    /// The files of a datastore (not its disks).
    pub async fn datastore_files(&self, ds: &str) -> Result<Vec<FileView>> {
        self.get(&format!("/datastores/{ds}/files")).await
    }

    /// Puts a file, or a part of it (`range`: start, end inclusive, total), into a datastore; the
    /// upload's state after it (complete, with the file, after the last part).
    pub async fn datastore_file_put(
        &self,
        ds: &str,
        path: &str,
        range: Option<(u64, u64, u64)>,
        sha256: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Result<UploadView> {
        let mut rb = self
            .request(Method::PUT, &format!("/datastores/{ds}/files/{}", path_segment(path)))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .timeout(Duration::from_secs(3600))
            .body(body);
        if let Some((start, end, total)) = range {
            rb = rb.header(reqwest::header::CONTENT_RANGE, format!("bytes {start}-{end}/{total}"));
        }
        if let Some(h) = sha256 {
            rb = rb.query(&[("sha256", h)]);
        }
        self.send(rb).await
    }

    /// Where the upload of a file of `total` bytes stands (how much the server has).
    pub async fn datastore_file_status(&self, ds: &str, path: &str, total: u64) -> Result<UploadView> {
        let rb = self
            .request(Method::PUT, &format!("/datastores/{ds}/files/{}", path_segment(path)))
            .header(reqwest::header::CONTENT_RANGE, format!("bytes */{total}"));
        self.send(rb).await
    }

    /// Uploads a local file in parts of `part` bytes, from where the server stands (a broken upload
    /// resumes), with its SHA-256 checked at the end; `progress` hears the bytes the server has.
    pub async fn datastore_upload(
        &self,
        ds: &str,
        path: &str,
        local: &std::path::Path,
        part: u64,
        sha256: Option<&str>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<UploadView> {
        use tokio::io::AsyncSeekExt;
        let local_err = |e: std::io::Error| ClientError::Transport(format!("{}: {e}", local.display()));
        let total = tokio::fs::metadata(local).await.map_err(local_err)?.len();
        if total == 0 {
            return self.datastore_file_put(ds, path, None, sha256, Vec::new()).await;
        }
        let mut at = self.datastore_file_status(ds, path, total).await?.received;
        progress(at, total);
        loop {
            let len = part.max(1).min(total - at);
            let mut f = tokio::fs::File::open(local).await.map_err(local_err)?;
            f.seek(std::io::SeekFrom::Start(at)).await.map_err(local_err)?;
            let body = file_body(f, len);
            let view = self.datastore_file_put(ds, path, Some((at, at + len - 1, total)), sha256, body).await?;
            at = view.received;
            progress(at, total);
            if view.complete {
                return Ok(view);
            }
        }
    }

    /// A file's bytes, as a response to stream from.
    pub async fn datastore_file_get(&self, ds: &str, path: &str) -> Result<reqwest::Response> {
        let rb = self
            .request(Method::GET, &format!("/datastores/{ds}/files/{}", path_segment(path)))
            .timeout(Duration::from_secs(3600));
        let resp = rb.send().await.map_err(transport)?;
        match resp.status().is_success() {
            true => Ok(resp),
            false => Err(error_from(resp).await),
        }
    }

    pub async fn datastore_file_delete(&self, ds: &str, path: &str) -> Result<()> {
        self.delete(&format!("/datastores/{ds}/files/{}", path_segment(path))).await
    }

    // --- presence and consoles -----------------------------------------------------------------

    /// Says that I am viewing or editing a VM (a heartbeat); who is on it now.
    pub async fn presence_set(&self, vm: &str, state: PresenceState) -> Result<Vec<PresenceEntry>> {
        self.put(&format!("/vms/{vm}/presence"), &PresenceSet { state }).await
    }

    pub async fn presence_leave(&self, vm: &str) -> Result<()> {
        self.delete(&format!("/vms/{vm}/presence")).await
    }

    pub async fn presence(&self, vm: &str) -> Result<Vec<PresenceEntry>> {
        self.get(&format!("/vms/{vm}/presence")).await
    }

    /// A single-use ticket to the VM's consoles (for a WebSocket without `Authorization`).
    pub async fn console_ticket(&self, vm: &str) -> Result<ConsoleTicket> {
        self.post(&format!("/vms/{vm}/console/ticket"), &serde_json::json!({})).await
    }

    // --- inventory ------------------------------------------------------------------------------

    pub async fn hosts(&self, q: &ListQuery) -> Result<Page<HostView>> {
        self.send(self.request(Method::GET, "/hosts").query(q)).await
    }

    pub async fn datastore(&self, name: &str) -> Result<DatastoreView> {
        self.get(&format!("/datastores/{name}")).await
    }

    pub async fn datastores(&self, q: &ListQuery) -> Result<Page<DatastoreView>> {
        self.send(self.request(Method::GET, "/datastores").query(q)).await
    }

    pub async fn networks(&self, q: &ListQuery) -> Result<Page<NetworkView>> {
        self.send(self.request(Method::GET, "/networks").query(q)).await
    }

    pub async fn pools(&self, q: &ListQuery) -> Result<Page<PoolView>> {
        self.send(self.request(Method::GET, "/pools").query(q)).await
    }

    pub async fn datastore_create(&self, p: &DatastoreCreate) -> Result<DatastoreView> {
        self.post("/datastores", p).await
    }

    pub async fn network_create(&self, p: &NetworkCreate) -> Result<NetworkView> {
        self.post("/networks", p).await
    }

    pub async fn pool_create(&self, p: &PoolCreate) -> Result<PoolView> {
        self.post("/pools", p).await
    }

    // --- disks ----------------------------------------------------------------------------------

    pub async fn disk_create(&self, p: &DiskCreate) -> Result<DiskView> {
        self.post("/disks", p).await
    }

    pub async fn disks(&self, q: &DiskListQuery) -> Result<Page<DiskView>> {
        self.send(self.request(Method::GET, "/disks").query(q)).await
    }

    /// Every disk, page by page.
    pub async fn disks_all(&self) -> Result<Vec<DiskView>> {
        let mut all = Vec::new();
        let mut q = DiskListQuery { limit: Some(1000), ..Default::default() };
        loop {
            let page = self.disks(&q).await?;
            all.extend(page.items);
            match page.next {
                Some(n) => q.after = Some(n),
                None => return Ok(all),
            }
        }
    }

    pub async fn disk(&self, disk: &str) -> Result<DiskView> {
        self.get(&format!("/disks/{disk}")).await
    }

    pub async fn disk_resize(&self, disk: &str, capacity_bytes: u64) -> Result<DiskView> {
        self.post(&format!("/disks/{disk}/resize"), &DiskResize { capacity_bytes }).await
    }

    pub async fn disk_clone(&self, disk: &str, p: &DiskClone) -> Result<DiskView> {
        self.post(&format!("/disks/{disk}/clone"), p).await
    }

    pub async fn disk_import(&self, disk: &str, p: &DiskImport) -> Result<DiskView> {
        self.post(&format!("/disks/{disk}/import"), p).await
    }

    pub async fn disk_move(&self, disk: &str, p: &DiskMove) -> Result<VmView> {
        self.post(&format!("/disks/{disk}/move"), p).await
    }

    pub async fn disk_delete(&self, disk: &str) -> Result<()> {
        self.delete(&format!("/disks/{disk}")).await
    }

    pub async fn snapshot_create(
        &self,
        vm: &str,
        p: &covm_types::snapshot::SnapshotCreate,
    ) -> Result<covm_types::snapshot::SnapshotView> {
        let task: TaskView = self.post(&format!("/vms/{vm}/snapshots"), p).await?;
        self.task_done(task.id, Duration::from_secs(600)).await?;
        // Names are unique per VM: the task's snapshot is the one of this name.
        self.snapshot(vm, &p.name.to_string()).await
    }

    /// Waits until a task ends; an error it ended in is [`ClientError::Task`].
    pub async fn task_done(&self, id: uuid::Uuid, timeout: Duration) -> Result<TaskView> {
        let t = self.task_wait(id, timeout, |_| {}).await?;
        match t.state {
            TaskState::Success => Ok(t),
            _ => {
                let error =
                    t.error.clone().and_then(|e| serde_json::from_value::<ErrorDetail>(e).ok()).unwrap_or_else(|| {
                        ErrorDetail {
                            code: ErrorCode::Unknown,
                            message: t.message.clone().unwrap_or_else(|| format!("task {} ended {:?}", t.id, t.state)),
                            field: None,
                            details: None,
                        }
                    });
                Err(ClientError::Task { task: Box::new(t), error })
            }
        }
    }

    pub async fn snapshot_update(
        &self,
        vm: &str,
        snap: &str,
        p: &covm_types::snapshot::SnapshotUpdate,
    ) -> Result<covm_types::snapshot::SnapshotView> {
        self.send(self.request(Method::PATCH, &format!("/vms/{vm}/snapshots/{snap}")).json(p)).await
    }

    pub async fn snapshots(&self, vm: &str) -> Result<Vec<covm_types::snapshot::SnapshotView>> {
        self.get(&format!("/vms/{vm}/snapshots")).await
    }

    pub async fn snapshot(&self, vm: &str, snap: &str) -> Result<covm_types::snapshot::SnapshotView> {
        self.get(&format!("/vms/{vm}/snapshots/{snap}")).await
    }

    pub async fn snapshot_delete(&self, vm: &str, snap: &str) -> Result<()> {
        self.delete(&format!("/vms/{vm}/snapshots/{snap}")).await
    }

    pub async fn snapshot_revert(
        &self,
        vm: &str,
        snap: &str,
        p: &covm_types::snapshot::SnapshotRevert,
    ) -> Result<VmView> {
        self.post(&format!("/vms/{vm}/snapshots/{snap}/revert"), p).await
    }

    pub async fn disk_snapshot_create(
        &self,
        disk: &str,
        p: &covm_types::snapshot::DiskSnapshotCreate,
    ) -> Result<covm_types::snapshot::DiskSnapshotView> {
        self.post(&format!("/disks/{disk}/snapshots"), p).await
    }

    pub async fn disk_snapshots(&self, disk: &str) -> Result<Vec<covm_types::snapshot::DiskSnapshotView>> {
        self.get(&format!("/disks/{disk}/snapshots")).await
    }

    pub async fn disk_snapshot_delete(&self, disk: &str, snap: &str) -> Result<()> {
        self.delete(&format!("/disks/{disk}/snapshots/{snap}")).await
    }

    pub async fn disk_snapshot_revert(&self, disk: &str, snap: &str) -> Result<covm_types::snapshot::DiskSnapshotView> {
        self.send(self.request(Method::POST, &format!("/disks/{disk}/snapshots/{snap}/revert"))).await
    }

    /// What a running VM's process uses of its host now.
    pub async fn vm_stats(&self, vm: &str) -> Result<VmStats> {
        self.get(&format!("/vms/{vm}/stats")).await
    }

    pub async fn vm_disk_attach(&self, vm: &str, p: &DiskAttach) -> Result<VmView> {
        self.post(&format!("/vms/{vm}/disks"), p).await
    }

    pub async fn vm_disk_detach(&self, vm: &str, disk: &str, q: &DetachQuery) -> Result<VmView> {
        self.send(self.request(Method::DELETE, &format!("/vms/{vm}/disks/{disk}")).query(q)).await
    }

    /// What QEMU holds for a running VM (block nodes and devices).
    pub async fn vm_block_state(&self, vm: &str) -> Result<BlockState> {
        self.get(&format!("/vms/{vm}/block")).await
    }

    // --- events and audit ---------------------------------------------------------------------

    pub async fn events(&self, q: &EventQuery) -> Result<Page<EventView>> {
        self.send(self.request(Method::GET, "/events").query(q)).await
    }

    pub async fn audit(&self, q: &AuditQuery) -> Result<Page<EventView>> {
        self.send(self.request(Method::GET, "/audit").query(q)).await
    }

    pub async fn audit_verify(&self) -> Result<AuditVerify> {
        self.get("/audit/verify").await
    }

    /// Follows the live feed after `after` (default: from now). The stream ends when the connection
    /// does; resume with the last `seq` seen.
    pub async fn events_follow(
        &self,
        after: Option<i64>,
        object: Option<uuid::Uuid>,
    ) -> Result<futures::stream::BoxStream<'static, Result<EventView>>> {
        let feed = self.feed_follow(after, object).await?;
        Ok(Box::pin(feed.filter_map(|item| async move {
            match item {
                Ok(FeedItem::Event(e)) => Some(Ok(*e)),
                Ok(FeedItem::Presence(_)) => None,
                Err(e) => Some(Err(e)),
            }
        })))
    }

    /// The live feed with presence: the log's events and `event: presence` (who is on a VM now).
    pub async fn feed_follow(
        &self,
        after: Option<i64>,
        object: Option<uuid::Uuid>,
    ) -> Result<futures::stream::BoxStream<'static, Result<FeedItem>>> {
        let mut rb = self
            .request(Method::GET, "/events")
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .timeout(Duration::from_secs(365 * 24 * 3600));
        if let Some(a) = after {
            rb = rb.header("Last-Event-ID", a.to_string());
        }
        if let Some(o) = object {
            rb = rb.query(&[("object", o.to_string())]);
        }
        let resp = rb.send().await.map_err(transport)?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        use eventsource_stream::Eventsource;
        let bad = |e: serde_json::Error| ClientError::Transport(format!("bad event: {e}"));
        Ok(Box::pin(resp.bytes_stream().eventsource().filter_map(move |ev| async move {
            match ev {
                Ok(ev) if ev.data.is_empty() => None,
                Ok(ev) if ev.event == "presence" => {
                    Some(serde_json::from_str::<PresenceEvent>(&ev.data).map(FeedItem::Presence).map_err(bad))
                }
                Ok(ev) => {
                    Some(serde_json::from_str::<EventView>(&ev.data).map(|e| FeedItem::Event(Box::new(e))).map_err(bad))
                }
                Err(e) => Some(Err(ClientError::Transport(format!("the feed broke: {e}")))),
            }
        })))
    }
}

/// What the live feed carries.
#[derive(Debug, Clone)]
pub enum FeedItem {
    /// An entry of the log (resumable by its `seq`).
    Event(Box<EventView>),
    /// Who is viewing or editing a VM now (not in the log).
    Presence(PresenceEvent),
}

/// `len` bytes of a file from where it stands, as a request body read while it is sent (1 MiB at a
/// time, never the whole in memory).
pub fn file_body(file: tokio::fs::File, len: u64) -> reqwest::Body {
    use tokio::io::AsyncReadExt;
    let stream = futures::stream::unfold(file.take(len), |mut r| async move {
        let mut buf = vec![0u8; 1 << 20];
        match r.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), r))
            }
            Err(e) => Some((Err(e), r)),
        }
    });
    reqwest::Body::wrap_stream(stream)
}

/// A datastore file's path as one URL path segment (`/` as `%2F`, everything but unreserved
/// characters escaped).
pub fn path_segment(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn error_from(resp: reqwest::Response) -> ClientError {
    let status = resp.status();
    let retry_after_s =
        resp.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let bytes = resp.bytes().await.unwrap_or_default();
    let error = serde_json::from_slice::<ErrorBody>(&bytes).map(|b| b.error).unwrap_or_else(|_| ErrorDetail {
        code: ErrorCode::Unknown,
        message: format!(
            "the server answered {status} without covm's error body: {}",
            String::from_utf8_lossy(&bytes).chars().take(200).collect::<String>()
        ),
        field: None,
        details: None,
    });
    ClientError::Api { status: status.as_u16(), error, retry_after_s }
}

/// Whether a status is one a client may retry the same request after.
pub fn retryable(status: u16) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS.as_u16() || status == StatusCode::SERVICE_UNAVAILABLE.as_u16()
}
