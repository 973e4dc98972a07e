//! Extractors that turn every malformed request into a covm error with a code and the field at fault:
//! JSON bodies (at most [`BODY_LIMIT`], unknown fields refused), query strings, and the session (a
//! bearer token, or for browsers the session cookie with its CSRF check, or a console ticket).

use covm_types::ErrorCode;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use covm_types::{Error, ErrorKind};
use serde::de::DeserializeOwned;

use super::error::ApiError;
pub use crate::app::json::json_parse;
use crate::app::{App, Ctx, RequestInfo};

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 1 << 20;
/// How long a request body may take to arrive, whole.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A JSON request body.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let mime = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if mime != "application/json" && !(mime.starts_with("application/") && mime.ends_with("+json")) {
            return Err(Error::new(
                ErrorKind::UnsupportedMediaType,
                ErrorCode::UnsupportedMediaType,
                "the body must be JSON, sent with Content-Type: application/json",
            )
            .into());
        }
        let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(req.into_body(), BODY_LIMIT));
        let bytes: Bytes = read
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::RequestTimeout,
                    ErrorCode::RequestTimeout,
                    format!("the body did not arrive within {} seconds", BODY_TIMEOUT.as_secs()),
                )
            })?
            .map_err(|_| {
                Error::new(
                    ErrorKind::PayloadTooLarge,
                    ErrorCode::PayloadTooLarge,
                    format!("the body is larger than {BODY_LIMIT} bytes"),
                )
            })?;
        if bytes.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                ErrorCode::MissingBody,
                "this request needs a JSON body",
            )
            .into());
        }
        // Every body is one JSON object (serde would take an array for a struct's fields in order).
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                ErrorCode::InvalidJson,
                "the body is one JSON object, {…}",
            )
            .into());
        }
        Ok(JsonBody(json_parse(&bytes)?))
    }
}

/// An id from the path.
pub fn parse_id(s: &str) -> Result<uuid::Uuid, Error> {
    uuid::Uuid::parse_str(s).map_err(|_| Error::invalid("id", format!("{s} is not an id (a UUID)")))
}

/// A query string.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Query::try_from_uri(&parts.uri).map(|Query(q)| QueryParams(q)).map_err(|e| {
            let detail = e.body_text();
            let detail = detail.strip_prefix("Failed to deserialize query string: ").unwrap_or(&detail).to_owned();
            ApiError(Error::new(
                ErrorKind::InvalidRequest,
                ErrorCode::InvalidQuery,
                format!("bad query string: {detail}"),
            ))
        })
    }
}

/// The request's shared facts (set by the middleware; a default one outside it, in unit tests).
pub fn request_info(parts: &Parts) -> Arc<RequestInfo> {
    parts
        .extensions
        .get::<Arc<RequestInfo>>()
        .cloned()
        .unwrap_or_else(|| Arc::new(RequestInfo::new(uuid::Uuid::now_v7().simple().to_string(), None)))
}

/// The cookie a browser's session is kept in (`POST /session` with `"cookie": true`).
pub const SESSION_COOKIE: &str = "covm_session";
/// The header a page sets on every request signed in by the cookie that changes something: another
/// site's form or image cannot set it, and its script cannot without a CORS preflight that covm
/// never grants.
pub const CSRF_HEADER: &str = "x-covm-csrf";

/// How a request carries its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Bearer,
    Cookie,
}

/// The session token of a request: `Authorization: Bearer`, else the session cookie.
pub fn session_token(headers: &HeaderMap) -> Option<(String, Via)> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    if let Some(t) = bearer {
        return Some((t.to_owned(), Via::Bearer));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
        .find(|t| !t.is_empty())
        .map(|t| (t.to_owned(), Via::Cookie))
}

/// The CSRF check of a request signed in by the cookie: sent by a page of this origin (`Origin`
/// and `Sec-Fetch-Site`, when the browser sends them), and when it changes something, with
/// [`CSRF_HEADER`].
pub fn csrf_check(method: &Method, headers: &HeaderMap) -> Result<(), Error> {
    let refuse = |why: &str| {
        Err(Error::new(ErrorKind::Forbidden, ErrorCode::CsrfFailed, format!("refused as cross-site: {why}"))
            .with_field(CSRF_HEADER))
    };
    let get = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = get(header::HeaderName::from_static("sec-fetch-site"))
        && site != "same-origin"
        && site != "none"
    {
        return refuse(&format!("the browser says the request comes from a {site} page"));
    }
    if let Some(origin) = get(header::ORIGIN) {
        let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
        if get(header::HOST) != Some(authority) {
            return refuse(&format!("the page of origin {origin} is not covm's"));
        }
    }
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && !headers.contains_key(CSRF_HEADER) {
        return refuse("a change signed in by the session cookie must carry the header X-Covm-Csrf: 1");
    }
    Ok(())
}

/// The signed-in caller (`Authorization: Bearer <token>`, or the session cookie).
pub struct Auth(pub Ctx);

impl FromRequestParts<App> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let (token, via) = session_token(&parts.headers).ok_or_else(|| {
            Error::unauthenticated("sign in first: send Authorization: Bearer <token> (or the session cookie)")
        })?;
        if via == Via::Cookie {
            csrf_check(&parts.method, &parts.headers)?;
        }
        Ok(Auth(authenticate(parts, app, &token).await?))
    }
}

/// The caller of a console's WebSocket: a ticket (`?ticket=`, for the VM it names) or a session.
pub struct ConsoleAuth {
    pub ctx: Ctx,
    /// The VM the ticket is for (None: a session, for any VM it may use).
    pub only: Option<uuid::Uuid>,
}

impl FromRequestParts<App> for ConsoleAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let ticket = form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "ticket")
            .map(|(_, v)| v.into_owned());
        let Some(ticket) = ticket else {
            let Auth(ctx) = Auth::from_request_parts(parts, app).await?;
            return Ok(ConsoleAuth { ctx, only: None });
        };
        let info = request_info(parts);
        match app.console_ticket_redeem(&info, &ticket).await {
            Ok((ctx, vm)) => {
                app.request_admit(&ctx, 1)?;
                Ok(ConsoleAuth { ctx, only: Some(vm) })
            }
            Err(e) => {
                app.anonymous_admit(&info, 1)?;
                Err(e.into())
            }
        }
    }
}

/// A WebSocket upgrade when the request asks for one.
pub struct MaybeWs(pub Option<axum::extract::ws::WebSocketUpgrade>);

impl<S: Send + Sync> FromRequestParts<S> for MaybeWs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if !parts.headers.contains_key(header::UPGRADE) {
            return Ok(MaybeWs(None));
        }
        let ws = axum::extract::ws::WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError(Error::new(ErrorKind::InvalidRequest, ErrorCode::UpgradeRequired, e.body_text())))?;
        Ok(MaybeWs(Some(ws)))
    }
}

/// Who the token is, and whether it may make this request (enroll-only sessions, rate limits).
async fn authenticate(parts: &Parts, app: &App, token: &str) -> Result<Ctx, ApiError> {
    let info = request_info(parts);
    let ctx = match app.authenticate(&info, token).await {
        Ok(ctx) => ctx,
        // A bad token costs its address (else junk tokens would pass every limit).
        Err(e) => {
            app.anonymous_admit(&info, 1)?;
            return Err(e.into());
        }
    };
    let route = parts.extensions.get::<axum::extract::MatchedPath>().map_or("", |m| m.as_str());
    if ctx.enroll_only && !ENROLL_ONLY_ROUTES.contains(&(parts.method.as_str(), route)) {
        return Err(Error::new(
            ErrorKind::Forbidden,
            ErrorCode::MfaEnrollmentRequired,
            "a policy requires two-factor sign-in of you: enroll (POST /api/v1/users/{you}/mfa, then …/mfa/confirm) first",
        )
        .into());
    }
    app.request_admit(&ctx, request_cost(&parts.method, route))?;
    Ok(ctx)
}

/// What an enroll-only session may do (`app::mfa`): enroll, confirm, see who it is, sign out.
const ENROLL_ONLY_ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/users/{user}/mfa"),
    ("POST", "/api/v1/users/{user}/mfa/confirm"),
    ("GET", "/api/v1/session"),
    ("DELETE", "/api/v1/session"),
];

/// What a request draws from its caller's rate-limit bucket: the expensive operations (powering a VM,
/// making or copying a disk, snapshots and reverts, creating a VM) draw
/// [`crate::app::ratelimit::COST_HEAVY`], everything else 1.
pub fn request_cost(method: &axum::http::Method, route: &str) -> u32 {
    const HEAVY: &[&str] = &[
        "/api/v1/vms",
        "/api/v1/vms/{vm}/power",
        "/api/v1/vms/{vm}/snapshots",
        "/api/v1/vms/{vm}/snapshots/{snap}/revert",
        "/api/v1/vms/{vm}/revert",
        "/api/v1/disks",
        "/api/v1/disks/{disk}/clone",
        "/api/v1/disks/{disk}/import",
        "/api/v1/disks/{disk}/move",
        "/api/v1/disks/{disk}/snapshots",
        "/api/v1/disks/{disk}/snapshots/{snap}/revert",
        "/api/v1/keys/rotate",
    ];
    match *method == axum::http::Method::POST && HEAVY.contains(&route) {
        true => crate::app::ratelimit::COST_HEAVY,
        false => 1,
    }
}

/// The request's facts, for handlers that run before anyone is signed in.
pub struct ReqInfo(pub Arc<RequestInfo>);

impl<S: Send + Sync> FromRequestParts<S> for ReqInfo {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ReqInfo(request_info(parts)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use covm_types::api::FolderCreate;

    #[test]
    fn unknown_fields_are_named() {
        let e = json_parse::<FolderCreate>(br#"{"name":"a","colour":"red"}"#).err().unwrap();
        assert_eq!(e.code, "unknown_field");
        assert_eq!(e.field.as_deref(), Some("colour"));
    }

    #[test]
    fn bad_names_are_named() {
        for bad in [r#"{"name":"../x"}"#, r#"{"name":"A B"}"#, r#"{"name":""}"#] {
            let e = json_parse::<FolderCreate>(bad.as_bytes()).err().unwrap();
            assert_eq!(e.code, "invalid_name", "{bad}");
            assert_eq!(e.field.as_deref(), Some("name"), "{bad}");
        }
        let long = format!(r#"{{"name":"{}"}}"#, "x".repeat(64));
        assert_eq!(json_parse::<FolderCreate>(long.as_bytes()).err().unwrap().code, "invalid_name");
    }

    #[test]
    fn missing_and_malformed() {
        let e = json_parse::<FolderCreate>(b"{}").err().unwrap();
        assert_eq!((e.code.as_str(), e.field.as_deref()), ("missing_field", Some("name")));
        assert_eq!(json_parse::<FolderCreate>(b"{").err().unwrap().code, "invalid_json");
        let e = json_parse::<FolderCreate>(br#"{"name":7}"#).err().unwrap();
        assert_eq!((e.code.as_str(), e.field.as_deref()), ("invalid_value", Some("name")));
    }
}
