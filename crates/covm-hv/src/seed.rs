//! A cloud-init NoCloud seed: an ISO 9660 image labelled `cidata` that holds `meta-data`, `user-data`
//! and (optionally) `network-config`, made with `xorriso` (or `genisoimage`) from Debian. cloud-init
//! finds it by its label on any CD the guest sees.

use std::path::{Path, PathBuf};

use crate::HvError;

/// The seed's three documents, as cloud-init reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: Option<String>,
}

/// Writes the seed's files into `dir/seed/` (kept beside the image, for whoever wants to read what the
/// guest was given) and makes `dir/seed.iso` from them, replacing an older one whole.
pub async fn make_iso(dir: &Path, seed: &Seed) -> Result<PathBuf, HvError> {
    let files = dir.join("seed");
    let io = |what: &'static str| move |e: std::io::Error| HvError::Io(format!("cannot {what}: {e}"));
    if files.exists() {
        std::fs::remove_dir_all(&files).map_err(io("clear the seed's directory"))?;
    }
    std::fs::create_dir_all(&files).map_err(io("make the seed's directory"))?;
    let mut names = vec!["meta-data", "user-data"];
    std::fs::write(files.join("meta-data"), &seed.meta_data).map_err(io("write meta-data"))?;
    std::fs::write(files.join("user-data"), &seed.user_data).map_err(io("write user-data"))?;
    if let Some(n) = &seed.network_config {
        std::fs::write(files.join("network-config"), n).map_err(io("write network-config"))?;
        names.push("network-config");
    }
    let iso = dir.join("seed.iso");
    let tmp = dir.join("seed.iso.tmp");
    let _ = std::fs::remove_file(&tmp);
    let found = |t: &str| crate::qemu::which(Path::new(t)).is_some();
    let (tool, mut args): (&str, Vec<String>) = if found("xorriso") {
        ("xorriso", vec!["-as".into(), "genisoimage".into()])
    } else if found("genisoimage") {
        ("genisoimage", vec![])
    } else {
        return Err(HvError::Unavailable(
            "a cloud-init seed needs xorriso (or genisoimage); install the Debian package xorriso".into(),
        ));
    };
    args.extend(["-quiet", "-output"].map(String::from));
    args.push(tmp.display().to_string());
    args.extend(["-volid", "cidata", "-joliet", "-rock"].map(String::from));
    args.extend(names.iter().map(|n| files.join(n).display().to_string()));
    let out = tokio::process::Command::new(tool)
        .args(&args)
        .output()
        .await
        .map_err(|e| HvError::Io(format!("cannot run {tool}: {e}")))?;
    if !out.status.success() {
        return Err(HvError::Io(format!(
            "{tool} could not make the cloud-init seed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::rename(&tmp, &iso).map_err(io("put the seed in place"))?;
    Ok(iso)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_seed_is_an_iso_labelled_cidata_with_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let seed = Seed {
            meta_data: "instance-id: i-1\nlocal-hostname: h\n".into(),
            user_data: "#cloud-config\n{}\n".into(),
            network_config: Some("{\"version\": 2}\n".into()),
        };
        let iso = make_iso(dir.path(), &seed).await.unwrap();
        let bytes = std::fs::read(&iso).unwrap();
        // The primary volume descriptor (sector 16): type 1, "CD001", the volume id at offset 40.
        let pvd = &bytes[16 * 2048..17 * 2048];
        assert_eq!(&pvd[1..6], b"CD001");
        assert_eq!(std::str::from_utf8(&pvd[40..46]).unwrap(), "cidata");
        let listing =
            std::process::Command::new("xorriso").args(["-indev", iso.to_str().unwrap(), "-ls", "/"]).output().unwrap();
        let ls = String::from_utf8_lossy(&listing.stdout);
        for f in ["meta-data", "user-data", "network-config"] {
            assert!(ls.contains(f), "{f} in {ls}");
        }
        assert_eq!(std::fs::read_to_string(dir.path().join("seed/meta-data")).unwrap(), seed.meta_data);
    }
}
