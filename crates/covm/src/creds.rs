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
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let d = dir()?;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&d)?;
    let f = d.join("credentials.json");
    let tmp = d.join("credentials.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    out.write_all(&serde_json::to_vec_pretty(c)?)?;
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
