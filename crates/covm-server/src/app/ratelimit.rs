//! Request rate limits: a token bucket per signed-in user and one per address for requests without
//! a session (governor's GCRA, keyed). Every request draws from its bucket; the expensive ones (power,
//! disk create and clone, snapshots, reverts) draw [`COST_HEAVY`]. Over the limit the answer is 429
//! with `Retry-After`; every limited answer carries `RateLimit-Limit`, `-Remaining` and `-Reset`.
//!
//! Several replicas share one limit: each takes its share, the configured rate and burst divided by
//! the number of live replicas (counted once a minute), so that a user spread over replicas gets about
//! the configured limit in all. One user at its limit does not slow another: buckets are per key.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use uuid::Uuid;

use covm_types::Error;

/// What an expensive request draws from its bucket.
pub const COST_HEAVY: u32 = 10;

/// The limits `covm serve` is given (`--rate-limit`, `--rate-burst`, and the same for anonymous
/// requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Requests a second a user may make, sustained.
    pub per_second: u32,
    /// How many at once after a pause.
    pub burst: u32,
    /// The same for requests without a session, per address.
    pub anonymous_per_second: u32,
    pub anonymous_burst: u32,
}

impl RateLimitConfig {
    /// No practical limit: for load tests and benchmarks, which measure the server, not the policy.
    pub const UNLIMITED: RateLimitConfig = RateLimitConfig {
        per_second: 1_000_000,
        burst: 1_000_000,
        anonymous_per_second: 1_000_000,
        anonymous_burst: 1_000_000,
    };
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig { per_second: 50, burst: 200, anonymous_per_second: 20, anonymous_burst: 100 }
    }
}

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

struct Buckets {
    share: u32,
    users: Keyed<Uuid>,
    addrs: Keyed<IpAddr>,
    user_quota: (u32, u32),
    addr_quota: (u32, u32),
}

/// The state of a caller's bucket after a request: for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// The bucket's size (the burst).
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again (or, refused, until the request would pass).
    pub reset_s: u64,
}

/// The buckets of this replica.
pub struct RateLimits {
    config: RateLimitConfig,
    clock: DefaultClock,
    buckets: RwLock<Arc<Buckets>>,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN)
}

impl RateLimits {
    pub fn new(config: RateLimitConfig) -> RateLimits {
        RateLimits { config, clock: DefaultClock::default(), buckets: RwLock::new(Arc::new(Self::make(config, 1))) }
    }

    fn make(c: RateLimitConfig, share: u32) -> Buckets {
        let part = |n: u32| n.div_ceil(share.max(1)).max(1);
        let user_quota = (part(c.per_second), part(c.burst));
        let addr_quota = (part(c.anonymous_per_second), part(c.anonymous_burst));
        let quota = |(rate, burst): (u32, u32)| Quota::per_second(nz(rate)).allow_burst(nz(burst));
        Buckets {
            share,
            users: RateLimiter::keyed(quota(user_quota)).with_middleware::<StateInformationMiddleware>(),
            addrs: RateLimiter::keyed(quota(addr_quota)).with_middleware::<StateInformationMiddleware>(),
            user_quota,
            addr_quota,
        }
    }

    pub fn config(&self) -> RateLimitConfig {
        self.config
    }

    fn buckets(&self) -> Arc<Buckets> {
        self.buckets.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes this replica's share when the number of live replicas changed (the buckets start over).
    pub fn set_replicas(&self, live: u32) {
        let live = live.max(1);
        metrics::gauge!("covm_rate_limit_replicas").set(f64::from(live));
        if self.buckets().share != live {
            tracing::info!(replicas = live, "rate limits: this replica now takes 1/{live} of each limit");
            *self.buckets.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Self::make(self.config, live));
        }
    }

    /// Forgets buckets that are full again (so that the maps do not grow with every address seen).
    pub fn shrink(&self) {
        let b = self.buckets();
        b.users.retain_recent();
        b.addrs.retain_recent();
        b.users.shrink_to_fit();
        b.addrs.shrink_to_fit();
    }

    /// A request by `user` that costs `cost`.
    pub fn admit_user(&self, user: Uuid, cost: u32) -> Result<RateState, (RateState, Error)> {
        let b = self.buckets();
        self.admit(&b.users, &user, cost, b.user_quota, "user")
    }

    /// A request without a session from `addr`.
    pub fn admit_addr(&self, addr: IpAddr, cost: u32) -> Result<RateState, (RateState, Error)> {
        let b = self.buckets();
        self.admit(&b.addrs, &addr, cost, b.addr_quota, "address")
    }

    fn admit<K: Clone + std::hash::Hash + Eq>(
        &self,
        l: &Keyed<K>,
        key: &K,
        cost: u32,
        (rate, burst): (u32, u32),
        kind: &'static str,
    ) -> Result<RateState, (RateState, Error)> {
        let cost = cost.clamp(1, burst);
        let refill = |missing: u32| u64::from(missing).div_ceil(u64::from(rate.max(1)));
        match l.check_key_n(key, nz(cost)) {
            Ok(Ok(snap)) => {
                let remaining = snap.remaining_burst_capacity();
                Ok(RateState { limit: burst, remaining, reset_s: refill(burst.saturating_sub(remaining)) })
            }
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let wait_s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                metrics::counter!("covm_rate_limited_total", "kind" => kind).increment(1);
                let state = RateState { limit: burst, remaining: 0, reset_s: wait_s.max(1) };
                Err((
                    state,
                    Error::rate_limited(
                        wait_s.max(1),
                        format!(
                            "too many requests: the limit is {rate} a second with bursts of {burst}; try again in {} s",
                            wait_s.max(1)
                        ),
                    ),
                ))
            }
            // A cost above the burst is clamped above; kept for completeness.
            Err(_) => {
                Err((RateState { limit: burst, remaining: 0, reset_s: 1 }, Error::rate_limited(1, "too many requests")))
            }
        }
    }
}

/// How often the replicas are counted and full buckets forgotten.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusals_with_a_wait_and_other_users_unaffected() {
        let l =
            RateLimits::new(RateLimitConfig { per_second: 1, burst: 5, anonymous_per_second: 1, anonymous_burst: 2 });
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        for i in 0..5 {
            let s = l.admit_user(a, 1).unwrap();
            assert_eq!((s.limit, s.remaining), (5, 4 - i));
        }
        let (state, e) = l.admit_user(a, 1).unwrap_err();
        assert_eq!(e.retry_after_s, Some(1));
        assert_eq!((state.remaining, state.reset_s), (0, 1));
        assert!(l.admit_user(b, 1).is_ok(), "another user has a bucket of its own");
        // A heavy request draws more than one token (clamped to the bucket).
        let c = Uuid::now_v7();
        assert_eq!(l.admit_user(c, COST_HEAVY).unwrap().remaining, 0);
        // Two replicas: each takes half.
        l.set_replicas(2);
        let d = Uuid::now_v7();
        let s = l.admit_user(d, 1).unwrap();
        assert_eq!(s.limit, 3, "half of 5, rounded up");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(l.admit_addr(ip, 1).is_ok());
        assert!(l.admit_addr(ip, 1).is_err(), "anonymous: one request each at half of 2");
    }
}
