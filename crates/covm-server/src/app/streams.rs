//! Long-lived streams (the event feed, the serial console, the VNC relay): how many a user may hold,
//! and their end when the right to hold them goes.
//!
//! - Each user may hold at most [`PER_USER`] streams at once on a replica (`COVM_STREAMS_PER_USER`
//!   overrides); one more is refused with 429 and `Retry-After`.
//! - A stream re-checks its caller whenever anything that decides authorization changes (grants,
//!   groups, roles, users, tokens: the privilege cache's epoch moves, also for changes made on
//!   another replica, which reach this one through the log) and at least every [`RECHECK`]: the
//!   token must still exist and not have expired, the user must exist, and the privilege the stream
//!   needs must still be held on its object. The stream ends within a second of losing any of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use covm_store::TokenKind;
use covm_types::{Error, Privilege};
use uuid::Uuid;

use super::{App, Ctx};

/// Streams one user may hold at once, unless `COVM_STREAMS_PER_USER` says otherwise.
pub const PER_USER: usize = 8;
/// How often a stream looks at the privilege epoch.
const TICK: Duration = Duration::from_millis(200);
/// A full re-check at least this often, even when nothing was seen to change.
const RECHECK: Duration = Duration::from_secs(5);

/// Open streams per user.
#[derive(Default)]
pub struct Streams(Mutex<HashMap<Uuid, usize>>);

fn per_user() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("COVM_STREAMS_PER_USER").ok().and_then(|v| v.parse().ok()).filter(|n| *n > 0).unwrap_or(PER_USER)
    })
}

/// One open stream: counts against its user's cap until dropped, and knows what it needs.
pub struct StreamGuard {
    app: App,
    ctx: Ctx,
    need: Option<(Uuid, Privilege)>,
    /// The caller's grants left out for their request conditions when the stream began.
    excluded: std::sync::Mutex<Option<Vec<Uuid>>>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut map = self.app.inner.streams.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ctx.user_id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ctx.user_id);
            }
        }
    }
}

impl App {
    /// Opens a stream for the caller (429 past the per-user cap). `need`: the privilege the stream
    /// needs on an object, re-checked for as long as it lasts.
    pub fn stream_open(&self, ctx: &Ctx, need: Option<(Uuid, Privilege)>) -> Result<StreamGuard, Error> {
        let mut map = self.inner.streams.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ctx.user_id).or_default();
        if *n >= per_user() {
            return Err(Error::rate_limited(
                5,
                format!("you have {n} streams open (events or consoles), the most one user may hold; close one first"),
            ));
        }
        *n += 1;
        Ok(StreamGuard { app: self.clone(), ctx: ctx.clone(), need, excluded: std::sync::Mutex::new(None) })
    }
}

impl StreamGuard {
    /// The grants left out for their request conditions when the stream began (the feed's filter).
    pub fn conditions_baseline(&self, excluded: Vec<Uuid>) {
        *self.excluded.lock().unwrap_or_else(|p| p.into_inner()) = Some(excluded);
    }

    /// Whether the caller may still hold the stream.
    async fn allowed(&self) -> Result<bool, Error> {
        let store = self.app.store();
        let Some(_) = store.user_get(self.ctx.user_id).await? else { return Ok(false) };
        let mut token = None;
        for kind in [TokenKind::Session, TokenKind::Api] {
            if let Some(t) =
                store.tokens_list(self.ctx.user_id, kind).await?.into_iter().find(|t| t.id == self.ctx.token_id)
            {
                token = Some(t);
            }
        }
        if token.is_none_or(|t| t.expires_at <= chrono::Utc::now()) {
            return Ok(false);
        }
        // The caller's request conditions (hours, expiry) moved: the stream ends, and the caller
        // opens it again under what applies now (the feed's filter is the viewer of its start).
        let excluded = self.app.viewer(&self.ctx).await?.excluded;
        {
            let mut seen = self.excluded.lock().unwrap_or_else(|p| p.into_inner());
            match &*seen {
                Some(before) if *before != excluded => return Ok(false),
                Some(_) => {}
                None => *seen = Some(excluded),
            }
        }
        if let Some((object, privilege)) = self.need {
            let privs = self.app.privileges_of(&self.ctx, object).await?;
            return Ok(privs.iter().any(|p| p == privilege.as_str()));
        }
        Ok(true)
    }

    /// Resolves when the caller loses the right to hold the stream (the future holds the stream's
    /// place in the cap while it lives).
    pub async fn revoked(self: Arc<Self>) {
        let mut epoch = self.app.caches().epoch();
        let mut checked = Instant::now();
        loop {
            tokio::time::sleep(TICK).await;
            let now = self.app.caches().epoch();
            if now == epoch && checked.elapsed() < RECHECK {
                continue;
            }
            epoch = now;
            checked = Instant::now();
            match self.allowed().await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(user = %self.ctx.user, "a stream ends: its caller lost the right to it");
                    return;
                }
                // The store cannot tell now: keep the stream, ask again at the next tick.
                Err(e) => tracing::debug!(error = %e, "could not re-check a stream's caller"),
            }
        }
    }
}
