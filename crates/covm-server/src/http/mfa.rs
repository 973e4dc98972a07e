//! Two-factor sign-in: enrollment, confirmation, turning it off, and the policy (`app::mfa`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use covm_types::ErrorBody;
use covm_types::api::{MfaCode, MfaDisable, MfaEnrollment, MfaPolicy};
use covm_types::error::ConflictError;

use super::error::ApiError;
use super::extract::{Auth, JsonBody};
use crate::app::App;

/// Begin two-factor sign-in (TOTP, RFC 6238) for oneself, or for anyone with `Users.Manage`: a new
/// secret, its `otpauth://` URL and ten single-use recovery codes, shown only in this answer. Sign-in
/// is unchanged until `…/mfa/confirm`.
#[utoipa::path(post, path = "/users/{user}/mfa", tag = "principals", operation_id = "user_mfa_enroll",
    params(("user" = String, Path, description = "user name or id")),
    responses((status = 201, body = MfaEnrollment), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn user_mfa_enroll(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(user): Path<String>,
) -> Result<(StatusCode, Json<MfaEnrollment>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.mfa_enroll(&ctx, &user).await?)))
}

/// Turn two-factor sign-in on with a current code from the enrolled secret. From then on a sign-in
/// needs `totp` (or a `recovery_code`) beside the password.
#[utoipa::path(post, path = "/users/{user}/mfa/confirm", tag = "principals", operation_id = "user_mfa_confirm",
    params(("user" = String, Path, description = "user name or id")), request_body = MfaCode,
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn user_mfa_confirm(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(user): Path<String>,
    JsonBody(p): JsonBody<MfaCode>,
) -> Result<StatusCode, ApiError> {
    app.mfa_confirm(&ctx, &user, &p.code).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Turn two-factor sign-in off: with a current `code`, or with `Permissions.Modify` on `/` (send `{}`).
#[utoipa::path(delete, path = "/users/{user}/mfa", tag = "principals", operation_id = "user_mfa_disable",
    params(("user" = String, Path, description = "user name or id")), request_body = MfaDisable,
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn user_mfa_disable(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(user): Path<String>,
    JsonBody(p): JsonBody<MfaDisable>,
) -> Result<StatusCode, ApiError> {
    app.mfa_disable(&ctx, &user, p).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Which groups must use two-factor sign-in.
#[utoipa::path(get, path = "/policies/mfa", tag = "principals", operation_id = "mfa_policy_get",
    responses((status = 200, body = MfaPolicy), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn mfa_policy_get(State(app): State<App>, Auth(_ctx): Auth) -> Result<Json<MfaPolicy>, ApiError> {
    Ok(Json(app.mfa_policy().await?))
}

/// Require two-factor sign-in of these groups' members (needs `Permissions.Modify` on `/`): until they
/// have it, a sign-in gives them a session that may only enroll.
#[utoipa::path(post, path = "/policies/mfa", tag = "principals", operation_id = "mfa_policy_set",
    request_body = MfaPolicy,
    responses((status = 200, body = MfaPolicy), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn mfa_policy_set(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(p): JsonBody<MfaPolicy>,
) -> Result<Json<MfaPolicy>, ApiError> {
    Ok(Json(app.mfa_policy_set(&ctx, p).await?))
}
