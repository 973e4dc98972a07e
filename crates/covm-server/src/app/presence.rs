//! Presence: who is viewing or editing a VM now. Ephemeral by design: heartbeats kept in memory with a
//! time to live, never in the store's tables or the hash-chained log; every change goes to the feeds
//! as an `event: presence` (see `http::events`). A user holding the VM's edit lease shows as `editing`
//! whatever their heartbeat says.
//!
//! Replicas share it through the store's notification channel ([`SIGNAL`]): each tells the others the
//! heartbeats it holds for a VM whenever they change, and again every third of the TTL while they
//! live; a replica keeps the others' sets until they are told again or their TTL passes. On SQLite,
//! one process is all and nothing is sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use covm_types::Error;
use covm_types::vm::{PresenceEntry, PresenceEvent, PresenceState};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::{App, Ctx};

/// How long a heartbeat counts by default (the UI sends one every 10 s).
pub const PRESENCE_TTL_DEFAULT: Duration = Duration::from_secs(30);
/// The store's channel on which replicas tell each other their heartbeats.
pub const SIGNAL: &str = "covm_presence";

struct Slot {
    state: PresenceState,
    since: DateTime<Utc>,
    seen: Instant,
}

/// One replica's heartbeats on one VM, as it tells the others.
#[derive(Debug, Serialize, Deserialize)]
struct Note {
    replica: Uuid,
    vm: Uuid,
    entries: Vec<PresenceEntry>,
}

#[derive(Default)]
struct State {
    /// The heartbeats sent to this replica, per VM and user.
    local: HashMap<Uuid, HashMap<String, Slot>>,
    /// What other replicas hold, per (replica, VM), until when.
    remote: HashMap<(Uuid, Uuid), (Vec<PresenceEntry>, Instant)>,
}

/// The heartbeats of this replica and what the others told it.
pub struct Presence {
    ttl: Duration,
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<PresenceEvent>>,
}

impl Presence {
    pub fn new(ttl: Duration) -> Presence {
        Presence { ttl, state: Mutex::new(State::default()), tx: broadcast::channel(256).0 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets a user's state; whether what others see changed (a new user, or another state).
    fn set(&self, vm: Uuid, user: &str, state: PresenceState) -> bool {
        let mut st = self.lock();
        let users = st.local.entry(vm).or_default();
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
        let mut st = self.lock();
        let Some(users) = st.local.get_mut(&vm) else { return false };
        let gone = users.remove(user).is_some();
        if users.is_empty() {
            st.local.remove(&vm);
        }
        gone
    }

    /// The live heartbeats this replica holds for a VM.
    fn local_entries(&self, vm: Uuid) -> Vec<PresenceEntry> {
        let st = self.lock();
        st.local
            .get(&vm)
            .into_iter()
            .flatten()
            .filter(|(_, s)| s.seen.elapsed() < self.ttl)
            .map(|(user, s)| PresenceEntry { user: user.clone(), state: s.state, since: s.since })
            .collect()
    }

    /// Everyone on a VM, on any replica, by name (a user on two replicas once: editing wins).
    fn entries(&self, vm: Uuid) -> Vec<PresenceEntry> {
        let mut all = self.local_entries(vm);
        let now = Instant::now();
        let st = self.lock();
        for ((_, v), (entries, until)) in &st.remote {
            if *v == vm && *until > now {
                all.extend(entries.iter().cloned());
            }
        }
        drop(st);
        let mut by_user: HashMap<String, PresenceEntry> = HashMap::new();
        for e in all {
            match by_user.get_mut(&e.user) {
                Some(have) => {
                    if e.state == PresenceState::Editing {
                        have.state = PresenceState::Editing;
                    }
                    have.since = have.since.min(e.since);
                }
                None => {
                    by_user.insert(e.user.clone(), e);
                }
            }
        }
        let mut out: Vec<PresenceEntry> = by_user.into_values().collect();
        out.sort_by(|a, b| a.user.cmp(&b.user));
        out
    }

    /// Keeps what another replica told; whether it changed what this one sees.
    fn remote_put(&self, note: Note) -> bool {
        let mut st = self.lock();
        let until = Instant::now() + self.ttl;
        let key = (note.replica, note.vm);
        let changed = st.remote.get(&key).is_none_or(|(old, _)| *old != note.entries);
        match note.entries.is_empty() {
            true => st.remote.remove(&key),
            false => st.remote.insert(key, (note.entries, until)),
        };
        changed
    }

    /// Forgets heartbeats and remote sets older than the time to live; the VMs whose presence
    /// changed, and of those the ones whose local heartbeats changed (to tell the other replicas).
    fn expire(&self) -> (Vec<Uuid>, Vec<Uuid>) {
        let mut st = self.lock();
        let (mut changed, mut local) = (Vec::new(), Vec::new());
        st.local.retain(|vm, users| {
            let before = users.len();
            users.retain(|_, s| s.seen.elapsed() < self.ttl);
            if users.len() != before {
                changed.push(*vm);
                local.push(*vm);
            }
            !users.is_empty()
        });
        let now = Instant::now();
        st.remote.retain(|(_, vm), (_, until)| {
            let live = *until > now;
            if !live {
                changed.push(*vm);
            }
            live
        });
        changed.sort();
        changed.dedup();
        (changed, local)
    }

    /// The VMs this replica holds heartbeats for.
    fn local_vms(&self) -> Vec<Uuid> {
        self.lock().local.keys().copied().collect()
    }

    /// Every presence change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<PresenceEvent>> {
        self.tx.subscribe()
    }
}

impl App {
    /// Says that the caller is viewing or editing a VM (a heartbeat); who is on it now.
    pub async fn presence_set(&self, ctx: &Ctx, vm: &str, state: PresenceState) -> Result<Vec<PresenceEntry>, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        if self.presence().set(rec.object.id, &ctx.user, state) {
            self.presence_changed(&rec, true).await;
        }
        Ok(self.presence_of(&rec))
    }

    /// The caller leaves a VM.
    pub async fn presence_leave(&self, ctx: &Ctx, vm: &str) -> Result<(), Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        if self.presence().remove(rec.object.id, &ctx.user) {
            self.presence_changed(&rec, true).await;
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

    /// Tells this replica's feeds who is on a VM now, and (`tell`) the other replicas what this one
    /// holds for it.
    async fn presence_changed(&self, rec: &covm_store::VmRecord, tell: bool) {
        let event = PresenceEvent { vm: rec.object.id, entries: self.presence_of(rec) };
        let _ = self.presence().tx.send(Arc::new(event));
        if tell {
            self.presence_tell(rec.object.id).await;
        }
    }

    async fn presence_tell(&self, vm: Uuid) {
        let mut note = Note { replica: self.replica(), vm, entries: self.presence().local_entries(vm) };
        let mut text = serde_json::to_string(&note).unwrap_or_default();
        // A note that does not fit keeps the users it can (a VM watched by a hundred people at once).
        while text.len() > covm_store::SIGNAL_MAX && note.entries.pop().is_some() {
            text = serde_json::to_string(&note).unwrap_or_default();
        }
        if let Err(e) = self.store().signal_send(SIGNAL, &text).await {
            tracing::debug!(error = %e, "could not tell the other replicas of a presence change");
        }
    }

    /// Listens to the other replicas' presence notes (at the start).
    pub async fn presence_listen(&self) -> Result<(), Error> {
        let weak = Arc::downgrade(&self.inner);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Note>();
        let me = self.replica();
        self.store()
            .signal_watch(
                SIGNAL,
                Arc::new(move |text| {
                    if let Ok(note) = serde_json::from_str::<Note>(&text)
                        && note.replica != me
                    {
                        let _ = tx.send(note);
                    }
                }),
            )
            .await?;
        tokio::spawn(async move {
            while let Some(note) = rx.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                let app = App { inner };
                let vm = note.vm;
                if app.presence().remote_put(note)
                    && let Ok(Some(rec)) = app.store().vm_get(vm).await
                {
                    app.presence_changed(&rec, false).await;
                }
            }
        });
        Ok(())
    }

    /// Publishes the presence of a VM again after its lease changed (the holder shows as editing).
    pub(crate) async fn presence_lease_changed(&self, vm: Uuid) {
        if let Ok(Some(rec)) = self.store().vm_get(vm).await {
            self.presence_changed(&rec, false).await;
        }
    }

    /// Drops heartbeats that stopped and tells the feeds; tells the other replicas again what this
    /// one holds every third of the TTL (run every second by the background loop).
    pub async fn presence_upkeep(&self, tick: u64) {
        let (changed, local) = self.presence().expire();
        for vm in &changed {
            match self.store().vm_get(*vm).await {
                Ok(Some(rec)) => self.presence_changed(&rec, false).await,
                _ => {
                    let _ = self.presence().tx.send(Arc::new(PresenceEvent { vm: *vm, entries: vec![] }));
                }
            }
        }
        let every = (self.presence().ttl.as_secs() / 3).max(1);
        let refresh = if tick.is_multiple_of(every) { self.presence().local_vms() } else { vec![] };
        let mut tell: Vec<Uuid> = local.into_iter().chain(refresh).collect();
        tell.sort();
        tell.dedup();
        for vm in tell {
            self.presence_tell(vm).await;
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
        assert_eq!(p.expire(), (vec![vm], vec![vm]));
        assert_eq!(p.expire(), (vec![], vec![]));
    }

    #[test]
    fn other_replicas_sets_merge_by_user_and_expire() {
        let p = Presence::new(Duration::from_millis(50));
        let (vm, other) = (Uuid::now_v7(), Uuid::now_v7());
        p.set(vm, "ann", PresenceState::Viewing);
        let since = Utc::now();
        let note = |entries| Note { replica: other, vm, entries };
        let e = |user: &str, state| PresenceEntry { user: user.into(), state, since };
        assert!(p.remote_put(note(vec![e("ann", PresenceState::Editing), e("bob", PresenceState::Viewing)])));
        assert!(!p.remote_put(note(vec![e("ann", PresenceState::Editing), e("bob", PresenceState::Viewing)])));
        let names: Vec<_> = p.entries(vm).into_iter().map(|e| (e.user, e.state)).collect();
        assert_eq!(names, vec![("ann".into(), PresenceState::Editing), ("bob".into(), PresenceState::Viewing)]);
        assert!(p.remote_put(note(vec![])), "an empty set: that replica holds nobody now");
        assert_eq!(p.entries(vm).len(), 1);
        p.remote_put(note(vec![e("bob", PresenceState::Viewing)]));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(p.expire(), (vec![vm], vec![vm]), "both the local heartbeat and the remote set end");
        assert!(p.entries(vm).is_empty());
    }
}
