//! Small in-process caches for the two reads every request makes: who a token belongs to, and what a
//! user may do on an object.
//!
//! - Tokens are cached for [`TOKEN_TTL`]; signing out, revoking a token, a new password and deleting a
//!   user clear the cache at once in this process. TODO-security: with several replicas, another
//!   replica may accept a revoked token for up to `TOKEN_TTL`.
//! - Effective privileges are cached per (user, object, the user's grants left out for their request
//!   conditions) under an epoch, and so are each user's conditional grants. Every change that can alter
//!   them (grants, group membership, deleting a user, moving a VM, changing its annotations) bumps the
//!   epoch in the same request; the feed's tailer also bumps it when it reads such a change written by
//!   another process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use covm_store::VersionRecord;
use uuid::Uuid;

pub const TOKEN_TTL: Duration = Duration::from_secs(5);
const MAX_ENTRIES: usize = 100_000;

#[derive(Clone)]
pub struct CachedToken {
    pub token_id: Uuid,
    pub user_id: Uuid,
    pub user: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// The session may only enroll in two-factor sign-in.
    pub enroll_only: bool,
    fetched: Instant,
}

/// (user, object, the user's excluded conditional grants) → (epoch it was read under, privileges).
type PrivilegeMap = HashMap<(Uuid, Uuid, String), (u64, Vec<String>)>;

/// A user's grants with conditions: (grant, its conditions).
pub type Conditional = Arc<Vec<(Uuid, covm_types::conditions::GrantConditions)>>;

#[derive(Default)]
pub struct Caches {
    epoch: AtomicU64,
    privileges: Mutex<PrivilegeMap>,
    /// user → (epoch, its conditional grants).
    conditional: Mutex<HashMap<Uuid, (u64, Conditional)>>,
    tokens: Mutex<HashMap<String, CachedToken>>,
    /// VM config versions: immutable once written, so never stale (a deleted VM's are never asked for).
    versions: Mutex<HashMap<(Uuid, i64), Arc<VersionRecord>>>,
}

const MAX_VERSIONS: usize = 4096;

impl Caches {
    pub fn version_get(&self, vm: Uuid, version: i64) -> Option<Arc<VersionRecord>> {
        self.versions.lock().unwrap_or_else(|p| p.into_inner()).get(&(vm, version)).cloned()
    }

    pub fn version_put(&self, vm: Uuid, version: i64, v: Arc<VersionRecord>) {
        let mut map = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_VERSIONS {
            map.clear();
        }
        map.insert((vm, version), v);
    }

    pub fn privileges_get(&self, viewer: &covm_store::Viewer, object: Uuid) -> Option<Vec<String>> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let map = self.privileges.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(viewer.user, object, viewer.excluded_param())).filter(|(e, _)| *e == epoch).map(|(_, p)| p.clone())
    }

    /// Stores privileges read under `epoch` (read before the query, so a bump during it wins).
    pub fn privileges_put(&self, epoch: u64, viewer: &covm_store::Viewer, object: Uuid, privileges: Vec<String>) {
        let mut map = self.privileges.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert((viewer.user, object, viewer.excluded_param()), (epoch, privileges));
    }

    pub fn conditional_get(&self, user: Uuid) -> Option<Conditional> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let map = self.conditional.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&user).filter(|(e, _)| *e == epoch).map(|(_, c)| c.clone())
    }

    pub fn conditional_put(&self, epoch: u64, user: Uuid, c: Conditional) {
        let mut map = self.conditional.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(user, (epoch, c));
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Something that decides privileges changed: forget them all.
    pub fn authz_changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.privileges.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.conditional.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn token_get(&self, hash: &str) -> Option<CachedToken> {
        let map = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        map.get(hash).filter(|t| t.fetched.elapsed() < TOKEN_TTL).cloned()
    }

    pub fn token_put(
        &self,
        hash: String,
        token_id: Uuid,
        user_id: Uuid,
        user: String,
        expires_at: chrono::DateTime<chrono::Utc>,
        enroll_only: bool,
    ) {
        let mut map = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(hash, CachedToken { token_id, user_id, user, expires_at, enroll_only, fetched: Instant::now() });
    }

    /// Forgets every cached token (one was revoked); streams re-check their callers (the epoch moves).
    pub fn tokens_clear(&self) {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.authz_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_invalidates_privileges_even_mid_query() {
        let c = Caches::default();
        let (u, o) = (covm_store::Viewer::user(Uuid::from_u128(1)), Uuid::from_u128(2));
        let u = &u;
        let e = c.epoch();
        c.privileges_put(e, u, o, vec!["System.View".into()]);
        assert_eq!(c.privileges_get(u, o).unwrap(), ["System.View"]);
        c.authz_changed();
        assert!(c.privileges_get(u, o).is_none());
        // A result read under the old epoch and stored after the bump is not served.
        c.privileges_put(e, u, o, vec!["Stale".into()]);
        assert!(c.privileges_get(u, o).is_none());
    }
}
