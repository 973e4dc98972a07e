//! Power actions, tasks, and consoles (serial log and VNC over WebSocket).

use covm_types::ErrorCode;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use covm_types::error::ConflictError;
use covm_types::vm::{ConsoleQuery, ConsoleTicket, PowerRequest, SerialQuery, TaskQuery, TaskView};
use covm_types::{Error, ErrorBody};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::error::ApiError;
use super::extract::{Auth, ConsoleAuth, JsonBody, MaybeWs, QueryParams, parse_id, session_token};
use crate::app::App;
use crate::app::consoles::SerialSession;

/// Power a VM `on`, `off` (at once), `shutdown` (ask the guest; give up after `timeout_s`) or `reset`.
/// Answers 202 with the task that does it; its end reaches the feed.
#[utoipa::path(post, path = "/vms/{vm}/power", tag = "vms", operation_id = "vm_power",
    params(("vm" = String, Path, description = "VM name or id")), request_body = PowerRequest,
    responses((status = 202, body = TaskView), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn vm_power(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    JsonBody(p): JsonBody<PowerRequest>,
) -> Result<(StatusCode, Json<TaskView>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(app.vm_power(&ctx, &vm, p).await?)))
}

/// Tasks on objects I may view, and mine; newest first.
#[utoipa::path(get, path = "/tasks", tag = "tasks", operation_id = "task_list", params(TaskQuery),
    responses((status = 200, body = Vec<TaskView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn task_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<TaskQuery>,
) -> Result<Json<Vec<TaskView>>, ApiError> {
    Ok(Json(app.tasks_list(&ctx, q).await?))
}

/// One task: state, progress, outcome.
#[utoipa::path(get, path = "/tasks/{id}", tag = "tasks", operation_id = "task_get",
    params(("id" = String, Path, description = "task id")),
    responses((status = 200, body = TaskView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn task_get(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    Ok(Json(app.task_get(&ctx, parse_id(&id)?).await?))
}

/// The longest line a serial stream holds back waiting for its end.
const SERIAL_LINE_MAX: usize = 64 * 1024;

/// The serial console: the last `tail` lines as text, or with `Accept: text/event-stream` those
/// lines and then every new one as it comes; or, as a WebSocket (`Upgrade: websocket`), the console
/// itself: the recent output and then the live output as binary frames, keystrokes in as text or
/// binary frames, shared by everyone on it (needs `VirtualMachine.Interact.ConsoleInteract`).
#[utoipa::path(get, path = "/vms/{vm}/console/serial", tag = "vms", operation_id = "vm_console_serial",
    params(("vm" = String, Path, description = "VM name or id"), SerialQuery),
    responses((status = 200, description = "the lines as text, or with `Accept: text/event-stream` a live stream of lines",
        content((String = "text/plain"), (String = "text/event-stream"))),
        (status = 101, description = "WebSocket: the interactive serial console"),
        (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_console_serial(
    State(app): State<App>,
    ConsoleAuth { ctx, only }: ConsoleAuth,
    Path(vm): Path<String>,
    headers: HeaderMap,
    MaybeWs(ws): MaybeWs,
    QueryParams(q): QueryParams<SerialQuery>,
) -> Result<Response, ApiError> {
    if let Some(ws) = ws {
        let (session, guard) = app.vm_serial_attach(&ctx, &vm, only).await?;
        let revoked = std::sync::Arc::new(guard).revoked();
        return Ok(ws.on_upgrade(move |ws| serial_relay(ws, session, revoked)));
    }
    if only.is_some() {
        return Err(Error::invalid("ticket", "a console ticket opens the WebSocket consoles only").into());
    }
    let tail = q.tail.unwrap_or(100);
    if tail > 10_000 {
        return Err(Error::invalid("tail", "tail is at most 10000").into());
    }
    let sse =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    let (path, lines, guard) = app.vm_serial(&ctx, &vm, tail as usize, sse).await?;
    if !sse {
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response());
    }
    let start = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0);
    let first = futures::stream::iter(lines.into_iter().map(|l| Ok::<_, Infallible>(Event::default().data(l))));
    let follow = futures::stream::unfold((path, start, String::new()), |(path, mut pos, mut partial)| async move {
        loop {
            let mut buf = Vec::new();
            if let Ok(mut f) = tokio::fs::File::open(&path).await {
                let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                if len < pos {
                    pos = 0; // the log was truncated by a new run
                }
                if len > pos && f.seek(std::io::SeekFrom::Start(pos)).await.is_ok() {
                    let _ = f.read_to_end(&mut buf).await;
                    pos += buf.len() as u64;
                }
            }
            partial.push_str(&String::from_utf8_lossy(&buf));
            // A guest that writes without newlines is cut into lines of at most 64 KiB.
            if partial.len() > SERIAL_LINE_MAX && !partial.contains('\n') {
                partial.push('\n');
            }
            if let Some(i) = partial.rfind('\n') {
                let done: String = partial.drain(..=i).collect();
                let events: Vec<Result<Event, Infallible>> =
                    done.lines().map(|l| Ok(Event::default().data(l.trim_end_matches('\r')))).collect();
                return Some((futures::stream::iter(events), (path, pos, partial)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    use futures::StreamExt;
    // Ends when the caller loses the console privilege (or signs out).
    let revoked =
        std::sync::Arc::new(guard.ok_or_else(|| Error::internal("a console stream without its guard"))?).revoked();
    Ok(Sse::new(first.chain(follow.flatten()).take_until(revoked)).keep_alive(KeepAlive::default()).into_response())
}

/// The VNC console as a WebSocket (subprotocol `binary`), relayed to QEMU's VNC socket, for noVNC
/// (needs `VirtualMachine.Interact.ConsoleInteract`).
#[utoipa::path(get, path = "/vms/{vm}/console/vnc", tag = "vms", operation_id = "vm_console_vnc",
    params(("vm" = String, Path, description = "VM name or id"), ConsoleQuery),
    responses((status = 101, description = "WebSocket relay of RFB"), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_console_vnc(
    State(app): State<App>,
    ConsoleAuth { ctx, only }: ConsoleAuth,
    Path(vm): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (socket, guard) = app.vm_vnc_socket(&ctx, &vm, only).await?;
    let unix = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|_| Error::conflict(ErrorCode::ConsoleUnavailable, "the VM's VNC console is not available"))?;
    let revoked = std::sync::Arc::new(guard).revoked();
    Ok(ws.protocols(["binary"]).on_upgrade(move |ws| relay(ws, unix, revoked)))
}

/// A single-use ticket to the VM's consoles, for a browser's WebSocket (send it as `?ticket=`; it
/// works for 30 seconds). Needs `VirtualMachine.Interact.ConsoleInteract`.
#[utoipa::path(post, path = "/vms/{vm}/console/ticket", tag = "vms", operation_id = "vm_console_ticket",
    params(("vm" = String, Path, description = "VM name or id")),
    responses((status = 201, body = ConsoleTicket), (status = 409, body = ConflictError), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_console_ticket(
    State(app): State<App>,
    Auth(ctx): Auth,
    Path(vm): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<ConsoleTicket>), ApiError> {
    let (token, _) = session_token(&headers).ok_or_else(|| Error::internal("a signed-in request without its token"))?;
    Ok((StatusCode::CREATED, Json(app.console_ticket(&ctx, &token, &vm).await?)))
}

/// Carries a shared serial console to one WebSocket until either closes or the caller loses the
/// console privilege.
async fn serial_relay(ws: WebSocket, s: SerialSession, revoked: impl std::future::Future<Output = ()>) {
    use futures::{SinkExt, StreamExt};
    let (mut ws_tx, mut ws_rx) = ws.split();
    let SerialSession { backlog, mut output, input, .. } = s;
    let up = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let keys = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => bytes::Bytes::copy_from_slice(t.as_bytes()),
                Message::Close(_) => break,
                _ => continue,
            };
            if input.send(keys).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        if ws_tx.send(Message::Binary(backlog.into())).await.is_err() {
            return;
        }
        loop {
            match output.recv().await {
                Ok(b) => {
                    if ws_tx.send(Message::Binary(b)).await.is_err() {
                        return;
                    }
                }
                // A slow reader misses what it could not keep up with; the console goes on.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
        let _ = ws_tx.close().await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = revoked => {}
    }
}

/// Relays RFB both ways until either side closes or the caller loses the console privilege.
async fn relay(ws: WebSocket, unix: tokio::net::UnixStream, revoked: impl std::future::Future<Output = ()>) {
    use futures::{SinkExt, StreamExt};
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut un_rx, mut un_tx) = unix.into_split();
    let up = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => t.as_bytes().to_vec().into(),
                Message::Close(_) => break,
                _ => continue,
            };
            if un_tx.write_all(&data).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match un_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = revoked => {}
    }
}
