//! VM snapshots (`app/snapshots.rs`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use covm_types::ErrorBody;
use covm_types::error::{ConflictError, LeasedError, StaleError};
use covm_types::snapshot::{
    DiskSnapshotCreate, DiskSnapshotView, SnapshotCreate, SnapshotRevert, SnapshotUpdate, SnapshotView,
};
use covm_types::vm::{TaskView, VmView};

use super::error::ApiError;
use super::extract::{Auth, JsonBody};
use super::vms::Pre;
use crate::app::App;

/// Takes a snapshot of a VM: its config version, a tag in every disk it covers and, with `memory`, the
/// running guest's RAM and devices. The rules are checked at once; the snapshot itself is a task
/// (`vm.snapshot.create`), whose message names the snapshot taken.
#[utoipa::path(post, path = "/vms/{vm}/snapshots", tag = "snapshots", operation_id = "snapshot_create",
    params(("vm" = String, Path, description = "VM name or id")),
    request_body = SnapshotCreate,
    responses((status = 202, body = TaskView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn snapshot_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    JsonBody(p): JsonBody<SnapshotCreate>,
) -> Result<(StatusCode, Json<TaskView>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(app.snapshot_create(&ctx, &vm, p).await?)))
}

/// A VM's snapshots, oldest first; `parent` makes the tree.
#[utoipa::path(get, path = "/vms/{vm}/snapshots", tag = "snapshots", operation_id = "snapshot_list",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Vec<SnapshotView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn snapshot_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
) -> Result<Json<Vec<SnapshotView>>, ApiError> {
    Ok(Json(app.snapshots_list(&ctx, &vm).await?))
}

/// One snapshot, by name or id.
#[utoipa::path(get, path = "/vms/{vm}/snapshots/{snap}", tag = "snapshots", operation_id = "snapshot_get",
    params(("vm" = String, Path, description = "VM name or id"), ("snap" = String, Path, description = "snapshot name or id")),
    responses((status = 200, body = SnapshotView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn snapshot_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((vm, snap)): Path<(String, String)>,
) -> Result<Json<SnapshotView>, ApiError> {
    Ok(Json(app.snapshot_get(&ctx, &vm, &snap).await?))
}

/// Pins or unpins a snapshot (a pinned safety snapshot never expires), or changes its description.
#[utoipa::path(patch, path = "/vms/{vm}/snapshots/{snap}", tag = "snapshots", operation_id = "snapshot_update",
    params(("vm" = String, Path, description = "VM name or id"), ("snap" = String, Path, description = "snapshot name or id")),
    request_body = SnapshotUpdate,
    responses((status = 200, body = SnapshotView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn snapshot_update(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((vm, snap)): Path<(String, String)>,
    JsonBody(p): JsonBody<SnapshotUpdate>,
) -> Result<Json<SnapshotView>, ApiError> {
    Ok(Json(app.snapshot_update(&ctx, &vm, &snap, p).await?))
}

/// Deletes a snapshot: its record and its tags.
#[utoipa::path(delete, path = "/vms/{vm}/snapshots/{snap}", tag = "snapshots", operation_id = "snapshot_delete",
    params(("vm" = String, Path, description = "VM name or id"), ("snap" = String, Path, description = "snapshot name or id")),
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn snapshot_delete(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((vm, snap)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.snapshot_delete(&ctx, &vm, &snap).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Puts a VM back to a snapshot: its config, its data, or both (a safety snapshot of the present first).
#[utoipa::path(post, path = "/vms/{vm}/snapshots/{snap}/revert", tag = "snapshots", operation_id = "snapshot_revert",
    params(("vm" = String, Path, description = "VM name or id"), ("snap" = String, Path, description = "snapshot name or id"),
        ("If-Match" = Option<String>, Header, description = "the version the revert is based on"),
        ("Covm-Lease" = Option<i64>, Header, description = "the fencing token of my lease")),
    request_body = SnapshotRevert,
    responses((status = 200, body = VmView), (status = 409, body = ConflictError), (status = 412, body = StaleError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn snapshot_revert(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((vm, snap)): Path<(String, String)>,
    Pre(pre): Pre,
    JsonBody(p): JsonBody<SnapshotRevert>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(app.snapshot_revert(&ctx, &vm, &snap, p, pre).await?))
}

/// Takes a snapshot of one disk (qcow2, not shared), live through the QEMU of a VM running it.
#[utoipa::path(post, path = "/disks/{disk}/snapshots", tag = "snapshots", operation_id = "disk_snapshot_create",
    params(("disk" = String, Path, description = "disk name or id")),
    request_body = DiskSnapshotCreate,
    responses((status = 201, body = DiskSnapshotView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn disk_snapshot_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(disk): Path<String>,
    JsonBody(p): JsonBody<DiskSnapshotCreate>,
) -> Result<(StatusCode, Json<DiskSnapshotView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.disk_snapshot_create(&ctx, &disk, p).await?)))
}

/// A disk's own snapshots, oldest first.
#[utoipa::path(get, path = "/disks/{disk}/snapshots", tag = "snapshots", operation_id = "disk_snapshot_list",
    params(("disk" = String, Path, description = "disk name or id")),
    responses((status = 200, body = Vec<DiskSnapshotView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn disk_snapshot_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(disk): Path<String>,
) -> Result<Json<Vec<DiskSnapshotView>>, ApiError> {
    Ok(Json(app.disk_snapshots_list(&ctx, &disk).await?))
}

/// Deletes a disk's snapshot.
#[utoipa::path(delete, path = "/disks/{disk}/snapshots/{snap}", tag = "snapshots", operation_id = "disk_snapshot_delete",
    params(("disk" = String, Path, description = "disk name or id"), ("snap" = String, Path, description = "snapshot name or id")),
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn disk_snapshot_delete(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((disk, snap)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.disk_snapshot_delete(&ctx, &disk, &snap).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Puts a disk back to its snapshot (refused while a running VM holds it).
#[utoipa::path(post, path = "/disks/{disk}/snapshots/{snap}/revert", tag = "snapshots", operation_id = "disk_snapshot_revert",
    params(("disk" = String, Path, description = "disk name or id"), ("snap" = String, Path, description = "snapshot name or id")),
    responses((status = 200, body = DiskSnapshotView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn disk_snapshot_revert(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((disk, snap)): Path<(String, String)>,
) -> Result<Json<DiskSnapshotView>, ApiError> {
    Ok(Json(app.disk_snapshot_revert(&ctx, &disk, &snap).await?))
}
