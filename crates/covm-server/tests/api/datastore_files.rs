//! Datastore files: uploads whole and in parts (resumable, checksummed), downloads, listings and
//! deletion; paths that lead out of the datastore, wrong checksums and wrong offsets change nothing.

use covm_types::ErrorCode;
use covm_types::api::AuditQuery;
use covm_types::disk::DiskImport;
use sha2::Digest;

use crate::common::{TestServer, vm_named};

fn sha(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Every file under the datastore's directory, relative to it (uploads in progress included).
fn tree(s: &TestServer) -> Vec<String> {
    let root = s.dir.path().join("datastores/local");
    let mut out = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            match e.file_type().unwrap().is_dir() {
                true => dirs.push(p),
                false => out.push(p.strip_prefix(&root).unwrap().display().to_string()),
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_file_uploads_in_two_parts_with_its_checksum_and_downloads_the_same() {
    let s = TestServer::start().await;
    let c = &s.admin;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let total = data.len() as u64;
    let half = 1_234_567u64;
    let hash = sha(&data);

    // Part one: 202, the server has `half` bytes; it says so when asked; nothing is a file yet.
    let v = c
        .datastore_file_put(
            "local",
            "iso/test.img",
            Some((0, half - 1, total)),
            Some(&hash),
            data[..half as usize].to_vec(),
        )
        .await
        .unwrap();
    assert_eq!((v.received, v.total, v.complete), (half, total, false));
    assert_eq!(c.datastore_file_status("local", "iso/test.img", total).await.unwrap().received, half);
    assert!(c.datastore_files("local").await.unwrap().is_empty(), "a partial upload is not a file");
    // A part that does not start where the upload stands: 409 upload_offset, saying where it does.
    let e = c
        .datastore_file_put(
            "local",
            "iso/test.img",
            Some((half + 10, total - 1, total)),
            None,
            data[half as usize + 10..].to_vec(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UploadOffset));
    assert_eq!(c.datastore_file_status("local", "iso/test.img", total).await.unwrap().received, half);
    // Part two: 201, the file, whole.
    let v = c
        .datastore_file_put(
            "local",
            "iso/test.img",
            Some((half, total - 1, total)),
            Some(&hash),
            data[half as usize..].to_vec(),
        )
        .await
        .unwrap();
    assert!(v.complete);
    let f = v.file.unwrap();
    assert_eq!((f.path.as_str(), f.size, f.used_by.len()), ("iso/test.img", total, 0));
    assert_eq!(std::fs::read(s.dir.path().join("datastores/local/iso/test.img")).unwrap(), data);
    assert_eq!(tree(&s), ["iso/test.img"], "no upload leftovers");
    let down = c.datastore_file_get("local", "iso/test.img").await.unwrap().bytes().await.unwrap();
    assert_eq!(sha(&down), hash);
    let list = c.datastore_files("local").await.unwrap();
    assert_eq!(list.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["iso/test.img"]);
    // An upload never replaces a file.
    let e = c.datastore_file_put("local", "iso/test.img", None, None, b"x".to_vec()).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AlreadyExists));
    // In the log, with its checksum.
    let a = c.audit(&AuditQuery { kind: Some("datastore.file.".into()), ..Default::default() }).await.unwrap();
    assert_eq!(a.items.len(), 1);
    assert_eq!(a.items[0].data["sha256"], hash.as_str());

    // A VM that boots from the file holds it: it cannot be deleted until the VM lets go.
    let vm = covm_types::vm::VmConfig { kernel: Some("local:iso/test.img".into()), ..vm_named("boots") };
    c.vm_create(&vm).await.unwrap();
    let e = c.datastore_file_delete("local", "iso/test.img").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InUse));
    assert!(e.to_string().contains("boots"), "{e}");
    assert_eq!(c.datastore_files("local").await.unwrap()[0].used_by, ["boots"]);
    c.vm_delete("boots").await.unwrap();
    c.datastore_file_delete("local", "iso/test.img").await.unwrap();
    assert!(tree(&s).is_empty());
}

#[tokio::test]
async fn wrong_checksums_and_paths_out_of_the_datastore_leave_nothing() {
    let s = TestServer::start().await;
    let c = &s.admin;
    let data = vec![42u8; 100_000];
    // A wrong checksum: the whole upload is deleted, also when it came in parts.
    let wrong = sha(b"something else");
    let e = c.datastore_file_put("local", "a.iso", None, Some(&wrong), data.clone()).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some(ErrorCode::ChecksumMismatch)));
    c.datastore_file_put("local", "b.iso", Some((0, 49_999, 100_000)), Some(&wrong), data[..50_000].to_vec())
        .await
        .unwrap();
    let e = c
        .datastore_file_put("local", "b.iso", Some((50_000, 99_999, 100_000)), Some(&wrong), data[50_000..].to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::ChecksumMismatch));
    assert!(tree(&s).is_empty(), "{:?}", tree(&s));
    let e = c.datastore_file_put("local", "c.iso", None, Some("nothex"), data.clone()).await.unwrap_err();
    assert_eq!(e.status(), Some(400));

    // Paths that lead out, or into covm's own folders.
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), s.dir.path().join("datastores/local/out")).unwrap();
    for bad in ["../escape.iso", "/abs.iso", "a/../../b.iso", "disks/x.qcow2", ".covm-uploads/x", "out/x.iso", "a//b"] {
        let e = c.datastore_file_put("local", bad, None, None, data.clone()).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{bad}: {e}");
    }
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none(), "nothing written through the link");
    assert_eq!(tree(&s), ["out"], "only the test's own link: {:?}", tree(&s));
    assert!(!s.dir.path().join("datastores/escape.iso").exists());
    // More than the datastore can hold is refused before a byte is written.
    let e =
        c.datastore_file_put("local", "huge.iso", Some((0, 9, u64::MAX / 2)), None, vec![0u8; 10]).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InsufficientSpace));

    // Someone who may only read the inventory may not list, read or upload.
    let bob = s.user("bob").await;
    s.admin.permission_grant("bob", "ReadOnly", "/", true).await.unwrap();
    assert_eq!(bob.datastore_files("local").await.unwrap_err().status(), Some(403));
    assert_eq!(
        bob.datastore_file_put("local", "d.iso", None, None, data.clone()).await.unwrap_err().status(),
        Some(403)
    );
    assert_eq!(tree(&s), ["out"]);
}

#[tokio::test]
async fn an_uploaded_image_becomes_a_disk() {
    let s = TestServer::start().await;
    let c = &s.admin;
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("up.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    let bytes = std::fs::read(&img).unwrap();
    // Uploaded by the client's resumable helper, in parts of 64 KiB.
    let mut seen = Vec::new();
    let v = c
        .datastore_upload("local", "images/up.qcow2", &img, 64 * 1024, Some(&sha(&bytes)), |at, _| seen.push(at))
        .await
        .unwrap();
    assert!(v.complete && seen.len() > 2 && *seen.last().unwrap() == bytes.len() as u64);
    let d = c
        .disk_import(
            "up",
            &DiskImport { datastore: "local".into(), path: "images/up.qcow2".into(), folder: None, pool: None },
        )
        .await
        .unwrap();
    assert_eq!(d.capacity_bytes, 16 << 20);
}

#[tokio::test]
async fn an_upload_that_stopped_a_day_ago_is_deleted() {
    let s = TestServer::start().await;
    let c = &s.admin;
    c.datastore_file_put("local", "old.iso", Some((0, 9, 100)), None, vec![1u8; 10]).await.unwrap();
    c.datastore_file_put("local", "new.iso", Some((0, 9, 100)), None, vec![1u8; 10]).await.unwrap();
    let keep = std::time::Duration::from_secs(3600);
    assert_eq!(s.app().uploads_reap(keep).await.unwrap(), 0, "both grew just now");
    // old.iso's part last grew two hours ago.
    let root = s.dir.path().join("datastores/local");
    // Which part is whose is the server's business: age both, then grow new.iso again.
    for p in tree(&s).into_iter().filter(|p| p.ends_with(".part")) {
        let st = std::process::Command::new("touch").args(["-d", "2 hours ago"]).arg(root.join(p)).status().unwrap();
        assert!(st.success());
    }
    c.datastore_file_put("local", "new.iso", Some((10, 19, 100)), None, vec![1u8; 10]).await.unwrap();
    assert_eq!(s.app().uploads_reap(keep).await.unwrap(), 1);
    assert_eq!(c.datastore_file_status("local", "old.iso", 100).await.unwrap().received, 0, "old.iso starts again");
    assert_eq!(c.datastore_file_status("local", "new.iso", 100).await.unwrap().received, 20, "new.iso resumes");
}
