//! The feed (`/events`, JSON pages or SSE) and the audit log.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use covm_types::api::{AuditQuery, AuditVerify, EventQuery, EventView, Page};
use covm_types::{Error, ErrorBody};
use futures::StreamExt;

use super::error::ApiError;
use super::extract::{Auth, QueryParams};
use crate::app::App;

/// The change feed: events on objects I may view, in order. With `Accept: text/event-stream` it is a
/// live SSE stream whose event ids are sequence numbers (resume with `Last-Event-ID` or `?after=`);
/// otherwise a JSON page.
#[utoipa::path(get, path = "/events", tag = "events", operation_id = "event_list", params(EventQuery),
    responses(
        (status = 200, description = "a page of events (JSON), or with `Accept: text/event-stream` a live stream of EventView as SSE `data:`",
            content((Page<EventView> = "application/json"), (String = "text/event-stream"))),
        (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn event_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    headers: HeaderMap,
    QueryParams(q): QueryParams<EventQuery>,
) -> Result<Response, ApiError> {
    let sse =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    if !sse {
        return Ok(Json(app.events_page(&ctx, q).await?).into_response());
    }
    let last_id = match headers.get("last-event-id").map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<i64>().ok()))
    {
        Some(None) => {
            return Err(Error::invalid("Last-Event-ID", "Last-Event-ID is a sequence number").into());
        }
        Some(Some(n)) => Some(n),
        None => None,
    };
    let object = q.object;
    let (sub, guard) = app.events_subscribe(&ctx, last_id.or(q.after), object).await?;
    // Who is viewing or editing the VMs this caller may see: `event: presence`, without an id (not
    // part of the log, so not resumed).
    let presence =
        futures::stream::unfold((app.presence_subscribe(), app, ctx), move |(mut rx, app, ctx)| async move {
            loop {
                match rx.recv().await {
                    Ok(p) if object.is_none_or(|o| o == p.vm) && app.presence_visible(&ctx, p.vm).await => {
                        let data = serde_json::to_string(p.as_ref()).unwrap_or_default();
                        return Some((Some(Event::default().event("presence").data(data)), (rx, app, ctx)));
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
    let stream = futures::stream::unfold(sub, |mut sub| async move {
        match sub.next_batch().await {
            Ok(batch) => Some((batch, sub)),
            Err(e) => {
                tracing::debug!(error = %e, "feed subscription ended");
                None
            }
        }
    })
    .flat_map(|batch| {
        futures::stream::iter(batch.into_iter().map(|e| Some(Event::default().id(e.rec.seq.to_string()).data(&e.json))))
    })
    // The end of the log's stream (None) ends the whole.
    .chain(futures::stream::once(async { None }));
    let stream = futures::stream::select(stream, presence)
        .take_while(|e| std::future::ready(e.is_some()))
        .filter_map(|e| std::future::ready(e.map(Ok::<_, Infallible>)))
        // Ends when the caller loses the right to it (signed out, token revoked, user deleted).
        .take_until(std::sync::Arc::new(guard).revoked());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

/// The audit log: every change, denial and failed request (needs `Audit.Read` on `/`).
#[utoipa::path(get, path = "/audit", tag = "events", operation_id = "audit_list", params(AuditQuery),
    responses((status = 200, body = Page<EventView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn audit_list(
    State(app): State<App>,
    Auth(ctx): Auth,
    QueryParams(q): QueryParams<AuditQuery>,
) -> Result<Json<Page<EventView>>, ApiError> {
    Ok(Json(app.audit_query(&ctx, q).await?))
}

/// Recompute the audit log's hash chain; names the first entry that does not match.
#[utoipa::path(get, path = "/audit/verify", tag = "events", operation_id = "audit_verify",
    responses((status = 200, body = AuditVerify), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn audit_verify(State(app): State<App>, Auth(ctx): Auth) -> Result<Json<AuditVerify>, ApiError> {
    Ok(Json(app.audit_verify(&ctx).await?))
}
