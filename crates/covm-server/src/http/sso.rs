//! Single sign-on with OpenID Connect (`app::sso`): the browser flow and the device flow. These
//! endpoints need no session (they make one); they draw from the caller's address's rate limit.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use covm_types::ErrorBody;
use covm_types::api::{
    SessionToken, SsoCallbackQuery, SsoDevicePoll, SsoDevicePollRequest, SsoDeviceStart, SsoInfo, SsoLoginQuery,
};
use covm_types::error::ConflictError;

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams, ReqInfo};
use crate::app::App;

/// Whether single sign-on is on (asked by the sign-in page, before anyone is signed in).
#[utoipa::path(get, path = "/sso", tag = "session", operation_id = "sso_info",
    responses((status = 200, body = SsoInfo), (status = "4XX", body = ErrorBody)))]
pub async fn sso_info(State(app): State<App>) -> Json<SsoInfo> {
    Json(app.sso_info())
}

/// Sign in through the identity provider: a redirect (303) to its authorization endpoint (the code
/// flow with PKCE); it sends the browser back to `/api/v1/sso/callback`. With `next` (the web UI),
/// the callback puts the session into the browser's cookie and redirects there.
#[utoipa::path(get, path = "/sso/login", tag = "session", operation_id = "sso_login", params(SsoLoginQuery),
    responses((status = 303, description = "to the identity provider"), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
pub async fn sso_login(
    State(app): State<App>,
    QueryParams(q): QueryParams<SsoLoginQuery>,
) -> Result<Response, ApiError> {
    let url = app.sso_begin(q.next).await?;
    Ok((StatusCode::SEE_OTHER, [(header::LOCATION, url)]).into_response())
}

/// Where the identity provider sends the browser back: the code is exchanged, the ID token checked,
/// and the answer is a session for the user (made at its first sign-in); when the sign-in began in
/// the web UI (`next`), the session cookie and a redirect (303) to that page instead.
#[utoipa::path(get, path = "/sso/callback", tag = "session", operation_id = "sso_callback",
    params(SsoCallbackQuery),
    responses((status = 201, body = SessionToken),
        (status = 303, description = "the web UI's sign-in: to its page, with the session cookie"),
        (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
pub async fn sso_callback(
    State(app): State<App>,
    ReqInfo(req): ReqInfo,
    secure: Option<Extension<crate::listen::Secure>>,
    QueryParams(q): QueryParams<SsoCallbackQuery>,
) -> Result<Response, ApiError> {
    let (t, next) = app.sso_callback(&req, q).await?;
    let Some(next) = next else { return Ok((StatusCode::CREATED, Json(t)).into_response()) };
    let max_age = (t.expires_at - chrono::Utc::now()).num_seconds().max(0);
    let cookie = super::session::session_cookie(&t.token, max_age, secure.is_some());
    Ok((StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), (header::LOCATION, next)]).into_response())
}

/// Begin a sign-in for a device without a browser (the CLI): a code to enter at the identity provider.
#[utoipa::path(post, path = "/sso/device", tag = "session", operation_id = "sso_device_start",
    responses((status = 200, body = SsoDeviceStart), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
pub async fn sso_device_start(State(app): State<App>) -> Result<Json<SsoDeviceStart>, ApiError> {
    Ok(Json(app.sso_device_begin().await?))
}

/// Whether the user approved the device sign-in: `pending`, or the session.
#[utoipa::path(post, path = "/sso/device/poll", tag = "session", operation_id = "sso_device_poll",
    request_body = SsoDevicePollRequest,
    responses((status = 200, body = SsoDevicePoll), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
pub async fn sso_device_poll(
    State(app): State<App>,
    ReqInfo(req): ReqInfo,
    JsonBody(p): JsonBody<SsoDevicePollRequest>,
) -> Result<Json<SsoDevicePoll>, ApiError> {
    Ok(Json(app.sso_device_poll(&req, p.id).await?))
}
