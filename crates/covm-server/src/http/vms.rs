//! VMs, their history, and their edit leases.

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use covm_types::api::Page;
use covm_types::error::{ConflictError, LeasedError, StaleError};
use covm_types::vm::{
    DiffQuery, DiffView, GuestInfo, GuestPassword, GuestSshKeys, LeaseReleaseQuery, LeaseRequest, LeaseView, Nic,
    NicQuery, PresenceEntry, PresenceSet, RevertRequest, VersionQuery, VersionView, VmChangeQuery, VmClone, VmConfig,
    VmListQuery, VmView,
};
use covm_types::{Error, ErrorBody};
use serde::Serialize;

use super::error::ApiError;
use super::extract::{Auth, JsonBody, QueryParams};
use crate::app::App;
use crate::app::vms::Preconditions;
use covm_types::vm::VmChangeResponse;

/// `If-Match` (`"7"`, `7`, `W/"7"`; `*` is no condition) and `Covm-Lease` (a fencing token).
pub struct Pre(pub Preconditions);

fn header_int(headers: &HeaderMap, name: &str, what: &str) -> Result<Option<i64>, Error> {
    let Some(v) = headers.get(name) else { return Ok(None) };
    let s = v.to_str().unwrap_or_default().trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.trim_start_matches("W/").trim_matches('"');
    s.parse::<i64>().map(Some).map_err(|_| Error::invalid(name, format!("{name} is {what}, like \"7\"")))
}

impl<S: Send + Sync> FromRequestParts<S> for Pre {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Pre(Preconditions {
            if_match: header_int(&parts.headers, "If-Match", "a version number")?,
            lease_token: header_int(&parts.headers, "Covm-Lease", "the fencing token of your lease (a number)")?,
        }))
    }
}

fn with_etag<T: Serialize>(status: StatusCode, version: i64, body: &T) -> Response {
    let mut r = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// VMs I may view, by name.
#[utoipa::path(get, path = "/vms", tag = "vms", operation_id = "vm_list", params(VmListQuery),
    responses((status = 200, body = Page<VmView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn vm_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<VmListQuery>,
) -> Result<Json<Page<VmView>>, ApiError> {
    Ok(Json(app.vms_list(&ctx, q).await?))
}

/// Create a VM from a config (every field but `name` has a default). Needs
/// `VirtualMachine.Inventory.Create` on the folder and `Resource.AssignVMToPool` on the pool.
#[utoipa::path(post, path = "/vms", tag = "vms", operation_id = "vm_create", request_body = VmConfig,
    responses((status = 201, body = VmView, headers(("ETag" = String))), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_create(
    State(app): State<App>,
    Auth(ctx): Auth,
    JsonBody(c): JsonBody<VmConfig>,
) -> Result<Response, ApiError> {
    let vm = app.vm_create(&ctx, c).await?;
    Ok(with_etag(StatusCode::CREATED, vm.version, &vm))
}

/// A VM: config, runtime state, lease; `ETag` is its version.
#[utoipa::path(get, path = "/vms/{vm}", tag = "vms", operation_id = "vm_get",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, body = VmView, headers(("ETag" = String))), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_get(State(app): State<App>, Auth(ctx): Auth, Path(vm): Path<String>) -> Result<Response, ApiError> {
    let v = app.vm_get(&ctx, &vm).await?;
    Ok(with_etag(StatusCode::OK, v.version, &v))
}

/// Change a VM with a JSON Merge Patch (RFC 7386). With `If-Match` a stale base is refused (412, with
/// what changed since); without it the patch applies to the newest version. Each field needs its
/// privilege (`cpus`: CPUCount, `memory_mib`: Memory, devices: AddRemoveDevice, disks:
/// AddExistingDisk/RemoveDisk, the rest: Edit). While someone else holds the lease: 423.
#[utoipa::path(patch, path = "/vms/{vm}", tag = "vms", operation_id = "vm_change",
    params(("vm" = String, Path, description = "VM name or id"), VmChangeQuery,
        ("If-Match" = Option<String>, Header, description = "the version the change is based on"),
        ("Covm-Lease" = Option<i64>, Header, description = "the fencing token of my lease")),
    request_body(content = covm_types::vm::VmChange, content_type = "application/merge-patch+json"),
    responses((status = 200, body = VmChangeResponse, headers(("ETag" = String))), (status = 409, body = ConflictError), (status = 412, body = StaleError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_change(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    Pre(pre): Pre,
    QueryParams(q): QueryParams<VmChangeQuery>,
    JsonBody(patch): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    let dry = q.dry_run;
    let (view, plan) = app.vm_change(&ctx, &vm, patch, pre, q).await?;
    Ok(if dry {
        with_etag(StatusCode::OK, view.version, &VmChangeResponse::Plan(plan))
    } else {
        with_etag(StatusCode::OK, view.version, &VmChangeResponse::Vm(Box::new(view)))
    })
}

/// Delete a VM that is off (needs `VirtualMachine.Inventory.Delete`).
#[utoipa::path(delete, path = "/vms/{vm}", tag = "vms", operation_id = "vm_delete",
    params(("vm" = String, Path, description = "VM name or id"),
        ("If-Match" = Option<String>, Header, description = "the version the deletion is based on"),
        ("Covm-Lease" = Option<i64>, Header, description = "the fencing token of my lease")),
    responses((status = 204), (status = 409, body = ConflictError), (status = 412, body = StaleError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn vm_delete(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    Pre(pre): Pre,
) -> Result<StatusCode, ApiError> {
    app.vm_delete(&ctx, &vm, pre).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The config history, newest first: author, time, message, request id and the RFC 6902 patch.
#[utoipa::path(get, path = "/vms/{vm}/versions", tag = "vms", operation_id = "vm_version_list",
    params(("vm" = String, Path, description = "VM name or id"), VersionQuery),
    responses((status = 200, body = Page<VersionView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn vm_version_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    QueryParams(q): QueryParams<VersionQuery>,
) -> Result<Json<Page<VersionView>>, ApiError> {
    Ok(Json(app.vm_versions(&ctx, &vm, q).await?))
}

/// One version with its whole document.
#[utoipa::path(get, path = "/vms/{vm}/versions/{n}", tag = "vms", operation_id = "vm_version_get",
    params(("vm" = String, Path, description = "VM name or id"), ("n" = i64, Path, description = "version")),
    responses((status = 200, body = VersionView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn vm_version_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((vm, n)): Path<(String, String)>,
) -> Result<Json<VersionView>, ApiError> {
    let n = n.parse::<i64>().map_err(|_| Error::invalid("n", "a version is a number"))?;
    Ok(Json(app.vm_version(&ctx, &vm, n).await?))
}

/// What changed between two versions: RFC 6902 and one line per field.
#[utoipa::path(get, path = "/vms/{vm}/diff", tag = "vms", operation_id = "vm_diff",
    params(("vm" = String, Path, description = "VM name or id"), DiffQuery),
    responses((status = 200, body = DiffView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn vm_diff(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    QueryParams(q): QueryParams<DiffQuery>,
) -> Result<Json<DiffView>, ApiError> {
    Ok(Json(app.vm_diff(&ctx, &vm, q.from, q.to).await?))
}

/// Write a new version whose content is version K's (checked like any change).
#[utoipa::path(post, path = "/vms/{vm}/revert", tag = "vms", operation_id = "vm_revert",
    params(("vm" = String, Path, description = "VM name or id"),
        ("If-Match" = Option<String>, Header, description = "the version the revert is based on"),
        ("Covm-Lease" = Option<i64>, Header, description = "the fencing token of my lease")),
    request_body = RevertRequest,
    responses((status = 200, body = VmView, headers(("ETag" = String))), (status = 409, body = ConflictError), (status = 412, body = StaleError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_revert(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    Pre(pre): Pre,
    JsonBody(r): JsonBody<RevertRequest>,
) -> Result<Response, ApiError> {
    let v = app.vm_revert(&ctx, &vm, r, pre).await?;
    Ok(with_etag(StatusCode::OK, v.version, &v))
}

/// Make the VM a template: powered off, it becomes read-only and the source of clones (a new config
/// version says so). Idempotent.
#[utoipa::path(post, path = "/vms/{vm}/template", tag = "vms", operation_id = "vm_template",
    params(("vm" = String, Path, description = "VM name or id"),
        ("If-Match" = Option<String>, Header, description = "the version this is based on"),
        ("Covm-Lease" = Option<i64>, Header, description = "the fencing token of my lease")),
    responses((status = 200, body = VmView, headers(("ETag" = String))), (status = 409, body = ConflictError), (status = 412, body = StaleError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_template(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    Pre(pre): Pre,
) -> Result<Response, ApiError> {
    let v = app.vm_template(&ctx, &vm, pre).await?;
    Ok(with_etag(StatusCode::OK, v.version, &v))
}

/// A new VM from this VM or template: its disks copied (full) or as qcow2 overlays on the template's
/// (linked), new MAC addresses, and with `customize` a new cloud-init identity. All or nothing.
#[utoipa::path(post, path = "/vms/{vm}/clone", tag = "vms", operation_id = "vm_clone",
    params(("vm" = String, Path, description = "the source VM or template: name or id")),
    request_body = VmClone,
    responses((status = 201, body = VmView, headers(("ETag" = String))), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_clone(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    JsonBody(r): JsonBody<VmClone>,
) -> Result<Response, ApiError> {
    let v = app.vm_clone(&ctx, &vm, r).await?;
    Ok(with_etag(StatusCode::CREATED, v.version, &v))
}

/// What the guest agent tells of the running guest now: OS, host name, interfaces and addresses.
/// A guest without an agent answers `agent: false` and why.
#[utoipa::path(get, path = "/vms/{vm}/guest", tag = "vms", operation_id = "vm_guest",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, body = GuestInfo), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_guest(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
) -> Result<Json<GuestInfo>, ApiError> {
    Ok(Json(app.vm_guest(&ctx, &vm).await?))
}

/// Set a guest user's password through the guest agent (409 `agent_unavailable` without one).
#[utoipa::path(post, path = "/vms/{vm}/guest/password", tag = "vms", operation_id = "vm_guest_password",
    params(("vm" = String, Path, description = "VM name or id")),
    request_body = GuestPassword,
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_guest_password(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    JsonBody(p): JsonBody<GuestPassword>,
) -> Result<StatusCode, ApiError> {
    app.vm_guest_password(&ctx, &vm, p).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Add SSH public keys to a guest user's `authorized_keys` through the guest agent.
#[utoipa::path(post, path = "/vms/{vm}/guest/ssh-keys", tag = "vms", operation_id = "vm_guest_ssh_keys",
    params(("vm" = String, Path, description = "VM name or id")),
    request_body = GuestSshKeys,
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_guest_ssh_keys(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    JsonBody(p): JsonBody<GuestSshKeys>,
) -> Result<StatusCode, ApiError> {
    app.vm_guest_ssh_keys(&ctx, &vm, p).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Add a NIC: plugged into a running VM at once (a free PCIe port on q35), else (or with
/// `next_boot`) in the config. The other NICs keep their QEMU names (they are named after their MACs).
#[utoipa::path(post, path = "/vms/{vm}/nics", tag = "vms", operation_id = "vm_nic_add",
    params(("vm" = String, Path, description = "VM name or id"), NicQuery,
        ("If-Match" = Option<String>, Header, description = "the version this is based on"),
        ("Covm-Lease" = Option<i64>, Header, description = "the fencing token of my lease")),
    request_body = Nic,
    responses((status = 200, body = VmView, headers(("ETag" = String))), (status = 409, body = ConflictError), (status = 412, body = StaleError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_nic_add(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    QueryParams(q): QueryParams<NicQuery>,
    Pre(pre): Pre,
    JsonBody(n): JsonBody<Nic>,
) -> Result<Response, ApiError> {
    let v = app.vm_nic_add(&ctx, &vm, n, q.next_boot, pre).await?;
    Ok(with_etag(StatusCode::OK, v.version, &v))
}

/// Remove the NIC with this MAC: unplugged from a running VM first (the guest lets go of it), else
/// (or with `next_boot`) from the config.
#[utoipa::path(delete, path = "/vms/{vm}/nics/{mac}", tag = "vms", operation_id = "vm_nic_remove",
    params(("vm" = String, Path, description = "VM name or id"), ("mac" = String, Path, description = "the NIC's MAC"), NicQuery,
        ("If-Match" = Option<String>, Header, description = "the version this is based on"),
        ("Covm-Lease" = Option<i64>, Header, description = "the fencing token of my lease")),
    responses((status = 200, body = VmView, headers(("ETag" = String))), (status = 409, body = ConflictError), (status = 412, body = StaleError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_nic_remove(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((vm, mac)): Path<(String, String)>,
    QueryParams(q): QueryParams<NicQuery>,
    Pre(pre): Pre,
) -> Result<Response, ApiError> {
    let v = app.vm_nic_remove(&ctx, &vm, &mac, q.next_boot, pre).await?;
    Ok(with_etag(StatusCode::OK, v.version, &v))
}

/// The VM's live lease, or null.
#[utoipa::path(get, path = "/vms/{vm}/lease", tag = "vms", operation_id = "lease_get",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Option<LeaseView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn lease_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
) -> Result<Json<Option<LeaseView>>, ApiError> {
    Ok(Json(app.lease_get(&ctx, &vm).await?))
}

/// Check the VM out for `ttl_s` seconds (at most an hour); others' writes get 423 until it ends.
/// The answer's `token` goes in `Covm-Lease` with my writes.
#[utoipa::path(post, path = "/vms/{vm}/lease", tag = "vms", operation_id = "lease_acquire",
    params(("vm" = String, Path, description = "VM name or id")), request_body = LeaseRequest,
    responses((status = 201, body = LeaseView), (status = 409, body = ConflictError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn lease_acquire(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    JsonBody(p): JsonBody<LeaseRequest>,
) -> Result<(StatusCode, Json<LeaseView>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.lease_acquire(&ctx, &vm, p).await?)))
}

/// Extend my live lease.
#[utoipa::path(put, path = "/vms/{vm}/lease", tag = "vms", operation_id = "lease_renew",
    params(("vm" = String, Path, description = "VM name or id"),
        ("Covm-Lease" = Option<i64>, Header, description = "the fencing token of my lease")),
    request_body = LeaseRequest,
    responses((status = 200, body = LeaseView), (status = 409, body = ConflictError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn lease_renew(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    Pre(pre): Pre,
    JsonBody(p): JsonBody<LeaseRequest>,
) -> Result<Json<LeaseView>, ApiError> {
    Ok(Json(app.lease_renew(&ctx, &vm, p, pre.lease_token).await?))
}

/// Release my lease; `?force=true` breaks anyone's (needs `VirtualMachine.Lease.Break`).
#[utoipa::path(delete, path = "/vms/{vm}/lease", tag = "vms", operation_id = "lease_release",
    params(("vm" = String, Path, description = "VM name or id"), LeaseReleaseQuery),
    responses((status = 204), (status = 409, body = ConflictError), (status = 423, body = LeasedError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn lease_release(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    QueryParams(q): QueryParams<LeaseReleaseQuery>,
) -> Result<StatusCode, ApiError> {
    app.lease_release(&ctx, &vm, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Who is on the VM now: users viewing or editing it (their heartbeats), and the lease holder as
/// editing.
#[utoipa::path(get, path = "/vms/{vm}/presence", tag = "vms", operation_id = "presence_get",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Vec<PresenceEntry>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn presence_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
) -> Result<Json<Vec<PresenceEntry>>, ApiError> {
    Ok(Json(app.presence_list(&ctx, &vm).await?))
}

/// I am viewing or editing the VM: a heartbeat (send it again within the presence TTL, 30 s by
/// default); answers who is on it now. Kept in memory, told on the feed as `event: presence`,
/// never in the log.
#[utoipa::path(put, path = "/vms/{vm}/presence", tag = "vms", operation_id = "presence_set",
    params(("vm" = String, Path, description = "VM name or id")), request_body = PresenceSet,
    responses((status = 200, body = Vec<PresenceEntry>), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn presence_set(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    JsonBody(p): JsonBody<PresenceSet>,
) -> Result<Json<Vec<PresenceEntry>>, ApiError> {
    Ok(Json(app.presence_set(&ctx, &vm, p.state).await?))
}

/// I left the VM.
#[utoipa::path(delete, path = "/vms/{vm}/presence", tag = "vms", operation_id = "presence_leave",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn presence_leave(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.presence_leave(&ctx, &vm).await?;
    Ok(StatusCode::NO_CONTENT)
}
