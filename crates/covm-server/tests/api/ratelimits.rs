//! Request rate limits (issue 16): a bucket per user and one per address without a session; a burst
//! gets 429 with `Retry-After` and the `RateLimit-*` headers while another user is served; expensive
//! requests draw more; several replicas share one limit.

use std::net::IpAddr;

use covm_server::app::ratelimit::RateLimitConfig;
use reqwest::StatusCode;

use crate::common::{TestServer, on_postgres};

const LIMITS: RateLimitConfig =
    RateLimitConfig { per_second: 1, burst: 10, anonymous_per_second: 1, anonymous_burst: 5 };

fn http(addr: &str) -> reqwest::Client {
    covm_client::tls::install_provider();
    reqwest::Client::builder().local_address(addr.parse::<IpAddr>().unwrap()).build().unwrap()
}

/// (status, RateLimit-Limit, -Remaining, -Reset, Retry-After) of one request.
async fn hit(c: &reqwest::Client, rb: reqwest::RequestBuilder) -> (StatusCode, [Option<u64>; 4]) {
    let r = c.execute(rb.build().unwrap()).await.unwrap();
    let h = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    (r.status(), [h("ratelimit-limit"), h("ratelimit-remaining"), h("ratelimit-reset"), h("retry-after")])
}

#[tokio::test]
async fn a_burst_gets_429_with_headers_while_another_user_is_served() {
    let s = TestServer::start_limited(LIMITS).await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let c = http("127.0.0.1");
    let get = |token: &str| c.get(format!("{}/api/v1/vms", s.url)).bearer_auth(token);
    // Alice's burst: ten answers, each telling what is left, then 429s.
    for i in 0..10u64 {
        let (status, [limit, remaining, reset, _]) = hit(&c, get(alice.token().unwrap())).await;
        assert_eq!(status, StatusCode::OK, "request {i}");
        assert_eq!((limit, remaining), (Some(10), Some(9 - i)), "request {i}");
        assert!(reset.unwrap() >= 1);
    }
    let (status, [limit, remaining, reset, retry]) = hit(&c, get(alice.token().unwrap())).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((limit, remaining), (Some(10), Some(0)));
    assert!(retry.unwrap() >= 1 && reset.unwrap() >= 1, "{retry:?} {reset:?}");
    let e = alice.vms(&Default::default()).await.unwrap_err();
    assert_eq!(e.code(), Some(covm_types::ErrorCode::RateLimited), "{e}");
    // Bob is not slowed by Alice.
    let (status, [_, remaining, _, _]) = hit(&c, get(bob.token().unwrap())).await;
    assert_eq!((status, remaining), (StatusCode::OK, Some(9)));
    // A power request draws ten: Carol's bucket is empty after one (the 404 drew too).
    let power = c
        .post(format!("{}/api/v1/vms/nope/power", s.url))
        .bearer_auth(carol.token().unwrap())
        .json(&serde_json::json!({"action": "on"}));
    let (status, [_, remaining, _, _]) = hit(&c, power).await;
    assert_eq!((status, remaining), (StatusCode::NOT_FOUND, Some(0)));
    assert_eq!(hit(&c, get(carol.token().unwrap())).await.0, StatusCode::TOO_MANY_REQUESTS);
    // Without a session: per address; another address is served.
    let stranger = http("127.0.0.2");
    for _ in 0..5 {
        assert_eq!(hit(&stranger, stranger.get(format!("{}/healthz", s.url))).await.0, StatusCode::OK);
    }
    let (status, [limit, _, _, retry]) = hit(&stranger, stranger.get(format!("{}/healthz", s.url))).await;
    assert_eq!((status, limit), (StatusCode::TOO_MANY_REQUESTS, Some(5)));
    assert!(retry.is_some());
    // Junk bearer tokens draw from their address too (they are not a way around its limit).
    let junk = http("127.0.0.4");
    let mut codes = Vec::new();
    for _ in 0..7 {
        codes.push(hit(&junk, junk.get(format!("{}/api/v1/vms", s.url)).bearer_auth("junk")).await.0.as_u16());
    }
    assert_eq!(codes, [401, 401, 401, 401, 401, 429, 429]);
    // The refusals are counted in /metrics, with the limits.
    let other = http("127.0.0.3");
    let metrics = other.get(format!("{}/metrics", s.url)).send().await.unwrap().text().await.unwrap();
    for want in [
        "covm_rate_limited_total{kind=\"user\"}",
        "covm_rate_limited_total{kind=\"address\"}",
        "covm_rate_limit_burst{kind=\"user\"}",
    ] {
        assert!(metrics.contains(want), "{want} not in /metrics");
    }
}

#[tokio::test]
async fn replicas_share_one_limit() {
    if !on_postgres() {
        return;
    }
    let a = TestServer::start_limited(LIMITS).await;
    let b = a.replica().await;
    for s in [&a, &b] {
        s.app().rates_upkeep().await;
    }
    let c = http("127.0.0.1");
    for s in [&a, &b] {
        let (status, [limit, ..]) =
            hit(&c, c.get(format!("{}/api/v1/vms", s.url)).bearer_auth(s.admin.token().unwrap())).await;
        assert_eq!((status, limit), (StatusCode::OK, Some(5)), "each of two replicas takes half of 10");
    }
    b.stop().await;
    a.app().rates_upkeep().await;
    let (_, [limit, ..]) = hit(&c, c.get(format!("{}/api/v1/vms", a.url)).bearer_auth(a.admin.token().unwrap())).await;
    assert_eq!(limit, Some(10), "alone again, the whole limit");
}
