//! What a request without a valid session can write to the log is small and bounded.
//!
//! Failed sign-ins and failed anonymous requests are audited, but an attacker must not be able to grow
//! the log (and the disk under it) at will. So:
//! - what such an entry holds is bounded: names are cut to [`NAME_MAX`] bytes and a cut name is
//!   recorded with the SHA-256 of the whole, paths to [`PATH_MAX`]; no body is ever stored;
//! - entries pass a token bucket per process ([`AnonBudget`]): [`BURST`] at once, then
//!   `COVM_ANON_AUDIT_PER_MIN` a minute (default [`PER_MIN_DEFAULT`]);
//! - what the bucket turns away, and every sign-in refused by a rate limit, is counted instead and
//!   written as one `audit.suppressed` entry (counts per kind and the busiest addresses) at most once a
//!   minute.
//!
//! With several replicas each has its bucket: the log grows by at most the sum of their rates.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use covm_store::NewEvent;
use covm_types::{Error, ErrorCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{App, EventExt, system_event};

/// The longest name an anonymous entry keeps.
pub const NAME_MAX: usize = 64;
/// The longest path an anonymous entry keeps.
pub const PATH_MAX: usize = 256;
/// Entries let through at once.
const BURST: f64 = 30.0;
/// Entries a minute after the burst, unless `COVM_ANON_AUDIT_PER_MIN` says otherwise.
pub const PER_MIN_DEFAULT: f64 = 60.0;
/// How often the suppressed counts are written.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// Addresses named in a summary.
const TOP_ADDRESSES: usize = 10;

/// `s` cut to at most `max` bytes (on a character boundary), and the SHA-256 of the whole if it was cut.
pub fn bounded(s: &str, max: usize) -> (String, Option<String>) {
    if s.len() <= max {
        return (s.to_owned(), None);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (format!("{}…", &s[..end]), Some(hex::encode(Sha256::digest(s.as_bytes()))))
}

struct State {
    tokens: f64,
    refilled: Instant,
    suppressed: BTreeMap<String, u64>,
    addresses: HashMap<String, u64>,
    last_summary: Instant,
}

/// The token bucket and the counts of what it turned away.
pub struct AnonBudget {
    per_s: f64,
    state: Mutex<State>,
}

impl Default for AnonBudget {
    fn default() -> Self {
        let per_min = std::env::var("COVM_ANON_AUDIT_PER_MIN")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| *v >= 0.0)
            .unwrap_or(PER_MIN_DEFAULT);
        AnonBudget {
            per_s: per_min / 60.0,
            state: Mutex::new(State {
                tokens: BURST,
                refilled: Instant::now(),
                suppressed: BTreeMap::new(),
                addresses: HashMap::new(),
                last_summary: Instant::now(),
            }),
        }
    }
}

impl AnonBudget {
    /// Takes a token for one entry; `false`: the entry is counted instead.
    fn admit(&self, kind: &str, addr: &str) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.tokens = (s.tokens + now.duration_since(s.refilled).as_secs_f64() * self.per_s).min(BURST);
        s.refilled = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            return true;
        }
        Self::count(&mut s, kind, addr);
        false
    }

    fn count(s: &mut State, kind: &str, addr: &str) {
        *s.suppressed.entry(kind.to_owned()).or_default() += 1;
        // The address map is bounded: past a size, new addresses are lumped together.
        let key = if s.addresses.len() < 10_000 || s.addresses.contains_key(addr) { addr } else { "other" };
        *s.addresses.entry(key.to_owned()).or_default() += 1;
    }

    /// Counts an entry that is never written on its own (a rate-limited sign-in).
    fn suppress(&self, kind: &str, addr: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::count(&mut s, kind, addr);
    }

    /// The summary to write, if one is due (`force`: whatever the time).
    fn summary_take(&self, force: bool) -> Option<serde_json::Value> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.suppressed.is_empty() || (!force && s.last_summary.elapsed() < SUMMARY_EVERY) {
            return None;
        }
        let since = s.last_summary.elapsed().as_secs();
        s.last_summary = Instant::now();
        let mut top: Vec<(String, u64)> = s.addresses.drain().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top.truncate(TOP_ADDRESSES);
        let by_kind = std::mem::take(&mut s.suppressed);
        let total: u64 = by_kind.values().sum();
        Some(json!({
            "suppressed": total,
            "by_kind": by_kind,
            "top_addresses": top.into_iter().map(|(a, n)| json!({ "address": a, "count": n })).collect::<Vec<_>>(),
            "seconds": since,
        }))
    }
}

impl App {
    /// Writes an entry of a request without a valid session, if the budget allows; counts it otherwise.
    pub(crate) async fn audit_anonymous(&self, ev: NewEvent, addr: Option<std::net::IpAddr>) -> Result<(), Error> {
        let addr = addr.map_or_else(|| "-".to_owned(), |a| a.to_string());
        if !self.inner.anon.admit(&ev.kind, &addr) {
            return Ok(());
        }
        self.store().event_append(ev).await?;
        Ok(())
    }

    /// Audits a change request that failed without an entry of its own (`request.failed`): the
    /// caller's, or, without a session, within the anonymous budget and with the path cut short.
    pub async fn audit_failed_request(
        &self,
        req: &super::RequestInfo,
        method: &str,
        path: &str,
        status: u16,
        code: Option<ErrorCode>,
    ) -> Result<(), Error> {
        let (path, _) = bounded(path, PATH_MAX);
        let what = format!("{method} {path}");
        let data = json!({ "method": method, "path": path, "status": status, "code": code });
        let ev = system_event("request.failed", "request", None, &what).audit_only().data(data);
        let ev = NewEvent { request_id: Some(req.id.clone()), ..ev };
        match req.actor.get() {
            Some(actor) => {
                self.store().event_append(NewEvent { actor: actor.clone(), ..ev }).await?;
                Ok(())
            }
            None => self.audit_anonymous(ev, req.addr).await,
        }
    }

    /// Counts an anonymous entry without writing it (it is in the next summary).
    pub(crate) fn audit_anonymous_suppress(&self, kind: &str, addr: Option<std::net::IpAddr>) {
        self.inner.anon.suppress(kind, &addr.map_or_else(|| "-".to_owned(), |a| a.to_string()));
    }

    /// Writes the summary of suppressed anonymous entries when one is due (called every second by
    /// the background loop; `force` at a clean stop and in tests).
    pub async fn audit_anonymous_flush(&self, force: bool) -> Result<(), Error> {
        if let Some(data) = self.inner.anon.summary_take(force) {
            let ev = system_event("audit.suppressed", "request", None, "anonymous").audit_only().data(data);
            self.store().event_append(ev).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_and_digested() {
        assert_eq!(bounded("bob", 64), ("bob".to_owned(), None));
        let long = "é".repeat(100);
        let (cut, digest) = bounded(&long, 64);
        assert!(cut.len() <= 64 + "…".len());
        assert_eq!(digest.unwrap().len(), 64);
    }

    #[test]
    fn the_bucket_lets_a_burst_through_then_counts() {
        let b = AnonBudget { per_s: 0.0, ..Default::default() };
        let let_through = (0..100).filter(|_| b.admit("session.failed", "10.0.0.1")).count();
        assert_eq!(let_through, BURST as usize);
        b.suppress("session.rate_limited", "10.0.0.2");
        let s = b.summary_take(true).unwrap();
        assert_eq!(s["suppressed"], 71);
        assert_eq!(s["by_kind"]["session.failed"], 70);
        assert_eq!(s["top_addresses"][0]["address"], "10.0.0.1");
        assert!(b.summary_take(true).is_none(), "counts start again after a summary");
    }
}
