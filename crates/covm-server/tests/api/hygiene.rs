//! The small things a careful client and a hostile one both notice: strict bodies and query strings,
//! every error in the JSON envelope, headers that keep answers out of caches, 404s that name nothing
//! hidden.

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::TestServer;

async fn raw(
    s: &TestServer,
    method: Method,
    path: &str,
    ct: Option<&str>,
    body: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut rb = s.admin.request(method, path).body(body.to_owned());
    if let Some(ct) = ct {
        rb = rb.header("content-type", ct);
    }
    let resp = rb.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let text = resp.text().await.unwrap();
    (status, headers, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test]
async fn bodies_are_one_json_object_sent_as_json() {
    let s = TestServer::start().await;
    let cases = [
        (Some("application/json"), r#"{"name":"a"} trailing"#, 400, "invalid_json"),
        (Some("application/json"), r#"{"name":"a"}{"name":"b"}"#, 400, "invalid_json"),
        (Some("application/json"), r#"["a"]"#, 400, "invalid_json"),
        (None, r#"{"name":"a"}"#, 415, "unsupported_media_type"),
        (Some("text/plain"), r#"{"name":"a"}"#, 415, "unsupported_media_type"),
    ];
    for (ct, body, status, code) in cases {
        let (st, _, b) = raw(&s, Method::POST, "/folders", ct, body).await;
        assert_eq!((st, b["error"]["code"].as_str()), (status, Some(code)), "{ct:?} {body}: {b}");
    }
    assert!(s.admin.folders().await.unwrap().items.is_empty(), "nothing was created");
    let (st, _, _) =
        raw(&s, Method::POST, "/folders", Some("application/json; charset=utf-8"), r#"{"name":"a"}"#).await;
    assert_eq!(st, 201);
}

#[tokio::test]
async fn unknown_query_parameters_are_refused() {
    let s = TestServer::start().await;
    let (st, _, b) = raw(&s, Method::GET, "/vms?limt=5", None, "").await;
    assert_eq!(
        (st, b["error"]["code"].as_str(), b["error"]["field"].as_str()),
        (400, Some("unknown_query_parameter"), Some("limt"))
    );
    let (st, _, _) = raw(&s, Method::GET, "/vms?limit=5", None, "").await;
    assert_eq!(st, 200);
    let (st, _, b) = raw(&s, Method::GET, "/folders?x=1", None, "").await;
    assert_eq!(st, 400, "{b}");
}

#[tokio::test]
async fn every_error_is_the_json_envelope_and_answers_are_not_cached() {
    let s = TestServer::start().await;
    s.admin.vm_create(&json!({ "name": "v" })).await.unwrap();
    // A path that is not UTF-8, a console without Upgrade, a method the path does not take.
    for (method, path) in [(Method::GET, "/vms/%FF%FE"), (Method::GET, "/vms/v/console/vnc"), (Method::PUT, "/vms")] {
        let (st, headers, b) = raw(&s, method.clone(), path, None, "").await;
        assert!((400..500).contains(&st), "{method} {path}: {st}");
        assert!(headers["content-type"].to_str().unwrap().starts_with("application/json"), "{method} {path}");
        assert!(b["error"]["code"].is_string() && b["error"]["message"].is_string(), "{method} {path}: {b}");
    }
    // Answers that carry tokens (and all others) are never cached nor sniffed.
    let resp = s
        .anonymous()
        .request(Method::POST, "/session")
        .json(&json!({ "user": "admin", "password": s.admin_password }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    // A bad fencing token is called one.
    let resp =
        s.admin.request(Method::PATCH, "/vms/v").header("Covm-Lease", "x").json(&json!({})).send().await.unwrap();
    let b: Value = resp.json().await.unwrap();
    assert!(b["error"]["message"].as_str().unwrap().contains("fencing token"), "{b}");
}

#[tokio::test]
async fn a_404_for_a_hidden_task_or_grant_names_only_what_was_asked() {
    let s = TestServer::start().await;
    s.admin.folder_create("secret-team", "/").await.unwrap();
    s.admin.vm_create(&json!({ "name": "secret-vm", "folder": "/secret-team" })).await.unwrap();
    let task = s.admin.vm_power("secret-vm", covm_types::vm::PowerAction::On, None).await.unwrap();
    let g = s.admin.permission_grant("admin", "ReadOnly", "/secret-team", true).await.unwrap();
    let eve = s.user("eve").await;
    for (method, path) in
        [(Method::GET, format!("/tasks/{}", task.id)), (Method::DELETE, format!("/permissions/{}", g.id))]
    {
        let resp = eve.request(method.clone(), &path).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{method} {path}");
        let text = resp.text().await.unwrap();
        assert!(!text.contains("secret"), "{method} {path}: {text}");
        let vm_id = s.admin.vm("secret-vm").await.unwrap().id.to_string();
        assert!(!text.contains(&vm_id), "{method} {path}: {text}");
    }
}
