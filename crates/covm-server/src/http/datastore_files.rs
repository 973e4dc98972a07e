//! Files in a datastore (`app::datastore_files`): list, upload (whole or in parts with
//! `Content-Range`), download, delete. The file's path is one path segment with its `/` sent as `%2F`
//! (`/datastores/local/files/iso%2Fdebian.iso`), as GitLab's files API does.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use covm_types::disk::{FileBytes, FileUploadQuery, FileView, UploadView};
use covm_types::error::ConflictError;
use covm_types::{Error, ErrorBody};
use futures::TryStreamExt;

use super::error::ApiError;
use super::extract::{Auth, QueryParams};
use crate::app::App;
use crate::app::datastore_files::{UploadPart, UploadRange};

/// The files of a datastore that are not covm's disks: ISOs, images to import, kernels (needs
/// `Datastore.Browse`).
#[utoipa::path(get, path = "/datastores/{datastore}/files", tag = "inventory", operation_id = "datastore_file_list",
    params(("datastore" = String, Path, description = "datastore name or id")),
    responses((status = 200, body = Vec<FileView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn datastore_file_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(ds): Path<String>,
) -> Result<Json<Vec<FileView>>, ApiError> {
    Ok(Json(app.datastore_files(&ctx, &ds).await?))
}

/// `Content-Range: bytes START-END/TOTAL` (a part) or `bytes */TOTAL` (where does it stand?).
fn upload_part(headers: &HeaderMap) -> Result<UploadPart, Error> {
    let bad = || Error::invalid("Content-Range", "Content-Range is bytes START-END/TOTAL or bytes */TOTAL");
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        let len = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        return Ok(UploadPart::Whole(len));
    };
    let v = v.to_str().map_err(|_| bad())?.trim();
    let (range, total) = v.strip_prefix("bytes ").and_then(|r| r.split_once('/')).ok_or_else(bad)?;
    let total: u64 = total.parse().map_err(|_| bad())?;
    if range == "*" {
        return Ok(UploadPart::Status(total));
    }
    let (start, end) = range.split_once('-').ok_or_else(bad)?;
    Ok(UploadPart::Range(UploadRange {
        start: start.parse().map_err(|_| bad())?,
        end: end.parse().map_err(|_| bad())?,
        total,
    }))
}

/// Upload a file into the datastore (needs `Datastore.FileManagement`): the whole file as the body,
/// or in parts with `Content-Range: bytes START-END/TOTAL`, each starting where the upload stands
/// (`bytes */TOTAL` with an empty body asks where that is). A part that is not the last answers 202
/// with the state; the last answers 201 with the file, after checking `?sha256=` (a mismatch deletes
/// the upload). Free space is checked first; the path stays inside the datastore and out of its
/// `disks/` folder; an existing file is never replaced.
#[utoipa::path(put, path = "/datastores/{datastore}/files/{path}", tag = "inventory", operation_id = "datastore_file_upload",
    params(("datastore" = String, Path, description = "datastore name or id"),
        ("path" = String, Path, description = "the file's path in the datastore, `/` sent as `%2F`"),
        ("Content-Range" = Option<String>, Header, description = "bytes START-END/TOTAL for a part, bytes */TOTAL to ask where the upload stands"),
        FileUploadQuery),
    request_body(content = FileBytes, content_type = "application/octet-stream", description = "the file's bytes, or the part's"),
    responses((status = 201, body = UploadView, description = "the file is complete"),
        (status = 202, body = UploadView, description = "the part is stored; more to come"),
        (status = 200, body = UploadView, description = "where the upload stands (bytes */TOTAL)"),
        (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn datastore_file_upload(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((ds, path)): Path<(String, String)>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<FileUploadQuery>,
    body: Body,
) -> Result<(StatusCode, Json<UploadView>), ApiError> {
    let part = upload_part(&headers)?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let view = app.datastore_file_upload(&ctx, &ds, &path, part, q.sha256, Box::pin(stream)).await?;
    let status = match (view.complete, part) {
        (true, _) => StatusCode::CREATED,
        (false, UploadPart::Status(_)) => StatusCode::OK,
        (false, _) => StatusCode::ACCEPTED,
    };
    Ok((status, Json(view)))
}

/// Download a file of the datastore (needs `Datastore.Browse`).
#[utoipa::path(get, path = "/datastores/{datastore}/files/{path}", tag = "inventory", operation_id = "datastore_file_get",
    params(("datastore" = String, Path, description = "datastore name or id"),
        ("path" = String, Path, description = "the file's path in the datastore, `/` sent as `%2F`")),
    responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream"),
        (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn datastore_file_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((ds, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (full, size) = app.datastore_file_open(&ctx, &ds, &path).await?;
    let file = tokio::fs::File::open(&full).await.map_err(|e| Error::internal(format!("open {path}: {e}")))?;
    let stream = futures::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    Ok(resp)
}

/// Delete a file that no VM's config names (needs `Datastore.FileManagement`); an upload in progress
/// of that path is dropped.
#[utoipa::path(delete, path = "/datastores/{datastore}/files/{path}", tag = "inventory", operation_id = "datastore_file_delete",
    params(("datastore" = String, Path, description = "datastore name or id"),
        ("path" = String, Path, description = "the file's path in the datastore, `/` sent as `%2F`")),
    responses((status = 204), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn datastore_file_delete(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path((ds, path)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.datastore_file_delete(&ctx, &ds, &path).await?;
    Ok(StatusCode::NO_CONTENT)
}
