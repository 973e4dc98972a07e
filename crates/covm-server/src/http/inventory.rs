//! The inventory: what is in a folder, folders, datastores, networks, pools and hosts.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use covm_types::ErrorBody;
use covm_types::api::{
    DatastoreCreate, DatastoreView, FolderCreate, FolderView, HostView, InventoryQuery, ListQuery, NetworkCreate,
    NetworkForwards, NetworkView, ObjectRef, Page, PoolCreate, PoolView,
};
use covm_types::error::ConflictError;

use super::error::ApiError;
use super::extract::{Auth, JsonBody, QueryParams};
use crate::app::App;

/// What is in a folder (`covm ls`): the objects I may view, and folders that lead to some.
#[utoipa::path(get, path = "/inventory", tag = "inventory", operation_id = "inventory_list", params(InventoryQuery),
    responses((status = 200, body = Vec<ObjectRef>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn inventory_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<InventoryQuery>,
) -> Result<Json<Vec<ObjectRef>>, ApiError> {
    Ok(Json(app.inventory_list(&ctx, q.path.as_deref()).await?))
}

/// Folders I may view, by path.
#[utoipa::path(get, path = "/folders", tag = "inventory", operation_id = "folder_list", params(ListQuery),
    responses((status = 200, body = Page<FolderView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn folder_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<Page<FolderView>>, ApiError> {
    Ok(Json(app.folders_list(&ctx, q).await?))
}

/// Create a folder in `parent` (needs `Folder.Create` on the parent).
#[utoipa::path(post, path = "/folders", tag = "inventory", operation_id = "folder_create", request_body = FolderCreate,
    responses((status = 201, body = FolderView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn folder_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(p): JsonBody<FolderCreate>,
) -> Result<(StatusCode, Json<FolderView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.folder_create(&ctx, p).await?)))
}

/// One folder, by id or name of a top-level folder (paths go in `/inventory?path=`).
#[utoipa::path(get, path = "/folders/{folder}", tag = "inventory", operation_id = "folder_get",
    params(("folder" = String, Path, description = "folder id or top-level name")),
    responses((status = 200, body = FolderView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn folder_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(folder): Path<String>,
) -> Result<Json<FolderView>, ApiError> {
    Ok(Json(app.folder_get(&ctx, &folder).await?))
}

/// Delete an empty folder (needs `Folder.Delete` on it).
#[utoipa::path(delete, path = "/folders/{folder}", tag = "inventory", operation_id = "folder_delete",
    params(("folder" = String, Path, description = "folder id or top-level name")),
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn folder_delete(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(folder): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.folder_delete(&ctx, &folder).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Datastores I may view, with their capacity.
#[utoipa::path(get, path = "/datastores", tag = "inventory", operation_id = "datastore_list", params(ListQuery),
    responses((status = 200, body = Page<DatastoreView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn datastore_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<Page<DatastoreView>>, ApiError> {
    Ok(Json(app.datastores_list(&ctx, q).await?))
}

/// Add a datastore: an existing directory on the host (needs `Datastore.Config` on its folder).
#[utoipa::path(post, path = "/datastores", tag = "inventory", operation_id = "datastore_create",
    request_body = DatastoreCreate,
    responses((status = 201, body = DatastoreView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn datastore_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(p): JsonBody<DatastoreCreate>,
) -> Result<(StatusCode, Json<DatastoreView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.datastore_create(&ctx, p).await?)))
}

/// One datastore.
#[utoipa::path(get, path = "/datastores/{datastore}", tag = "inventory", operation_id = "datastore_get",
    params(("datastore" = String, Path, description = "datastore name or id")),
    responses((status = 200, body = DatastoreView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn datastore_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(ds): Path<String>,
) -> Result<Json<DatastoreView>, ApiError> {
    Ok(Json(app.datastore_get(&ctx, &ds).await?))
}

/// Networks I may view.
#[utoipa::path(get, path = "/networks", tag = "inventory", operation_id = "network_list", params(ListQuery),
    responses((status = 200, body = Page<NetworkView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn network_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<Page<NetworkView>>, ApiError> {
    Ok(Json(app.networks_list(&ctx, q).await?))
}

/// Add a network (needs `Network.Config` on its folder).
#[utoipa::path(post, path = "/networks", tag = "inventory", operation_id = "network_create", request_body = NetworkCreate,
    responses((status = 201, body = NetworkView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn network_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(p): JsonBody<NetworkCreate>,
) -> Result<(StatusCode, Json<NetworkView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.network_create(&ctx, p).await?)))
}

/// A network, with a NAT network's pinned addresses and port forwards.
#[utoipa::path(get, path = "/networks/{net}", tag = "inventory", operation_id = "network_get",
    params(("net" = String, Path, description = "network name or id")),
    responses((status = 200, body = NetworkView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn network_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(net): Path<String>,
) -> Result<Json<NetworkView>, ApiError> {
    Ok(Json(app.network_get(&ctx, &net).await?))
}

/// Delete a network no VM uses (409 `in_use` names them), with everything covm made for it on the host.
#[utoipa::path(delete, path = "/networks/{net}", tag = "inventory", operation_id = "network_delete",
    params(("net" = String, Path, description = "network name or id")),
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn network_delete(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(net): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.network_delete(&ctx, &net).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replace a NAT network's port forwards (host port → a VM's port), applied at once.
#[utoipa::path(put, path = "/networks/{net}/forwards", tag = "inventory", operation_id = "network_forwards_set",
    params(("net" = String, Path, description = "network name or id")),
    request_body = NetworkForwards,
    responses((status = 200, body = NetworkView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn network_forwards_set(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(net): Path<String>,
    JsonBody(p): JsonBody<NetworkForwards>,
) -> Result<Json<NetworkView>, ApiError> {
    Ok(Json(app.network_forwards_set(&ctx, &net, p).await?))
}

/// Resource pools I may view, with their quotas.
#[utoipa::path(get, path = "/pools", tag = "inventory", operation_id = "pool_list", params(ListQuery),
    responses((status = 200, body = Page<PoolView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn pool_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<Page<PoolView>>, ApiError> {
    Ok(Json(app.pools_list(&ctx, q).await?))
}

/// Add a resource pool with a quota (needs `Resource.CreatePool` on its folder).
#[utoipa::path(post, path = "/pools", tag = "inventory", operation_id = "pool_create", request_body = PoolCreate,
    responses((status = 201, body = PoolView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn pool_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(p): JsonBody<PoolCreate>,
) -> Result<(StatusCode, Json<PoolView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.pool_create(&ctx, p).await?)))
}

/// Hosts I may view, with CPUs, memory and KVM.
#[utoipa::path(get, path = "/hosts", tag = "inventory", operation_id = "host_list", params(ListQuery),
    responses((status = 200, body = Page<HostView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn host_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<Page<HostView>>, ApiError> {
    Ok(Json(app.hosts_list(&ctx, q).await?))
}
