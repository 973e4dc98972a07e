//! Users, groups, roles, privileges and permissions.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use covm_types::api::{
    GroupCreate, GroupMemberAdd, GroupView, PasswordSet, PermissionCreate, PermissionQuery, PermissionView, RoleCreate,
    RoleView, UserCreate, UserView,
};
use covm_types::error::ConflictError;
use covm_types::{ErrorBody, Privilege};

use super::error::ApiError;
use super::extract::{Auth, JsonBody, QueryParams};
use crate::app::App;

/// All users (needs `System.Read` on `/`).
#[utoipa::path(get, path = "/users", tag = "principals", operation_id = "user_list",
    responses((status = 200, body = Vec<UserView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn user_list(State(app): State<App>, Auth(ctx): Auth) -> Result<Json<Vec<UserView>>, ApiError> {
    Ok(Json(app.users_list(&ctx).await?))
}

/// Create a user (needs `Users.Manage` on `/`).
#[utoipa::path(post, path = "/users", tag = "principals", operation_id = "user_create", request_body = UserCreate,
    responses((status = 201, body = UserView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn user_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(p): JsonBody<UserCreate>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.user_create(&ctx, p).await?)))
}

/// One user (oneself, or anyone with `System.Read` on `/`).
#[utoipa::path(get, path = "/users/{user}", tag = "principals", operation_id = "user_get",
    params(("user" = String, Path, description = "user name or id")),
    responses((status = 200, body = UserView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn user_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(user): Path<String>,
) -> Result<Json<UserView>, ApiError> {
    Ok(Json(app.user_get(&ctx, &user).await?))
}

/// Delete a user with its tokens, memberships and grants (needs `Users.Manage` on `/`).
#[utoipa::path(delete, path = "/users/{user}", tag = "principals", operation_id = "user_delete",
    params(("user" = String, Path, description = "user name or id")),
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn user_delete(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(user): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.user_delete(&ctx, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set a password: one's own, or anyone's with `Users.Manage`. The user's sessions end.
#[utoipa::path(put, path = "/users/{user}/password", tag = "principals", operation_id = "user_password_set",
    params(("user" = String, Path, description = "user name or id")), request_body = PasswordSet,
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn user_password_set(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(user): Path<String>,
    JsonBody(p): JsonBody<PasswordSet>,
) -> Result<StatusCode, ApiError> {
    app.user_password_set(&ctx, &user, p).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// All groups with their members (needs `System.Read` on `/`).
#[utoipa::path(get, path = "/groups", tag = "principals", operation_id = "group_list",
    responses((status = 200, body = Vec<GroupView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn group_list(State(app): State<App>, Auth(ctx): Auth) -> Result<Json<Vec<GroupView>>, ApiError> {
    Ok(Json(app.groups_list(&ctx).await?))
}

/// Create a group (needs `Users.Manage` on `/`).
#[utoipa::path(post, path = "/groups", tag = "principals", operation_id = "group_create", request_body = GroupCreate,
    responses((status = 201, body = GroupView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn group_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(p): JsonBody<GroupCreate>,
) -> Result<(StatusCode, Json<GroupView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.group_create(&ctx, p).await?)))
}

/// Add a user to a group (needs `Users.Manage` on `/`).
#[utoipa::path(post, path = "/groups/{group}/members", tag = "principals", operation_id = "group_member_add",
    params(("group" = String, Path, description = "group name")), request_body = GroupMemberAdd,
    responses((status = 200, body = GroupView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn group_member_add(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(group): Path<String>,
    JsonBody(p): JsonBody<GroupMemberAdd>,
) -> Result<Json<GroupView>, ApiError> {
    Ok(Json(app.group_member_add(&ctx, &group, p).await?))
}

/// Remove a user from a group (needs `Users.Manage` on `/`).
#[utoipa::path(delete, path = "/groups/{group}/members/{user}", tag = "principals", operation_id = "group_member_remove",
    params(("group" = String, Path, description = "group name"), ("user" = String, Path, description = "user name")),
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn group_member_remove(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((group, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.group_member_remove(&ctx, &group, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every privilege covm knows.
#[utoipa::path(get, path = "/privileges", tag = "principals", operation_id = "privilege_list",
    responses((status = 200, body = Vec<Privilege>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn privilege_list(Auth(_ctx): Auth) -> Json<Vec<Privilege>> {
    Json(Privilege::ALL.to_vec())
}

/// The built-in and custom roles.
#[utoipa::path(get, path = "/roles", tag = "principals", operation_id = "role_list",
    responses((status = 200, body = Vec<RoleView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn role_list(State(app): State<App>, Auth(_ctx): Auth) -> Result<Json<Vec<RoleView>>, ApiError> {
    Ok(Json(app.roles_list().await?))
}

/// Define a custom role (needs `Permissions.Modify` on `/`).
#[utoipa::path(post, path = "/roles", tag = "principals", operation_id = "role_create", request_body = RoleCreate,
    responses((status = 201, body = RoleView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn role_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(p): JsonBody<RoleCreate>,
) -> Result<(StatusCode, Json<RoleView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.role_create(&ctx, p).await?)))
}

/// One role with its privileges.
#[utoipa::path(get, path = "/roles/{role}", tag = "principals", operation_id = "role_get",
    params(("role" = String, Path, description = "role name")),
    responses((status = 200, body = RoleView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn role_get(
    State(app): State<App>,
    Auth(_ctx): Auth,
    Path(role): Path<String>,
) -> Result<Json<RoleView>, ApiError> {
    Ok(Json(app.role_get(&role).await?))
}

/// Grants on objects I may view.
#[utoipa::path(get, path = "/permissions", tag = "principals", operation_id = "permission_list", params(PermissionQuery),
    responses((status = 200, body = Vec<PermissionView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn permission_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<PermissionQuery>,
) -> Result<Json<Vec<PermissionView>>, ApiError> {
    Ok(Json(app.permissions_list(&ctx, q).await?))
}

/// Grant a role to a user or `group:NAME` on an object (needs `Permissions.Modify` there). A grant to
/// the same principal on the same object replaces the old one.
#[utoipa::path(post, path = "/permissions", tag = "principals", operation_id = "permission_create",
    request_body = PermissionCreate,
    responses((status = 201, body = PermissionView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn permission_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(p): JsonBody<PermissionCreate>,
) -> Result<(StatusCode, Json<PermissionView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.permission_create(&ctx, p).await?)))
}

/// Revoke a grant (needs `Permissions.Modify` on its object).
#[utoipa::path(delete, path = "/permissions/{id}", tag = "principals", operation_id = "permission_delete",
    params(("id" = Uuid, Path, description = "permission id")),
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn permission_delete(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = super::extract::parse_id(&id)?;
    app.permission_delete(&ctx, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
