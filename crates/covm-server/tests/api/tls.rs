//! TLS (issue 16): covm's own CA, TLS 1.3 by default, plain HTTP refused beyond loopback, the
//! operator's certificate read again on reload, HSTS, and replicas that forward to each other over TLS.

use std::sync::Arc;

use covm_client::Client;
use covm_server::{ServeConfig, TlsMode, tls::TlsMin};
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;

use crate::common::{TestServer, on_postgres};

fn client_config(ca_pem: &str, versions: &[&'static rustls::SupportedProtocolVersion]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Handshakes with `addr` as a client of only these versions; the version agreed on, or the error.
async fn handshake(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ProtocolVersion, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca_pem, versions)));
    let s = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.map_err(|e| e.to_string())?;
    Ok(s.get_ref().1.protocol_version().unwrap())
}

#[tokio::test]
async fn tls_13_by_default_a_12_client_is_refused_and_answers_carry_hsts() {
    let s = TestServer::start_tls().await;
    let ca = s.ca_pem().unwrap();
    let addr = s.url.trim_start_matches("https://").parse().unwrap();
    assert_eq!(handshake(addr, &ca, &[&rustls::version::TLS13]).await, Ok(rustls::ProtocolVersion::TLSv1_3));
    let refused = handshake(addr, &ca, &[&rustls::version::TLS12]).await;
    assert!(refused.is_err(), "a TLS 1.2-only client must be refused by default: {refused:?}");
    // The CA's files: keys only for covm's user.
    for key in ["ca.key", "server.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.dir.path().join("tls").join(key)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // The typed client over TLS, and the headers of an answer.
    s.admin.whoami(None).await.unwrap();
    let resp = reqwest_with(&ca).get(format!("{}/healthz", s.url)).send().await.unwrap();
    let h = resp.headers();
    assert_eq!(h["strict-transport-security"], "max-age=31536000");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert!(h["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"));
    // A client that does not trust covm's CA gets no answer.
    let untrusting = Client::new(&s.url);
    let e = untrusting.health().await.unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
}

fn reqwest_with(ca_pem: &str) -> reqwest::Client {
    covm_client::tls::install_provider();
    reqwest::Client::builder()
        .tls_backend_preconfigured(covm_client::tls::pinned_config(ca_pem).unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn plain_http_beyond_loopback_refuses_to_start_unless_insecure_http() {
    if on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let any: std::net::SocketAddr = "0.0.0.0:0".parse().unwrap();
    let e = covm_server::start(ServeConfig {
        driver: covm_server::Driver::Sim,
        tls: TlsMode::Off,
        ..ServeConfig::new(dir.path().to_owned(), any)
    })
    .await
    .err()
    .expect("plain HTTP on 0.0.0.0 must not start");
    assert!(e.to_string().contains("refusing to serve plain HTTP"), "{e:#}");
    assert!(!dir.path().join("covm.db").exists(), "a refused start touches nothing");
    // Beyond loopback TLS is the default; --insecure-http allows plain HTTP.
    let c = ServeConfig::new(dir.path().to_owned(), any);
    assert!(c.tls_on().unwrap());
    assert!(!ServeConfig { insecure_http: true, ..c.clone() }.tls_on().unwrap());
    assert!(!ServeConfig::new(dir.path().to_owned(), "127.0.0.1:0".parse().unwrap()).tls_on().unwrap());
    let r =
        covm_server::start(ServeConfig { driver: covm_server::Driver::Sim, insecure_http: true, ..c }).await.unwrap();
    assert!(r.tls.is_none());
    r.stop().await.unwrap();
}

/// An operator's CA and server certificate (`certs.rs`): the CA's PEM, the chain's and the key's files.
fn operator_ca(dir: &std::path::Path, tag: &str) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let c = crate::certs::operator_cert(dir, tag);
    (std::fs::read_to_string(&c.ca).unwrap(), c.chain, c.key)
}

#[tokio::test]
async fn the_operators_certificate_is_served_and_read_again_on_reload() {
    if on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (ca1, cert, key) = operator_ca(certs.path(), "one");
    let r = covm_server::start(ServeConfig {
        driver: covm_server::Driver::Sim,
        tls_settings: covm_server::tls::TlsSettings {
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            min: TlsMin::V12,
        },
        ..ServeConfig::new(dir.path().to_owned(), "127.0.0.1:0".parse().unwrap())
    })
    .await
    .unwrap();
    assert!(!dir.path().join("tls").exists(), "no CA of covm's own with the operator's certificate");
    let url = format!("https://{}", r.addr);
    Client::with_ca(&url, &ca1).unwrap().health().await.unwrap();
    // --tls-min 1.2 lets a TLS 1.2 client in.
    assert_eq!(handshake(r.addr, &ca1, &[&rustls::version::TLS12]).await, Ok(rustls::ProtocolVersion::TLSv1_2));
    // A new certificate from another CA in the same files; reload (what SIGHUP does).
    let (ca2, cert2, key2) = operator_ca(certs.path(), "two");
    std::fs::rename(cert2, &cert).unwrap();
    std::fs::rename(key2, &key).unwrap();
    r.tls.as_ref().unwrap().reload().unwrap();
    Client::with_ca(&url, &ca2).unwrap().health().await.unwrap();
    assert!(Client::with_ca(&url, &ca1).unwrap().health().await.is_err(), "the old CA no longer vouches");
    // A broken file: reload fails and the current certificate stays.
    std::fs::write(&key, "not a key").unwrap();
    assert!(r.tls.as_ref().unwrap().reload().is_err());
    Client::with_ca(&url, &ca2).unwrap().health().await.unwrap();
    r.stop().await.unwrap();
}

#[tokio::test]
async fn replicas_forward_to_each_other_over_tls() {
    if !on_postgres() {
        return;
    }
    let a = TestServer::start_tls().await;
    let b = a.replica().await;
    assert!(a.url.starts_with("https://") && b.url.starts_with("https://"));
    assert_ne!(a.ca_pem(), b.ca_pem(), "each replica has a CA of its own");
    a.admin.vm_create(&crate::common::vm_named("on-a")).await.unwrap();
    let t = a.admin.vm_power("on-a", covm_types::vm::PowerAction::On, None).await.unwrap();
    crate::common::task_done(&a.admin, &t).await;
    // A request to b about a's VM is forwarded to a, over TLS with the CA a registered.
    let t = b.admin.vm_power("on-a", covm_types::vm::PowerAction::Off, None).await.unwrap();
    let done = crate::common::task_done(&b.admin, &t).await;
    assert_eq!(done.state, covm_types::vm::TaskState::Success, "{done:?}");
    assert_eq!(b.admin.vm("on-a").await.unwrap().runtime.power_state, covm_types::vm::PowerState::Off);
}
