//! Files in a datastore that are not covm's disks: ISOs, images to import, kernels. Uploaded through
//! the API (streamed, resumable in parts, checked against a SHA-256), listed, downloaded and deleted;
//! never named by a path that leads out of the datastore or into its `disks/` folder.
//!
//! An upload in parts grows a hidden file `.covm-uploads/<sha256 of the path>.part` beside its total
//! (`….total`); each part must start where the upload stands. The last part makes the file: its
//! checksum is checked, and it is linked into place only if nothing is there yet (so a file appears
//! whole or not at all). A wrong checksum deletes what was uploaded.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use covm_store::ObjectRecord;
use covm_types::api::ObjectKind;
use covm_types::disk::{FileView, UploadView};
use covm_types::{Error, ErrorCode, ErrorKind, Privilege};
use futures::{Stream, StreamExt};
use serde_json::json;
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use super::refs::{DISKS_DIR, file_refs};
use super::{App, Ctx, EventExt};

/// The hidden folder of uploads in progress, in every datastore.
pub const UPLOADS_DIR: &str = ".covm-uploads";
/// How long an upload that stopped is kept for its resumption (then [`App::uploads_reap`] deletes it).
pub const UPLOAD_KEEP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A part of an upload: bytes `start..=end` of a file of `total` bytes (`Content-Range`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadRange {
    pub start: u64,
    pub end: u64,
    pub total: u64,
}

/// What a request uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadPart {
    /// The whole file in this request (its length, when the request says it).
    Whole(Option<u64>),
    /// One part.
    Range(UploadRange),
    /// No bytes: where does the upload of a file of this size stand (`Content-Range: bytes */TOTAL`)?
    Status(u64),
}

/// The files that a request is uploading now (one request at a time per file).
#[derive(Default)]
pub struct Uploads(Mutex<HashSet<PathBuf>>);

struct UploadClaim<'a>(&'a Uploads, PathBuf);

impl Drop for UploadClaim<'_> {
    fn drop(&mut self) {
        self.0.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}

impl Uploads {
    fn claim(&self, target: &Path) -> Result<UploadClaim<'_>, Error> {
        let mut busy = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(target.to_owned()) {
            return Err(Error::conflict(ErrorCode::Busy, "another request is uploading this file now; try again"));
        }
        Ok(UploadClaim(self, target.to_owned()))
    }
}

/// A datastore-relative path of a file covm may manage: inside the datastore, not in its disk folder
/// nor its uploads.
fn file_rel(ds: &str, path: &str) -> Result<String, Error> {
    let (_, rel) = covm_types::vm::datastore_path("path", &format!("{ds}:{path}"))?;
    let first = rel.split('/').next().unwrap_or_default();
    if first == DISKS_DIR || rel.split('/').any(|c| c.starts_with(".covm")) {
        return Err(Error::new(
            ErrorKind::InvalidRequest,
            ErrorCode::ManagedDiskFile,
            format!("{path} is covm's own ({DISKS_DIR}/ holds disk images, .covm* its work); use the disk API"),
        )
        .with_field("path"));
    }
    if rel.chars().any(char::is_control) {
        return Err(Error::invalid("path", "a path may not hold control characters"));
    }
    if rel.split('/').any(|c| c.len() > 255) {
        return Err(Error::invalid("path", "a part of a path has at most 255 bytes"));
    }
    Ok(rel)
}

fn outside(path: &str, ds: &str) -> Error {
    Error::new(
        ErrorKind::InvalidRequest,
        ErrorCode::PathOutsideDatastore,
        format!("{path} is not a file inside datastore {ds}"),
    )
    .with_field("path")
}

fn io_error(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            Error::conflict(ErrorCode::InsufficientSpace, format!("the datastore is full ({what})"))
        }
        _ => Error::internal(format!("{what}: {e}")),
    }
}

/// Where the parts of an upload of `rel` grow.
fn part_files(root: &Path, rel: &str) -> (PathBuf, PathBuf) {
    let key = hex::encode(sha2::Sha256::digest(rel.as_bytes()));
    let dir = root.join(UPLOADS_DIR);
    (dir.join(format!("{key}.part")), dir.join(format!("{key}.total")))
}

async fn file_sha256(path: &Path) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

fn remove_quietly(paths: &[&Path]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

impl App {
    /// A datastore the caller sees, with `need` on it, and its directory (canonical).
    async fn datastore_dir(&self, ctx: &Ctx, ds: &str, need: Privilege) -> Result<(ObjectRecord, PathBuf), Error> {
        let obj = self.object_resolve(ctx, ds, Some(ObjectKind::Datastore), "datastore").await?;
        self.require(ctx, &obj, need).await?;
        let root = PathBuf::from(obj.spec["path"].as_str().unwrap_or_default())
            .canonicalize()
            .map_err(|_| Error::conflict(ErrorCode::DatastoreMissing, "the datastore's directory is gone"))?;
        Ok((obj, root))
    }

    /// The VMs whose config names `ds:rel`, by name.
    async fn file_users(&self, ds: &str, rel: &str) -> Result<Vec<String>, Error> {
        let reference = format!("{ds}:{rel}");
        let mut users = Vec::new();
        for vm in self.vms_all().await? {
            let Ok(c) = super::vms::parse_config(&vm.config) else { continue };
            if file_refs(&c).iter().any(|(_, r)| r.is_some_and(|r| *r == reference)) {
                users.push(vm.object.name.clone());
            }
        }
        Ok(users)
    }

    async fn file_view(&self, ds: &ObjectRecord, root: &Path, rel: &str) -> Result<FileView, Error> {
        let meta = std::fs::metadata(root.join(rel)).map_err(|_| outside(rel, &ds.name))?;
        Ok(FileView {
            datastore: ds.name.clone(),
            path: rel.to_owned(),
            size: meta.len(),
            modified: meta.modified().map(chrono::DateTime::from).unwrap_or_else(|_| chrono::Utc::now()),
            used_by: self.file_users(&ds.name, rel).await?,
        })
    }

    /// The files of a datastore (not its disks nor uploads in progress), by path (needs
    /// `Datastore.Browse`).
    pub async fn datastore_files(&self, ctx: &Ctx, ds: &str) -> Result<Vec<FileView>, Error> {
        let (obj, root) = self.datastore_dir(ctx, ds, Privilege::DatastoreBrowse).await?;
        let mut rels = Vec::new();
        let mut dirs = vec![String::new()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(root.join(&dir)) else { continue };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let rel = if dir.is_empty() { name.clone() } else { format!("{dir}/{name}") };
                if file_rel(&obj.name, &rel).is_err() {
                    continue;
                }
                match e.file_type() {
                    Ok(t) if t.is_dir() => dirs.push(rel),
                    Ok(t) if t.is_file() => rels.push(rel),
                    _ => {} // links and the rest are not offered
                }
            }
        }
        rels.sort();
        let mut out = Vec::with_capacity(rels.len());
        for rel in rels {
            out.push(self.file_view(&obj, &root, &rel).await?);
        }
        Ok(out)
    }

    /// A file to download: its path on this host and its size (needs `Datastore.Browse`).
    pub async fn datastore_file_open(&self, ctx: &Ctx, ds: &str, path: &str) -> Result<(PathBuf, u64), Error> {
        let (obj, root) = self.datastore_dir(ctx, ds, Privilege::DatastoreBrowse).await?;
        let rel = file_rel(&obj.name, path)?;
        let full = root.join(&rel).canonicalize().map_err(|_| outside(path, &obj.name))?;
        let meta = std::fs::metadata(&full).map_err(|_| outside(path, &obj.name))?;
        if !full.starts_with(&root) || !meta.is_file() {
            return Err(outside(path, &obj.name));
        }
        Ok((full, meta.len()))
    }

    /// Uploads a file, whole or a part of it (needs `Datastore.FileManagement`):
    /// the upload's state after this part, with the file once its last part arrived.
    pub async fn datastore_file_upload<S>(
        &self,
        ctx: &Ctx,
        ds: &str,
        path: &str,
        part: UploadPart,
        sha256: Option<String>,
        body: S,
    ) -> Result<UploadView, Error>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
    {
        let (obj, root) = self.datastore_dir(ctx, ds, Privilege::DatastoreFileManagement).await?;
        let rel = file_rel(&obj.name, path)?;
        let sha256 = sha256.map(|s| s.to_ascii_lowercase());
        if sha256.as_ref().is_some_and(|s| s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(Error::invalid("sha256", "sha256 is 64 hex digits"));
        }
        let target = root.join(&rel);
        if std::fs::symlink_metadata(&target).is_ok() {
            return Err(Error::conflict(ErrorCode::AlreadyExists, format!("{ds}:{rel} exists; delete it first"))
                .with_field("path"));
        }
        let _claim = self.uploads().claim(&target)?;
        let (part_file, total_file) = part_files(&root, &rel);
        std::fs::create_dir_all(root.join(UPLOADS_DIR)).map_err(io_error("make the uploads folder"))?;
        let received = std::fs::metadata(&part_file).map(|m| m.len()).unwrap_or(0);
        let stored_total: Option<u64> =
            std::fs::read_to_string(&total_file).ok().and_then(|t| t.trim().parse().ok()).filter(|_| received > 0);
        let view = |received: u64, total: u64| UploadView {
            datastore: obj.name.clone(),
            path: rel.clone(),
            received,
            total,
            complete: false,
            file: None,
        };
        // What this request must bring, and the size of the whole file (when known).
        let (start, expect, total) = match part {
            UploadPart::Status(total) => {
                return Ok(view(if stored_total == Some(total) { received } else { 0 }, total));
            }
            UploadPart::Whole(len) => (0, len, len),
            UploadPart::Range(r) => {
                if r.start > r.end || r.end >= r.total {
                    return Err(Error::invalid("Content-Range", "Content-Range is bytes START-END/TOTAL, END < TOTAL"));
                }
                let at = match stored_total {
                    Some(t) if t != r.total => {
                        return Err(Error::conflict(
                            ErrorCode::UploadOffset,
                            format!("this upload is of a file of {t} bytes, not {}", r.total),
                        )
                        .with_details(json!({ "received": received, "total": t })));
                    }
                    Some(_) => received,
                    None => 0,
                };
                if r.start != at {
                    return Err(Error::conflict(
                        ErrorCode::UploadOffset,
                        format!("this upload stands at byte {at}; the next part starts there"),
                    )
                    .with_details(json!({ "received": at, "total": r.total })));
                }
                (at, Some(r.end - r.start + 1), Some(r.total))
            }
        };
        if let Some(t) = total {
            Self::space_check(&root, t - start)?;
        }
        if let UploadPart::Whole(_) = part {
            remove_quietly(&[&part_file, &total_file]);
        }
        if let (UploadPart::Range(r), 0) = (part, start) {
            remove_quietly(&[&part_file]);
            std::fs::write(&total_file, r.total.to_string()).map_err(io_error("note the upload's size"))?;
        }
        // The bytes, appended as they come; what arrived stays when the request breaks off (the
        // client resumes from `received`).
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part_file)
            .await
            .map_err(io_error("open the upload"))?;
        let mut got: u64 = 0;
        let mut body = body;
        let mut broke = None;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    broke = Some(e);
                    break;
                }
            };
            if expect.is_some_and(|n| got + chunk.len() as u64 > n) {
                let _ = f.set_len(start + got).await;
                return Err(Error::invalid("Content-Range", "the body is longer than its Content-Range says"));
            }
            f.write_all(&chunk).await.map_err(io_error("write the upload"))?;
            got += chunk.len() as u64;
        }
        f.flush().await.map_err(io_error("write the upload"))?;
        drop(f);
        let received = start + got;
        if let Some(e) = broke {
            return Err(Error::invalid(
                "body",
                format!("the upload broke off at byte {received} ({e}); resume from there"),
            ));
        }
        if expect.is_some_and(|n| got < n) && matches!(part, UploadPart::Range(_)) {
            return Err(Error::invalid(
                "Content-Range",
                format!("the body has {got} bytes; its Content-Range says more"),
            ));
        }
        let total = total.unwrap_or(received);
        if received < total {
            return Ok(view(received, total));
        }
        // The last part: check, then link into place if the path is still free.
        let actual = match &sha256 {
            Some(_) => Some(file_sha256(&part_file).await.map_err(io_error("read the upload"))?),
            None => None,
        };
        if let (Some(want), Some(got)) = (&sha256, &actual)
            && want != got
        {
            remove_quietly(&[&part_file, &total_file]);
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                ErrorCode::ChecksumMismatch,
                format!("the uploaded file's SHA-256 is {got}, not {want}; it was deleted"),
            )
            .with_field("sha256")
            .with_details(json!({ "expected": want, "actual": got })));
        }
        let parent = target.parent().unwrap_or(&root).to_owned();
        std::fs::create_dir_all(&parent).map_err(io_error("make the file's folder"))?;
        if !parent.canonicalize().is_ok_and(|p| p.starts_with(&root)) {
            remove_quietly(&[&part_file, &total_file]);
            return Err(outside(path, &obj.name));
        }
        match std::fs::hard_link(&part_file, &target) {
            Ok(()) => remove_quietly(&[&part_file, &total_file]),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::conflict(ErrorCode::AlreadyExists, format!("{ds}:{rel} exists; delete it first"))
                    .with_field("path"));
            }
            Err(e) => return Err(io_error("put the file in place")(e)),
        }
        let ev = ctx
            .event("datastore.file.uploaded", "datastore", Some(obj.id), &obj.name)
            .data(json!({ "path": rel, "size": received, "sha256": actual }));
        self.store().event_append(ev).await?;
        self.committed();
        let file = self.file_view(&obj, &root, &rel).await?;
        Ok(UploadView { complete: true, file: Some(file), ..view(received, total) })
    }

    /// Deletes the uploads that have not grown for [`UPLOAD_KEEP`] in every datastore of this host
    /// (run once a minute by the background loop); how many.
    pub async fn uploads_reap(&self, keep: std::time::Duration) -> Result<usize, Error> {
        let mut n = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self.store().objects_list(ObjectKind::Datastore, None, after.as_deref(), 1000).await?;
            for ds in &page {
                let dir = PathBuf::from(ds.spec["path"].as_str().unwrap_or_default()).join(UPLOADS_DIR);
                let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                for e in entries.flatten() {
                    let path = e.path();
                    if path.extension().is_none_or(|x| x != "part") {
                        continue;
                    }
                    // (An upload in progress writes to its part, which is then never that old.)
                    let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                    if age.is_some_and(|a| a > keep) {
                        remove_quietly(&[&path, &path.with_extension("total")]);
                        n += 1;
                    }
                }
            }
            if page.len() < 1000 {
                return Ok(n);
            }
            after = page.last().map(|o| o.path.clone());
        }
    }

    /// Deletes a file that no VM names (needs `Datastore.FileManagement`); an upload in progress of
    /// that path is dropped too.
    pub async fn datastore_file_delete(&self, ctx: &Ctx, ds: &str, path: &str) -> Result<(), Error> {
        let (obj, root) = self.datastore_dir(ctx, ds, Privilege::DatastoreFileManagement).await?;
        let rel = file_rel(&obj.name, path)?;
        let (part_file, total_file) = part_files(&root, &rel);
        let full = root.join(&rel);
        let meta = std::fs::symlink_metadata(&full);
        if meta.is_err() && part_file.exists() {
            remove_quietly(&[&part_file, &total_file]);
            return Ok(());
        }
        if !meta.is_ok_and(|m| m.is_file()) || !full.canonicalize().is_ok_and(|p| p.starts_with(&root)) {
            return Err(Error::new(ErrorKind::NotFound, ErrorCode::NotFound, format!("there is no file {ds}:{rel}"))
                .with_field("path"));
        }
        let users = self.file_users(&obj.name, &rel).await?;
        if !users.is_empty() {
            return Err(Error::conflict(
                ErrorCode::InUse,
                format!("{ds}:{rel} is named by the VM(s) {}; change them first", users.join(", ")),
            )
            .with_details(json!({ "vms": users })));
        }
        std::fs::remove_file(&full).map_err(io_error("delete the file"))?;
        let ev = ctx.event("datastore.file.deleted", "datastore", Some(obj.id), &obj.name).data(json!({ "path": rel }));
        self.store().event_append(ev).await?;
        self.committed();
        Ok(())
    }
}
