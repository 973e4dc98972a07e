//! Single sign-on with OpenID Connect: the authorization code flow with PKCE for browsers, the device
//! authorization flow (RFC 8628) for the CLI (`covm login --sso`).
//!
//! The identity provider is configured by its issuer (discovery at
//! `{issuer}/.well-known/openid-configuration`), a client id and secret, the claim that carries the
//! user's groups, and a map from IdP groups to covm groups. An ID token is accepted when its signature
//! checks against the provider's JWKS (`jsonwebtoken`), and its issuer, audience, expiry and (browser
//! flow) nonce are right.
//!
//! A user is created at its first sign-in, named by `preferred_username` (else `sub`), and tied to its
//! `sub`: a local user of the same name is never taken over (409). At every sign-in the user's
//! memberships in the mapped covm groups follow the IdP's groups (added and removed), so grants on
//! those groups apply as the IdP says. An SSO user has no password in covm; two-factor sign-in is the
//! IdP's business.
//!
//! Sign-ins in progress (the browser flow's state, a device flow's code) are kept in this replica's
//! memory for 10 minutes: behind a load balancer, a browser's callback must reach the replica that
//! sent it away (sticky sessions), and a CLI's polls too.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use covm_store::{NewEvent, UserRecord};
use covm_types::api::{SessionToken, SsoCallbackQuery, SsoDevicePoll, SsoDeviceStart, SsoInfo};
use covm_types::{Error, ErrorCode, ErrorKind, ROOT_ID};
use rand::Rng;
use serde::Deserialize;
use sha2::Digest;
use uuid::Uuid;

use super::{App, EventExt, RequestInfo};

/// How `covm serve` reaches its identity provider.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: crate::Hidden,
    /// The ID token claim that lists the user's groups (default `groups`).
    pub groups_claim: String,
    /// IdP group → covm group.
    pub group_map: BTreeMap<String, String>,
    /// Where the provider sends the browser back (default: this server's advertised URL +
    /// `/api/v1/sso/callback`).
    pub redirect_url: Option<String>,
    /// An ID token claim that, when true, says the user is disabled at the provider: covm disables it
    /// too (its sessions and API tokens end) and refuses the sign-in; false again enables it.
    pub disabled_claim: Option<String>,
}

const PENDING_TTL: Duration = Duration::from_secs(600);
/// At most this many sign-ins in progress per replica (each kind); more wait (503).
const PENDING_MAX: usize = 10_000;

fn too_many() -> Error {
    Error::new(ErrorKind::Unavailable, ErrorCode::SsoUnavailable, "too many sign-ins are in progress; try again soon")
}

#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    device_authorization_endpoint: Option<String>,
}

struct Pending {
    verifier: String,
    nonce: String,
    at: Instant,
    /// The web UI's path to land on (the session then goes into a cookie).
    next: Option<String>,
}

/// A path of this server's web UI: absolute, on this origin (not `//host`), printable.
fn ui_path(next: &str) -> Result<(), Error> {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && next.len() <= 2048
        && next.chars().all(|c| c.is_ascii_graphic());
    match ok {
        true => Ok(()),
        false => Err(Error::invalid("next", "next is a path of covm's web UI, such as /vms/web-1")),
    }
}

struct Device {
    device_code: String,
    interval: u64,
    at: Instant,
}

/// Sign-ins in progress, and what was learnt of the provider.
#[derive(Default)]
pub struct SsoState {
    pending: Mutex<HashMap<String, Pending>>,
    devices: Mutex<HashMap<Uuid, Device>>,
    discovery: tokio::sync::Mutex<Option<Discovery>>,
    /// The provider's keys, read again when a token names a key they lack (a key rotation there).
    jwks: tokio::sync::Mutex<Option<jsonwebtoken::jwk::JwkSet>>,
}

fn random_b64(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::rng().random()).collect();
    B64URL.encode(bytes)
}

fn unavailable(what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Unavailable, ErrorCode::SsoUnavailable, format!("the identity provider: {what}"))
}

fn refused(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unauthenticated, ErrorCode::Unauthenticated, what)
}

#[derive(Debug, Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// The client for the identity provider (one per process, so connections are reused).
fn http() -> reqwest::Client {
    static C: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        crate::tls::install_provider();
        reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default()
    })
    .clone()
}

/// A successful JSON answer of the provider.
async fn json_of<T: serde::de::DeserializeOwned>(rb: reqwest::RequestBuilder) -> Result<T, Error> {
    rb.send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(unavailable)?
        .json()
        .await
        .map_err(unavailable)
}

impl App {
    fn oidc(&self) -> Result<&OidcConfig, Error> {
        self.config().oidc.as_ref().ok_or_else(|| {
            Error::new(ErrorKind::NotFound, ErrorCode::NotFound, "single sign-on is not configured on this server")
        })
    }

    async fn discovery(&self) -> Result<Discovery, Error> {
        let cfg = self.oidc()?;
        let mut d = self.sso().discovery.lock().await;
        if let Some(d) = &*d {
            return Ok(d.clone());
        }
        let url = format!("{}/.well-known/openid-configuration", cfg.issuer.trim_end_matches('/'));
        let found: Discovery = json_of(http().get(&url)).await?;
        if found.issuer.trim_end_matches('/') != cfg.issuer.trim_end_matches('/') {
            return Err(unavailable(format!("discovery names issuer {}, not {}", found.issuer, cfg.issuer)));
        }
        *d = Some(found.clone());
        Ok(found)
    }

    fn redirect_url(&self) -> Result<String, Error> {
        let cfg = self.oidc()?;
        Ok(cfg.redirect_url.clone().unwrap_or_else(|| format!("{}/api/v1/sso/callback", self.advertised())))
    }

    /// The browser flow's first step: where to send the browser (the provider's authorization
    /// endpoint, with PKCE S256, a state and a nonce).
    pub async fn sso_begin(&self, next: Option<String>) -> Result<String, Error> {
        if let Some(n) = &next {
            ui_path(n)?;
        }
        let cfg = self.oidc()?;
        let d = self.discovery().await?;
        let (state, verifier, nonce) = (random_b64(24), random_b64(32), random_b64(24));
        let challenge = B64URL.encode(sha2::Sha256::digest(verifier.as_bytes()));
        {
            let mut p = self.sso().pending.lock().unwrap_or_else(|p| p.into_inner());
            p.retain(|_, v| v.at.elapsed() < PENDING_TTL);
            if p.len() >= PENDING_MAX {
                return Err(too_many());
            }
            p.insert(state.clone(), Pending { verifier, nonce: nonce.clone(), at: Instant::now(), next });
        }
        let mut url = reqwest::Url::parse(&d.authorization_endpoint).map_err(unavailable)?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &cfg.client_id)
            .append_pair("redirect_uri", &self.redirect_url()?)
            .append_pair("scope", "openid profile groups")
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(url.to_string())
    }

    /// Whether single sign-on is on.
    pub fn sso_info(&self) -> SsoInfo {
        SsoInfo { enabled: self.config().oidc.is_some() }
    }

    /// The browser flow's end: the provider's answer (a refusal, or a code), the code exchanged (with
    /// the PKCE verifier), the ID token checked, and a session for its user; with the web UI's path
    /// to land on when the sign-in began there.
    pub async fn sso_callback(
        &self,
        req: &std::sync::Arc<RequestInfo>,
        q: SsoCallbackQuery,
    ) -> Result<(SessionToken, Option<String>), Error> {
        if let Some(e) = q.error {
            return Err(refused(format!(
                "the identity provider did not sign you in: {}",
                q.error_description.unwrap_or(e)
            )));
        }
        let (Some(code), Some(state)) = (q.code, q.state) else {
            return Err(Error::invalid("code", "the identity provider's answer has no code and state"));
        };
        let (code, state) = (code.as_str(), state.as_str());
        let pending = self
            .sso()
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(state)
            .filter(|p| p.at.elapsed() < PENDING_TTL)
            .ok_or_else(|| refused("this sign-in is unknown or too old; start again").with_field("state"))?;
        let cfg = self.oidc()?;
        let d = self.discovery().await?;
        let redirect = self.redirect_url()?;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect.as_str()),
            ("client_id", cfg.client_id.as_str()),
            ("client_secret", cfg.client_secret.0.as_str()),
            ("code_verifier", pending.verifier.as_str()),
        ];
        let answer = self.token_call(&d, &form).await?;
        let id_token = answer.id_token.ok_or_else(|| {
            refused(format!(
                "the identity provider gave no ID token: {}",
                answer.error_description.or(answer.error).unwrap_or_default()
            ))
        })?;
        let claims = self.id_token_check(&d, &id_token, Some(&pending.nonce)).await?;
        Ok((self.sso_session(req, &claims).await?, pending.next))
    }

    async fn token_call(&self, d: &Discovery, form: &[(&str, &str)]) -> Result<TokenAnswer, Error> {
        let resp = http().post(&d.token_endpoint).form(form).send().await.map_err(unavailable)?;
        resp.json::<TokenAnswer>().await.map_err(unavailable)
    }

    /// The device flow's first step: a code for the user to enter at the provider.
    pub async fn sso_device_begin(&self) -> Result<SsoDeviceStart, Error> {
        let cfg = self.oidc()?;
        let d = self.discovery().await?;
        let endpoint = d
            .device_authorization_endpoint
            .clone()
            .ok_or_else(|| unavailable("it offers no device authorization endpoint"))?;
        #[derive(Deserialize)]
        struct Answer {
            device_code: String,
            user_code: String,
            verification_uri: String,
            #[serde(default)]
            verification_uri_complete: Option<String>,
            #[serde(default)]
            interval: Option<u64>,
            expires_in: u64,
        }
        let form = [
            ("client_id", cfg.client_id.as_str()),
            ("client_secret", cfg.client_secret.0.as_str()),
            ("scope", "openid profile groups"),
        ];
        let a: Answer = json_of(http().post(&endpoint).form(&form)).await?;
        let id = Uuid::new_v4();
        let interval = a.interval.unwrap_or(5).max(1);
        {
            let mut devices = self.sso().devices.lock().unwrap_or_else(|p| p.into_inner());
            devices.retain(|_, v| v.at.elapsed() < PENDING_TTL);
            if devices.len() >= PENDING_MAX {
                return Err(too_many());
            }
            devices.insert(id, Device { device_code: a.device_code, interval, at: Instant::now() });
        }
        Ok(SsoDeviceStart {
            id,
            user_code: a.user_code,
            verification_uri: a.verification_uri,
            verification_uri_complete: a.verification_uri_complete,
            interval_s: interval,
            expires_in_s: a.expires_in,
        })
    }

    /// The device flow's poll: pending until the user approved at the provider, then a session.
    pub async fn sso_device_poll(&self, req: &std::sync::Arc<RequestInfo>, id: Uuid) -> Result<SsoDevicePoll, Error> {
        let (device_code, interval) = {
            let devices = self.sso().devices.lock().unwrap_or_else(|p| p.into_inner());
            let dev = devices
                .get(&id)
                .filter(|d| d.at.elapsed() < PENDING_TTL)
                .ok_or_else(|| refused("this device sign-in is unknown or too old; start again").with_field("id"))?;
            (dev.device_code.clone(), dev.interval)
        };
        let cfg = self.oidc()?;
        let d = self.discovery().await?;
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code.as_str()),
            ("client_id", cfg.client_id.as_str()),
            ("client_secret", cfg.client_secret.0.as_str()),
        ];
        let answer = self.token_call(&d, &form).await?;
        match (answer.id_token, answer.error.as_deref()) {
            (Some(t), _) => {
                self.sso().devices.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                let claims = self.id_token_check(&d, &t, None).await?;
                let session = self.sso_session(req, &claims).await?;
                Ok(SsoDevicePoll { pending: false, interval_s: interval, session: Some(session) })
            }
            (None, Some("authorization_pending" | "slow_down")) => {
                Ok(SsoDevicePoll { pending: true, interval_s: interval, session: None })
            }
            (None, e) => {
                self.sso().devices.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                Err(refused(format!(
                    "the identity provider refused: {}",
                    answer.error_description.as_deref().or(e).unwrap_or("no ID token")
                )))
            }
        }
    }

    /// Checks an ID token against the provider's keys (fetched again once for an unknown key id).
    async fn id_token_check(
        &self,
        d: &Discovery,
        token: &str,
        nonce: Option<&str>,
    ) -> Result<serde_json::Value, Error> {
        let cfg = self.oidc()?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| refused(format!("a bad ID token: {e}")))?;
        let find = |set: &jsonwebtoken::jwk::JwkSet| {
            match &header.kid {
                Some(kid) => set.find(kid),
                None => set.keys.first(),
            }
            .cloned()
        };
        let mut cached = self.sso().jwks.lock().await;
        let jwk = match cached.as_ref().and_then(find) {
            Some(k) => k,
            None => {
                let fresh: jsonwebtoken::jwk::JwkSet = json_of(http().get(&d.jwks_uri)).await?;
                let k = find(&fresh);
                *cached = Some(fresh);
                k.ok_or_else(|| refused("the ID token is signed by a key the provider does not publish"))?
            }
        };
        drop(cached);
        let jwk = &jwk;
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| refused(format!("the provider's key: {e}")))?;
        let mut v = jsonwebtoken::Validation::new(header.alg);
        v.set_audience(&[&cfg.client_id]);
        v.set_issuer(&[&d.issuer]);
        v.leeway = 30;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| refused(format!("the ID token does not check: {e}")))?;
        if let Some(n) = nonce
            && data.claims["nonce"].as_str() != Some(n)
        {
            return Err(refused("the ID token's nonce is not this sign-in's"));
        }
        Ok(data.claims)
    }

    /// The covm user of an ID token (made at its first sign-in), its mapped groups brought in line
    /// with the IdP's, and a session.
    async fn sso_session(
        &self,
        req: &std::sync::Arc<RequestInfo>,
        claims: &serde_json::Value,
    ) -> Result<SessionToken, Error> {
        let cfg = self.oidc()?;
        let sub =
            claims["sub"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| refused("the ID token names no subject"))?;
        let subject = format!("{}#{sub}", cfg.issuer.trim_end_matches('/'));
        let wanted = claims["preferred_username"].as_str().unwrap_or(sub);
        let name = covm_types::Name::parse(wanted)
            .map_err(|e| refused(format!("the IdP's user name {wanted} cannot be a covm user name: {e}")))?;
        let disabled = cfg.disabled_claim.as_deref().is_some_and(|c| claims[c].as_bool() == Some(true));
        let user = match self.store().user_by_name(name.as_str()).await? {
            Some(u) if u.sso_subject.as_deref() == Some(subject.as_str()) => {
                if u.disabled != disabled {
                    let kind = if disabled { "user.disabled" } else { "user.enabled" };
                    let ev = NewEvent {
                        actor: u.name.clone(),
                        request_id: Some(req.id.clone()),
                        ..super::system_event(kind, "user", Some(u.id), &u.name)
                    }
                    .scope(ROOT_ID)
                    .data(serde_json::json!({ "sso": cfg.issuer }));
                    self.store().user_disabled_set(u.id, disabled, ev).await?;
                    self.caches().tokens_clear();
                    self.committed();
                }
                if disabled {
                    return Err(super::auth::user_disabled(&u.name));
                }
                u
            }
            Some(_) if disabled => return Err(super::auth::user_disabled(name.as_str())),
            Some(_) => {
                return Err(Error::conflict(
                    ErrorCode::AlreadyExists,
                    format!(
                        "a covm user named {name} exists and is not this IdP user; an admin must rename one of them"
                    ),
                ));
            }
            None if disabled => return Err(super::auth::user_disabled(name.as_str())),
            None => {
                let u = UserRecord {
                    id: Uuid::now_v7(),
                    name: name.to_string(),
                    // No password signs in: the hash of nothing covm ever hands out.
                    password_hash: "!sso".into(),
                    created_at: covm_store::now(),
                    mfa_secret: None,
                    mfa_on: false,
                    sso_subject: Some(subject.clone()),
                    disabled: false,
                };
                let ev = NewEvent {
                    actor: u.name.clone(),
                    request_id: Some(req.id.clone()),
                    ..super::system_event("user.created", "user", Some(u.id), &u.name)
                }
                .scope(ROOT_ID)
                .data(serde_json::json!({ "sso": cfg.issuer }));
                self.store().user_create(u.clone(), ev).await?;
                u
            }
        };
        // Memberships in the mapped groups follow the IdP's groups.
        let idp_groups: Vec<String> = claims[cfg.groups_claim.as_str()]
            .as_array()
            .map(|a| a.iter().filter_map(|g| g.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let have = self.store().user_groups(user.id).await?;
        let mut changed = false;
        for (idp, covm) in &cfg.group_map {
            let Some(g) = self.store().group_by_name(covm).await? else {
                tracing::warn!(group = %covm, "the SSO group map names a covm group that does not exist");
                continue;
            };
            let ev = |kind: &str| {
                NewEvent {
                    actor: user.name.clone(),
                    request_id: Some(req.id.clone()),
                    ..super::system_event(kind, "group", Some(g.id), &g.name)
                }
                .scope(ROOT_ID)
                .data(serde_json::json!({ "user": user.name, "sso_group": idp }))
            };
            match (idp_groups.contains(idp), have.contains(covm)) {
                (true, false) => {
                    self.store().group_member_add(g.id, user.id, ev("group.member_added")).await?;
                    changed = true;
                }
                (false, true) => {
                    self.store().group_member_remove(g.id, user.id, ev("group.member_removed")).await?;
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            self.caches().authz_changed();
            self.committed();
        }
        self.session_issue(req, &user, false, "sso").await
    }
}
