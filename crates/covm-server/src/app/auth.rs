//! Sign-in, sessions and API tokens, the first `admin`, and the sign-in rate limiter.
//!
//! Passwords are argon2id hashes (computed off the async runtime). Tokens are 32 random bytes shown
//! once as hex; the store keeps only their SHA-256, so a copy of the database signs nobody in.
//! Failed sign-ins are audited and counted per (user, address) and per address; past the limit the
//! next attempt gets 429 with `Retry-After`, before any password is checked.

use covm_types::ErrorCode;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use chrono::Utc;
use covm_store::{TokenKind, TokenRecord, UserRecord};
use covm_types::api::{SessionCreate, SessionToken, TokenCreate, TokenView, UserView, Whoami};
use covm_types::{BuiltinRole, Error, Privilege, ROOT_ID};
use rand::Rng;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{App, Ctx, EventExt, RequestInfo, system_event};

/// How long a session lasts.
pub const SESSION_TTL: chrono::Duration = chrono::Duration::hours(12);
/// API token lifetimes.
const TOKEN_TTL_DEFAULT_S: u64 = 30 * 24 * 3600;
const TOKEN_TTL_MAX_S: u64 = 365 * 24 * 3600;
/// Shortest password accepted.
pub const PASSWORD_MIN_LEN: usize = 8;

/// The file the first start writes the `admin` password into.
pub const INITIAL_PASSWORD_FILE: &str = "initial-admin-password";

/// Fixed ids of the built-in roles, so that every store and replica agree.
pub fn builtin_role_id(role: BuiltinRole) -> Uuid {
    let n = match role {
        BuiltinRole::Admin => 1,
        BuiltinRole::ReadOnly => 2,
        BuiltinRole::NoAccess => 3,
        BuiltinRole::VmUser => 4,
        BuiltinRole::VmCreator => 5,
    };
    Uuid::from_u128(0x0c0f_0000_0000_0000_0000_0000_0000_0000 | n)
}

pub(crate) async fn password_hash(password: String) -> Result<String, Error> {
    let _turn = HASHING.acquire().await.map_err(|_| Error::internal("the password hasher is closed"))?;
    tokio::task::spawn_blocking(move || {
        let salt = rand::rng().random::<[u8; 16]>();
        Argon2::default()
            .hash_password_with_salt(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|_| Error::internal("could not hash the password"))
    })
    .await
    .map_err(|_| Error::internal("the password hasher failed"))?
}

/// Checks a password against a stored hash. Without a hash (an unknown user) it hashes anyway and
/// answers false, so that an unknown user costs the same time as a wrong password.
async fn password_verify(password: String, hash: Option<String>) -> bool {
    let Some(hash) = hash else {
        let _ = password_hash(password).await;
        return false;
    };
    let Ok(_turn) = HASHING.acquire().await else { return false };
    tokio::task::spawn_blocking(move || {
        PasswordVerifier::<str>::verify_password(&Argon2::default(), password.as_bytes(), &hash).is_ok()
    })
    .await
    .unwrap_or(false)
}

pub(crate) fn password_check(field: &str, password: &str) -> Result<(), Error> {
    if password.chars().count() < PASSWORD_MIN_LEN {
        return Err(Error::new(
            covm_types::ErrorKind::InvalidRequest,
            ErrorCode::WeakPassword,
            format!("a password has at least {PASSWORD_MIN_LEN} characters"),
        )
        .with_field(field));
    }
    Ok(())
}

fn token_new() -> (String, String) {
    let token = format!("covm_{}", hex::encode(rand::rng().random::<[u8; 32]>()));
    let hash = token_hash(&token);
    (token, hash)
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// 403 `user_disabled`.
pub(crate) fn user_disabled(name: &str) -> Error {
    Error::new(
        covm_types::ErrorKind::Forbidden,
        ErrorCode::UserDisabled,
        format!("user {name} is disabled: its identity provider said so at its last sign-in"),
    )
}

/// A random password of 24 letters and digits.
fn password_random() -> String {
    const CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..24).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

/// The longest user name a sign-in may send (names are shorter; this bounds what a stranger sends).
pub const USER_NAME_MAX: usize = 256;
/// The longest password accepted (hashing costs grow with it).
pub const PASSWORD_MAX: usize = 1024;

/// The per-account limit: after 10 attempts within 15 minutes, each further try waits 2, 4, 8 …
/// seconds after the last one, never more than a minute. A guesser gets at most one try a minute at
/// an account from anywhere; the owner, from an address she signed in from before, is not held by it.
const ACCOUNT_POLICY: covm_store::SigninPolicy =
    covm_store::SigninPolicy { window: chrono::Duration::minutes(15), free: 10, delay_max_s: 60 };

/// Password hashes computed at once (each takes ~19 MiB and a core for ~50 ms): more wait their turn.
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Counts failed sign-ins in a sliding window.
#[derive(Default)]
pub struct RateLimiter {
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// Failed sign-ins to names that are no account (bounded).
    accounts: Mutex<HashMap<String, covm_store::SigninFailures>>,
}

const WINDOW: Duration = Duration::from_secs(60);
/// Failures allowed per (user, address) and per address within [`WINDOW`].
const PER_USER_ADDR: usize = 5;
const PER_ADDR: usize = 20;

impl RateLimiter {
    fn keys(user: &str, addr: Option<IpAddr>) -> [(String, usize); 2] {
        let a = addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        [(format!("{user}@{a}"), PER_USER_ADDR), (format!("@{a}"), PER_ADDR)]
    }

    /// Seconds to wait, if the caller is over a limit now.
    pub fn blocked(&self, user: &str, addr: Option<IpAddr>) -> Option<u64> {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = None;
        for (key, limit) in Self::keys(user, addr) {
            if let Some(q) = map.get_mut(&key) {
                while q.front().is_some_and(|t| now.duration_since(*t) > WINDOW) {
                    q.pop_front();
                }
                if q.len() >= limit
                    && let Some(first) = q.front()
                {
                    let w = WINDOW.saturating_sub(now.duration_since(*first)).as_secs().max(1);
                    wait = Some(wait.map_or(w, |x: u64| x.max(w)));
                }
            }
        }
        wait
    }

    pub fn failed(&self, user: &str, addr: Option<IpAddr>) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for (key, _) in Self::keys(user, addr) {
            map.entry(key).or_default().push_back(Instant::now());
        }
        // Bound the map: forget keys whose window has passed.
        if map.len() > 10_000 {
            let now = Instant::now();
            map.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) <= WINDOW));
        }
    }

    fn account_get(&self, account: &str) -> Option<covm_store::SigninFailures> {
        let key = super::anon::bounded(account, super::anon::NAME_MAX).0;
        self.accounts.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned()
    }

    fn account_failed(&self, account: &str, at: chrono::DateTime<Utc>, window: chrono::Duration) {
        let mut map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, f| at - f.first_at <= window);
        }
        let key = super::anon::bounded(account, super::anon::NAME_MAX).0;
        let f = map.entry(key).or_insert(covm_store::SigninFailures { failures: 0, first_at: at, last_at: at });
        if at - f.first_at > window {
            *f = covm_store::SigninFailures { failures: 0, first_at: at, last_at: at };
        }
        f.failures += 1;
        f.last_at = at;
    }

    pub fn succeeded(&self, user: &str, addr: Option<IpAddr>) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&Self::keys(user, addr)[0].0);
    }
}

/// The meta key that records a successful sign-in to `account` from `addr`.
fn known_key(account: &str, addr: Option<IpAddr>) -> String {
    format!("signin-ok/{account}/{}", addr.map_or_else(|| "-".to_owned(), |a| a.to_string()))
}

/// What the per-account limit said of one sign-in attempt.
#[derive(Default)]
struct Attempt {
    /// Seconds to wait: refused now.
    wait: Option<u64>,
    /// Counted in the store (a success takes it back).
    reserved: bool,
    /// The address signed in to the account within a day (no need to record it again).
    known_recently: bool,
}

/// How long an address that signed in to an account stays known to it.
const KNOWN_FOR: chrono::Duration = chrono::Duration::days(30);

impl App {
    /// Reserves a sign-in attempt under the per-account limit; the seconds to wait if the account
    /// must. An existing account's attempts are counted in the store, atomically for every replica;
    /// a name that is no account is limited the same way in this process (the answers do not tell
    /// accounts apart on one replica). An address that signed in to the account within
    /// [`KNOWN_FOR`] is not held by it (only by the per-address limits): a guesser elsewhere
    /// cannot keep the owner out.
    async fn account_reserve(&self, account: &str, exists: bool, addr: Option<IpAddr>) -> Result<Attempt, Error> {
        let now = covm_store::now();
        if !exists {
            let wait = self.limiter().account_get(account).map(|f| ACCOUNT_POLICY.wait(&f, now)).unwrap_or(0);
            if wait > 0 {
                return Ok(Attempt { wait: Some(wait), ..Default::default() });
            }
            self.limiter().account_failed(account, now, ACCOUNT_POLICY.window);
            return Ok(Attempt::default());
        }
        let known = self.store().meta_get(&known_key(account, addr)).await?;
        let since = known.and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok()).map(|t| now - t.to_utc());
        if since.is_some_and(|d| d < KNOWN_FOR) {
            let known_recently = since.is_some_and(|d| d < chrono::Duration::days(1));
            return Ok(Attempt { known_recently, ..Default::default() });
        }
        let wait = self.store().signin_reserve(account, now, ACCOUNT_POLICY).await?;
        Ok(Attempt { wait, reserved: wait.is_none(), known_recently: false })
    }
}

pub(crate) fn user_view(u: &UserRecord) -> UserView {
    UserView {
        id: u.id,
        name: u.name.clone(),
        created_at: u.created_at,
        mfa: u.mfa_on,
        sso: u.sso_subject.is_some(),
        disabled: u.disabled,
    }
}

impl App {
    /// Creates the built-in roles (refreshing their privileges) and, on the very first start, the user
    /// `admin` with a random password written to `DATA/initial-admin-password` (mode 0600). Returns the
    /// path of that file when this call created the admin.
    pub async fn bootstrap(&self, data_dir: &Path) -> Result<Option<std::path::PathBuf>, Error> {
        for role in BuiltinRole::ALL {
            let privs: Vec<&str> = role.privileges().iter().map(|p| p.as_str()).collect();
            self.store().role_upsert_builtin(builtin_role_id(role), role.name(), &privs).await?;
        }
        if self.store().user_by_name("admin").await?.is_some() || !self.store().users_list().await?.is_empty() {
            return Ok(None);
        }
        let password = password_random();
        let file = data_dir.join(INITIAL_PASSWORD_FILE);
        // The file first: a crash after it and before the user leaves a file that the next start
        // overwrites; the reverse order could leave an admin whose password nobody knows.
        write_secret(&file, &password).map_err(|e| {
            tracing::error!(error = %e, file = %file.display(), "could not write the initial admin password");
            Error::internal("could not write the initial admin password")
        })?;
        let user = UserRecord {
            id: Uuid::now_v7(),
            name: "admin".into(),
            password_hash: password_hash(password).await?,
            created_at: covm_store::now(),
            mfa_secret: None,
            mfa_on: false,
            sso_subject: None,
            disabled: false,
        };
        let ev = system_event("user.created", "user", Some(user.id), "admin")
            .scope(ROOT_ID)
            .data(serde_json::json!({ "role": "Admin", "object": "/", "bootstrap": true }));
        if self.store().user_bootstrap(user, builtin_role_id(BuiltinRole::Admin), ev).await? {
            self.committed();
            Ok(Some(file))
        } else {
            // Another replica made the first user at the same time; its password is in its data dir.
            let _ = std::fs::remove_file(&file);
            Ok(None)
        }
    }

    /// Signs in with a password. Failures are audited (within the anonymous budget, `app::anon`) and
    /// rate limited per (user, address), per address, and per account across addresses and replicas.
    pub async fn session_create(&self, req: &Arc<RequestInfo>, p: SessionCreate) -> Result<SessionToken, Error> {
        if p.user.len() > USER_NAME_MAX {
            return Err(Error::invalid("user", format!("a user name has at most {USER_NAME_MAX} bytes")));
        }
        if p.password.len() > PASSWORD_MAX {
            return Err(Error::invalid("password", format!("a password has at most {PASSWORD_MAX} bytes")));
        }
        let (name, digest) = super::anon::bounded(&p.user, super::anon::NAME_MAX);
        let denied = |code: &str, message: String| {
            let ev = system_event(code, "user", None, &name).audit_only();
            covm_store::NewEvent { actor: name.clone(), request_id: Some(req.id.clone()), ..ev }.data(
                serde_json::json!({ "address": req.addr.map(|a| a.to_string()), "reason": message, "user_sha256": digest }),
            )
        };
        let user = self.store().user_by_name(&p.user).await?;
        let exists = user.is_some();
        let mut wait = self.limiter().blocked(&p.user, req.addr);
        // The per-account limit reserves the attempt before the password is checked, so parallel
        // guesses are counted too; a success takes it back.
        let mut attempt = Attempt::default();
        if wait.is_none() {
            attempt = self.account_reserve(&p.user, exists, req.addr).await?;
            wait = attempt.wait;
        }
        if let Some(wait) = wait {
            // Refusals by a limit are counted, not written one by one.
            self.audit_anonymous_suppress("session.rate_limited", req.addr);
            req.mark_audited();
            return Err(Error::rate_limited(wait, format!("too many failed sign-ins; try again in {wait} seconds")));
        }
        // A user of single sign-on has no password here (its hash is never a valid one; checked anyway).
        let hash = user.as_ref().filter(|u| u.sso_subject.is_none()).map(|u| u.password_hash.clone());
        let ok = password_verify(p.password.clone(), hash).await;
        let Some(user) = user.filter(|_| ok) else {
            self.limiter().failed(&p.user, req.addr);
            self.audit_anonymous(denied("session.failed", "bad user or password".into()), req.addr).await?;
            req.mark_audited();
            return Err(Error::unauthenticated("the user name or the password is wrong"));
        };
        if user.disabled {
            return Err(user_disabled(&user.name));
        }
        // The second factor: a wrong or replayed code is a failed sign-in like a wrong password (the
        // reserved attempt stays counted); a missing one is only the question.
        if user.mfa_on
            && let Err(e) = self.mfa_check_signin(&user, p.totp.as_deref(), p.recovery_code.as_deref()).await
        {
            if e.code != ErrorCode::MfaRequired {
                self.limiter().failed(&p.user, req.addr);
                self.audit_anonymous(denied("session.failed", "wrong second factor".into()), req.addr).await?;
                req.mark_audited();
            } else if attempt.reserved {
                self.store().signin_forgive(&user.name).await?;
            }
            return Err(e);
        }
        let enroll_only = !user.mfa_on && self.mfa_required_of(&user).await?;
        if attempt.reserved {
            self.store().signin_forgive(&user.name).await?;
        }
        if !attempt.known_recently {
            self.store().meta_set(&known_key(&user.name, req.addr), &covm_store::time_to_db(covm_store::now())).await?;
        }
        self.session_issue(req, &user, enroll_only, "password").await
    }

    /// A new session for `user` (signed in by `how`: `password` or `sso`), audited.
    pub(crate) async fn session_issue(
        &self,
        req: &Arc<RequestInfo>,
        user: &UserRecord,
        enroll_only: bool,
        how: &str,
    ) -> Result<SessionToken, Error> {
        let (token, hash) = token_new();
        let now = covm_store::now();
        let rec = TokenRecord {
            id: Uuid::now_v7(),
            user_id: user.id,
            kind: TokenKind::Session,
            name: "session".into(),
            hash,
            created_at: now,
            expires_at: now + SESSION_TTL,
            enroll_only,
        };
        let ev = covm_store::NewEvent {
            actor: user.name.clone(),
            request_id: Some(req.id.clone()),
            ..system_event("session.created", "user", Some(user.id), &user.name).audit_only()
        }
        .data(serde_json::json!({ "address": req.addr.map(|a| a.to_string()), "enroll_only": enroll_only, "by": how }));
        let expires_at = rec.expires_at;
        self.store().token_create(rec, Some(ev)).await?;
        Ok(SessionToken { token, user: user.name.clone(), expires_at, enroll_only })
    }

    /// Finds the caller of a bearer token.
    pub async fn authenticate(&self, req: &Arc<RequestInfo>, token: &str) -> Result<Ctx, Error> {
        let bad = || Error::unauthenticated("the token is unknown or has expired; sign in again");
        let hash = token_hash(token);
        let (token_id, user_id, user, expires_at, enroll_only) = match self.caches().token_get(&hash) {
            Some(t) => (t.token_id, t.user_id, t.user, t.expires_at, t.enroll_only),
            None => {
                let rec = self.store().token_by_hash(&hash).await?.ok_or_else(bad)?;
                let user = self.store().user_get(rec.user_id).await?.ok_or_else(bad)?;
                if user.disabled {
                    return Err(bad());
                }
                self.caches().token_put(hash, rec.id, user.id, user.name.clone(), rec.expires_at, rec.enroll_only);
                (rec.id, user.id, user.name, rec.expires_at, rec.enroll_only)
            }
        };
        if expires_at <= Utc::now() {
            return Err(bad());
        }
        let _ = req.actor.set(user.clone());
        Ok(Ctx { user_id, user, token_id, req: req.clone(), system: false, enroll_only })
    }

    pub async fn session_delete(&self, ctx: &Ctx) -> Result<(), Error> {
        // In the feed (scoped to the user, which no feed reader views) so that every replica's tailer
        // sees it: each forgets its cached tokens and re-checks its streams.
        let ev = ctx.event("session.deleted", "user", Some(ctx.user_id), &ctx.user);
        self.store().token_delete(ctx.user_id, ctx.token_id, Some(ev)).await?;
        self.caches().tokens_clear();
        Ok(())
    }

    /// Who am I, and what may I do on `object` (default `/`).
    pub async fn session_get(&self, ctx: &Ctx, object: Option<&str>) -> Result<Whoami, Error> {
        let user = self
            .store()
            .user_get(ctx.user_id)
            .await?
            .ok_or_else(|| Error::unauthenticated("the user no longer exists"))?;
        let obj = self.object_resolve(ctx, object.unwrap_or("/"), None, "object").await?;
        let privileges = self.privileges(ctx, obj.id).await?;
        Ok(Whoami {
            user: user_view(&user),
            groups: self.store().user_groups(ctx.user_id).await?,
            object: self.object_ref(&obj),
            privileges,
            enroll_only: ctx.enroll_only,
        })
    }

    pub async fn token_create(&self, ctx: &Ctx, p: TokenCreate) -> Result<TokenView, Error> {
        let ttl = p.expires_in_s.unwrap_or(TOKEN_TTL_DEFAULT_S);
        if ttl == 0 || ttl > TOKEN_TTL_MAX_S {
            return Err(Error::invalid(
                "expires_in_s",
                format!("a token lives from 1 second to {TOKEN_TTL_MAX_S} seconds (one year)"),
            ));
        }
        if self.store().tokens_list(ctx.user_id, TokenKind::Api).await?.iter().any(|t| t.name == p.name.as_str()) {
            return Err(Error::conflict(
                ErrorCode::AlreadyExists,
                format!("you already have a token named {}", p.name),
            )
            .with_field("name"));
        }
        let (token, hash) = token_new();
        let now = covm_store::now();
        let rec = TokenRecord {
            id: Uuid::now_v7(),
            user_id: ctx.user_id,
            kind: TokenKind::Api,
            name: p.name.to_string(),
            hash,
            created_at: now,
            expires_at: now + chrono::Duration::seconds(ttl as i64),
            enroll_only: false,
        };
        let ev = ctx
            .event("token.created", "user", Some(ctx.user_id), &ctx.user)
            .audit_only()
            .data(serde_json::json!({ "token": rec.name, "token_id": rec.id, "expires_at": rec.expires_at }));
        let mut view = token_view(&rec);
        self.store().token_create(rec, Some(ev)).await?;
        view.token = Some(token);
        Ok(view)
    }

    pub async fn tokens_list(&self, ctx: &Ctx) -> Result<Vec<TokenView>, Error> {
        Ok(self.store().tokens_list(ctx.user_id, TokenKind::Api).await?.iter().map(token_view).collect())
    }

    pub async fn token_delete(&self, ctx: &Ctx, id: Uuid) -> Result<(), Error> {
        let ev = ctx
            .event("token.deleted", "user", Some(ctx.user_id), &ctx.user)
            .data(serde_json::json!({ "token_id": id }));
        if !self.store().token_delete(ctx.user_id, id, Some(ev)).await? {
            return Err(Error::not_found("token", &id.to_string()));
        }
        self.caches().tokens_clear();
        Ok(())
    }

    /// The caller's privileges on an object, as typed values.
    pub async fn privileges(&self, ctx: &Ctx, object: Uuid) -> Result<Vec<Privilege>, Error> {
        let mut privs: Vec<Privilege> =
            self.privileges_of(ctx, object).await?.iter().filter_map(|p| p.parse().ok()).collect();
        privs.sort();
        Ok(privs)
    }
}

fn token_view(t: &TokenRecord) -> TokenView {
    TokenView { id: t.id, name: t.name.clone(), created_at: t.created_at, expires_at: t.expires_at, token: None }
}

/// Writes a secret file readable by its owner only, atomically.
pub fn write_secret(path: &Path, content: &str) -> std::io::Result<()> {
    crate::files::write_atomic(path, format!("{content}\n").as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_blocks_after_the_limit_and_names_a_wait() {
        let l = RateLimiter::default();
        let a = Some("127.0.0.1".parse().unwrap());
        for _ in 0..PER_USER_ADDR {
            assert_eq!(l.blocked("bob", a), None);
            l.failed("bob", a);
        }
        let wait = l.blocked("bob", a).expect("blocked");
        assert!((1..=60).contains(&wait));
        // Another user from the same address is not blocked yet; success clears only the pair.
        assert_eq!(l.blocked("carol", a), None);
        l.succeeded("bob", a);
        assert_eq!(l.blocked("bob", a), None);
    }

    #[tokio::test]
    async fn passwords_hash_and_verify() {
        let h = password_hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(password_verify("correct horse".into(), Some(h.clone())).await);
        assert!(!password_verify("wrong horse".into(), Some(h)).await);
        assert!(!password_verify("x".into(), Some("garbage".into())).await);
        assert!(!password_verify("x".into(), None).await);
    }
}
