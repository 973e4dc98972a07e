//! The HTTP API: axum handlers that authenticate, call one app function and render its result.
//!
//! Around every request, [`request_mw`] gives it an id (`X-Request-Id`), counts it in the metrics,
//! writes a `request.failed` audit entry for a change that failed without one, and makes sure that a 500
//! (a panic included) carries the request id that is in the log.

pub mod datastore_files;
pub mod disks;
pub mod error;
pub mod events;
pub mod extract;
pub mod forward;
pub mod inventory;
pub mod keys;
pub mod mfa;
pub mod power;
pub mod principals;
pub mod session;
pub mod snapshots;
pub mod sso;
pub mod vms;

use covm_types::ErrorCode;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use covm_types::api::Health;
use covm_types::{Error, ErrorBody};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{App, RequestInfo};
use error::{ApiError, ResponseCode};

#[derive(OpenApi)]
#[openapi(
    info(title = "covm", description = "A shared virtual-machine host for a team.", license(name = "Apache-2.0")),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody, covm_types::vm::ApplyMode)),
    tags(
        (name = "session", description = "Sign-in, sessions and API tokens"),
        (name = "principals", description = "Users, groups, roles and permissions"),
        (name = "inventory", description = "Folders, datastores, networks, pools and hosts"),
        (name = "vms", description = "VMs as versioned documents, their history and edit leases"),
        (name = "disks", description = "First-class disks and their images"),
        (name = "snapshots", description = "VM snapshots: config and data, reverted together or apart"),
        (name = "tasks", description = "Long operations and their progress"),
        (name = "events", description = "The change feed and the audit log"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every API route, with its OpenAPI description.
fn api_routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(session::session_create, session::session_get, session::session_delete))
        .routes(routes!(session::token_list, session::token_create))
        .routes(routes!(session::token_delete))
        .routes(routes!(principals::user_list, principals::user_create))
        .routes(routes!(principals::user_get, principals::user_delete))
        .routes(routes!(principals::user_password_set))
        .routes(routes!(mfa::user_mfa_enroll, mfa::user_mfa_disable))
        .routes(routes!(mfa::user_mfa_confirm))
        .routes(routes!(mfa::mfa_policy_get, mfa::mfa_policy_set))
        .routes(routes!(keys::keys_rotate))
        .routes(routes!(sso::sso_info))
        .routes(routes!(sso::sso_login))
        .routes(routes!(sso::sso_callback))
        .routes(routes!(sso::sso_device_start))
        .routes(routes!(sso::sso_device_poll))
        .routes(routes!(principals::group_list, principals::group_create))
        .routes(routes!(principals::group_member_add))
        .routes(routes!(principals::group_member_remove))
        .routes(routes!(principals::privilege_list))
        .routes(routes!(principals::role_list, principals::role_create))
        .routes(routes!(principals::role_get))
        .routes(routes!(principals::permission_list, principals::permission_create))
        .routes(routes!(principals::permission_delete))
        .routes(routes!(inventory::inventory_list))
        .routes(routes!(inventory::folder_list, inventory::folder_create))
        .routes(routes!(inventory::folder_get, inventory::folder_delete))
        .routes(routes!(inventory::datastore_list, inventory::datastore_create))
        .routes(routes!(inventory::datastore_get))
        .routes(routes!(datastore_files::datastore_file_list))
        .routes(routes!(
            datastore_files::datastore_file_upload,
            datastore_files::datastore_file_get,
            datastore_files::datastore_file_delete
        ))
        .routes(routes!(inventory::network_list, inventory::network_create))
        .routes(routes!(inventory::network_get, inventory::network_delete))
        .routes(routes!(inventory::network_forwards_set))
        .routes(routes!(inventory::pool_list, inventory::pool_create))
        .routes(routes!(inventory::host_list))
        .routes(routes!(vms::vm_list, vms::vm_create))
        .routes(routes!(vms::vm_get, vms::vm_change, vms::vm_delete))
        .routes(routes!(vms::vm_version_list))
        .routes(routes!(vms::vm_version_get))
        .routes(routes!(vms::vm_diff))
        .routes(routes!(vms::vm_revert))
        .routes(routes!(vms::vm_template))
        .routes(routes!(vms::vm_clone))
        .routes(routes!(vms::vm_guest))
        .routes(routes!(vms::vm_nic_add))
        .routes(routes!(vms::vm_nic_remove))
        .routes(routes!(vms::vm_guest_password))
        .routes(routes!(vms::vm_guest_ssh_keys))
        .routes(routes!(vms::lease_get, vms::lease_acquire, vms::lease_renew, vms::lease_release))
        .routes(routes!(disks::disk_list, disks::disk_create))
        .routes(routes!(disks::disk_get, disks::disk_delete))
        .routes(routes!(disks::disk_resize))
        .routes(routes!(disks::disk_clone))
        .routes(routes!(disks::disk_import))
        .routes(routes!(disks::disk_move))
        .routes(routes!(disks::vm_disk_attach))
        .routes(routes!(disks::vm_disk_detach))
        .routes(routes!(disks::vm_block_state))
        .routes(routes!(disks::vm_stats))
        .routes(routes!(snapshots::snapshot_create, snapshots::snapshot_list))
        .routes(routes!(snapshots::snapshot_get, snapshots::snapshot_update, snapshots::snapshot_delete))
        .routes(routes!(snapshots::snapshot_revert))
        .routes(routes!(snapshots::disk_snapshot_create, snapshots::disk_snapshot_list))
        .routes(routes!(snapshots::disk_snapshot_delete))
        .routes(routes!(snapshots::disk_snapshot_revert))
        .routes(routes!(power::vm_power))
        .routes(routes!(power::vm_console_serial))
        .routes(routes!(power::vm_console_vnc))
        .routes(routes!(power::vm_console_ticket))
        .routes(routes!(vms::presence_get, vms::presence_set, vms::presence_leave))
        .routes(routes!(power::task_list))
        .routes(routes!(power::task_get))
        .routes(routes!(events::event_list))
        .routes(routes!(events::audit_list))
        .routes(routes!(events::audit_verify))
}

/// The OpenAPI document of the API, as checked in at `openapi/covm.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = OpenApiRouter::<App>::with_openapi(ApiDoc::openapi()).nest("/api/v1", api_routes()).into_openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// The routes outside the API document: health, readiness, metrics and the document itself.
pub const SERVICE_ROUTES: &[&str] = &["/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"];

fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new().install_recorder().map_err(|e| tracing::warn!(error = %e, "metrics are off")).ok()
        })
        .clone()
}

/// The whole HTTP service.
pub fn router(app: App) -> axum::Router {
    let metrics = metrics_handle();
    let limits = app.rates().config();
    metrics::gauge!("covm_rate_limit_per_second", "kind" => "user").set(f64::from(limits.per_second));
    metrics::gauge!("covm_rate_limit_burst", "kind" => "user").set(f64::from(limits.burst));
    metrics::gauge!("covm_rate_limit_per_second", "kind" => "address").set(f64::from(limits.anonymous_per_second));
    metrics::gauge!("covm_rate_limit_burst", "kind" => "address").set(f64::from(limits.anonymous_burst));
    let (api, _) = OpenApiRouter::with_openapi(ApiDoc::openapi()).nest("/api/v1", api_routes()).split_for_parts();
    let doc = Arc::new(openapi());
    let api = api
        .route("/healthz", get(|| async { Json(Health { status: "ok".into(), details: vec![] }) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(move || async move { metrics.map(|m| m.render()).unwrap_or_default() }))
        .route("/api/v1/openapi.json", get(move || async move { Json(doc.as_ref().clone()) }));
    with_service_layers(api, app)
}

/// The fallback and the layers every route gets: panics caught, requests counted, ids and audits.
fn with_service_layers(routes: axum::Router<App>, app: App) -> axum::Router {
    routes
        .fallback(crate::ui::fallback)
        .layer(CatchPanicLayer::custom(|_| {
            ApiError(Error::internal("covm hit a bug while handling this request")).into_response()
        }))
        .layer(axum::middleware::from_fn_with_state(app.clone(), forward::forward_mw))
        .layer(axum::middleware::from_fn_with_state(app.clone(), request_mw))
        .with_state(app)
}

async fn readyz(State(app): State<App>) -> Response {
    match app.readiness().await {
        (true, details) => Json(Health { status: "ready".into(), details }).into_response(),
        (false, details) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "unavailable".into(), details })).into_response()
        }
    }
}

fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string())
}

/// The query parameters each documented route takes, from the OpenAPI document.
fn query_params() -> &'static HashMap<(String, String), Vec<String>> {
    static PARAMS: OnceLock<HashMap<(String, String), Vec<String>>> = OnceLock::new();
    PARAMS.get_or_init(|| {
        let doc = serde_json::to_value(openapi()).unwrap_or_default();
        let mut out = HashMap::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                let names = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "query")
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect();
                out.insert((method.to_ascii_uppercase(), path.clone()), names);
            }
        }
        out
    })
}

/// A query parameter the route does not take is refused (a typo must not pass as "no filter").
fn query_check(method: &Method, route: &str, query: Option<&str>) -> Result<(), Error> {
    let Some(allowed) = query_params().get(&(method.as_str().to_owned(), route.to_owned())) else { return Ok(()) };
    for (name, _) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if !allowed.iter().any(|a| *a == name) {
            let takes = if allowed.is_empty() { "none".to_owned() } else { allowed.join(", ") };
            return Err(Error::new(
                covm_types::ErrorKind::InvalidRequest,
                ErrorCode::UnknownQueryParameter,
                format!("unknown query parameter {name}; this path takes {takes}"),
            )
            .with_field(name.into_owned()));
        }
    }
    Ok(())
}

/// Every error is the JSON envelope: one that a library answered in plain text (a path that is not
/// UTF-8, a console request without `Upgrade`) is wrapped.
async fn json_envelope(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let code = match parts.status {
        StatusCode::NOT_FOUND => ErrorCode::NoRoute,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::UPGRADE_REQUIRED => ErrorCode::UpgradeRequired,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::InvalidRequest,
    };
    let text = String::from_utf8_lossy(&bytes).trim().to_owned();
    let text = if text.is_empty() { parts.status.canonical_reason().unwrap_or("error").to_owned() } else { text };
    let kind = match parts.status {
        s if s.is_server_error() => covm_types::ErrorKind::Internal,
        StatusCode::NOT_FOUND => covm_types::ErrorKind::NotFound,
        _ => covm_types::ErrorKind::InvalidRequest,
    };
    let body = serde_json::to_vec(&Error::new(kind, code, text).body()).unwrap_or_default();
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.extensions.insert(ResponseCode(code));
    Response::from_parts(parts, Body::from(body))
}

async fn request_mw(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&req);
    let addr = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let info = Arc::new(RequestInfo::new(id.clone(), addr));
    req.extensions_mut().insert(info.clone());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "-".to_owned(), |m| m.as_str().to_owned());
    let secure = req.extensions().get::<crate::listen::Secure>().is_some();
    // A request without a session draws from its address's bucket; a signed-in one from its user's
    // (when `Auth` has found who it is).
    // Sign-in endpoints count per address whatever headers they carry (they make sessions).
    let signing_in = path.starts_with("/api/v1/sso/") || (method == Method::POST && path == "/api/v1/session");
    let anonymous = signing_in || extract::session_token(req.headers()).is_none();
    let admitted = match anonymous {
        true => app.anonymous_admit(&info, 1),
        false => Ok(()),
    };

    let mut resp = match admitted.and_then(|()| query_check(&method, &route, req.uri().query())) {
        Ok(()) => next.run(req).await,
        Err(e) => ApiError(e).into_response(),
    };
    let is_json =
        resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if (resp.status().is_client_error() || resp.status().is_server_error()) && !is_json {
        resp = json_envelope(resp).await;
    }
    // Answers are for the caller alone (some carry tokens): never cached, never sniffed.
    // Nor framed by another site, nor named in a referrer; over TLS, browsers keep to TLS.
    // (The UI's pages set their own caching and policy: `ui::fallback`.)
    let h = resp.headers_mut();
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'; base-uri 'none'"));
    if secure {
        h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    }
    if let Some(r) = info.rate.get() {
        h.insert(HeaderName::from_static("ratelimit-limit"), HeaderValue::from(r.limit));
        h.insert(HeaderName::from_static("ratelimit-remaining"), HeaderValue::from(r.remaining));
        h.insert(HeaderName::from_static("ratelimit-reset"), HeaderValue::from(r.reset_s));
    }
    let status = resp.status();

    let mutating = matches!(method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
    let code = resp.extensions().get::<ResponseCode>().map(|c| c.0);
    if code == Some(ErrorCode::StorageFull) {
        app.storage_note(true);
    } else if mutating && status.is_success() {
        app.storage_note(false);
    }
    if mutating
        && (status.is_client_error() || status.is_server_error())
        && status != StatusCode::UNAUTHORIZED
        && !info.audited()
        && resp.extensions().get::<forward::Forwarded>().is_none()
        // The store is down or full: the entry could not be written either (the log says why).
        && !matches!(code, Some(ErrorCode::StoreUnavailable | ErrorCode::StorageFull))
        && let Err(e) = app.audit_failed_request(&info, method.as_str(), &path, status.as_u16(), code).await
    {
        tracing::error!(request_id = %id, error = %e, "could not audit a failed request");
    }
    if status.is_server_error() {
        resp = with_request_id(resp, &id).await;
        tracing::error!(request_id = %id, %method, %path, status = status.as_u16(), "request failed");
    } else {
        tracing::debug!(request_id = %id, %method, %path, status = status.as_u16(), "request");
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let labels = [("method", method.as_str().to_owned()), ("route", route), ("status", status.as_u16().to_string())];
    metrics::counter!("covm_http_requests_total", &labels).increment(1);
    metrics::histogram!("covm_http_request_duration_seconds", &labels[..2]).record(started.elapsed().as_secs_f64());
    resp
}

/// Puts the request id into a 5xx error body, so that a user can quote it and find the log line.
async fn with_request_id(resp: Response, id: &str) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let Ok(mut err) = serde_json::from_slice::<ErrorBody>(&bytes) else {
        // Not an error body (readiness answers 503 with its own): as it was.
        return Response::from_parts(parts, Body::from(bytes));
    };
    err.error.message = format!("{} (request id {id}; the server log has the details)", err.error.message);
    let mut details = err.error.details.take().unwrap_or_else(|| serde_json::json!({}));
    if let Some(obj) = details.as_object_mut() {
        obj.insert("request_id".into(), id.into());
    }
    err.error.details = Some(details);
    let body = serde_json::to_vec(&err).unwrap_or_default();
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::app::AppConfig;

    #[tokio::test]
    async fn a_panic_is_a_json_500_with_the_request_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = covm_store::SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let driver = Arc::new(covm_hv::sim::SimDriver::default());
        let app = App::new(Arc::new(store), AppConfig::new(dir.path().to_owned(), "test".into()), driver);
        let routes = axum::Router::new().route(
            "/boom",
            axum::routing::post(|| async {
                if true {
                    panic!("a bug");
                }
            }),
        );
        let svc = with_service_layers(routes, app.clone());
        let req = Request::post("/boom").header("x-request-id", "req-42").body(Body::empty()).unwrap();
        let resp = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers()["x-request-id"], "req-42");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        let err: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(err.error.code, "internal");
        assert!(err.error.message.contains("req-42"), "{}", err.error.message);
        assert_eq!(err.error.details.unwrap()["request_id"], "req-42");
        // The failed request is in the audit log, with its request id.
        let audit = app
            .store_for_tests()
            .audit_query(covm_store::AuditFilter { limit: 10, ..Default::default() })
            .await
            .unwrap();
        assert!(audit.iter().any(|e| e.kind == "request.failed" && e.request_id.as_deref() == Some("req-42")));
        // An unknown API path is a JSON 404 too (any other path is the web UI's: `ui::fallback`).
        let resp = svc.oneshot(Request::get("/api/v1/nope").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    }
}
