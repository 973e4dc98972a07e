//! Conditions on grants (issue 16, ABAC): each condition allows and denies as it should, a failing
//! grant does not apply (the nearest-grant rule looks further, still deny by default), the 403 names
//! the condition, lists and the feed follow, and `tests/golden/authz_conditions.txt` holds the table
//! (regenerate with `UPDATE_GOLDEN=1 cargo test -p covm-server --test api conditions`).

use std::net::IpAddr;

use chrono::{Timelike, Utc};
use covm_client::Client;
use covm_types::conditions::GrantConditions;
use covm_types::vm::PowerAction;
use serde_json::json;

use crate::common::{PASSWORD, TestServer, vm_named};
use crate::openapi::repo_file;

/// A client of `user` whose connections come from `addr`.
async fn from(s: &TestServer, user: &str, addr: &str) -> (reqwest::Client, String) {
    covm_client::tls::install_provider();
    let c = reqwest::Client::builder().local_address(addr.parse::<IpAddr>().unwrap()).build().unwrap();
    let token = s.anonymous().login(user, PASSWORD).await.unwrap().1.token;
    (c, token)
}

/// (status of GET the VM, status of powering it on, the condition a 403 names) for `user` from `addr`.
async fn try_vm(s: &TestServer, user: &str, addr: &str, vm: &str) -> (u16, u16, String) {
    let (c, token) = from(s, user, addr).await;
    let get = c.get(format!("{}/api/v1/vms/{vm}", s.url)).bearer_auth(&token).send().await.unwrap();
    let get_status = get.status().as_u16();
    let body: serde_json::Value = get.json().await.unwrap();
    let power = c
        .post(format!("{}/api/v1/vms/{vm}/power", s.url))
        .bearer_auth(&token)
        .json(&json!({ "action": "on" }))
        .send()
        .await
        .unwrap();
    let power_status = power.status().as_u16();
    let pbody: serde_json::Value = power.json().await.unwrap();
    let named = [&body, &pbody]
        .iter()
        .find_map(|b| b["error"]["details"]["condition"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "-".into());
    if power_status == 202 {
        let task: covm_types::vm::TaskView = serde_json::from_value(pbody).unwrap();
        crate::common::task_done(&s.admin, &task).await;
        let t = s.admin.vm_power(vm, PowerAction::Off, None).await.unwrap();
        crate::common::task_done(&s.admin, &t).await;
    }
    (get_status, power_status, named)
}

fn annotated(name: &str, folder: &str, env: &str) -> covm_types::vm::VmConfig {
    covm_types::vm::VmConfig {
        folder: folder.into(),
        annotations: [("env".to_owned(), env.to_owned())].into(),
        ..vm_named(name)
    }
}

#[tokio::test]
async fn each_condition_allows_and_denies_as_the_golden_table_says() {
    let s = TestServer::start().await;
    let mut rows = Vec::new();
    let hour = Utc::now().hour();
    let now_window = format!("{:02}-{:02}", hour, (hour + 2) % 24);
    let other_window = format!("{:02}-{:02}", (hour + 3) % 24, (hour + 5) % 24);
    let cases: Vec<(&str, GrantConditions)> = vec![
        ("none", GrantConditions::default()),
        (
            "annotations env=dev",
            GrantConditions { annotations: [("env".into(), "dev".into())].into(), ..Default::default() },
        ),
        (
            "source_cidrs 127.0.0.2/32",
            GrantConditions { source_cidrs: vec!["127.0.0.2/32".into()], ..Default::default() },
        ),
        ("hours_utc now", GrantConditions { hours_utc: Some(now_window), ..Default::default() }),
        ("hours_utc later", GrantConditions { hours_utc: Some(other_window), ..Default::default() }),
        (
            "expires_at future",
            GrantConditions { expires_at: Some(Utc::now() + chrono::Duration::hours(1)), ..Default::default() },
        ),
        (
            "expires_at past",
            GrantConditions { expires_at: Some(Utc::now() - chrono::Duration::hours(1)), ..Default::default() },
        ),
    ];
    for (i, (label, c)) in cases.into_iter().enumerate() {
        // A folder per case with a dev and a prod VM; a user holding VMUser on it under the condition.
        let folder = format!("case{i}");
        s.admin.folder_create(&folder, "/").await.unwrap();
        let (dev, prod, user) = (format!("dev-{i}"), format!("prod-{i}"), format!("u{i}"));
        s.admin.vm_create(&annotated(&dev, &format!("/{folder}"), "dev")).await.unwrap();
        s.admin.vm_create(&annotated(&prod, &format!("/{folder}"), "prod")).await.unwrap();
        s.admin.user_create(&user, PASSWORD).await.unwrap();
        let g =
            s.admin.permission_grant_if(&user, "VMUser", &format!("/{folder}"), true, Some(c.clone())).await.unwrap();
        assert_eq!(g.conditions.unwrap_or_default(), c, "the grant shows its conditions");
        for (vm, addr) in [(&dev, "127.0.0.1"), (&prod, "127.0.0.1"), (&dev, "127.0.0.2")] {
            let (get, power, named) = try_vm(&s, &user, addr, vm).await;
            let vm_kind = if vm.starts_with("dev") { "dev VM" } else { "prod VM" };
            rows.push(format!("{label:<28} {vm_kind:<8} from {addr:<10} GET {get}  power {power}  condition {named}"));
        }
    }
    let table = rows.join("\n") + "\n";
    let golden = repo_file("crates/covm-server/tests/golden/authz_conditions.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &table).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_default();
    assert_eq!(table, want, "the conditions table changed; if on purpose, regenerate it (UPDATE_GOLDEN=1)");
}

#[tokio::test]
async fn a_failing_grant_does_not_apply_and_the_rule_looks_further() {
    let s = TestServer::start().await;
    s.admin.folder_create("team", "/").await.unwrap();
    s.admin.vm_create(&annotated("web", "/team", "prod")).await.unwrap();
    s.admin.vm_create(&annotated("lab", "/team", "dev")).await.unwrap();
    let carl = s.user("carl").await;
    // ReadOnly on / for everything; VMUser on /team only for dev VMs.
    s.admin.permission_grant("carl", "ReadOnly", "/", true).await.unwrap();
    let dev_only = GrantConditions { annotations: [("env".into(), "dev".into())].into(), ..Default::default() };
    s.admin.permission_grant_if("carl", "VMUser", "/team", true, Some(dev_only)).await.unwrap();
    // On web the conditional grant fails: the nearest that applies is ReadOnly on / (view, no power),
    // and the 403 names the condition.
    carl.vm("web").await.unwrap();
    let e = carl.vm_power("web", PowerAction::On, None).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let covm_client::ClientError::Api { error, .. } = &e else { panic!("{e}") };
    assert_eq!(error.details.as_ref().unwrap()["condition"], "annotations", "{e}");
    // On lab it applies.
    let t = carl.vm_power("lab", PowerAction::On, None).await.unwrap();
    crate::common::task_done(&s.admin, &t).await;
    // Annotations change: the grant follows at once (web becomes dev).
    s.admin.vm_change("web", &json!({ "annotations": { "env": "dev" } }), &Default::default()).await.unwrap();
    let t = carl.vm_power("web", PowerAction::On, None).await.unwrap();
    crate::common::task_done(&s.admin, &t).await;
    // Without the ReadOnly grant, a failing conditional grant leaves nothing: lists omit the VM.
    let dana = s.user("dana").await;
    let dev_only = GrantConditions { annotations: [("env".into(), "dev".into())].into(), ..Default::default() };
    s.admin.permission_grant_if("dana", "VMUser", "/team", true, Some(dev_only)).await.unwrap();
    s.admin.vm_change("web", &json!({ "annotations": { "env": "prod" } }), &Default::default()).await.unwrap();
    let names: Vec<String> = dana.vms(&Default::default()).await.unwrap().items.into_iter().map(|v| v.name).collect();
    assert_eq!(names, vec!["lab".to_owned()], "only what a grant that applies shows");
    let e = dana.vm("web").await.unwrap_err();
    assert_eq!(e.status(), Some(404), "hidden by an annotation condition: not told it exists: {e}");
}

#[tokio::test]
async fn bad_conditions_are_refused_with_the_field_and_expiry_ends_a_grant() {
    let s = TestServer::start().await;
    s.admin.user_create("erin", PASSWORD).await.unwrap();
    for (c, field) in [
        (json!({ "source_cidrs": ["10.0.0.0/33"] }), "conditions.source_cidrs[0]"),
        (json!({ "hours_utc": "9 to 5" }), "conditions.hours_utc"),
        (json!({ "colour": "red" }), "conditions.colour"),
    ] {
        let e = s
            .admin
            .post::<_, serde_json::Value>(
                "/permissions",
                &json!({ "principal": "erin", "role": "ReadOnly", "object": "/", "conditions": c }),
            )
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(400), "{e}");
        let covm_client::ClientError::Api { error, .. } = &e else { panic!() };
        assert!(error.field.as_deref().is_some_and(|f| f.ends_with(field.rsplit('.').next().unwrap())), "{e}");
    }
    assert!(s.admin.permissions(&Default::default()).await.unwrap().iter().all(|p| p.principal != "erin"));
    // A grant that expires in a second works until then.
    s.admin.vm_create(&vm_named("box")).await.unwrap();
    let soon = GrantConditions { expires_at: Some(Utc::now() + chrono::Duration::seconds(1)), ..Default::default() };
    s.admin.permission_grant_if("erin", "ReadOnly", "/", true, Some(soon)).await.unwrap();
    let erin: Client = s.login("erin").await;
    erin.vm("box").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let e = erin.vm("box").await.unwrap_err();
    let covm_client::ClientError::Api { error, .. } = &e else { panic!() };
    assert_eq!(error.details.as_ref().unwrap()["condition"], "expires_at", "{e}");
}

#[tokio::test]
async fn an_editor_cannot_meet_an_annotation_condition_by_editing_annotations() {
    let s = TestServer::start().await;
    s.admin.folder_create("team", "/").await.unwrap();
    s.admin.vm_create(&annotated("box", "/team", "dev")).await.unwrap();
    let erin = s.user("erin").await;
    s.admin.permission_grant("erin", "VMCreator", "/team", true).await.unwrap();
    let gold = GrantConditions { annotations: [("tier".into(), "gold".into())].into(), ..Default::default() };
    s.admin.permission_grant_if("group:gold", "Admin", "/team", true, Some(gold)).await.unwrap_err();
    s.admin.group_create("gold").await.unwrap();
    s.admin.group_member_add("gold", "erin").await.unwrap();
    let gold = GrantConditions { annotations: [("tier".into(), "gold".into())].into(), ..Default::default() };
    s.admin.permission_grant_if("group:gold", "Admin", "/team", true, Some(gold)).await.unwrap();
    // An annotation no condition names: an editor changes it.
    erin.vm_change("box", &json!({ "annotations": { "env": "dev", "note": "x" } }), &Default::default()).await.unwrap();
    // tier is named by a condition: setting it would give erin Admin on the VM; it needs Permissions.Modify.
    let e = erin
        .vm_change("box", &json!({ "annotations": { "env": "dev", "tier": "gold" } }), &Default::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(e.to_string().contains("Permissions.Modify"), "{e}");
    s.admin
        .vm_change("box", &json!({ "annotations": { "env": "dev", "tier": "gold" } }), &Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_feed_ends_when_a_grant_s_request_condition_stops_holding() {
    use futures::StreamExt;
    let s = TestServer::start().await;
    s.admin.vm_create(&vm_named("seen")).await.unwrap();
    let fay = s.user("fay").await;
    let soon = GrantConditions { expires_at: Some(Utc::now() + chrono::Duration::seconds(1)), ..Default::default() };
    s.admin.permission_grant_if("fay", "ReadOnly", "/", true, Some(soon)).await.unwrap();
    let mut feed = fay.events_follow(None, None).await.unwrap();
    // The grant expires; within the streams' 5 s re-check the feed ends (its filter was the grant's).
    let t = std::time::Instant::now();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(Ok(_)) = feed.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the feed outlived its grant");
    assert!(t.elapsed() < std::time::Duration::from_secs(8), "{:?}", t.elapsed());
}
