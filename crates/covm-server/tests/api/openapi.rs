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

/// Every `$ref` names a schema the document defines (a generator fails on one that it does not).
#[test]
fn every_reference_in_the_document_is_defined() {
    let doc = serde_json::to_value(covm_server::http::openapi()).unwrap();
    let defined = doc["components"]["schemas"].as_object().unwrap();
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                    out.push(r.to_owned());
                }
                m.values().for_each(|v| refs(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{r} is not a schema reference"));
        assert!(defined.contains_key(name), "{r} is referenced but not defined");
    }
    // The limits the server enforces are in the document.
    let limit = &doc["paths"]["/api/v1/vms"]["get"]["parameters"];
    let limit = limit.as_array().unwrap().iter().find(|p| p["name"] == "limit").unwrap();
    assert_eq!((limit["schema"]["minimum"].as_i64(), limit["schema"]["maximum"].as_i64()), (Some(1), Some(1000)));
}

/// Every request body is described property by property (generators need it): no bare object unless
/// it is free-form by design; and the VM change body names every field of the config.
#[test]
fn request_bodies_are_described_property_by_property() {
    let doc = serde_json::to_value(covm_server::http::openapi()).unwrap();
    let schemas = &doc["components"]["schemas"];
    let resolve = |s: &serde_json::Value| match s["$ref"].as_str() {
        Some(r) => schemas[r.trim_start_matches("#/components/schemas/")].clone(),
        None => s.clone(),
    };
    let mut bodies = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (ct, media) in op["requestBody"]["content"].as_object().into_iter().flatten() {
                let schema = resolve(&media["schema"]);
                // A file's bytes (an upload) are bytes, said so.
                if ct == "application/octet-stream" {
                    assert_eq!(
                        (schema["type"].as_str(), schema["format"].as_str()),
                        (Some("string"), Some("binary")),
                        "{method} {path}: {schema}"
                    );
                    continue;
                }
                bodies += 1;
                assert!(
                    schema["properties"].as_object().is_some_and(|p| !p.is_empty()),
                    "{method} {path} ({ct}): the body has no properties: {schema}"
                );
            }
        }
    }
    assert!(bodies > 20, "{bodies}");
    let keys = |s: &serde_json::Value| -> std::collections::BTreeSet<String> {
        s["properties"].as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(keys(&schemas["VmChange"]), keys(&schemas["VmConfig"]), "VmChange and VmConfig differ");
    let body = &doc["paths"]["/api/v1/vms/{vm}"]["patch"]["requestBody"]["content"]["application/merge-patch+json"];
    assert_eq!(body["schema"]["$ref"], "#/components/schemas/VmChange");
}

/// Error codes are one enum in the schema, the same list as the code's; and the answers a client must
/// act on (412 with what changed, 423 naming the holder, 409) have bodies of their own.
#[test]
fn error_codes_and_conflict_bodies_have_schemas() {
    let doc = serde_json::to_value(covm_server::http::openapi()).unwrap();
    let schemas = &doc["components"]["schemas"];
    let codes: Vec<&str> =
        schemas["ErrorCode"]["enum"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let known: Vec<&str> = covm_types::ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(codes, known);
    for body in ["ErrorDetail", "StaleErrorDetail", "LeasedErrorDetail", "ConflictErrorDetail"] {
        assert_eq!(schemas[body]["properties"]["code"]["$ref"], "#/components/schemas/ErrorCode", "{body}");
    }
    for (k, v) in [("current_version", "integer"), ("your_version", "integer")] {
        assert_eq!(schemas["StaleDetails"]["properties"][k]["type"], v);
    }
    assert!(schemas["LeasedDetails"]["properties"]["holder"].is_object());
    let answer = |path: &str, method: &str, status: &str| {
        doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]["$ref"].clone()
    };
    for (path, method) in
        [("/api/v1/vms/{vm}", "patch"), ("/api/v1/vms/{vm}", "delete"), ("/api/v1/vms/{vm}/revert", "post")]
    {
        assert_eq!(answer(path, method, "412"), "#/components/schemas/StaleError", "{method} {path}");
        assert_eq!(answer(path, method, "423"), "#/components/schemas/LeasedError", "{method} {path}");
        assert_eq!(answer(path, method, "409"), "#/components/schemas/ConflictError", "{method} {path}");
    }
    // Every change has its 409 body.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method != "get" && path != "/api/v1/session" {
                assert!(op["responses"]["409"].is_object(), "{method} {path} has no 409 body");
            }
        }
    }
}
