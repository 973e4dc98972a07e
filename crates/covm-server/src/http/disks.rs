//! First-class disks.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use covm_types::ErrorBody;
use covm_types::api::Page;
use covm_types::disk::{DiskClone, DiskCreate, DiskImport, DiskListQuery, DiskResize, DiskView};
use covm_types::error::{ConflictError, LeasedError};

use super::error::ApiError;
use super::extract::{Auth, JsonBody, QueryParams};
use crate::app::App;

/// Disks I may view.
#[utoipa::path(get, path = "/disks", tag = "disks", operation_id = "disk_list", params(DiskListQuery),
    responses((status = 200, body = Page<DiskView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn disk_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<DiskListQuery>,
) -> Result<Json<Page<DiskView>>, ApiError> {
    Ok(Json(app.disks_list(&ctx, q).await?))
}

/// Create a disk with `qemu-img` (needs `Disk.Create` on the folder and `Datastore.AllocateSpace` on
/// the datastore; checks free space and the pool's disk quota first).
#[utoipa::path(post, path = "/disks", tag = "disks", operation_id = "disk_create", request_body = DiskCreate,
    responses((status = 201, body = DiskView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn disk_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(p): JsonBody<DiskCreate>,
) -> Result<(StatusCode, Json<DiskView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.disk_create(&ctx, p).await?)))
}

/// A disk, with what `qemu-img info` says of its image.
#[utoipa::path(get, path = "/disks/{disk}", tag = "disks", operation_id = "disk_get",
    params(("disk" = String, Path, description = "disk name or id")),
    responses((status = 200, body = DiskView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn disk_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(disk): Path<String>,
) -> Result<Json<DiskView>, ApiError> {
    Ok(Json(app.disk_get(&ctx, &disk).await?))
}

/// Delete a disk and its image (refused while a VM holds it, naming the VMs).
#[utoipa::path(delete, path = "/disks/{disk}", tag = "disks", operation_id = "disk_delete",
    params(("disk" = String, Path, description = "disk name or id")),
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn disk_delete(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(disk): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.disk_delete(&ctx, &disk).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Grow a disk (needs `Disk.Extend`; shrinking is refused).
#[utoipa::path(post, path = "/disks/{disk}/resize", tag = "disks", operation_id = "disk_resize",
    params(("disk" = String, Path, description = "disk name or id")), request_body = DiskResize,
    responses((status = 200, body = DiskView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn disk_resize(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(disk): Path<String>,
    JsonBody(p): JsonBody<DiskResize>,
) -> Result<Json<DiskView>, ApiError> {
    Ok(Json(app.disk_resize(&ctx, &disk, p).await?))
}

/// Copy a disk into a new one in the same datastore.
#[utoipa::path(post, path = "/disks/{disk}/clone", tag = "disks", operation_id = "disk_clone",
    params(("disk" = String, Path, description = "disk name or id")), request_body = DiskClone,
    responses((status = 201, body = DiskView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn disk_clone(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(disk): Path<String>,
    JsonBody(p): JsonBody<DiskClone>,
) -> Result<(StatusCode, Json<DiskView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.disk_clone(&ctx, &disk, p).await?)))
}

/// Make the disk `{disk}` from an image file already inside a datastore (moved to a covm name).
#[utoipa::path(post, path = "/disks/{disk}/import", tag = "disks", operation_id = "disk_import",
    params(("disk" = String, Path, description = "the new disk's name")), request_body = DiskImport,
    responses((status = 201, body = DiskView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn disk_import(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(disk): Path<String>,
    JsonBody(p): JsonBody<DiskImport>,
) -> Result<(StatusCode, Json<DiskView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.disk_import(&ctx, &disk, p).await?)))
}

/// Attach a disk to a VM (needs `VirtualMachine.Config.AddExistingDisk`): hot-plugged on a running VM's
/// virtio-scsi bus; one writer unless the disk is `multi_writer`; controller and unit chosen unless
/// given, and checked.
#[utoipa::path(post, path = "/vms/{vm}/disks", tag = "disks", operation_id = "vm_disk_attach",
    params(("vm" = String, Path, description = "VM name or id")), request_body = covm_types::disk::DiskAttach,
    responses((status = 200, body = covm_types::vm::VmView), (status = 409, body = ConflictError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn vm_disk_attach(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    JsonBody(p): JsonBody<covm_types::disk::DiskAttach>,
) -> Result<Json<covm_types::vm::VmView>, ApiError> {
    Ok(Json(app.vm_disk_attach(&ctx, &vm, p).await?))
}

/// Detach a disk from a VM (needs `VirtualMachine.Config.RemoveDisk`); on a running VM the guest must
/// release it, or the detach fails and the disk stays attached.
#[utoipa::path(delete, path = "/vms/{vm}/disks/{disk}", tag = "disks", operation_id = "vm_disk_detach",
    params(("vm" = String, Path, description = "VM name or id"), ("disk" = String, Path, description = "disk name or id"), covm_types::disk::DetachQuery),
    responses((status = 200, body = covm_types::vm::VmView), (status = 409, body = ConflictError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn vm_disk_detach(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((vm, disk)): Path<(String, String)>,
    QueryParams(q): QueryParams<covm_types::disk::DetachQuery>,
) -> Result<Json<covm_types::vm::VmView>, ApiError> {
    Ok(Json(app.vm_disk_detach(&ctx, &vm, &disk, q.next_boot, q.generation).await?))
}

/// Move a disk from the VM that holds it to `to_vm`, as one operation (on failure it goes back).
#[utoipa::path(post, path = "/disks/{disk}/move", tag = "disks", operation_id = "disk_move",
    params(("disk" = String, Path, description = "disk name or id")), request_body = covm_types::disk::DiskMove,
    responses((status = 200, body = covm_types::vm::VmView), (status = 409, body = ConflictError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn disk_move(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(disk): Path<String>,
    JsonBody(p): JsonBody<covm_types::disk::DiskMove>,
) -> Result<Json<covm_types::vm::VmView>, ApiError> {
    Ok(Json(app.disk_move(&ctx, &disk, p).await?))
}

/// What QEMU holds of block nodes and devices for a running VM (`query-named-block-nodes`,
/// `query-block`), to compare with its config.
#[utoipa::path(get, path = "/vms/{vm}/block", tag = "disks", operation_id = "vm_block_state",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, body = covm_types::vm::BlockState), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn vm_block_state(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
) -> Result<Json<covm_types::vm::BlockState>, ApiError> {
    Ok(Json(app.vm_block_state(&ctx, &vm).await?))
}

/// What a running VM's QEMU process uses of its host now: CPU time and resident memory, as the
/// host's kernel counts them (409 `vm_not_running` when it does not run).
#[utoipa::path(get, path = "/vms/{vm}/stats", tag = "vms", operation_id = "vm_stats",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, body = covm_types::vm::VmStats), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn vm_stats(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
) -> Result<Json<covm_types::vm::VmStats>, ApiError> {
    Ok(Json(app.vm_stats(&ctx, &vm).await?))
}
