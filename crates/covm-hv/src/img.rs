//! Disk images through `qemu-img` (`create`, `resize`, `convert`, `info --output=json`). Paths are
//! chosen by the caller (covm names image files itself; users never give one).

use std::path::Path;

use std::process::Stdio;

use serde::Deserialize;
use tokio::process::Command;

use crate::HvError;
use crate::secret::{DiskKey, PROCESS_KEY_ID, ProcessKey};

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
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    run_keyed(args, None).await
}

/// Runs qemu-img; with `process` its key is written to qemu-img's standard input (read there as the
/// `covm-master` secret, which the disk passphrases on the command line are encrypted with).
async fn run_keyed(args: Vec<String>, process: Option<&ProcessKey>) -> Result<String, HvError> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = Command::new(QEMU_IMG);
    cmd.args(&args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for v in crate::secret::SECRET_ENV {
        cmd.env_remove(v);
    }
    cmd.stdin(if process.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            HvError::Unavailable("qemu-img is not installed; install the Debian package qemu-utils".into())
        } else {
            HvError::os("run qemu-img")(e)
        }
    })?;
    if let (Some(k), Some(mut stdin)) = (process, child.stdin.take()) {
        stdin.write_all(k.base64().as_bytes()).await.map_err(HvError::os("give qemu-img its key"))?;
        drop(stdin);
    }
    let out = child.wait_with_output().await.map_err(HvError::os("run qemu-img"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(HvError::Io(format!("qemu-img {} failed: {err}", args.first().map_or("", String::as_str))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// LUKS in qcow2 as covm makes it: AES-256-XTS. The passphrase is 256 random bits, not a person's
/// password, so PBKDF2 has nothing to slow down: 10 ms of iterations instead of QEMU's 2 s, which every
/// open of the image (each start of its VM, each qemu-img) would otherwise pay.
const LUKS_OPTS: &str = "encrypt.format=luks,encrypt.key-secret={id},encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts,encrypt.iter-time=10";

/// What qemu-img needs to open an image: `-f FORMAT PATH`, or for an encrypted one (with the secret
/// objects) `--image-opts driver=…,file.filename=…,encrypt.key-secret=…`.
struct Opened {
    objects: Vec<String>,
    image: Vec<String>,
}

fn open_args(path: &Path, format: &str, key: Option<&DiskKey>, id: &str, process: &ProcessKey) -> Opened {
    match key {
        None => Opened { objects: vec![], image: vec!["-f".into(), format.into(), s(path)] },
        Some(k) => Opened {
            objects: vec!["--object".into(), process.object_arg(id, k)],
            image: vec![
                "--image-opts".into(),
                format!("driver={format},file.filename={},encrypt.key-secret={id}", crate::qemu::opt_escape(&s(path))),
            ],
        },
    }
}

fn process_object() -> Vec<String> {
    vec!["--object".into(), format!("secret,id={PROCESS_KEY_ID},file=/dev/stdin,format=base64")]
}

/// Runs `qemu-img SUB [flags] <image> [rest]` on one image, encrypted or not.
async fn on_image(
    sub: &str,
    flags: &[&str],
    path: &Path,
    format: &str,
    key: Option<&DiskKey>,
    rest: &[String],
) -> Result<String, HvError> {
    let process = ProcessKey::random();
    let o = open_args(path, format, key, "covm-disk", &process);
    let mut args = vec![sub.to_owned()];
    if key.is_some() {
        args.extend(process_object());
    }
    args.extend(o.objects);
    args.extend(flags.iter().map(|f| (*f).to_owned()));
    args.extend(o.image);
    args.extend(rest.iter().cloned());
    run_keyed(args, key.map(|_| &process)).await
}

/// Creates an image of `format` (`qcow2` or `raw`) and `size` bytes; fails if the file exists. With
/// `key`, a qcow2 with LUKS encryption (AES-256-XTS) unlocked by that passphrase.
pub async fn create(path: &Path, format: &str, size: u64, key: Option<&DiskKey>) -> Result<(), HvError> {
    if path.exists() {
        return Err(HvError::Io(format!("{} exists already", path.display())));
    }
    let Some(k) = key else {
        return run(&["create", "-q", "-f", format, &s(path), &size.to_string()]).await.map(|_| ());
    };
    let process = ProcessKey::random();
    let mut args = vec!["create".to_owned(), "-q".into(), "-f".into(), format.into()];
    args.extend(process_object());
    args.extend(["--object".into(), process.object_arg("covm-disk", k)]);
    args.extend(["-o".into(), LUKS_OPTS.replace("{id}", "covm-disk"), s(path), size.to_string()]);
    run_keyed(args, Some(&process)).await.map(|_| ())
}

/// Grows an image to `size` bytes (never shrinks).
/// A qcow2 overlay on `backing` (a linked clone's disk): reads what it has not written from the backing
/// image, which must then never change. `backing` is named relative to the overlay's directory when
/// both are in the same one, so that a datastore can move.
pub async fn create_overlay(path: &Path, backing: &Path, backing_format: &str) -> Result<(), HvError> {
    if path.exists() {
        return Err(HvError::Io(format!("{} exists already", path.display())));
    }
    let name = match (backing.parent(), path.parent(), backing.file_name()) {
        (Some(a), Some(b), Some(f)) if a == b => f.to_string_lossy().into_owned(),
        _ => s(backing),
    };
    run(&["create", "-q", "-f", "qcow2", "-b", &name, "-F", backing_format, &s(path)]).await.map(|_| ())
}

pub async fn resize(path: &Path, format: &str, size: u64, key: Option<&DiskKey>) -> Result<(), HvError> {
    on_image("resize", &["-q"], path, format, key, &[size.to_string()]).await.map(|_| ())
}

/// Puts an image that a failed operation grew back to `size` bytes (`--shrink`). Only for an image
/// no guest has seen at its new size: the undo of a grow.
pub async fn shrink_back(path: &Path, format: &str, size: u64, key: Option<&DiskKey>) -> Result<(), HvError> {
    on_image("resize", &["-q", "--shrink"], path, format, key, &[size.to_string()]).await.map(|_| ())
}

/// The tags of an image's internal snapshots.
pub async fn snapshot_tags(path: &Path) -> Result<Vec<String>, HvError> {
    Ok(info(path).await?.snapshots.into_iter().map(|s| s.name).collect())
}

/// Takes an internal snapshot `tag` of an image no process holds (qcow2 only). A tag already there is
/// kept: a retry or a recovery may call it again.
pub async fn snapshot_create(path: &Path, tag: &str, key: Option<&DiskKey>) -> Result<(), HvError> {
    if snapshot_tags(path).await?.iter().any(|t| t == tag) {
        return Ok(());
    }
    on_image("snapshot", &["-q", "-c", tag], path, "qcow2", key, &[]).await.map(|_| ())
}

/// Puts an image back to its internal snapshot `tag` (the data after it is lost).
pub async fn snapshot_apply(path: &Path, tag: &str, key: Option<&DiskKey>) -> Result<(), HvError> {
    on_image("snapshot", &["-q", "-a", tag], path, "qcow2", key, &[]).await.map(|_| ())
}

/// Deletes an internal snapshot; one that is not there is already deleted.
pub async fn snapshot_delete(path: &Path, tag: &str, key: Option<&DiskKey>) -> Result<(), HvError> {
    if !path.exists() || !snapshot_tags(path).await?.iter().any(|t| t == tag) {
        return Ok(());
    }
    on_image("snapshot", &["-q", "-d", tag], path, "qcow2", key, &[]).await.map(|_| ())
}

/// Copies an image into a new file of `format`; an encrypted source is read with `src_key`, and with
/// `dst_key` the copy is encrypted (LUKS) with that passphrase.
pub async fn convert(
    src: &Path,
    src_format: &str,
    src_key: Option<&DiskKey>,
    dst: &Path,
    format: &str,
    dst_key: Option<&DiskKey>,
) -> Result<(), HvError> {
    if dst.exists() {
        return Err(HvError::Io(format!("{} exists already", dst.display())));
    }
    let process = ProcessKey::random();
    let keyed = src_key.is_some() || dst_key.is_some();
    let o = open_args(src, src_format, src_key, "covm-src", &process);
    let mut args = vec!["convert".to_owned(), "-q".into()];
    if keyed {
        args.extend(process_object());
    }
    args.extend(o.objects);
    if let Some(k) = dst_key {
        args.extend(["--object".into(), process.object_arg("covm-dst", k)]);
    }
    args.extend(o.image);
    args.extend(["-O".into(), format.into()]);
    if dst_key.is_some() {
        args.extend(["-o".into(), LUKS_OPTS.replace("{id}", "covm-dst")]);
    }
    args.push(s(dst));
    run_keyed(args, keyed.then_some(&process)).await.map(|_| ())
}

/// Whether an image is encrypted (LUKS in qcow2).
pub fn encrypted(info: &ImageInfo) -> bool {
    info.format_specific.as_ref().is_some_and(|f| f["data"]["encrypt"]["format"] == "luks")
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
        create(&f, "qcow2", 1 << 20, None).await.unwrap();
        snapshot_create(&f, "covm-a", None).await.unwrap();
        snapshot_create(&f, "covm-a", None).await.unwrap();
        assert_eq!(snapshot_tags(&f).await.unwrap(), ["covm-a"]);
        snapshot_apply(&f, "covm-a", None).await.unwrap();
        snapshot_delete(&f, "covm-a", None).await.unwrap();
        snapshot_delete(&f, "covm-a", None).await.unwrap();
        assert!(snapshot_tags(&f).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn create_resize_convert_info() {
        if std::process::Command::new(QEMU_IMG).arg("--version").output().is_err() {
            panic!("qemu-img is needed (Debian package qemu-utils)");
        }
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        create(&a, "qcow2", 64 << 20, None).await.unwrap();
        assert!(create(&a, "qcow2", 1 << 20, None).await.is_err(), "no overwrite");
        let i = info(&a).await.unwrap();
        assert_eq!((i.format.as_str(), i.virtual_size), ("qcow2", 64 << 20));
        resize(&a, "qcow2", 128 << 20, None).await.unwrap();
        assert_eq!(info(&a).await.unwrap().virtual_size, 128 << 20);
        let b = dir.path().join("b.raw");
        convert(&a, "qcow2", None, &b, "raw", None).await.unwrap();
        let i = info(&b).await.unwrap();
        assert_eq!((i.format.as_str(), i.virtual_size), ("raw", 128 << 20));
    }

    /// Writes `byte` over the first MiB of an encrypted image through qemu-io (its passphrase given as
    /// qemu-img takes it), or reads it back: whether it reads as `byte`.
    fn qemu_io(path: &Path, key: &DiskKey, op: &str, byte: u8) -> bool {
        use std::io::Write;
        let process = ProcessKey::random();
        let mut child = std::process::Command::new("qemu-io")
            .args(["--object", &format!("secret,id={PROCESS_KEY_ID},file=/dev/stdin,format=base64")])
            .args(["--object", &process.object_arg("k", key)])
            .args(["--image-opts", &format!("driver=qcow2,file.filename={},encrypt.key-secret=k", path.display())])
            .args(["-c", &format!("{op} -P {byte} 0 1M")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(process.base64().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed")
    }

    #[tokio::test]
    async fn encrypted_images_are_luks_and_every_operation_takes_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
        let (ka, kb) = (DiskKey::random(), DiskKey::random());
        create(&a, "qcow2", 4 << 20, Some(&ka)).await.unwrap();
        let i = info(&a).await.unwrap();
        assert!(encrypted(&i), "{i:?}");
        assert_eq!(i.format_specific.as_ref().unwrap()["data"]["encrypt"]["cipher-mode"], "xts");
        assert!(qemu_io(&a, &ka, "write", 0x5a));
        assert!(qemu_io(&a, &ka, "read", 0x5a));
        assert!(!qemu_io(&a, &kb, "read", 0x5a), "another key opens nothing");
        // The marker is not in the file in clear.
        let raw = std::fs::read(&a).unwrap();
        assert!(!raw.windows(4096).any(|w| w.iter().all(|&x| x == 0x5a)));
        snapshot_create(&a, "covm-s", Some(&ka)).await.unwrap();
        assert!(qemu_io(&a, &ka, "write", 0x11));
        snapshot_apply(&a, "covm-s", Some(&ka)).await.unwrap();
        assert!(qemu_io(&a, &ka, "read", 0x5a), "the snapshot put the data back");
        snapshot_delete(&a, "covm-s", Some(&ka)).await.unwrap();
        resize(&a, "qcow2", 8 << 20, Some(&ka)).await.unwrap();
        assert_eq!(info(&a).await.unwrap().virtual_size, 8 << 20);
        // A copy under another key reads the same.
        convert(&a, "qcow2", Some(&ka), &b, "qcow2", Some(&kb)).await.unwrap();
        assert!(encrypted(&info(&b).await.unwrap()));
        assert!(qemu_io(&b, &kb, "read", 0x5a));
        assert!(!qemu_io(&b, &ka, "read", 0x5a));
        // Without its key nothing opens.
        assert!(resize(&a, "qcow2", 16 << 20, None).await.is_err());
    }
}
