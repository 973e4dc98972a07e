//! Sign-in, permissions and their propagation, bad input, tamper evidence, restart.

use covm_client::ClientError;
use covm_types::Privilege;
use covm_types::api::{
    AuditQuery, DatastoreCreate, EventQuery, ListQuery, NetworkCreate, NetworkKind, PoolCreate, Quota, TokenCreate,
};
use reqwest::Method;
use serde_json::json;

use crate::common::{PASSWORD, TestServer, name};

fn api_err(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, String, Option<String>) {
    match r {
        Err(ClientError::Api { status, error, .. }) => (status, error.code.to_string(), error.field),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn done_when_scenario_of_the_foundation() {
    let s = TestServer::start().await;
    let bob = s.user("bob").await;
    s.admin.folder_create("team-a", "/").await.unwrap();
    s.admin.permission_grant("bob", "ReadOnly", "/team-a", true).await.unwrap();

    let ls = bob.ls(None).await.unwrap();
    assert_eq!(ls.iter().map(|o| o.path.as_str()).collect::<Vec<_>>(), ["/team-a"]);

    let (status, code, _) = api_err(bob.folder_create("x", "/team-a").await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let Err(ClientError::Api { error, .. }) = bob.folder_create("x", "/team-a").await else { unreachable!() };
    assert!(error.message.contains("Folder.Create") && error.message.contains("/team-a"), "{}", error.message);

    let denials = s
        .admin
        .audit(&AuditQuery { actor: Some("bob".into()), kind: Some("authz.denied".into()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(denials.items.len(), 2);
    assert_eq!(denials.items[0].data["privilege"], "Folder.Create");
    assert_eq!(denials.items[0].data["object"], "/team-a");
    let v = s.admin.audit_verify().await.unwrap();
    assert!(v.ok && v.entries > 5, "{v:?}");
    // bob may not read the audit log.
    assert_eq!(api_err(bob.audit_verify().await).0, 403);
}

#[tokio::test]
async fn sign_in_failures_are_audited_and_rate_limited() {
    let s = TestServer::start().await;
    s.user("carol").await;
    let anon = s.anonymous();
    for _ in 0..5 {
        assert_eq!(api_err(anon.login("carol", "wrong-password").await).0, 401);
    }
    match anon.login("carol", PASSWORD).await {
        Err(ClientError::Api { status: 429, retry_after_s: Some(s), .. }) => assert!((1..=60).contains(&s)),
        other => panic!("expected 429 with Retry-After, got {other:?}"),
    }
    let failed = s
        .admin
        .audit(&AuditQuery { kind: Some("session.".into()), actor: Some("carol".into()), ..Default::default() })
        .await
        .unwrap();
    let kinds: Vec<&str> = failed.items.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "session.failed").count(), 5, "{kinds:?}");
    assert!(kinds.contains(&"session.created"), "{kinds:?}");
    // Refusals by the limit are counted in a summary, not written one by one.
    s.app().audit_anonymous_flush(true).await.unwrap();
    let q = AuditQuery { kind: Some("audit.suppressed".into()), ..Default::default() };
    let summary = s.admin.audit(&q).await.unwrap();
    assert_eq!(summary.items[0].data["by_kind"]["session.rate_limited"], 1, "{:?}", summary.items[0].data);
    // An unknown user fails like a wrong password.
    assert_eq!(api_err(anon.login("nobody", "whatever-pw").await), (401, "unauthenticated".into(), None));
}

#[tokio::test]
async fn sessions_and_api_tokens() {
    let s = TestServer::start().await;
    let dave = s.user("dave").await;
    let t = dave.token_create(&TokenCreate { name: name("ci"), expires_in_s: Some(3600) }).await.unwrap();
    let secret = t.token.clone().expect("the secret is shown once");
    let by_token = s.anonymous().with_token(secret.clone());
    assert_eq!(by_token.whoami(None).await.unwrap().user.name, "dave");
    let listed = dave.tokens().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].token.is_none(), "a listed token has no secret");
    dave.token_delete(t.id).await.unwrap();
    assert_eq!(api_err(by_token.whoami(None).await).0, 401);

    dave.logout().await.unwrap();
    assert_eq!(api_err(dave.whoami(None).await).0, 401);
    // Tokens are stored hashed: the secret is nowhere in the database.
    if s.db.is_none() {
        let db = std::fs::read(s.db_path()).unwrap();
        let wal = std::fs::read(s.db_path().with_extension("db-wal")).unwrap_or_default();
        for bytes in [db, wal] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
    }
    let q = format!("SELECT COUNT(*) FROM tokens WHERE hash = '{secret}' OR name = '{secret}' OR id = '{secret}'");
    assert_eq!(s.scalar(&q).await, 0);
    let (status, code, field) = api_err(dave.whoami(None).await);
    assert_eq!((status, code.as_str(), field), (401, "unauthenticated", None));
}

#[tokio::test]
async fn grants_propagate_only_when_asked_and_user_grants_beat_group_grants() {
    let s = TestServer::start().await;
    let bob = s.user("bob").await;
    s.admin.folder_create("a", "/").await.unwrap();
    s.admin.folder_create("b", "/a").await.unwrap();
    s.admin.folder_create("c", "/a/b").await.unwrap();

    // Not propagating: /a only.
    let g = s.admin.permission_grant("bob", "ReadOnly", "/a", false).await.unwrap();
    assert_eq!(bob.ls(Some("/a")).await.unwrap().len(), 0, "nothing below /a is visible");
    assert_eq!(api_err(bob.ls(Some("/a/b")).await).0, 404);
    // Propagating (the grant is replaced): everything below.
    s.admin.permission_grant("bob", "ReadOnly", "/a", true).await.unwrap();
    assert_eq!(bob.ls(Some("/a/b")).await.unwrap()[0].path, "/a/b/c");
    assert_eq!(
        s.admin.permissions(&Default::default()).await.unwrap().iter().filter(|p| p.principal == "bob").count(),
        1
    );
    let _ = g;

    // A group grant of Admin on the same object: the user's own ReadOnly grant wins.
    s.admin.group_create("ops").await.unwrap();
    s.admin.group_member_add("ops", "bob").await.unwrap();
    s.admin.permission_grant("group:ops", "Admin", "/a", true).await.unwrap();
    let on_b = bob.whoami(Some("/a/b")).await.unwrap();
    assert_eq!(on_b.groups, ["ops"]);
    assert_eq!(on_b.privileges, vec![Privilege::SystemView, Privilege::SystemRead]);
    assert_eq!(api_err(bob.folder_create("x", "/a/b").await).0, 403);

    // Without the user grant the group's Admin applies.
    let mine = s
        .admin
        .permissions(&covm_types::api::PermissionQuery { object: Some("/a".into()), principal: Some("bob".into()) })
        .await
        .unwrap();
    s.admin.permission_revoke(&mine[0].id.to_string()).await.unwrap();
    bob.folder_create("x", "/a/b").await.unwrap();

    // A nearer grant beats a farther one: NoAccess on /a/b/c hides it from the group's Admin on /a.
    s.admin.permission_grant("group:ops", "NoAccess", "/a/b/c", true).await.unwrap();
    let names: Vec<String> = bob.ls(Some("/a/b")).await.unwrap().into_iter().map(|o| o.path).collect();
    assert_eq!(names, ["/a/b/x"]);
    assert_eq!(api_err(bob.whoami(Some("/a/b/c")).await).0, 404);

    // Groups' grants on the same object unite.
    s.admin.group_create("power").await.unwrap();
    s.admin.group_member_add("power", "bob").await.unwrap();
    s.admin.folder_create("u", "/").await.unwrap();
    s.admin.permission_grant("group:ops", "ReadOnly", "/u", true).await.unwrap();
    s.admin.permission_grant("group:power", "VMUser", "/u", true).await.unwrap();
    let on_u = bob.whoami(Some("/u")).await.unwrap();
    assert!(
        on_u.privileges.contains(&Privilege::VmInteractPowerOn) && on_u.privileges.contains(&Privilege::SystemRead)
    );

    // Lists are filtered: bob sees the folders he may view, not /c-hidden.
    s.admin.folder_create("hidden", "/").await.unwrap();
    let folders: Vec<String> = bob.folders().await.unwrap().items.into_iter().map(|f| f.path).collect();
    assert!(!folders.contains(&"/hidden".to_string()) && !folders.contains(&"/a/b/c".to_string()), "{folders:?}");
    assert!(folders.contains(&"/a/b/x".to_string()) && folders.contains(&"/u".to_string()), "{folders:?}");
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing_but_the_audit_log() {
    let s = TestServer::start().await;
    let counts = async || (s.count("objects").await, s.count("users").await, s.count("permissions").await);
    let before = counts().await;
    let audit_len =
        async || s.admin.audit(&AuditQuery { limit: Some(1000), ..Default::default() }).await.unwrap().items.len();
    // Raw bodies on purpose: an unknown field, bad names, a missing field and an oversized body.
    let cases: Vec<(serde_json::Value, u16, &str, Option<&str>)> = vec![
        (json!({ "name": "ok", "colour": "red" }), 400, "unknown_field", Some("colour")),
        (json!({ "name": "../x" }), 400, "invalid_name", Some("name")),
        (json!({ "name": "A B" }), 400, "invalid_name", Some("name")),
        (json!({ "name": "" }), 400, "invalid_name", Some("name")),
        (json!({ "name": "x".repeat(64) }), 400, "invalid_name", Some("name")),
        (json!({ "name": "big", "parent": "x".repeat(1 << 20) }), 413, "payload_too_large", None),
        (json!({ "parent": "/" }), 400, "missing_field", Some("name")),
        (json!({ "name": "orphan", "parent": "/nope" }), 404, "not_found", Some("parent")),
    ];
    for (body, status, code, field) in cases {
        let n = audit_len().await;
        let resp = s.admin.request(Method::POST, "/folders").json(&body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{code}");
        let err: covm_types::ErrorBody = resp.json().await.unwrap();
        assert_eq!(err.error.code, code);
        assert_eq!(err.error.field.as_deref(), field, "{code}");
        assert!(!err.error.message.is_empty());
        let audit = s.admin.audit(&AuditQuery { after: None, limit: Some(1000), ..Default::default() }).await.unwrap();
        assert_eq!(audit.items.len(), n + 1, "exactly one audit entry for {code}");
        let last = audit.items.last().unwrap();
        assert_eq!(last.kind, "request.failed");
        assert_eq!(last.data["code"], code);
        assert_eq!(last.data["status"], status);
    }
    // Not JSON at all, and a JSON body that is not an object.
    let resp = s
        .admin
        .request(Method::POST, "/users")
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<covm_types::ErrorBody>().await.unwrap().error.code, "invalid_json");
    // A bad query string is a 400 with a code, not a plain-text rejection.
    let resp = s.admin.request(Method::GET, "/folders?limit=many").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<covm_types::ErrorBody>().await.unwrap().error.code, "invalid_query");
    // A weak password is refused with its field.
    assert_eq!(
        api_err(s.admin.user_create("weak", "short").await),
        (400, "weak_password".into(), Some("password".into()))
    );
    assert_eq!(counts().await, before, "nothing changed");
    assert!(s.admin.audit_verify().await.unwrap().ok);
}

#[tokio::test]
async fn a_changed_audit_row_is_found_by_verify() {
    let s = TestServer::start().await;
    s.admin.folder_create("f1", "/").await.unwrap();
    s.admin.folder_create("f2", "/").await.unwrap();
    let target = s
        .admin
        .audit(&AuditQuery { kind: Some("folder.created".into()), ..Default::default() })
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|e| e.object_name.as_deref() == Some("f1"))
        .unwrap();
    assert!(s.admin.audit_verify().await.unwrap().ok);

    // Someone with the file edits one row: the append-only trigger is theirs to drop.
    let drop = if s.db.is_some() { "DROP TRIGGER events_no_update ON events" } else { "DROP TRIGGER events_no_update" };
    s.execute(drop).await.unwrap();
    s.execute(&format!("UPDATE events SET actor = 'mallory' WHERE seq = {}", target.seq)).await.unwrap();

    let v = s.admin.audit_verify().await.unwrap();
    assert!(!v.ok);
    assert_eq!(v.broken_seq, Some(target.seq));
    assert_eq!(v.entries as i64, target.seq - 1);
}

#[tokio::test]
async fn the_log_refuses_updates_and_deletes() {
    let s = TestServer::start().await;
    let e = s.execute("UPDATE events SET actor = 'x' WHERE seq = 1").await.unwrap_err();
    assert!(e.contains("append-only"), "{e}");
    let e = s.execute("DELETE FROM events").await.unwrap_err();
    assert!(e.contains("append-only"), "{e}");
}

#[tokio::test]
async fn everything_survives_a_restart() {
    let mut s = TestServer::start().await;
    let bob = s.user("bob").await;
    s.admin.folder_create("team-a", "/").await.unwrap();
    s.admin.folder_create("sub", "/team-a").await.unwrap();
    s.admin.group_create("ops").await.unwrap();
    s.admin.group_member_add("ops", "bob").await.unwrap();
    s.admin.role_create("poweruser", &[Privilege::SystemView, Privilege::VmInteractPowerOn]).await.unwrap();
    s.admin.permission_grant("group:ops", "poweruser", "/team-a", true).await.unwrap();
    let password_file = std::fs::read_to_string(s.dir.path().join("initial-admin-password")).unwrap();
    let before = s.admin.events(&EventQuery { limit: Some(1000), ..Default::default() }).await.unwrap().items;

    s.restart().await;

    assert_eq!(std::fs::read_to_string(s.dir.path().join("initial-admin-password")).unwrap(), password_file);
    // Sessions survive (tokens are in the store).
    assert_eq!(
        bob.whoami(Some("/team-a/sub")).await.unwrap().privileges,
        vec![Privilege::SystemView, Privilege::VmInteractPowerOn]
    );
    let (admin, _) = s.anonymous().login("admin", &s.admin_password).await.unwrap();
    assert_eq!(admin.users().await.unwrap().len(), 2);
    assert_eq!(admin.groups().await.unwrap()[0].members, ["bob"]);
    let after = admin.events(&EventQuery { limit: Some(1000), ..Default::default() }).await.unwrap().items;
    assert_eq!(after[..before.len()], before[..], "the log is unchanged");
    // A restart adds no admin, no defaults twice.
    assert_eq!(admin.datastores(&ListQuery::default()).await.unwrap().items.len(), 1);
    assert!(admin.audit_verify().await.unwrap().ok);
    let v = admin.audit_verify().await.unwrap();
    assert_eq!(v.entries as usize, s.count("events").await as usize);
}

#[tokio::test]
async fn datastores_networks_pools_and_hosts() {
    let s = TestServer::start().await;
    let hosts = s.admin.hosts(&ListQuery::default()).await.unwrap();
    assert_eq!(hosts.items.len(), 1);
    assert!(hosts.items[0].cpus >= 1 && hosts.items[0].memory_mib > 0);
    let ds = s.admin.datastore("local").await.unwrap();
    assert!(ds.capacity_bytes > 0 && ds.free_bytes <= ds.capacity_bytes);
    assert!(ds.path.starts_with(s.dir.path().canonicalize().unwrap().to_str().unwrap()));

    let dir = tempfile::tempdir().unwrap();
    let datastore = |ds: &str, path: &str| DatastoreCreate { name: name(ds), path: path.into(), folder: None };
    let fast = dir.path().to_str().unwrap();
    let created = s.admin.datastore_create(&datastore("fast", fast)).await.unwrap();
    assert_eq!(created.folder, "/");
    let e = api_err(s.admin.datastore_create(&datastore("bad", "/no/such/dir")).await);
    assert_eq!((e.0, e.2.as_deref()), (400, Some("path")));
    let e = api_err(s.admin.datastore_create(&datastore("fast", fast)).await);
    assert_eq!((e.0, e.1.as_str()), (409, "already_exists"));

    let bridge = |net: &str, bridge: Option<&str>| NetworkCreate {
        name: name(net),
        kind: NetworkKind::Bridge,
        bridge: bridge.map(str::to_owned),
        folder: None,
        vlan: None,
        subnet: None,
    };
    let net = s.admin.network_create(&bridge("lan", Some("br0"))).await.unwrap();
    assert_eq!(net.bridge.as_deref(), Some("br0"));
    assert_eq!(api_err(s.admin.network_create(&bridge("x", None)).await).2.as_deref(), Some("bridge"));
    let pool = |p: &str, vcpus: u32| PoolCreate {
        name: name(p),
        quota: Quota { vcpus: Some(vcpus), ..Default::default() },
        folder: None,
    };
    let gold = s.admin.pool_create(&pool("gold", 8)).await.unwrap();
    assert_eq!(gold.quota.vcpus, Some(8));
    assert_eq!(api_err(s.admin.pool_create(&pool("zero", 0)).await).2.as_deref(), Some("quota.vcpus"));
    // A folder with something in it is not deleted.
    s.admin.folder_create("full", "/").await.unwrap();
    s.admin.folder_create("inner", "/full").await.unwrap();
    assert_eq!(api_err(s.admin.folder_delete("full").await).1, "folder_not_empty");
}
