//! The master key of encrypted disks (`app::keys`).

use axum::Json;
use axum::extract::State;
use covm_types::ErrorBody;
use covm_types::api::KeysRotated;
use covm_types::error::ConflictError;

use super::error::ApiError;
use super::extract::Auth;
use crate::app::App;

/// Wrap every encrypted disk's key again under a new master key (needs `Permissions.Modify` on `/`).
/// No image is touched. Only covm's own `DATA/master.key` rotates (409 `key_unavailable` when the key
/// is given by `--master-key-file` or `COVM_MASTER_KEY`).
#[utoipa::path(post, path = "/keys/rotate", tag = "disks", operation_id = "keys_rotate",
    responses((status = 200, body = KeysRotated), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn keys_rotate(State(app): State<App>, Auth(ctx): Auth) -> Result<Json<KeysRotated>, ApiError> {
    Ok(Json(app.keys_rotate(&ctx).await?))
}
