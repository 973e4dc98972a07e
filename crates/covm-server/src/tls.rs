//! TLS for covm's listener (rustls with the `ring` provider).
//!
//! covm serves TLS whenever it listens beyond loopback, and on loopback with `--tls`. Without a
//! certificate of the operator's (`--tls-cert`/`--tls-key`), the first start makes a private CA and a
//! server certificate for the host's names and addresses in `DATA/tls/` (keys mode 0600); later starts
//! reuse the CA and issue a new server certificate when the names change or it nears its end. The CA's
//! SHA-256 fingerprint is logged, for `covm login` to compare. The served chain is the server
//! certificate and the CA, so a client can see (and pin) the CA.
//!
//! [`Tls::reload`] re-reads the files (on SIGHUP): a connection gets the configuration current when
//! it was accepted.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

/// Days a server certificate of covm's own CA is valid; it is issued again this many days before.
const SERVER_CERT_DAYS: i64 = 397;
const RENEW_BEFORE_DAYS: i64 = 30;
const CA_YEARS: i32 = 20;

/// The lowest TLS version served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMin {
    /// TLS 1.3 only (the default).
    #[default]
    V13,
    /// TLS 1.2 and 1.3.
    V12,
}

/// How the listener gets its certificate.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// The operator's certificate chain (PEM, server certificate first) and key; both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub min: TlsMin,
}

enum Source {
    /// covm's own CA in this directory, issuing for these names.
    Own { dir: PathBuf, names: Vec<String>, ca_name: String },
    /// The operator's files.
    Files { cert: PathBuf, key: PathBuf },
}

/// The listener's TLS: the current server configuration and what clients should trust.
pub struct Tls {
    source: Source,
    min: TlsMin,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// The certificate a client or a peer replica trusts (PEM): covm's CA, or the last certificate of
    /// the operator's chain.
    trust: RwLock<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("fingerprint", &self.fingerprint()).finish()
    }
}

impl Tls {
    /// Sets TLS up for a listener on `listen`: the operator's files, or covm's own CA in `DATA/tls`.
    pub fn setup(data_dir: &Path, node_id: &str, listen: IpAddr, settings: &TlsSettings) -> anyhow::Result<Tls> {
        let source = match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => Source::Files { cert: cert.clone(), key: key.clone() },
            (None, None) => Source::Own {
                dir: data_dir.join("tls"),
                names: host_names(listen),
                ca_name: format!("covm CA {node_id}"),
            },
            _ => bail!("--tls-cert and --tls-key go together"),
        };
        let (config, trust) = load(&source, settings.min)?;
        Ok(Tls { source, min: settings.min, current: RwLock::new(config), trust: RwLock::new(trust) })
    }

    /// Reads the certificate and key again (after SIGHUP); on an error the current ones stay.
    pub fn reload(&self) -> anyhow::Result<()> {
        let (config, trust) = load(&self.source, self.min)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        *self.trust.write().unwrap_or_else(|p| p.into_inner()) = trust;
        Ok(())
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// The PEM certificate clients trust.
    pub fn trust_pem(&self) -> String {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The SHA-256 fingerprint of [`Tls::trust_pem`]'s certificate, `AB:CD:…`.
    pub fn fingerprint(&self) -> String {
        let pem = self.trust_pem();
        CertificateDer::from_pem_slice(pem.as_bytes()).map(|c| fingerprint(&c)).unwrap_or_default()
    }
}

/// The SHA-256 fingerprint of a certificate, as `AB:CD:…` (as `openssl x509 -fingerprint -sha256`).
pub fn fingerprint(der: &[u8]) -> String {
    sha2::Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The names a server certificate of covm's own CA is for: `localhost`, the host's name, and the
/// listen address, or every address of the host when it listens on all of them.
fn host_names(listen: IpAddr) -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
        && !h.is_empty()
    {
        names.push(h.to_owned());
    }
    let mut ips: Vec<IpAddr> = vec!["127.0.0.1".parse().expect("an address"), "::1".parse().expect("an address")];
    if listen.is_unspecified() {
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs {
                if let Some(s) = a.address {
                    if let Some(v4) = s.as_sockaddr_in() {
                        ips.push(IpAddr::V4(v4.ip()));
                    } else if let Some(v6) = s.as_sockaddr_in6()
                        && !v6.ip().is_unicast_link_local()
                    {
                        ips.push(IpAddr::V6(v6.ip()));
                    }
                }
            }
        }
    } else {
        ips.push(listen);
    }
    ips.sort();
    ips.dedup();
    names.extend(ips.iter().map(IpAddr::to_string));
    names.dedup();
    names
}

fn load(source: &Source, min: TlsMin) -> anyhow::Result<(Arc<rustls::ServerConfig>, String)> {
    let (chain, key, chain_file) = match source {
        Source::Files { cert, key } => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("could not read the certificate chain {}", cert.display()))?;
            if chain.is_empty() {
                bail!("{} holds no certificate", cert.display());
            }
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("could not read the private key {}", key.display()))?;
            (chain, key, cert.clone())
        }
        Source::Own { dir, names, ca_name } => {
            let (chain, key) = own_ca(dir, names, ca_name)?;
            (chain, key, dir.join("ca.pem"))
        }
    };
    let trust = last_pem_cert(&read(&chain_file)?)
        .with_context(|| format!("{} holds no PEM certificate", chain_file.display()))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match min {
        TlsMin::V13 => &[&rustls::version::TLS13],
        TlsMin::V12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and the key do not go together")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), trust))
}

/// The last `CERTIFICATE` block of a PEM text (the root end of a chain).
fn last_pem_cert(text: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = text.rfind(BEGIN)?;
    let end = text[start..].find(END)? + start + END.len();
    Some(format!("{}\n", &text[start..end]))
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct Issued {
    names: Vec<String>,
    not_after: chrono::DateTime<chrono::Utc>,
}

/// Sets a certificate's validity to the days from `from` to `to` (UTC midnights).
fn validity(p: &mut rcgen::CertificateParams, from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>) {
    use chrono::Datelike;
    let day = |t: chrono::DateTime<chrono::Utc>| {
        rcgen::date_time_ymd(t.year(), u8::try_from(t.month()).unwrap_or(1), u8::try_from(t.day()).unwrap_or(1))
    };
    p.not_before = day(from);
    p.not_after = day(to);
}

/// covm's own CA and a server certificate for `names`, made or reused in `dir`.
fn own_ca(
    dir: &Path,
    names: &[String],
    ca_name: &str,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let ca_params = || {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, ca_name);
        dn.push(DnType::OrganizationName, "covm");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        p
    };
    let (ca_pem, ca_key_pem) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca_key = if ca_pem.exists() && ca_key_pem.exists() {
        KeyPair::from_pem(&read(&ca_key_pem)?).map_err(|e| anyhow::anyhow!("{e}")).context("covm's CA key")?
    } else {
        let key = KeyPair::generate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut p = ca_params();
        let now = chrono::Utc::now();
        validity(&mut p, now - chrono::Duration::days(1), now + chrono::Duration::days(365 * i64::from(CA_YEARS)));
        let cert = p.self_signed(&key).map_err(|e| anyhow::anyhow!("{e}"))?;
        write_private(&ca_key_pem, &key.serialize_pem())?;
        write_public(&ca_pem, &cert.pem())?;
        let _ = std::fs::remove_file(dir.join("server.json"));
        tracing::info!(dir = %dir.display(), "made covm's own certificate authority");
        key
    };
    let ca_der = CertificateDer::from_pem_file(&ca_pem).map_err(|e| anyhow::anyhow!("{e}")).context("covm's CA")?;
    let (srv_pem, srv_key_pem, srv_json) = (dir.join("server.pem"), dir.join("server.key"), dir.join("server.json"));
    let now = chrono::Utc::now();
    let issued: Option<Issued> = std::fs::read(&srv_json).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let fresh = issued
        .as_ref()
        .is_some_and(|i| i.names == names && i.not_after - now > chrono::Duration::days(RENEW_BEFORE_DAYS))
        && srv_pem.exists()
        && srv_key_pem.exists();
    if !fresh {
        let issuer = Issuer::new(ca_params(), &ca_key);
        let key = KeyPair::generate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut p = CertificateParams::new(names.to_vec()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.get(1).unwrap_or(&names[0]).as_str());
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let not_after = now + chrono::Duration::days(SERVER_CERT_DAYS);
        validity(&mut p, now - chrono::Duration::days(1), not_after);
        let cert = p.signed_by(&key, &issuer).map_err(|e| anyhow::anyhow!("{e}"))?;
        write_private(&srv_key_pem, &key.serialize_pem())?;
        write_public(&srv_pem, &cert.pem())?;
        write_public(&srv_json, &serde_json::to_string(&Issued { names: names.to_vec(), not_after })?)?;
        tracing::info!(names = ?names, "issued a server certificate from covm's own CA");
    }
    let leaf = CertificateDer::from_pem_file(&srv_pem)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("the server certificate")?;
    let key =
        PrivateKeyDer::from_pem_file(&srv_key_pem).map_err(|e| anyhow::anyhow!("{e}")).context("the server key")?;
    Ok((vec![leaf, ca_der], key))
}

fn read(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("could not read {}", p.display()))
}

/// Writes a file that only covm's user may read (mode 0600), atomically.
fn write_private(p: &Path, text: &str) -> anyhow::Result<()> {
    write_mode(p, text, 0o600)
}

fn write_public(p: &Path, text: &str) -> anyhow::Result<()> {
    write_mode(p, text, 0o644)
}

fn write_mode(p: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    crate::files::write_atomic(p, text.as_bytes(), mode).with_context(|| format!("could not write {}", p.display()))
}

/// Makes rustls's `ring` provider the process's default: reqwest is built without one, so this runs
/// before covm builds a reqwest client (forwarding to a replica, asking an identity provider).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client configuration that trusts exactly the certificates in `pem` (a replica's CA), TLS 1.2
/// or 1.3.
pub fn client_config(pem: &str) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(c.map_err(|e| anyhow::anyhow!("{e}"))?).context("a certificate that cannot be a trust anchor")?;
    }
    if roots.is_empty() {
        bail!("no certificate to trust");
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
