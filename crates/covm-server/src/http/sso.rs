//! Single sign-on with OpenID Connect (`app::sso`): the browser flow and the device flow. These
//! endpoints need no session (they make one); they draw from the caller's address's rate limit.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use covm_types::ErrorBody;
use covm_types::api::{SessionToken, SsoCallbackQuery, SsoDevicePoll, SsoDevicePollRequest, SsoDeviceStart};
use covm_types::error::ConflictError;

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams, ReqInfo};
use crate::app::App;

/// Sign in through the identity provider: a redirect (303) to its authorization endpoint (the code
/// flow with PKCE); it sends the browser back to `/api/v1/sso/callback`.
#[utoipa::path(get, path = "/sso/login", tag = "session", operation_id = "sso_login",
    responses((status = 303, description = "to the identity provider"), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
pub async fn sso_login(State(app): State<App>) -> Result<Response, ApiError> {
    let url = app.sso_begin().await?;
    Ok((StatusCode::SEE_OTHER, [(header::LOCATION, url)]).into_response())
}

/// Where the identity provider sends the browser back: the code is exchanged, the ID token checked,
/// and the answer is a session for the user (made at its first sign-in).
#[utoipa::path(get, path = "/sso/callback", tag = "session", operation_id = "sso_callback",
    params(SsoCallbackQuery),
    responses((status = 201, body = SessionToken), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
pub async fn sso_callback(
    State(app): State<App>,
    ReqInfo(req): ReqInfo,
    QueryParams(q): QueryParams<SsoCallbackQuery>,
) -> Result<(StatusCode, Json<SessionToken>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.sso_callback(&req, q).await?)))
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
