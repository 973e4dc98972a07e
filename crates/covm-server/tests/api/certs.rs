//! An operator's own CA and a server certificate for localhost and 127.0.0.1 signed by it, as PEM
//! files: for the TLS tests here and the CLI's (`covm/tests/cli.rs` includes this file).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub struct OperatorCert {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// The server certificate and the CA (PEM), what `--tls-cert` takes.
    pub chain: PathBuf,
    pub key: PathBuf,
}

/// Writes `TAG-ca.pem`, `TAG.pem` and `TAG.key` in `dir`.
pub fn operator_cert(dir: &Path, tag: &str) -> OperatorCert {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("operator CA {tag}"));
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let c = OperatorCert {
        ca: dir.join(format!("{tag}-ca.pem")),
        chain: dir.join(format!("{tag}.pem")),
        key: dir.join(format!("{tag}.key")),
    };
    std::fs::write(&c.ca, ca_cert.pem()).unwrap();
    std::fs::write(&c.chain, leaf.pem() + &ca_cert.pem()).unwrap();
    std::fs::write(&c.key, key.serialize_pem()).unwrap();
    c
}
