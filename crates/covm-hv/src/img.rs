//! Disk images through `qemu-img` (`create`, `resize`, `convert`, `info --output=json`). Paths are
//! chosen by the caller (covm names image files itself; users never give one).

use std::path::Path;

use serde::Deserialize;
use tokio::process::Command;

use crate::HvError;

pub const QEMU_IMG: &str = "qemu-img";

/// What `qemu-img info` says of an image.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct ImageInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    #[serde(rename = "backing-filename", default, skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Format details (for qcow2, `data.data-file` names an external data file).
    #[serde(rename = "format-specific", default, skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<serde_json::Value>,
    /// The internal snapshots the image holds (qcow2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<ImageSnapshot>,
}

/// One internal snapshot of an image.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct ImageSnapshot {
    pub name: String,
}

impl ImageInfo {
    /// Another file the image would make QEMU open: a backing file or a qcow2 external data file.
    pub fn external_file(&self) -> Option<String> {
        self.backing_filename
            .clone()
            .or_else(|| self.format_specific.as_ref()?["data"]["data-file"].as_str().map(str::to_owned))
    }
}

async fn run(args: &[&str]) -> Result<String, HvError> {
    let out = Command::new(QEMU_IMG).args(args).output().await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            HvError::Unavailable("qemu-img is not installed; install the Debian package qemu-utils".into())
        } else {
            HvError::os("run qemu-img")(e)
        }
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(HvError::Io(format!("qemu-img {} failed: {err}", args.first().unwrap_or(&""))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Creates an image of `format` (`qcow2` or `raw`) and `size` bytes; fails if the file exists.
pub async fn create(path: &Path, format: &str, size: u64) -> Result<(), HvError> {
    if path.exists() {
        return Err(HvError::Io(format!("{} exists already", path.display())));
    }
    run(&["create", "-q", "-f", format, &s(path), &size.to_string()]).await.map(|_| ())
}

/// Grows an image to `size` bytes (never shrinks).
pub async fn resize(path: &Path, format: &str, size: u64) -> Result<(), HvError> {
    run(&["resize", "-q", "-f", format, &s(path), &size.to_string()]).await.map(|_| ())
}

/// Puts an image that a failed operation grew back to `size` bytes (`--shrink`). Only for an image
/// no guest has seen at its new size: the undo of a grow.
pub async fn shrink_back(path: &Path, format: &str, size: u64) -> Result<(), HvError> {
    run(&["resize", "-q", "--shrink", "-f", format, &s(path), &size.to_string()]).await.map(|_| ())
}

/// The tags of an image's internal snapshots.
pub async fn snapshot_tags(path: &Path) -> Result<Vec<String>, HvError> {
    Ok(info(path).await?.snapshots.into_iter().map(|s| s.name).collect())
}

/// Takes an internal snapshot `tag` of an image no process holds (qcow2 only). A tag already there is
/// kept: a retry or a recovery may call it again.
pub async fn snapshot_create(path: &Path, tag: &str) -> Result<(), HvError> {
    if snapshot_tags(path).await?.iter().any(|t| t == tag) {
        return Ok(());
    }
    run(&["snapshot", "-q", "-f", "qcow2", "-c", tag, &s(path)]).await.map(|_| ())
}

/// Puts an image back to its internal snapshot `tag` (the data after it is lost).
pub async fn snapshot_apply(path: &Path, tag: &str) -> Result<(), HvError> {
    run(&["snapshot", "-q", "-f", "qcow2", "-a", tag, &s(path)]).await.map(|_| ())
}

/// Deletes an internal snapshot; one that is not there is already deleted.
pub async fn snapshot_delete(path: &Path, tag: &str) -> Result<(), HvError> {
    if !path.exists() || !snapshot_tags(path).await?.iter().any(|t| t == tag) {
        return Ok(());
    }
    run(&["snapshot", "-q", "-f", "qcow2", "-d", tag, &s(path)]).await.map(|_| ())
}

/// Copies an image into a new file of `format`.
pub async fn convert(src: &Path, src_format: &str, dst: &Path, format: &str) -> Result<(), HvError> {
    if dst.exists() {
        return Err(HvError::Io(format!("{} exists already", dst.display())));
    }
    run(&["convert", "-q", "-f", src_format, "-O", format, &s(src), &s(dst)]).await.map(|_| ())
}

pub async fn info(path: &Path) -> Result<ImageInfo, HvError> {
    let out = run(&["info", "--output=json", "-U", &s(path)]).await?;
    serde_json::from_str(&out).map_err(|e| HvError::Io(format!("qemu-img info: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn internal_snapshots_are_taken_applied_and_deleted_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.qcow2");
        create(&f, "qcow2", 1 << 20).await.unwrap();
        snapshot_create(&f, "covm-a").await.unwrap();
        snapshot_create(&f, "covm-a").await.unwrap();
        assert_eq!(snapshot_tags(&f).await.unwrap(), ["covm-a"]);
        snapshot_apply(&f, "covm-a").await.unwrap();
        snapshot_delete(&f, "covm-a").await.unwrap();
        snapshot_delete(&f, "covm-a").await.unwrap();
        assert!(snapshot_tags(&f).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn create_resize_convert_info() {
        if std::process::Command::new(QEMU_IMG).arg("--version").output().is_err() {
            panic!("qemu-img is needed (Debian package qemu-utils)");
        }
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        create(&a, "qcow2", 64 << 20).await.unwrap();
        assert!(create(&a, "qcow2", 1 << 20).await.is_err(), "no overwrite");
        let i = info(&a).await.unwrap();
        assert_eq!((i.format.as_str(), i.virtual_size), ("qcow2", 64 << 20));
        resize(&a, "qcow2", 128 << 20).await.unwrap();
        assert_eq!(info(&a).await.unwrap().virtual_size, 128 << 20);
        let b = dir.path().join("b.raw");
        convert(&a, "qcow2", &b, "raw").await.unwrap();
        let i = info(&b).await.unwrap();
        assert_eq!((i.format.as_str(), i.virtual_size), ("raw", 128 << 20));
    }
}
