//! What TLS costs (issue 16): full TLS 1.3 handshakes a second against plain TCP connects, and the
//! latency of a `PATCH` of a VM over a kept-alive connection and over a new connection per request,
//! plain against TLS. Both servers run in this process (covm-server, simulated driver, SQLite), so
//! the client's and the server's work share the machine's cores, as on loopback anyway.

use std::sync::Arc;
use std::time::Instant;

use covm_client::{ChangeOptions, Client};
use rustls::pki_types::ServerName;
use serde_json::json;

use crate::{Percentiles, Report};

pub struct TlsParams {
    /// Handshakes (and plain connects) to time.
    pub handshakes: usize,
    /// PATCHes per variant.
    pub patches: usize,
}

async fn start(dir: &std::path::Path, tls: bool) -> anyhow::Result<covm_server::Running> {
    covm_server::start(covm_server::ServeConfig {
        driver: covm_server::Driver::Sim,
        tls: if tls { covm_server::TlsMode::On } else { covm_server::TlsMode::Off },
        rate_limits: covm_server::app::ratelimit::RateLimitConfig::UNLIMITED,
        ..covm_server::ServeConfig::new(dir.to_owned(), "127.0.0.1:0".parse()?)
    })
    .await
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

async fn patches(c: &Client, vm: &str, n: usize) -> anyhow::Result<Percentiles> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        c.vm_change(vm, &json!({ "description": format!("edit {i}") }), &ChangeOptions::default()).await?;
        samples.push(ms(t));
    }
    Ok(Percentiles::of(samples))
}

pub async fn tls(p: &TlsParams) -> anyhow::Result<Report> {
    covm_client::tls::install_provider();
    let (plain_dir, tls_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let plain = start(plain_dir.path(), false).await?;
    let secure = start(tls_dir.path(), true).await?;
    let ca = std::fs::read_to_string(tls_dir.path().join("tls/ca.pem"))?;
    let password = |d: &std::path::Path| -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(d.join("initial-admin-password"))?.trim().to_owned())
    };
    let plain_url = format!("http://{}", plain.addr);
    let tls_url = format!("https://{}", secure.addr);
    let (pc, _) = Client::new(&plain_url).login("admin", &password(plain_dir.path())?).await?;
    let (tc, _) = Client::with_ca(&tls_url, &ca)?.login("admin", &password(tls_dir.path())?).await?;
    for c in [&pc, &tc] {
        c.vm_create(&covm_types::vm::VmConfig::named("bench")?).await?;
    }

    // Handshakes: connect, handshake, close, one after another.
    let config = Arc::new(covm_client::tls::pinned_config(&ca).map_err(anyhow::Error::msg)?);
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut hs = Vec::with_capacity(p.handshakes);
    let t0 = Instant::now();
    for _ in 0..p.handshakes {
        let t = Instant::now();
        let tcp = tokio::net::TcpStream::connect(secure.addr).await?;
        let s = connector.connect(ServerName::try_from("localhost")?, tcp).await?;
        drop(s);
        hs.push(ms(t));
    }
    let handshakes_per_s = p.handshakes as f64 / t0.elapsed().as_secs_f64();
    let mut connects = Vec::with_capacity(p.handshakes);
    let t0 = Instant::now();
    for _ in 0..p.handshakes {
        let t = Instant::now();
        drop(tokio::net::TcpStream::connect(plain.addr).await?);
        connects.push(ms(t));
    }
    let connects_per_s = p.handshakes as f64 / t0.elapsed().as_secs_f64();

    // PATCH latency on kept-alive connections, then with a new connection per request.
    let plain_kept = patches(&pc, "bench", p.patches).await?;
    let tls_kept = patches(&tc, "bench", p.patches).await?;
    let fresh = |base: &Client, url: &str, ca: Option<&str>| -> anyhow::Result<Client> {
        let c = match ca {
            Some(ca) => Client::with_ca(url, ca)?,
            None => Client::new(url),
        };
        Ok(c.with_token(base.token().unwrap_or_default()))
    };
    let mut plain_new = Vec::new();
    let mut tls_new = Vec::new();
    for i in 0..p.patches {
        let body = json!({ "description": format!("fresh {i}") });
        let c = fresh(&pc, &plain_url, None)?;
        let t = Instant::now();
        c.vm_change("bench", &body, &ChangeOptions::default()).await?;
        plain_new.push(ms(t));
        let c = fresh(&tc, &tls_url, Some(&ca))?;
        let t = Instant::now();
        c.vm_change("bench", &body, &ChangeOptions::default()).await?;
        tls_new.push(ms(t));
    }
    let (plain_new, tls_new) = (Percentiles::of(plain_new), Percentiles::of(tls_new));
    let r = |x: f64| (x * 10.0).round() / 10.0;
    let figures = json!({
        "tls13_handshakes_per_s": r(handshakes_per_s),
        "handshake_ms": Percentiles::of(hs),
        "tcp_connects_per_s": r(connects_per_s),
        "tcp_connect_ms": Percentiles::of(connects),
        "patch_kept_alive_plain_ms": plain_kept,
        "patch_kept_alive_tls_ms": tls_kept,
        "patch_new_connection_plain_ms": plain_new,
        "patch_new_connection_tls_ms": tls_new,
        "tls_extra_p50_kept_alive_ms": r((tls_kept.p50 - plain_kept.p50) * 1000.0) / 1000.0,
        "tls_extra_p50_new_connection_ms": r((tls_new.p50 - plain_new.p50) * 1000.0) / 1000.0,
    });
    plain.stop().await?;
    secure.stop().await?;
    Ok(Report {
        scenario: "tls".into(),
        params: json!({ "handshakes": p.handshakes, "patches": p.patches }),
        figures,
        violations: 0,
        violation_details: vec![],
    })
}
