//! The store conformance suite: what every [`Store`] implementation must do, run on each backend.
//! Today that is SQLite; the PostgreSQL backend runs the same functions.

use std::sync::Arc;

use covm_store::*;
use covm_types::ROOT_ID;
use covm_types::api::ObjectKind;
use uuid::Uuid;

fn ev(kind: &str) -> NewEvent {
    NewEvent {
        actor: "test".into(),
        kind: kind.into(),
        object_kind: "test".into(),
        feed: true,
        data: serde_json::json!({ "k": kind }),
        ..Default::default()
    }
}

async fn folder(s: &dyn Store, name: &str, parent: Uuid) -> ObjectRecord {
    let o = NewObject {
        id: Uuid::now_v7(),
        kind: ObjectKind::Folder,
        name: name.into(),
        parent_id: parent,
        spec: serde_json::json!({}),
    };
    s.object_create(o, ev("folder.created")).await.unwrap().0
}

/// A local user record (a password hash that is no hash; no second factor, no SSO).
fn user_record(name: &str) -> UserRecord {
    UserRecord {
        id: Uuid::now_v7(),
        name: name.into(),
        password_hash: "x".into(),
        created_at: now(),
        mfa_secret: None,
        mfa_on: false,
        sso_subject: None,
        disabled: false,
    }
}

async fn user(s: &dyn Store, name: &str) -> Uuid {
    let u = user_record(name);
    let id = u.id;
    s.user_create(u, ev("user.created")).await.unwrap();
    id
}

async fn role(s: &dyn Store, name: &str, privs: &[&str]) -> Uuid {
    let id = Uuid::now_v7();
    let r =
        RoleRecord { id, name: name.into(), builtin: false, privileges: privs.iter().map(|p| p.to_string()).collect() };
    s.role_create(r, ev("role.created")).await.unwrap();
    id
}

async fn grant(s: &dyn Store, p: (PrincipalKind, Uuid), role: Uuid, obj: Uuid, propagate: bool) {
    s.permission_create(
        NewGrant { id: Uuid::now_v7(), principal: p, role, object: obj, propagate, conditions: None },
        ev("permission.granted"),
    )
    .await
    .unwrap();
}

async fn tree_paths_and_names(s: &dyn Store) {
    let a = folder(s, "a", ROOT_ID).await;
    let b = folder(s, "b", a.id).await;
    assert_eq!(b.path, "/a/b");
    assert_eq!(s.object_by_path("/a/b").await.unwrap().unwrap().id, b.id);
    // Folder names are unique within a parent only.
    folder(s, "b", ROOT_ID).await;
    let dup = NewObject {
        id: Uuid::now_v7(),
        kind: ObjectKind::Folder,
        name: "b".into(),
        parent_id: a.id,
        spec: serde_json::json!({}),
    };
    assert_eq!(s.object_create(dup, ev("x")).await.unwrap_err().code, "already_exists");
    // Other kinds are unique per kind, wherever they are.
    let pool = |parent| NewObject {
        id: Uuid::now_v7(),
        kind: ObjectKind::Pool,
        name: "p".into(),
        parent_id: parent,
        spec: serde_json::json!({}),
    };
    s.object_create(pool(a.id), ev("pool.created")).await.unwrap();
    assert_eq!(s.object_create(pool(b.id), ev("x")).await.unwrap_err().code, "already_exists");
    assert_eq!(s.object_by_name(ObjectKind::Pool, "p").await.unwrap().unwrap().path, "/a/p");
    // A folder with children is not deleted; an empty one is.
    assert_eq!(s.object_delete(a.id, ev("folder.deleted")).await.unwrap_err().code, "folder_not_empty");
    s.object_delete(b.id, ev("folder.deleted")).await.unwrap();
    assert!(s.object_get(b.id).await.unwrap().is_none());
    assert_eq!(s.object_delete(ROOT_ID, ev("x")).await.unwrap_err().code, "root_folder");
}

async fn effective_privileges(s: &dyn Store) {
    let top = folder(s, "top", ROOT_ID).await;
    let mid = folder(s, "mid", top.id).await;
    let low = folder(s, "low", mid.id).await;
    let u = user(s, "eve").await;
    let g = Uuid::now_v7();
    s.group_create(g, "eve-group", ev("group.created")).await.unwrap();
    s.group_member_add(g, u, ev("group.member_added")).await.unwrap();
    let read = role(s, "read", &["System.View", "System.Read"]).await;
    let power = role(s, "power", &["System.View", "VirtualMachine.Interact.PowerOn"]).await;
    let none = role(s, "none", &[]).await;
    let privs = async |o: Uuid| s.privileges_effective(&Viewer::user(u), o).await.unwrap();

    assert!(privs(top.id).await.is_empty(), "deny by default");
    grant(s, (PrincipalKind::Group, g), power, top.id, true).await;
    assert_eq!(privs(low.id).await, ["System.View", "VirtualMachine.Interact.PowerOn"], "propagates down");
    // The user's own grant on the same node beats the group's.
    grant(s, (PrincipalKind::User, u), read, top.id, true).await;
    assert_eq!(privs(low.id).await, ["System.Read", "System.View"]);
    // A nearer grant beats a farther one, even a group's over a user's.
    grant(s, (PrincipalKind::Group, g), none, mid.id, true).await;
    assert!(privs(low.id).await.is_empty());
    assert_eq!(privs(top.id).await, ["System.Read", "System.View"]);
    // A grant that does not propagate applies to its object only; below it the farther grant applies.
    let u2 = user(s, "fay").await;
    grant(s, (PrincipalKind::User, u2), read, top.id, true).await;
    grant(s, (PrincipalKind::User, u2), power, mid.id, false).await;
    assert_eq!(
        s.privileges_effective(&Viewer::user(u2), mid.id).await.unwrap(),
        ["System.View", "VirtualMachine.Interact.PowerOn"]
    );
    assert_eq!(s.privileges_effective(&Viewer::user(u2), low.id).await.unwrap(), ["System.Read", "System.View"]);
    // Visibility agrees, and lists are filtered by it.
    let visible = s.objects_visible(&Viewer::user(u)).await.unwrap();
    assert!(visible.contains(&top.id) && !visible.contains(&mid.id) && !visible.contains(&low.id));
    let listed: Vec<Uuid> = s
        .objects_list(ObjectKind::Folder, Some(&Viewer::user(u)), None, 100)
        .await
        .unwrap()
        .iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(listed, [top.id]);
    // Children lists include what leads to something visible.
    let u3 = user(s, "gus").await;
    grant(s, (PrincipalKind::User, u3), read, low.id, false).await;
    let kids: Vec<String> =
        s.object_children(ROOT_ID, Some(&Viewer::user(u3))).await.unwrap().into_iter().map(|o| o.path).collect();
    assert_eq!(kids, ["/top"]);
    // Deleting a user removes its grants.
    s.user_delete(u3, ev("user.deleted")).await.unwrap();
    let left = s.permissions_list(PermissionFilter { principal_id: Some(u3), ..Default::default() }).await.unwrap();
    assert!(left.is_empty());
}

async fn the_log_is_a_hash_chain(s: &dyn Store) {
    let head = s.events_head().await.unwrap();
    let a = s.event_append(ev("a.one")).await.unwrap();
    let b = s.event_append(NewEvent { feed: false, ..ev("a.two") }).await.unwrap();
    let c = s.event_append(ev("a.three")).await.unwrap();
    assert_eq!((a.seq, b.seq, c.seq), (head + 1, head + 2, head + 3));
    assert_eq!(s.events_head().await.unwrap(), c.seq);
    // The feed skips audit-only entries; the audit log has them.
    let feed: Vec<i64> = s.events_after(head, 10).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(feed, [a.seq, c.seq]);
    let audit = s
        .audit_query(AuditFilter { kind: Some("a.".into()), after: head, limit: 10, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(audit.len(), 3);
    assert_eq!(audit[1], b);
    let verify = s.audit_verify().await.unwrap();
    assert!(verify.ok);
    assert_eq!(verify.entries as i64, c.seq);
    // Numbers in an entry's data read back as written (a duration in milliseconds, say), so that the
    // chain still verifies: floats must round-trip exactly through the stored JSON text.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let floats: Vec<f64> = (0..2000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 10_000_000) as f64 / 1e4 + (x >> 40) as f64 * 1e-9
        })
        .collect();
    let f = s.event_append(NewEvent { data: serde_json::json!({ "ms": floats }), ..ev("a.floats") }).await.unwrap();
    let verify = s.audit_verify().await.unwrap();
    assert!(verify.ok && verify.entries as i64 == f.seq, "{verify:?}");
}

async fn concurrent_appends_keep_the_chain(s: Arc<dyn Store>) {
    let head = s.events_head().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..25 {
                s.event_append(ev(&format!("c.{i}.{j}"))).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.events_head().await.unwrap(), head + 200);
    let v = s.audit_verify().await.unwrap();
    assert!(v.ok && v.entries as i64 == head + 200, "{v:?}");
}

async fn first_user_once(s: &dyn Store) {
    let admin_role = role(s, "boot", &["System.View"]).await;
    let mk = || user_record("first");
    // Users exist already in this store (from earlier checks): bootstrap changes nothing.
    assert!(!s.user_bootstrap(mk(), admin_role, ev("user.created")).await.unwrap());
    assert!(s.user_by_name("first").await.unwrap().is_none());
}

fn saga(kind: &str) -> SagaRecord {
    SagaRecord {
        id: Uuid::now_v7(),
        kind: kind.into(),
        state: covm_store::SagaState::Running,
        actor: "test".into(),
        request_id: None,
        data: serde_json::json!({ "k": 1 }),
        done: vec![],
        current: None,
        error: None,
        owner: Uuid::now_v7(),
        created_at: now(),
        updated_at: now(),
    }
}

/// Operation locks: all or nothing, one saga per object, released with the saga's end; the log keeps
/// running sagas for recovery.
async fn sagas_and_locks(s: Arc<dyn Store>) {
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let first = saga("disk.attach");
    assert_eq!(s.saga_begin(first.clone(), &[a, b]).await.unwrap(), None);
    // b is held: nothing of the second saga is written, c stays free.
    let second = saga("disk.move");
    let holder = s.saga_begin(second.clone(), &[c, b]).await.unwrap().expect("b is held");
    assert_eq!((holder.object_id, holder.saga_id, holder.kind.as_str()), (b, first.id, "disk.attach"));
    assert!(s.saga_get(second.id).await.unwrap().is_none());
    assert!(s.op_lock_get(c).await.unwrap().is_none());
    // Progress is kept; the running saga is listed for recovery.
    let mut first = first;
    first.done = vec!["blockdev_add".into()];
    first.current = Some("device_add".into());
    s.saga_update(&first).await.unwrap();
    let unfinished = s.sagas_unfinished().await.unwrap();
    assert_eq!(unfinished.iter().filter(|r| r.id == first.id).count(), 1);
    assert_eq!(s.saga_get(first.id).await.unwrap().unwrap().done, ["blockdev_add"]);
    // Its end releases its locks; it is no longer listed.
    first.state = covm_store::SagaState::Done;
    s.saga_end(&first).await.unwrap();
    assert!(s.op_lock_get(a).await.unwrap().is_none());
    assert!(s.sagas_unfinished().await.unwrap().iter().all(|r| r.id != first.id));
    // Many racing for one object: exactly one holds it at a time.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.saga_begin(saga("race"), &[c]).await.unwrap().is_none() })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1);
}

pub async fn run_suite(s: Arc<dyn Store>) {
    // Bootstrap on an empty store creates the user and its grant on the root, once.
    let r = role(s.as_ref(), "admin-ish", &["System.View", "Folder.Create"]).await;
    let u = user_record("root-user");
    assert!(s.user_bootstrap(u.clone(), r, ev("user.created")).await.unwrap());
    assert_eq!(s.privileges_effective(&Viewer::user(u.id), ROOT_ID).await.unwrap(), ["Folder.Create", "System.View"]);

    tree_paths_and_names(s.as_ref()).await;
    effective_privileges(s.as_ref()).await;
    the_log_is_a_hash_chain(s.as_ref()).await;
    concurrent_appends_keep_the_chain(s.clone()).await;
    first_user_once(s.as_ref()).await;
    sagas_and_locks(s.clone()).await;
}

#[tokio::test]
async fn sqlite_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).await.unwrap());
    run_suite(s).await;
}

#[tokio::test]
async fn postgres_passes_the_conformance_suite() {
    let url = covm_store::testing::postgres_database().await.expect("PostgreSQL for tests (Debian package postgresql)");
    let s: Arc<dyn Store> = Arc::new(PgStore::connect(&url).await.unwrap());
    run_suite(s).await;
}
