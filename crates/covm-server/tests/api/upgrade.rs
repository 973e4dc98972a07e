//! Upgrades lose nothing: a data directory written by an earlier covm (one fixture per released
//! schema, made by `scripts/make-upgrade-fixture REV NAME` and checked in under
//! `tests/fixtures/upgrade/NAME`) is opened by this covm; the migrations run, everything is there,
//! the audit chain verifies, and what is new works on the old data.

use covm_types::api::AuditQuery;
use covm_types::disk::{DiskAttach, DiskView};

use crate::common::{TestServer, on_postgres};
use crate::openapi::repo_file;

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test]
async fn data_dirs_of_earlier_releases_open_with_everything_in_them() {
    if on_postgres() {
        return; // the fixtures are SQLite data directories
    }
    let root = repo_file("crates/covm-server/tests/fixtures/upgrade");
    let mut fixtures: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.path()).collect();
    fixtures.sort();
    assert!(!fixtures.is_empty(), "no upgrade fixture under {}", root.display());
    for fixture in fixtures {
        let name = fixture.file_name().unwrap().to_string_lossy().into_owned();
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&fixture, dir.path());
        let s = TestServer::start_at(dir, covm_server::Driver::Sim, None).await;
        let c = &s.admin;
        let users: Vec<String> = c.users().await.unwrap().into_iter().map(|u| u.name).collect();
        for u in ["admin", "carol", "dave"] {
            assert!(users.iter().any(|x| x == u), "{name}: user {u} is gone: {users:?}");
        }
        assert!(c.groups().await.unwrap().iter().any(|g| g.name == "ops"), "{name}: group ops");
        let grants = c.permissions(&Default::default()).await.unwrap();
        assert!(grants.iter().any(|g| g.principal == "carol" && g.role == "VMCreator"), "{name}: {grants:?}");
        let web = c.vm("web-1").await.unwrap();
        assert_eq!((web.version, web.config.cpus, web.config.description.as_str()), (4, 2, "the web server"), "{name}");
        assert_eq!(c.vm_versions("web-1", &Default::default()).await.unwrap().items.len(), 4, "{name}");
        // The old lease (an hour long) has expired by the time the test runs; the lease table works on
        // the old data: a lease can be taken.
        let lease = c.lease_acquire("web-1", 60).await.unwrap();
        assert!(lease.token.unwrap_or(0) >= 1, "{name}: {lease:?}");
        assert_eq!(web.config.disks.len(), 1, "{name}");
        c.vm("db-1").await.unwrap();
        // Snapshots, from the schema that has them.
        if name.as_str() >= "schema-0008" {
            let snaps = c.snapshots("web-1").await.unwrap();
            assert_eq!(snaps.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), ["s-1"], "{name}");
            assert!(!snaps[0].pinned && snaps[0].disks.len() == 1, "{name}: {snaps:?}");
        }
        // A conditional grant and an encrypted disk, from the schema that has them.
        if name.as_str() >= "schema-0009" {
            let dave = grants.iter().find(|g| g.principal == "dave").expect("dave's grant");
            assert_eq!(dave.conditions.as_ref().unwrap().source_cidrs, ["127.0.0.0/8"], "{name}");
            let sec = c.disk("secret-1").await.unwrap();
            assert_eq!(sec.encryption, Some(covm_types::disk::DiskEncryption::Luks), "{name}");
            // Its key opens with the data directory's master key (a rotation unwraps and rewraps it; the
            // fixture keeps records, not images).
            assert_eq!(c.keys_rotate().await.unwrap().disks, 1, "{name}");
        }
        // The disks and their attachments (the attachment index is filled by the migration).
        let d1: DiskView = c.disk("data-1").await.unwrap();
        assert_eq!(d1.attachments.iter().map(|a| a.vm.as_str()).collect::<Vec<_>>(), ["web-1"], "{name}");
        let attach = |disk: &str| DiskAttach {
            disk: disk.into(),
            controller: None,
            unit: None,
            read_only: false,
            next_boot: false,
        };
        let e = c.vm_disk_attach("db-1", &attach("data-1")).await.expect_err("one writer");
        assert_eq!(e.code(), Some(covm_types::ErrorCode::DiskInUse), "{name}");
        c.vm_disk_attach("db-1", &attach("data-2")).await.unwrap();
        // The audit log: what was there, and a chain that verifies across the upgrade.
        let kinds: Vec<String> = c
            .audit(&AuditQuery { limit: Some(1000), ..Default::default() })
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| e.kind)
            .collect();
        for k in ["session.failed", "authz.denied", "vm.created", "vm.lease.acquired"] {
            assert!(kinds.iter().any(|x| x == k), "{name}: no {k} in the audit log: {kinds:?}");
        }
        let v = c.audit_verify().await.unwrap();
        assert!(v.ok && v.entries > 20, "{name}: {v:?}");
        s.stop().await;
    }
}
