//! The checked-in OpenAPI document is what the code generates. Regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p covm-server --test api openapi`.

use std::path::PathBuf;

pub fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

#[test]
fn the_checked_in_openapi_document_matches_the_code() {
    let generated = serde_json::to_string_pretty(&covm_server::http::openapi()).unwrap() + "\n";
    let file = repo_file("openapi/covm.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        checked_in == generated,
        "openapi/covm.json differs from the code; run `UPDATE_GOLDEN=1 cargo test -p covm-server --test api openapi` and commit it"
    );
}

#[tokio::test]
async fn the_server_serves_the_same_document() {
    let s = crate::common::TestServer::start().await;
    let served: serde_json::Value = s.anonymous().get("/api/v1/openapi.json").await.unwrap();
    assert_eq!(served, serde_json::to_value(covm_server::http::openapi()).unwrap());
    assert!(served["paths"]["/api/v1/folders"]["post"].is_object());
}
