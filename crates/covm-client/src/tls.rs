//! TLS for the client: rustls with the `ring` provider, trusting either the system's roots or exactly
//! one server's CA (pinned, like ssh's known hosts), and a probe that reads the certificate chain a
//! server presents so that a person can decide to trust it.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;

/// Makes rustls's `ring` provider the process's default. reqwest is built without a provider of its
/// own, so this runs before any reqwest client is built (`Client::new` calls it; so must anything
/// else that builds a reqwest client).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A configuration that trusts exactly the certificates in `pem` (TLS 1.2 or 1.3).
pub fn pinned_config(pem: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| format!("not a PEM certificate: {e}"))?;
        roots.add(c).map_err(|e| format!("a certificate that cannot be trusted as a CA: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate to trust".into());
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The SHA-256 fingerprint of a certificate (DER), as `AB:CD:…`.
pub fn fingerprint(der: &[u8]) -> String {
    sha2::Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// A certificate (DER) as PEM text.
pub fn pem(der: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for c in der.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            b64.push(if i <= c.len() { T[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' });
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Accepts any certificate and keeps the chain: only for [`server_chain`], which sends nothing.
#[derive(Debug)]
struct Recorder {
    chain: std::sync::Mutex<Vec<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.to_vec()];
        chain.extend(intermediates.iter().map(|c| c.to_vec()));
        *self.chain.lock().unwrap_or_else(|p| p.into_inner()) = chain;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The certificate chain (DER, server certificate first) that the server at `url` (`https://…`)
/// presents, read by a TLS handshake that trusts nothing and sends no request.
pub async fn server_chain(url: &str) -> Result<Vec<Vec<u8>>, String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url} is not a URL: {e}"))?;
    if u.scheme() != "https" {
        return Err(format!("{url} is not an https:// URL"));
    }
    let host = u.host_str().ok_or_else(|| format!("{url} names no host"))?.trim_matches(['[', ']']).to_owned();
    let port = u.port_or_known_default().unwrap_or(443);
    let provider = provider();
    let recorder = Arc::new(Recorder { chain: Default::default(), provider: provider.clone() });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
    let tcp =
        tokio::time::timeout(std::time::Duration::from_secs(10), tokio::net::TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| format!("{url}: no answer in 10 s"))?
            .map_err(|e| format!("could not connect to {url}: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let _tls = tokio::time::timeout(std::time::Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| format!("{url}: the TLS handshake did not end in 10 s"))?
        .map_err(|e| format!("TLS with {url} failed: {e}"))?;
    let chain = recorder.chain.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if chain.is_empty() {
        return Err(format!("{url} presented no certificate"));
    }
    Ok(chain)
}
