//! Where the CLI keeps its sign-in: `credentials.json` in the user's config dir (`COVM_CONFIG_DIR`
//! overrides it), mode 0600. `COVM_TOKEN` and `COVM_URL` override what is stored.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub url: String,
    pub user: String,
    pub token: String,
}

pub fn dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("COVM_CONFIG_DIR") {
        return Ok(PathBuf::from(d));
    }
    Ok(dirs::config_dir().context("no config directory for this user (set COVM_CONFIG_DIR)")?.join("covm"))
}

fn file() -> anyhow::Result<PathBuf> {
    Ok(dir()?.join("credentials.json"))
}

pub fn load() -> anyhow::Result<Option<Credentials>> {
    let f = file()?;
    match std::fs::read(&f) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("{} is not readable; sign in again", f.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("could not read {}", f.display())),
    }
}

pub fn save(c: &Credentials) -> anyhow::Result<PathBuf> {
    write_private("credentials.json", &serde_json::to_vec_pretty(c)?)
}

/// Writes `name` in the config dir (made mode 0700) atomically, mode 0600.
fn write_private(name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let d = dir()?;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&d)?;
    let f = d.join(name);
    let tmp = d.join(format!("{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    out.write_all(bytes)?;
    out.sync_all()?;
    std::fs::rename(&tmp, &f)?;
    Ok(f)
}

pub fn remove() -> anyhow::Result<()> {
    match std::fs::remove_file(file()?) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// The certificate authorities the user trusted, per server (`known_servers.json` beside the
/// credentials, like ssh's known hosts): the server's origin (`https://host:port`) → the CA's PEM.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct KnownServers {
    #[serde(flatten)]
    pub servers: std::collections::BTreeMap<String, KnownServer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KnownServer {
    pub fingerprint: String,
    pub ca_pem: String,
}

pub fn known_file() -> anyhow::Result<PathBuf> {
    Ok(dir()?.join("known_servers.json"))
}

/// `https://host:port` of a URL (the key in `known_servers.json`).
pub fn origin(url: &str) -> anyhow::Result<String> {
    let u = reqwest::Url::parse(url).with_context(|| format!("{url} is not a URL"))?;
    let host = u.host_str().with_context(|| format!("{url} names no host"))?;
    Ok(format!("{}://{}:{}", u.scheme(), host, u.port_or_known_default().unwrap_or(443)))
}

pub fn known_load() -> anyhow::Result<KnownServers> {
    let f = known_file()?;
    match std::fs::read(&f) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is not readable", f.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KnownServers::default()),
        Err(e) => Err(e).with_context(|| format!("could not read {}", f.display())),
    }
}

pub fn known_save(k: &KnownServers) -> anyhow::Result<PathBuf> {
    write_private("known_servers.json", &serde_json::to_vec_pretty(k)?)
}
