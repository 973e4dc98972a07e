//! Presence: who is viewing or editing a VM now. Ephemeral by design: heartbeats kept in memory with a
//! time to live, never in the store or the hash-chained log; every change goes to the feeds of this
//! replica as an `event: presence` (see `http::events`). A user holding the VM's edit lease shows as
//! `editing` whatever their heartbeat says.
//!
//! Requests about a VM are forwarded to the replica that runs it (`http::forward`), so the heartbeats
//! of one VM meet on one replica; a feed on another replica sees that VM's presence only by asking
//! (`GET /vms/{vm}/presence`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use covm_types::Error;
use covm_types::vm::{PresenceEntry, PresenceEvent, PresenceState};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::{App, Ctx};

/// How long a heartbeat counts by default (the UI sends one every 10 s).
pub const PRESENCE_TTL_DEFAULT: Duration = Duration::from_secs(30);

struct Slot {
    state: PresenceState,
    since: DateTime<Utc>,
    seen: Instant,
}

/// The heartbeats of this replica, per VM and user.
pub struct Presence {
    ttl: Duration,
    vms: Mutex<HashMap<Uuid, HashMap<String, Slot>>>,
    tx: broadcast::Sender<Arc<PresenceEvent>>,
}

impl Presence {
    pub fn new(ttl: Duration) -> Presence {
        Presence { ttl, vms: Mutex::new(HashMap::new()), tx: broadcast::channel(256).0 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, HashMap<String, Slot>>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets a user's state; whether what others see changed (a new user, or another state).
    fn set(&self, vm: Uuid, user: &str, state: PresenceState) -> bool {
        let mut vms = self.lock();
        let users = vms.entry(vm).or_default();
        let now = Instant::now();
        match users.get_mut(user) {
            Some(s) if s.state == state => {
                s.seen = now;
                false
            }
            Some(s) => {
                *s = Slot { state, since: Utc::now(), seen: now };
                true
            }
            None => {
                users.insert(user.to_owned(), Slot { state, since: Utc::now(), seen: now });
                true
            }
        }
    }

    fn remove(&self, vm: Uuid, user: &str) -> bool {
        let mut vms = self.lock();
        let Some(users) = vms.get_mut(&vm) else { return false };
        let gone = users.remove(user).is_some();
        if users.is_empty() {
            vms.remove(&vm);
        }
        gone
    }

    /// The users whose heartbeat is live, by name.
    fn entries(&self, vm: Uuid) -> Vec<PresenceEntry> {
        let vms = self.lock();
        let mut out: Vec<PresenceEntry> = vms
            .get(&vm)
            .into_iter()
            .flatten()
            .filter(|(_, s)| s.seen.elapsed() < self.ttl)
            .map(|(user, s)| PresenceEntry { user: user.clone(), state: s.state, since: s.since })
            .collect();
        out.sort_by(|a, b| a.user.cmp(&b.user));
        out
    }

    /// Forgets heartbeats older than the time to live; the VMs whose presence changed.
    fn expire(&self) -> Vec<Uuid> {
        let mut vms = self.lock();
        let mut changed = Vec::new();
        vms.retain(|vm, users| {
            let before = users.len();
            users.retain(|_, s| s.seen.elapsed() < self.ttl);
            if users.len() != before {
                changed.push(*vm);
            }
            !users.is_empty()
        });
        changed
    }

    /// Every presence change of this replica from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<PresenceEvent>> {
        self.tx.subscribe()
    }
}

impl App {
    /// Says that the caller is viewing or editing a VM (a heartbeat); who is on it now.
    pub async fn presence_set(&self, ctx: &Ctx, vm: &str, state: PresenceState) -> Result<Vec<PresenceEntry>, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        if self.presence().set(rec.object.id, &ctx.user, state) {
            self.presence_publish(&rec).await;
        }
        Ok(self.presence_of(&rec))
    }

    /// The caller leaves a VM.
    pub async fn presence_leave(&self, ctx: &Ctx, vm: &str) -> Result<(), Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        if self.presence().remove(rec.object.id, &ctx.user) {
            self.presence_publish(&rec).await;
        }
        Ok(())
    }

    /// Who is on a VM now.
    pub async fn presence_list(&self, ctx: &Ctx, vm: &str) -> Result<Vec<PresenceEntry>, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        Ok(self.presence_of(&rec))
    }

    /// The live heartbeats, with the holder of a live edit lease as `editing`.
    fn presence_of(&self, rec: &covm_store::VmRecord) -> Vec<PresenceEntry> {
        let mut entries = self.presence().entries(rec.object.id);
        if let Some(l) = rec.lease.as_ref().filter(|l| l.expires_at > Utc::now()) {
            match entries.iter_mut().find(|e| e.user == l.holder) {
                Some(e) => e.state = PresenceState::Editing,
                None => {
                    entries.push(PresenceEntry {
                        user: l.holder.clone(),
                        state: PresenceState::Editing,
                        since: l.acquired_at,
                    });
                    entries.sort_by(|a, b| a.user.cmp(&b.user));
                }
            }
        }
        entries
    }

    async fn presence_publish(&self, rec: &covm_store::VmRecord) {
        let event = PresenceEvent { vm: rec.object.id, entries: self.presence_of(rec) };
        let _ = self.presence().tx.send(Arc::new(event));
    }

    /// Publishes the presence of a VM again after its lease changed (the holder shows as editing).
    pub(crate) async fn presence_lease_changed(&self, vm: Uuid) {
        if let Ok(Some(rec)) = self.store().vm_get(vm).await {
            self.presence_publish(&rec).await;
        }
    }

    /// Drops heartbeats that stopped and tells the feeds (run every second by the background loop).
    pub async fn presence_expire(&self) {
        for vm in self.presence().expire() {
            match self.store().vm_get(vm).await {
                Ok(Some(rec)) => self.presence_publish(&rec).await,
                _ => {
                    let _ = self.presence().tx.send(Arc::new(PresenceEvent { vm, entries: vec![] }));
                }
            }
        }
    }

    /// Whether the caller may see a VM's presence on the feed (it may see the VM).
    pub async fn presence_visible(&self, ctx: &Ctx, vm: Uuid) -> bool {
        self.privileges_of(ctx, vm).await.is_ok_and(|p| !p.is_empty())
    }

    /// The presence changes of this replica, for a feed.
    pub fn presence_subscribe(&self) -> broadcast::Receiver<Arc<PresenceEvent>> {
        self.presence().subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_expire_and_changes_are_told() {
        let p = Presence::new(Duration::from_millis(50));
        let vm = Uuid::now_v7();
        assert!(p.set(vm, "ann", PresenceState::Viewing));
        assert!(!p.set(vm, "ann", PresenceState::Viewing), "a heartbeat alone changes nothing others see");
        assert!(p.set(vm, "ann", PresenceState::Editing));
        assert!(p.set(vm, "bob", PresenceState::Viewing));
        let names: Vec<_> = p.entries(vm).into_iter().map(|e| (e.user, e.state)).collect();
        assert_eq!(names, vec![("ann".into(), PresenceState::Editing), ("bob".into(), PresenceState::Viewing)]);
        assert!(p.remove(vm, "bob"));
        assert!(!p.remove(vm, "bob"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(p.entries(vm).is_empty(), "a stopped heartbeat no longer counts");
        assert_eq!(p.expire(), vec![vm]);
        assert!(p.expire().is_empty());
    }
}
