//! Sagas: operations with more than one side effect (attach a disk: block node, device, config
//! version), run as ordered steps with a persisted log, so that a failure or a crash in the middle
//! leaves nothing half done.
//!
//! - A saga is a typed value ([`Saga`]): its own state (what it decided, what its steps produced), the
//!   steps it takes, and for each step an idempotent `forward` and `undo`.
//! - One step is the **pivot**: the one that commits the operation (usually the store write). A failure
//!   up to and including it undoes every step taken, newest first, the failed one included (it may have
//!   had its effect before it failed). Steps after the pivot are finished instead (retried).
//! - The log (the `sagas` table) is written when the saga begins, before each step and at the end. After
//!   a crash, [`App::sagas_recover`] reads the sagas still `running`: one whose pivot took effect is
//!   finished, any other is undone.
//! - A saga holds **operation locks** on the objects it changes from its first write to its end: at
//!   most one saga changes a VM or a disk at a time. A second one waits a while for the lock, then gets
//!   409 `operation_in_progress` naming the holder.
//! - Tests inject a failure or a crash before or after any step ([`Faults`]; `COVM_FAULT` in the
//!   environment, e.g. `disk.attach:device_add:after:crash`).

use covm_types::ErrorCode;
use std::fmt::Debug;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use covm_store::{OpLock, SagaRecord, SagaState};
use covm_types::{Error, ErrorKind};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use uuid::Uuid;

use super::{App, Ctx};

pub mod clone;
pub mod disk;
pub mod plug;
pub mod registry;
pub mod snapshot;

/// How long a saga waits for another one's locks before it gives up.
const LOCK_WAIT: Duration = Duration::from_secs(30);

#[async_trait]
pub trait Saga: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The saga's name in the log and in fault switches (`disk.attach`).
    const KIND: &'static str;
    type Step: Copy + Eq + Debug + Serialize + DeserializeOwned + Send + Sync;

    /// The steps, in order.
    fn steps(&self) -> Vec<Self::Step>;
    /// The step that commits the operation.
    fn pivot(&self) -> Self::Step;
    /// Takes a step. Idempotent: a recovery may take it again.
    async fn forward(&mut self, app: &App, ctx: &Ctx, step: Self::Step) -> Result<(), Error>;
    /// Undoes a step, whether it took effect or not. Idempotent.
    async fn undo(&mut self, app: &App, ctx: &Ctx, step: Self::Step) -> Result<(), Error>;
    /// At recovery, with the pivot in progress when covm stopped: did it take effect?
    async fn pivoted(&self, app: &App) -> Result<bool, Error>;
}

fn step_name<T: Serialize>(step: T) -> String {
    serde_json::to_value(step).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn step_parse<T: DeserializeOwned>(name: &str) -> Result<T, Error> {
    serde_json::from_value(json!(name)).map_err(|_| Error::internal(format!("unknown saga step {name} in the log")))
}

// --- fault injection (tests)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAt {
    Before,
    After,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// The step fails (after its effect, with `After`).
    Fail,
    /// The process dies on the spot, as with `kill -9`.
    Crash,
}

/// One injected fault: `saga:step:before|after:fail|crash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub saga: String,
    pub step: String,
    pub at: FaultAt,
    pub action: FaultAction,
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let [saga, step, at, action] = parts[..] else {
            return Err(format!("a fault is saga:step:before|after:fail|crash, not {s}"));
        };
        let at = match at {
            "before" => FaultAt::Before,
            "after" => FaultAt::After,
            _ => return Err(format!("a fault happens before or after a step, not {at}")),
        };
        let action = match action {
            "fail" => FaultAction::Fail,
            "crash" => FaultAction::Crash,
            _ => return Err(format!("a fault is fail or crash, not {action}")),
        };
        Ok(Fault { saga: saga.to_owned(), step: step.to_owned(), at, action })
    }
}

/// The fault switch: empty in production; `COVM_FAULT` or a test sets it. It also keeps the plans of
/// the last sagas run, so that tests take each saga's steps from the saga itself.
#[derive(Debug, Default)]
pub struct Faults(Mutex<Option<Fault>>, Mutex<std::collections::VecDeque<SagaPlan>>);

/// A saga's steps as it ran them, and its pivot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaPlan {
    pub kind: &'static str,
    pub steps: Vec<String>,
    pub pivot: String,
}

impl SagaPlan {
    /// The steps a failure at which undoes the saga: those up to and including the pivot.
    pub fn undone_on_failure(&self) -> &[String] {
        let end = self.steps.iter().position(|s| *s == self.pivot).map_or(self.steps.len(), |i| i + 1);
        &self.steps[..end]
    }
}

/// A saga's plan, from the saga itself.
pub fn plan_of<S: Saga>(saga: &S) -> SagaPlan {
    SagaPlan { kind: S::KIND, steps: saga.steps().into_iter().map(step_name).collect(), pivot: step_name(saga.pivot()) }
}

/// How many plans [`Faults`] keeps.
const PLANS_KEPT: usize = 32;

impl Faults {
    pub fn from_env() -> Faults {
        let f = std::env::var("COVM_FAULT").ok().filter(|s| !s.is_empty()).and_then(|s| match s.parse() {
            Ok(f) => {
                tracing::warn!(fault = %s, "fault injection is on (COVM_FAULT); this is for tests");
                Some(f)
            }
            Err(e) => {
                tracing::error!(error = %e, "COVM_FAULT is not understood; no fault is injected");
                None
            }
        });
        Faults(Mutex::new(f), Mutex::default())
    }

    /// The plans of the sagas run since the last call (at most the last 32), oldest first.
    pub fn plans_take(&self) -> Vec<SagaPlan> {
        self.1.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }

    fn saw(&self, plan: SagaPlan) {
        let mut plans = self.1.lock().unwrap_or_else(|p| p.into_inner());
        if plans.len() == PLANS_KEPT {
            plans.pop_front();
        }
        plans.push_back(plan);
    }

    pub fn set(&self, fault: Option<Fault>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }

    fn check(&self, saga: &str, step: &str, at: FaultAt) -> Result<(), Error> {
        let hit = {
            let f = self.0.lock().unwrap_or_else(|p| p.into_inner());
            f.as_ref().filter(|f| f.saga == saga && f.step == step && f.at == at).map(|f| f.action)
        };
        match hit {
            None => Ok(()),
            Some(FaultAction::Fail) => Err(Error::internal(format!(
                "injected failure {} step {step} of {saga}",
                if at == FaultAt::Before { "before" } else { "after" }
            ))),
            Some(FaultAction::Crash) => {
                tracing::error!(saga, step, ?at, "injected crash");
                std::process::abort();
            }
        }
    }
}

// --- the engine

/// A saga that holds its locks and is logged, before its steps run: the caller checks its rules now,
/// with the objects locked, then [`SagaGuard::run`]s it or [`SagaGuard::refuse`]s.
pub struct SagaGuard {
    app: App,
    rec: SagaRecord,
}

impl App {
    /// Logs a new saga of `kind` and takes its locks (waiting a while for another saga's).
    pub async fn saga_begin(&self, ctx: &Ctx, kind: &str, locks: &[Uuid]) -> Result<SagaGuard, Error> {
        let now = covm_store::now();
        let rec = SagaRecord {
            id: Uuid::now_v7(),
            kind: kind.to_owned(),
            state: SagaState::Running,
            actor: ctx.user.clone(),
            request_id: Some(ctx.req.id.clone()),
            data: json!(null),
            done: Vec::new(),
            current: None,
            error: None,
            owner: self.replica(),
            created_at: now,
            updated_at: now,
        };
        let deadline = Instant::now() + LOCK_WAIT;
        let mut pause = Duration::from_millis(1);
        loop {
            match self.store().saga_begin(rec.clone(), locks).await? {
                None => return Ok(SagaGuard { app: self.clone(), rec }),
                Some(holder) if Instant::now() + pause >= deadline => {
                    return Err(self.lock_error(holder).await);
                }
                Some(_) => {
                    // A saga of this process that ends wakes the waiters at once; the pause bounds the
                    // wait for one of another replica.
                    let woken = self.inner.saga_ended.notified();
                    tokio::select! {
                        _ = woken => {}
                        _ = tokio::time::sleep(pause) => pause = (pause * 2).min(Duration::from_millis(50)),
                    }
                }
            }
        }
    }

    /// Logs a saga's end (its locks go) and wakes the sagas waiting for locks.
    async fn saga_end(&self, rec: &SagaRecord) -> Result<(), Error> {
        let r = self.store().saga_end(rec).await;
        self.inner.saga_ended.notify_waiters();
        r
    }

    pub(crate) async fn lock_error(&self, l: OpLock) -> Error {
        let name = self.store().object_get(l.object_id).await.ok().flatten().map(|o| o.name).unwrap_or_default();
        Error::new(
            ErrorKind::Conflict,
            ErrorCode::OperationInProgress,
            format!("{name} is being changed by {} ({}, since {})", l.actor, l.kind, l.taken_at.to_rfc3339()),
        )
        .with_details(json!({ "object": name, "holder": l.actor, "operation": l.kind, "saga": l.saga_id }))
    }

    /// Runs `f` to its end even when the caller goes away (a client that hangs up mid-saga must not
    /// leave it half done).
    pub async fn to_the_end<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, Error>> + Send + 'static,
    {
        tokio::spawn(f).await.map_err(|e| Error::internal(format!("an operation failed: {e}")))?
    }

    /// Finishes or undoes every saga whose replica is gone (a crash interrupted it): at start, after the
    /// VMs are adopted, and then by the replica that runs background work.
    pub async fn sagas_recover(&self) -> Result<usize, Error> {
        let mut unfinished = Vec::new();
        for rec in self.store().sagas_unfinished().await? {
            if !self.store().replica_alive(rec.owner).await? {
                unfinished.push(rec);
            }
        }
        for rec in &unfinished {
            let r = self.saga_recover_any(rec.clone()).await;
            if let Err(e) = r {
                tracing::error!(saga = %rec.id, kind = %rec.kind, error = %e, "a saga could not be recovered");
                let mut rec = rec.clone();
                rec.state = SagaState::Stuck;
                rec.error = Some(format!("recovery: {}", e.message));
                rec.updated_at = covm_store::now();
                self.saga_end(&rec).await?;
            }
        }
        if !unfinished.is_empty() {
            self.committed();
        }
        Ok(unfinished.len())
    }

    pub(crate) async fn saga_recover<S: Saga>(&self, mut rec: SagaRecord) -> Result<(), Error> {
        let ctx = Ctx::system(&rec.actor, rec.request_id.as_deref());
        if rec.data.is_null() {
            // It stopped while checking its rules: nothing was done.
            rec.state = SagaState::Undone;
            rec.error = Some("interrupted before its first step".into());
            rec.updated_at = covm_store::now();
            return self.saga_end(&rec).await;
        }
        let mut saga: S = serde_json::from_value(rec.data.clone())
            .map_err(|e| Error::internal(format!("a {} saga's log cannot be read: {e}", rec.kind)))?;
        let done: Vec<S::Step> = rec.done.iter().map(|s| step_parse(s)).collect::<Result<_, _>>()?;
        let current: Option<S::Step> = rec.current.as_deref().map(step_parse).transpose()?;
        let pivot = saga.pivot();
        let committed = done.contains(&pivot) || (current == Some(pivot) && saga.pivoted(self).await?);
        tracing::info!(saga = %rec.id, kind = %rec.kind, done = ?done, current = ?current, committed, "recovering a saga a crash interrupted");
        if committed {
            let steps = saga.steps();
            let after = steps.iter().position(|s| *s == pivot).map_or(steps.len(), |i| i + 1);
            for step in steps[after..].iter().filter(|s| !done.contains(s)) {
                saga.forward(self, &ctx, *step).await?;
            }
            rec.state = SagaState::Done;
            rec.error = Some("finished after a crash".into());
        } else {
            for step in current.iter().chain(done.iter().rev()) {
                saga.undo(self, &ctx, *step).await?;
            }
            rec.state = SagaState::Undone;
            rec.error = Some("undone after a crash".into());
        }
        rec.data = serde_json::to_value(&saga).unwrap_or_default();
        rec.current = None;
        rec.updated_at = covm_store::now();
        self.saga_end(&rec).await
    }
}

impl SagaGuard {
    /// A lock-only saga (it has no steps) is over: its locks go.
    pub async fn release(mut self) {
        self.rec.state = SagaState::Done;
        self.rec.updated_at = covm_store::now();
        if let Err(e) = self.app.saga_end(&self.rec).await {
            tracing::error!(saga = %self.rec.id, error = %e, "a saga's locks could not be released");
        }
    }

    /// The rules said no: nothing was done; the saga ends and its locks go.
    pub async fn refuse(mut self, e: Error) -> Error {
        self.rec.state = SagaState::Undone;
        self.rec.error = Some(e.message.clone());
        self.rec.updated_at = covm_store::now();
        if let Err(le) = self.app.saga_end(&self.rec).await {
            tracing::error!(saga = %self.rec.id, error = %le, "a refused saga's locks could not be released");
        }
        e
    }

    /// Runs the steps. On a failure up to the pivot, undoes what was done and returns the failure.
    pub async fn run<S: Saga>(self, ctx: &Ctx, saga: S) -> Result<S, Error> {
        self.run_ending(ctx, saga).await.map_err(|(e, _)| e)
    }

    /// [`SagaGuard::run`], saying on a failure how the saga ended: `Undone` (nothing of it is left) or
    /// `Stuck` (an undo failed: what it did may still be there).
    pub async fn run_ending<S: Saga>(mut self, ctx: &Ctx, mut saga: S) -> Result<S, (Error, SagaState)> {
        let app = self.app.clone();
        let steps = saga.steps();
        let pivot = saga.pivot();
        app.inner.faults.saw(plan_of(&saga));
        let mut done: Vec<S::Step> = Vec::new();
        for step in steps {
            let name = step_name(step);
            self.rec.current = Some(name.clone());
            self.rec.data = serde_json::to_value(&saga).unwrap_or_default();
            self.rec.updated_at = covm_store::now();
            if let Err(e) = app.store().saga_update(&self.rec).await {
                return Err(self.unwind(ctx, &mut saga, None, &done, e).await);
            }
            let faults = &app.inner.faults;
            let r = match faults.check(S::KIND, &name, FaultAt::Before) {
                Ok(()) => match saga.forward(&app, ctx, step).await {
                    Ok(()) => faults.check(S::KIND, &name, FaultAt::After),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    done.push(step);
                    self.rec.done.push(name);
                    self.rec.current = None;
                }
                Err(e) if done.contains(&pivot) => {
                    // Committed: the operation happened. What is left (cleanup) stays in the log and is
                    // finished at the next start; it needs no lock meanwhile.
                    tracing::error!(saga = %self.rec.id, kind = S::KIND, step = %name, error = %e, "a step after the commit failed; it is retried at the next start");
                    if let Err(le) = app.store().saga_unlock(self.rec.id).await {
                        tracing::error!(saga = %self.rec.id, error = %le, "a committed saga's locks could not be released");
                    }
                    app.inner.saga_ended.notify_waiters();
                    return Ok(saga);
                }
                Err(e) => return Err(self.unwind(ctx, &mut saga, Some(step), &done, e).await),
            }
        }
        self.rec.state = SagaState::Done;
        self.rec.current = None;
        self.rec.data = serde_json::to_value(&saga).unwrap_or_default();
        self.rec.updated_at = covm_store::now();
        if let Err(e) = app.saga_end(&self.rec).await {
            // The operation is done; the log's end is retried by recovery (which finds it committed).
            tracing::error!(saga = %self.rec.id, error = %e, "a finished saga could not be logged as done");
        }
        Ok(saga)
    }

    /// Undoes the failed step and the done ones, newest first; logs the end.
    async fn unwind<S: Saga>(
        &mut self,
        ctx: &Ctx,
        saga: &mut S,
        failed: Option<S::Step>,
        done: &[S::Step],
        cause: Error,
    ) -> (Error, SagaState) {
        let app = self.app.clone();
        let sys = ctx.as_system();
        let mut stuck = None;
        for step in failed.iter().chain(done.iter().rev()) {
            if let Err(e) = saga.undo(&app, &sys, *step).await {
                tracing::error!(saga = %self.rec.id, kind = S::KIND, step = ?step, error = %e, "a saga step could not be undone");
                stuck = Some(e);
                break;
            }
        }
        self.rec.state = if stuck.is_some() { SagaState::Stuck } else { SagaState::Undone };
        self.rec.error = Some(match &stuck {
            Some(u) => format!("{}; undo failed: {}", cause.message, u.message),
            None => cause.message.clone(),
        });
        self.rec.data = serde_json::to_value(&*saga).unwrap_or_default();
        self.rec.current = None;
        self.rec.updated_at = covm_store::now();
        if let Err(e) = app.saga_end(&self.rec).await {
            tracing::error!(saga = %self.rec.id, error = %e, "an undone saga could not be logged; recovery will undo it again");
        }
        (cause, self.rec.state)
    }
}

impl App {
    /// Background work that one replica runs at a time, every second: lease expiry reports, the
    /// recovery of sagas whose replica died, and (every minute) the deletion of expired safety
    /// snapshots. Every replica keeps asking for the role, so that another
    /// takes over within a second or two when its holder dies (PostgreSQL releases the holder's lock
    /// with its connection). `leader`: whether this replica took the role at start.
    pub async fn background(&self, mut leader: bool) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut reap: u64 = 0;
        let mut reaping: Option<tokio::task::JoinHandle<()>> = None;
        let mut ticks: u64 = 0;
        let mut polling: Option<tokio::task::JoinHandle<()>> = None;
        let mut netting: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tick.tick().await;
            // Rate limits: this replica's share, and buckets that are full again forgotten (every
            // replica, at its first tick and then once a minute).
            ticks += 1;
            if ticks % crate::app::ratelimit::UPKEEP_EVERY.as_secs() == 1 {
                self.rates_upkeep().await;
            }
            // Presence heartbeats that stopped, and the others told again (every replica).
            self.presence_upkeep(ticks).await;
            // What the guest agents of this node's VMs say, every few seconds, on a task of its own (a
            // guest without an agent takes a few seconds to say nothing).
            if ticks.is_multiple_of(crate::app::guest::POLL_EVERY.as_secs())
                && polling.as_ref().is_none_or(|p| p.is_finished())
            {
                let app = self.clone();
                polling = Some(tokio::spawn(async move { app.guests_poll().await }));
            }
            // The NAT networks on this host: at start (after a reboot nothing of them is there), then
            // once a minute (a dnsmasq that died comes back).
            if ticks % 60 == 1 && netting.as_ref().is_none_or(|n| n.is_finished()) {
                let app = self.clone();
                netting = Some(tokio::spawn(async move { app.networks_reconcile().await }));
            }
            // Every replica writes the summary of its own suppressed anonymous entries.
            if let Err(e) = self.audit_anonymous_flush(false).await {
                tracing::warn!(error = %e, "could not write the summary of suppressed audit entries");
            }
            match self.store().leader_try().await {
                Ok(now) => {
                    if now != leader {
                        tracing::info!(
                            leader = now,
                            "this replica {} background work",
                            if now { "now runs" } else { "no longer runs" }
                        );
                    }
                    leader = now;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not ask for the background role");
                    leader = false;
                }
            }
            if !leader {
                continue;
            }
            if let Err(e) = self.leases_expire().await {
                tracing::warn!(error = %e, "could not report expired leases");
            }
            // Expired safety snapshots, once a minute, on a task of their own: a deletion can wait up
            // to a lock's time for a VM's other operation, and the rest of this loop runs every second.
            reap += 1;
            if reap.is_multiple_of(60) && reaping.as_ref().is_none_or(|r| r.is_finished()) {
                let app = self.clone();
                reaping = Some(tokio::spawn(async move {
                    match app.snapshots_reap().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(snapshots = n, "deleted expired safety snapshots"),
                        Err(e) => tracing::warn!(error = %e, "could not delete expired safety snapshots"),
                    }
                    match app.uploads_reap(crate::app::datastore_files::UPLOAD_KEEP).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(uploads = n, "deleted uploads that stopped a day ago"),
                        Err(e) => tracing::warn!(error = %e, "could not delete stopped uploads"),
                    }
                }));
            }
            match self.sagas_recover().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sagas = n, "recovered the sagas of a replica that died"),
                Err(e) => tracing::warn!(error = %e, "saga recovery failed"),
            }
        }
    }
}
