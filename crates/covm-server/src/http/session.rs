//! Sign-in, who am I, sign-out, and API tokens.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use covm_types::ErrorBody;
use covm_types::api::{SessionCreate, SessionQuery, SessionToken, TokenCreate, TokenView, Whoami};
use covm_types::error::ConflictError;

use super::error::ApiError;
use super::extract::{Auth, JsonBody, QueryParams, ReqInfo, SESSION_COOKIE};
use crate::app::App;

/// Sign in with a user name and password; the token goes in `Authorization: Bearer`, or for a
/// browser (`"cookie": true`) into the HttpOnly session cookie.
#[utoipa::path(post, path = "/session", tag = "session", operation_id = "session_create",
    request_body = SessionCreate,
    responses((status = 201, body = SessionToken,
        headers(("set-cookie" = String, description = "with `\"cookie\": true`: `covm_session=…; HttpOnly; SameSite=Strict; Path=/` (and `Secure` under TLS)"))),
        (status = "4XX", body = ErrorBody)))]
pub async fn session_create(
    State(app): State<App>,
    ReqInfo(req): ReqInfo,
    secure: Option<Extension<crate::listen::Secure>>,
    JsonBody(p): JsonBody<SessionCreate>,
) -> Result<Response, ApiError> {
    let cookie = p.cookie;
    let mut t = app.session_create(&req, p).await?;
    if !cookie {
        return Ok((StatusCode::CREATED, Json(t)).into_response());
    }
    let max_age = (t.expires_at - chrono::Utc::now()).num_seconds().max(0);
    let value = session_cookie(&std::mem::take(&mut t.token), max_age, secure.is_some());
    Ok((StatusCode::CREATED, [(header::SET_COOKIE, value)], Json(t)).into_response())
}

/// The `Set-Cookie` value of a browser's session (an empty token and no age: the cookie is dropped).
pub(super) fn session_cookie(token: &str, max_age: i64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}")
}

/// Who am I, my groups, and my effective privileges on `object` (default `/`).
#[utoipa::path(get, path = "/session", tag = "session", operation_id = "session_get",
    params(SessionQuery),
    responses((status = 200, body = Whoami), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn session_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<SessionQuery>,
) -> Result<Json<Whoami>, ApiError> {
    Ok(Json(app.session_get(&ctx, q.object.as_deref()).await?))
}

/// Sign out: the token of this request stops working (a browser's session cookie is dropped).
#[utoipa::path(delete, path = "/session", tag = "session", operation_id = "session_delete",
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn session_delete(
    State(app): State<App>,
    Auth(ctx): Auth,
    secure: Option<Extension<crate::listen::Secure>>,
) -> Result<Response, ApiError> {
    app.session_delete(&ctx).await?;
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, session_cookie("", 0, secure.is_some()))]).into_response())
}

/// My API tokens (without their secrets).
#[utoipa::path(get, path = "/tokens", tag = "session", operation_id = "token_list",
    responses((status = 200, body = Vec<TokenView>), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn token_list(State(app): State<App>, Auth(ctx): Auth) -> Result<Json<Vec<TokenView>>, ApiError> {
    Ok(Json(app.tokens_list(&ctx).await?))
}

/// Make a named API token; its secret is in this response only.
#[utoipa::path(post, path = "/tokens", tag = "session", operation_id = "token_create",
    request_body = TokenCreate,
    responses((status = 201, body = TokenView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn token_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(p): JsonBody<TokenCreate>,
) -> Result<(StatusCode, Json<TokenView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.token_create(&ctx, p).await?)))
}

/// Revoke one of my API tokens.
#[utoipa::path(delete, path = "/tokens/{id}", tag = "session", operation_id = "token_delete",
    params(("id" = Uuid, Path, description = "token id")),
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn token_delete(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = super::extract::parse_id(&id)?;
    app.token_delete(&ctx, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
