//! The live feed and the audit log, both read from the one log the store writes with every change.
//!
//! ```text
//!  commit ──wake──▶ tailer task ──reads seq > cursor──▶ ring (last RING_CAP feed events)
//!                                        │                    │
//!                                        └──head (watch)──▶ subscribers: cursor → batch from ring,
//!                                                           or from the store when behind the ring
//! ```
//!
//! Rules: events reach a subscriber in sequence order, each once (the subscriber keeps a cursor and
//! resumes from any sequence number); a subscriber sees an event only when it may view the event's
//! scope object. Its set of visible objects is recomputed whenever a batch holds an event that can
//! change visibility (objects created or deleted, grants, groups, roles).

use covm_types::ErrorCode;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use covm_store::{AuditFilter, EventRecord, Store};
use covm_types::api::{AuditQuery, AuditVerify, EventQuery, EventView, Page};
use covm_types::{Error, Privilege};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use super::{App, Ctx};

/// How many recent feed events the hub keeps in memory.
const RING_CAP: usize = 4_096;
/// How many events one read of the store brings.
const BATCH: u32 = 1000;
/// How many events a subscriber replaying from before the ring reads at a time.
const REPLAY_PAGE: u32 = 100;
/// The tailer looks at the store this often even without a wake-up (writes by other processes).
const POLL: Duration = Duration::from_millis(500);

pub fn event_view(e: &EventRecord) -> EventView {
    EventView {
        seq: e.seq,
        time: e.time,
        actor: e.actor.clone(),
        request_id: e.request_id.clone(),
        kind: e.kind.clone(),
        object_kind: e.object_kind.clone(),
        object_id: e.object_id,
        object_name: e.object_name.clone(),
        version_before: e.version_before,
        version_after: e.version_after,
        patch: e.patch.clone(),
        data: e.data.clone(),
        hash: e.hash.clone(),
    }
}

/// Whether an event can change someone's effective privileges somewhere.
fn changes_privileges(e: &EventRecord) -> bool {
    e.kind.starts_with("permission.")
        || e.kind.starts_with("group.member_")
        || e.kind == "user.deleted"
        // A revoked token: every replica forgets its cached tokens and re-checks its streams.
        || e.kind == "token.deleted"
        || e.kind == "session.deleted"
        || e.data["moved"] == serde_json::Value::Bool(true)
        || e.data["annotations_changed"] == serde_json::Value::Bool(true)
}

/// Whether an event can change who may view what.
fn changes_visibility(e: &EventRecord) -> bool {
    let kind = e.kind.as_str();
    e.data["moved"] == serde_json::Value::Bool(true)
        || e.data["annotations_changed"] == serde_json::Value::Bool(true)
        || kind.ends_with(".created")
        || kind.ends_with(".deleted")
        || kind.starts_with("permission.")
        || kind.starts_with("group.")
        || kind.starts_with("role.")
}

/// A feed event with its JSON rendering, made once and shared by every subscriber.
pub struct FeedItem {
    pub rec: EventRecord,
    /// The [`EventView`] as JSON.
    pub json: String,
}

impl FeedItem {
    fn new(rec: EventRecord) -> Arc<FeedItem> {
        let json = serde_json::to_string(&event_view(&rec)).unwrap_or_default();
        Arc::new(FeedItem { rec, json })
    }
}

struct Ring {
    /// The sequence number just before the first item: the ring answers any cursor ≥ `start`.
    start: i64,
    items: VecDeque<Arc<FeedItem>>,
}

struct HubInner {
    store: Arc<dyn Store>,
    /// Called when the tailer reads a change that can alter privileges (also one from another process).
    on_authz_change: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    wake: Notify,
    head: watch::Sender<i64>,
    ring: RwLock<Ring>,
    /// True once the server stops: every subscription ends.
    closing: watch::Sender<bool>,
}

/// Fans the log out to every live subscriber.
#[derive(Clone)]
pub struct EventHub {
    inner: Arc<HubInner>,
}

impl EventHub {
    pub fn new(store: Arc<dyn Store>) -> EventHub {
        let (head, _) = watch::channel(0);
        EventHub {
            inner: Arc::new(HubInner {
                store,
                on_authz_change: std::sync::OnceLock::new(),
                wake: Notify::new(),
                head,
                ring: RwLock::new(Ring { start: 0, items: VecDeque::new() }),
                closing: watch::channel(false).0,
            }),
        }
    }

    /// Sets what to call when the tailer reads a change that can alter privileges.
    pub fn on_authz_change(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.inner.on_authz_change.set(f);
    }

    /// Something was committed: the tailer reads it now instead of at its next poll.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Ends every subscription (the server is stopping).
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// The newest feed sequence number the hub has read.
    pub fn head(&self) -> i64 {
        *self.inner.head.borrow()
    }

    /// Starts the tailer; it runs until the process ends.
    pub async fn start(&self) -> Result<tokio::task::JoinHandle<()>, Error> {
        let head = self.inner.store.events_head().await?;
        {
            let mut ring = self.inner.ring.write().unwrap_or_else(|p| p.into_inner());
            ring.start = head;
            ring.items.clear();
        }
        self.inner.head.send_replace(head);
        let hub = self.clone();
        Ok(tokio::spawn(async move { hub.tail(head).await }))
    }

    async fn tail(&self, mut cursor: i64) {
        loop {
            let _ = tokio::time::timeout(POLL, self.inner.wake.notified()).await;
            loop {
                let batch = match self.inner.store.events_after(cursor, BATCH).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "the feed could not read the log; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                };
                let Some(last) = batch.last().map(|e| e.seq) else {
                    break;
                };
                let full = batch.len() == BATCH as usize;
                if batch.iter().any(changes_privileges)
                    && let Some(f) = self.inner.on_authz_change.get()
                {
                    f();
                }
                {
                    let mut ring = self.inner.ring.write().unwrap_or_else(|p| p.into_inner());
                    ring.items.extend(batch.into_iter().map(FeedItem::new));
                    while ring.items.len() > RING_CAP {
                        if let Some(old) = ring.items.pop_front() {
                            ring.start = old.rec.seq;
                        }
                    }
                }
                cursor = last;
                self.inner.head.send_replace(cursor);
                if !full {
                    break;
                }
            }
        }
    }

    /// Feed events after `cursor`, from memory when the ring still holds them.
    async fn read_after(&self, cursor: i64, limit: usize) -> Result<Vec<Arc<FeedItem>>, Error> {
        {
            let ring = self.inner.ring.read().unwrap_or_else(|p| p.into_inner());
            if cursor >= ring.start {
                let from = ring.items.partition_point(|e| e.rec.seq <= cursor);
                return Ok(ring.items.iter().skip(from).take(limit).cloned().collect());
            }
        }
        Ok(self.inner.store.events_after(cursor, limit as u32).await?.into_iter().map(FeedItem::new).collect())
    }

    pub fn subscribe(&self, viewer: covm_store::Viewer, after: i64, object: Option<Uuid>) -> Subscription {
        Subscription {
            hub: self.clone(),
            head: self.inner.head.subscribe(),
            closing: self.inner.closing.subscribe(),
            viewer,
            cursor: after,
            object,
            visible: None,
        }
    }
}

/// One reader of the live feed.
pub struct Subscription {
    hub: EventHub,
    head: watch::Receiver<i64>,
    closing: watch::Receiver<bool>,
    /// Who reads (its conditional grants as they were when the stream began).
    viewer: covm_store::Viewer,
    cursor: i64,
    object: Option<Uuid>,
    visible: Option<HashSet<Uuid>>,
}

impl Subscription {
    /// The next events this subscriber may see, waiting until there are some.
    ///
    /// Behind the ring (a replay from long ago), the store picks the events the subscriber may view,
    /// a page at a time: what a replay costs follows what the reader may see, and its memory is one
    /// page. Within the ring, events are shared by every subscriber and filtered here.
    pub async fn next_batch(&mut self) -> Result<Vec<Arc<FeedItem>>, Error> {
        loop {
            let head = *self.head.borrow_and_update();
            let ring_start = self.hub.inner.ring.read().unwrap_or_else(|p| p.into_inner()).start;
            if head > self.cursor && self.cursor < ring_start {
                let page = self.hub.inner.store.events_after_visible(self.cursor, &self.viewer, REPLAY_PAGE).await?;
                let last = page.last().map_or(self.cursor, |e| e.seq);
                self.cursor = match page.len() == REPLAY_PAGE as usize {
                    true => last,
                    // Nothing more it may see up to where the ring starts (or the head).
                    false => last.max(ring_start.min(head)),
                };
                let out: Vec<Arc<FeedItem>> = page
                    .into_iter()
                    .filter(|e| self.object.is_none_or(|o| e.object_id == Some(o)))
                    .map(FeedItem::new)
                    .collect();
                if !out.is_empty() {
                    return Ok(out);
                }
                continue;
            }
            if head > self.cursor {
                let batch = self.hub.read_after(self.cursor, 500).await?;
                if let Some(last) = batch.last() {
                    self.cursor = last.rec.seq;
                    if self.visible.is_none() || batch.iter().any(|e| changes_visibility(&e.rec)) {
                        let ids = self.hub.inner.store.objects_visible(&self.viewer).await?;
                        self.visible = Some(ids.into_iter().collect());
                    }
                    let visible = self.visible.as_ref().expect("computed above");
                    let out: Vec<Arc<FeedItem>> = batch
                        .into_iter()
                        .filter(|e| e.rec.scope_id.is_some_and(|s| visible.contains(&s)))
                        .filter(|e| self.object.is_none_or(|o| e.rec.object_id == Some(o)))
                        .collect();
                    if !out.is_empty() {
                        return Ok(out);
                    }
                    continue;
                }
            }
            let stopping =
                || Error::new(covm_types::ErrorKind::Unavailable, ErrorCode::ShuttingDown, "covm is stopping");
            tokio::select! {
                r = self.head.changed() => r.map_err(|_| stopping())?,
                _ = self.closing.wait_for(|c| *c) => return Err(stopping()),
            }
        }
    }
}

impl App {
    /// A page of the feed (what `GET /events` returns without SSE).
    pub async fn events_page(&self, ctx: &Ctx, q: EventQuery) -> Result<Page<EventView>, Error> {
        let limit = q.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(Error::invalid("limit", "limit is between 1 and 1000"));
        }
        let after = q.after.unwrap_or(0);
        if after < 0 {
            return Err(Error::invalid("after", "after is a sequence number, 0 or more"));
        }
        let batch = self.store().events_after(after, limit).await?;
        let visible: HashSet<Uuid> =
            self.store().objects_visible(&self.viewer(ctx).await?).await?.into_iter().collect();
        let next = (batch.len() == limit as usize).then(|| batch.last().map(|e| e.seq.to_string())).flatten();
        let items = batch
            .iter()
            .filter(|e| e.scope_id.is_some_and(|s| visible.contains(&s)))
            .filter(|e| q.object.is_none_or(|o| e.object_id == Some(o)))
            .map(event_view)
            .collect();
        Ok(Page { items, next })
    }

    /// Starts following the feed after `after` (a sequence number; default: from the newest committed
    /// entry, which the hub's tailer may not have read yet).
    pub async fn events_subscribe(
        &self,
        ctx: &Ctx,
        after: Option<i64>,
        object: Option<Uuid>,
    ) -> Result<(Subscription, super::streams::StreamGuard), Error> {
        let guard = self.stream_open(ctx, None)?;
        let after = match after {
            Some(a) => a,
            None => self.store().events_head().await?,
        };
        let viewer = self.viewer(ctx).await?;
        // The stream ends when the caller's request conditions move from these.
        guard.conditions_baseline(viewer.excluded.clone());
        Ok((self.hub().subscribe(viewer, after, object), guard))
    }

    pub async fn audit_query(&self, ctx: &Ctx, q: AuditQuery) -> Result<Page<EventView>, Error> {
        self.require_global(ctx, Privilege::AuditRead).await?;
        let limit = q.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(Error::invalid("limit", "limit is between 1 and 1000"));
        }
        let items = self
            .store()
            .audit_query(AuditFilter {
                actor: q.actor,
                object_id: q.object,
                kind: q.kind,
                since: q.since,
                until: q.until,
                after: q.after.unwrap_or(0),
                limit,
            })
            .await?;
        let next = (items.len() == limit as usize).then(|| items.last().map(|e| e.seq.to_string())).flatten();
        Ok(Page { items: items.iter().map(event_view).collect(), next })
    }

    pub async fn audit_verify(&self, ctx: &Ctx) -> Result<AuditVerify, Error> {
        self.require_global(ctx, Privilege::AuditRead).await?;
        self.store().audit_verify().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_changing_kinds() {
        let ev = |kind: &str, data: serde_json::Value| EventRecord {
            seq: 1,
            time: chrono::Utc::now(),
            actor: "a".into(),
            request_id: None,
            kind: kind.into(),
            object_kind: "x".into(),
            object_id: None,
            object_name: None,
            scope_id: None,
            feed: true,
            version_before: None,
            version_after: None,
            patch: None,
            data,
            hash: String::new(),
        };
        let none = serde_json::json!({});
        assert!(changes_visibility(&ev("folder.created", none.clone())));
        assert!(changes_visibility(&ev("permission.revoked", none.clone())));
        assert!(changes_visibility(&ev("group.member_added", none.clone())));
        assert!(!changes_visibility(&ev("vm.config.changed", none.clone())));
        assert!(changes_visibility(&ev("vm.config.changed", serde_json::json!({ "moved": true }))));
        assert!(!changes_visibility(&ev("user.password_changed", none)));
    }
}
