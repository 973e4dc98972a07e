//! The covm store: one trait, [`Store`], that the app layer talks to, and its two implementations,
//! [`SqliteStore`] (the embedded default) and [`PgStore`] (several replicas on one database), which run
//! the same SQL (`sql/`, a file a resource) and pass the same conformance suite.
//!
//! Rules every implementation keeps:
//! - Every method that changes something takes the [`NewEvent`] that records the change and appends it to
//!   the log in the same transaction, so that a change without its log entry (or the reverse) cannot exist.
//! - The log is append-only and hash-chained: `hash = sha256(prev_hash ‖ canonical entry)`, computed by
//!   [`event_hash`] so that every backend and the verifier agree byte for byte.
//! - "Who may see what" is answered in SQL ([`InventoryStore::objects_list`], [`InventoryStore::object_children`]), so that a
//!   list is filtered before it is paged, never after.
//! - Errors are [`covm_types::Error`]: a unique name taken is a conflict, a missing row is `not found`, a
//!   database fault is logged here once and surfaces as `internal`.

#[macro_use]
mod sql;
pub mod postgres;
pub mod sqlite;
pub mod testing;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use covm_types::Error;
use covm_types::api::{AuditVerify, ObjectKind};
use covm_types::vm::{PowerState, TaskState};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Who looks, for the rules of visibility and privileges: the user, and those of its grants whose
/// conditions on the request (address, hours, expiry) fail now and so do not apply. Conditions on
/// the object's annotations are checked by the store against each object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Viewer {
    pub user: Uuid,
    pub excluded: Vec<Uuid>,
}

impl Viewer {
    /// A user none of whose grants is excluded.
    pub fn user(user: Uuid) -> Viewer {
        Viewer { user, excluded: Vec::new() }
    }

    /// The excluded grants as the SQL parameter `|id|id|` (`''` for none).
    pub fn excluded_param(&self) -> String {
        match self.excluded.is_empty() {
            true => String::new(),
            false => format!("|{}|", self.excluded.iter().map(Uuid::to_string).collect::<Vec<_>>().join("|")),
        }
    }
}

/// A grant to make.
#[derive(Debug, Clone)]
pub struct NewGrant {
    pub id: Uuid,
    pub principal: (PrincipalKind, Uuid),
    pub role: Uuid,
    pub object: Uuid,
    pub propagate: bool,
    pub conditions: Option<covm_types::conditions::GrantConditions>,
}

/// Where a node's replica answers, and the certificate it is trusted by when it serves TLS (PEM).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeAddr {
    pub url: String,
    pub ca_pem: Option<String>,
}

/// An inventory object.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectRecord {
    pub id: Uuid,
    pub kind: ObjectKind,
    pub name: String,
    pub parent_id: Option<Uuid>,
    pub path: String,
    /// The kind's own fields (datastore path, pool quota, host facts, …) as JSON.
    pub spec: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// An object to create under `parent_id`; the store computes its path and closure rows.
#[derive(Debug, Clone)]
pub struct NewObject {
    pub id: Uuid,
    pub kind: ObjectKind,
    pub name: String,
    pub parent_id: Uuid,
    pub spec: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub id: Uuid,
    pub name: String,
    pub password_hash: String,
    pub created_at: DateTime<Utc>,
    /// The TOTP secret (base32): on when `mfa_on`, else an enrollment not yet confirmed.
    pub mfa_secret: Option<String>,
    pub mfa_on: bool,
    /// The identity provider's subject (`issuer#sub`) of a user made by single sign-on.
    pub sso_subject: Option<String>,
    /// Disabled (by its identity provider): no sign-in, no session, no token.
    pub disabled: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupRecord {
    pub id: Uuid,
    pub name: String,
    pub members: Vec<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoleRecord {
    pub id: Uuid,
    pub name: String,
    pub builtin: bool,
    /// Dotted privilege names, sorted.
    pub privileges: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    User,
    Group,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::Group => "group",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PermissionRecord {
    pub id: Uuid,
    pub principal_kind: PrincipalKind,
    pub principal_id: Uuid,
    /// The user or group name.
    pub principal_name: String,
    pub role_id: Uuid,
    pub role_name: String,
    pub object_id: Uuid,
    pub propagate: bool,
    pub created_at: DateTime<Utc>,
    /// The grant applies only where and when these hold.
    pub conditions: Option<covm_types::conditions::GrantConditions>,
}

#[derive(Debug, Clone, Default)]
pub struct PermissionFilter {
    pub object_id: Option<Uuid>,
    pub principal_id: Option<Uuid>,
    /// Only grants on objects this user may view.
    pub viewer: Option<Viewer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Session,
    Api,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Session => "session",
            TokenKind::Api => "api",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub id: Uuid,
    pub user_id: Uuid,
    pub kind: TokenKind,
    pub name: String,
    /// Hex SHA-256 of the token.
    pub hash: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The session may only enroll in two-factor sign-in.
    pub enroll_only: bool,
}

/// A log entry to append; the store gives it its sequence number, time and hash.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub actor: String,
    pub request_id: Option<String>,
    pub kind: String,
    pub object_kind: String,
    pub object_id: Option<Uuid>,
    pub object_name: Option<String>,
    /// The inventory object whose visibility decides who sees this event in the feed.
    pub scope_id: Option<Uuid>,
    /// False for audit-only entries.
    pub feed: bool,
    pub version_before: Option<i64>,
    pub version_after: Option<i64>,
    pub patch: Option<serde_json::Value>,
    pub data: serde_json::Value,
}

/// A stored log entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    pub seq: i64,
    pub time: DateTime<Utc>,
    pub actor: String,
    pub request_id: Option<String>,
    pub kind: String,
    pub object_kind: String,
    pub object_id: Option<Uuid>,
    pub object_name: Option<String>,
    pub scope_id: Option<Uuid>,
    pub feed: bool,
    pub version_before: Option<i64>,
    pub version_after: Option<i64>,
    pub patch: Option<serde_json::Value>,
    pub data: serde_json::Value,
    #[serde(skip)]
    pub hash: String,
}

/// Filters of the audit log; all given ones must match.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub object_id: Option<Uuid>,
    /// An exact kind, or a prefix ending in `.`.
    pub kind: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub after: i64,
    pub limit: u32,
}

/// The hash of a log entry: `sha256(prev_hash ‖ canonical JSON of the entry without its hash)`.
/// The canonical JSON is serde_json's rendering of [`EventRecord`] (fields in declaration order, object
/// keys of `data` and `patch` sorted, since serde_json's map is ordered).
pub fn event_hash(prev_hash: &str, entry: &EventRecord) -> String {
    let canonical = serde_json::to_vec(entry).expect("an event always serializes");
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(&canonical);
    hex::encode(h.finalize())
}

/// Times as stored: RFC 3339, UTC, microseconds, so that text order is time order.
pub fn time_to_db(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Now, truncated to what the store keeps (microseconds), so that a stored time reads back equal.
pub fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// An edit lease on a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRecord {
    pub holder_id: Uuid,
    pub holder: String,
    /// The fencing token (monotonic per VM).
    pub token: i64,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// A VM: its inventory object, newest config, runtime state and lease.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub object: ObjectRecord,
    pub version: i64,
    pub config: serde_json::Value,
    pub power_state: PowerState,
    pub runtime: serde_json::Value,
    pub generation: i64,
    /// The lease as stored; it may have expired (the caller decides with the time it is given).
    pub lease: Option<LeaseRecord>,
    /// The last fencing token handed out.
    pub lease_fence: i64,
}

/// A disk in a VM's newest config.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachmentRecord {
    pub vm_id: Uuid,
    pub vm_name: String,
    pub power_state: PowerState,
    pub controller: String,
    pub unit: u32,
    pub read_only: bool,
    pub generation: u64,
}

/// One version of a VM's config.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRecord {
    pub version: i64,
    pub config: serde_json::Value,
    pub author: String,
    pub time: DateTime<Utc>,
    pub message: Option<String>,
    pub request_id: Option<String>,
    /// RFC 6902 from the version before (from `{}` for version 1).
    pub patch: serde_json::Value,
    pub event_seq: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct VmFilter {
    /// Only VMs below this folder.
    pub folder: Option<Uuid>,
    pub name_prefix: Option<String>,
    pub power_state: Option<PowerState>,
    /// The cursor: a name.
    pub after: Option<String>,
    pub limit: u32,
}

/// A new config version to write.
#[derive(Debug, Clone)]
pub struct ConfigWrite {
    pub config: serde_json::Value,
    /// The VM's name and folder as the config says (a rename or a move when they differ).
    pub name: String,
    pub parent_id: Uuid,
    pub author: String,
    pub message: Option<String>,
    pub request_id: Option<String>,
    pub patch: serde_json::Value,
}

#[derive(Debug, Clone)]
pub enum LeaseWrite {
    /// A lease (new, renewed, or taken over); a new token also becomes the VM's fence.
    Set(LeaseRecord),
    Clear,
}

/// New runtime state. `generation` counts runs: a power-on (or an adoption) bumps it, and a node
/// agent's writes for an older run are ignored by the write's closure.
#[derive(Debug, Clone)]
pub struct RuntimeWrite {
    pub power_state: PowerState,
    pub runtime: serde_json::Value,
    pub bump_generation: bool,
}

/// A long operation.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub id: Uuid,
    pub kind: String,
    pub object_id: Option<Uuid>,
    pub object_name: Option<String>,
    pub actor: String,
    pub request_id: Option<String>,
    pub state: TaskState,
    pub progress: i64,
    pub message: Option<String>,
    pub error: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaState {
    /// Its steps run (or, after a crash, wait for recovery to undo them).
    Running,
    /// Every step completed.
    Done,
    /// It failed and its completed steps were undone.
    Undone,
    /// An undo failed: an operator must look; its locks stay held.
    Stuck,
}

impl SagaState {
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Done => "done",
            SagaState::Undone => "undone",
            SagaState::Stuck => "stuck",
        }
    }

    /// The state a stored string names (the inverse of [`SagaState::as_str`]).
    pub fn parse(s: &str) -> Option<SagaState> {
        [SagaState::Running, SagaState::Done, SagaState::Undone, SagaState::Stuck].into_iter().find(|x| x.as_str() == s)
    }
}

/// One saga's log entry: what it is, how far it got.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRecord {
    pub id: Uuid,
    pub kind: String,
    pub state: SagaState,
    pub actor: String,
    pub request_id: Option<String>,
    /// The saga's own typed state.
    pub data: serde_json::Value,
    /// The steps that completed, in order.
    pub done: Vec<String>,
    /// The step in progress (it may have had its effect or not).
    pub current: Option<String>,
    pub error: Option<String>,
    /// The replica running it.
    pub owner: Uuid,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Who holds an operation lock.
#[derive(Debug, Clone, PartialEq)]
pub struct OpLock {
    pub object_id: Uuid,
    pub saga_id: Uuid,
    pub kind: String,
    pub actor: String,
    pub taken_at: DateTime<Utc>,
}

/// What one write to a VM does, decided inside the transaction by a [`VmWriteFn`].
#[derive(Debug, Clone, Default)]
pub struct VmWrite {
    pub config: Option<ConfigWrite>,
    pub runtime: Option<RuntimeWrite>,
    pub lease: Option<LeaseWrite>,
    pub delete: bool,
    /// Appended in order; a config write links its version to the first.
    pub events: Vec<NewEvent>,
}

/// What a [`VmWriteFn`] decided, seeing the VM as it is inside the transaction.
#[derive(Debug, Clone)]
pub enum WriteOutcome {
    /// Write this (config, runtime, lease, delete, log entries).
    Write(Box<VmWrite>),
    /// Nothing to write: the VM already is as asked.
    Unchanged,
    /// What the caller checked before the transaction no longer holds (the VM's references moved):
    /// nothing is written; check again from the start.
    Retry(String),
    /// The caller's base version (`If-Match`) is not the current one: nothing is written.
    Stale { current_version: i64, your_version: i64 },
}

impl From<VmWrite> for WriteOutcome {
    fn from(w: VmWrite) -> WriteOutcome {
        WriteOutcome::Write(Box::new(w))
    }
}

/// What [`VmStore::vm_write`] did.
#[derive(Debug, Clone)]
pub enum Written {
    /// Committed: the VM after the write (None when deleted) and the log entries appended.
    Done { vm: Option<VmRecord>, events: Vec<EventRecord> },
    /// Nothing written; the VM as it is.
    Unchanged(VmRecord),
    /// Nothing written: the closure asked to check again (see [`WriteOutcome::Retry`]).
    Retry(String),
    /// Nothing written: the base version was stale; the VM as it is.
    Stale { vm: VmRecord, your_version: i64 },
}

impl Written {
    /// The VM after the write and the entries appended, for closures that never ask to retry and never
    /// see a stale base (an unchanged VM is itself with no entries).
    pub fn done(self) -> Result<(Option<VmRecord>, Vec<EventRecord>)> {
        match self {
            Written::Done { vm, events } => Ok((vm, events)),
            Written::Unchanged(vm) => Ok((Some(vm), vec![])),
            Written::Retry(why) => Err(Error::internal(format!("a write asked to be retried: {why}"))),
            Written::Stale { vm, your_version } => Err(Error::new(
                covm_types::ErrorKind::PreconditionFailed,
                covm_types::ErrorCode::VersionMismatch,
                format!("{} is at version {}, not {your_version}", vm.object.name, vm.version),
            )
            .with_details(serde_json::json!({ "current_version": vm.version, "your_version": your_version }))),
        }
    }
}

/// Decides a VM write from the VM as it is inside the transaction and the store's clock. It must not
/// do I/O: everything that needs the database is checked before. An error aborts the write.
pub type VmWriteFn = Box<dyn FnOnce(&VmRecord, DateTime<Utc>) -> Result<WriteOutcome> + Send>;

/// Everything the app layer asks of storage: one trait a resource, each implemented in its own file
/// of `sql/` for both backends. Bring them into scope with `use covm_store::prelude::*`.
pub trait Store:
    InventoryStore
    + PrincipalStore
    + LogStore
    + VmStore
    + SnapshotStore
    + TaskStore
    + SagaStore
    + ClusterStore
    + Send
    + Sync
    + 'static
{
}

impl<T> Store for T where
    T: InventoryStore
        + PrincipalStore
        + LogStore
        + VmStore
        + SnapshotStore
        + TaskStore
        + SagaStore
        + ClusterStore
        + Send
        + Sync
        + 'static
{
}

/// The store traits, to call a [`Store`]'s methods.
pub mod prelude {
    pub use crate::{
        ClusterStore, InventoryStore, LogStore, PrincipalStore, SagaStore, SnapshotStore, Store, TaskStore, VmStore,
    };
}

/// The inventory tree: objects, their paths and closure rows, and who may see them.
#[async_trait]
pub trait InventoryStore: Send + Sync {
    async fn object_get(&self, id: Uuid) -> Result<Option<ObjectRecord>>;
    async fn object_by_path(&self, path: &str) -> Result<Option<ObjectRecord>>;
    async fn object_by_name(&self, kind: ObjectKind, name: &str) -> Result<Option<ObjectRecord>>;
    /// Children of `parent`, by name. With a viewer: only those the viewer may view, or that lead to
    /// something it may view (so that a user granted `/a/b` sees `/a` when listing `/`).
    async fn object_children(&self, parent: Uuid, viewer: Option<&Viewer>) -> Result<Vec<ObjectRecord>>;
    /// Objects of a kind by path, after the cursor `after` (a path), at most `limit`; with a viewer, only
    /// those it may view.
    async fn objects_list(
        &self,
        kind: ObjectKind,
        viewer: Option<&Viewer>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ObjectRecord>>;
    async fn object_create(&self, object: NewObject, event: NewEvent) -> Result<(ObjectRecord, EventRecord)>;
    /// Replaces an object's spec (host facts at start, datastore capacity, …).
    async fn object_spec_set(&self, id: Uuid, spec: serde_json::Value) -> Result<()>;
    /// Replaces the specs of several objects in one transaction, with one log entry (a key rotation):
    /// each `(id, expected, new)` only if its spec is still `expected` (409 `conflict` otherwise, and
    /// nothing is written).
    async fn object_specs_swap(
        &self,
        specs: Vec<(Uuid, serde_json::Value, serde_json::Value)>,
        event: NewEvent,
    ) -> Result<EventRecord>;
    /// Replaces an object's spec with its log entry, if the spec is still `expected` (a compare and
    /// swap: 409 `conflict` otherwise).
    async fn object_spec_update(
        &self,
        id: Uuid,
        expected: &serde_json::Value,
        spec: serde_json::Value,
        event: NewEvent,
    ) -> Result<EventRecord>;
    /// Deletes an object that has no children (409 `folder_not_empty` otherwise), with its grants.
    async fn object_delete(&self, id: Uuid, event: NewEvent) -> Result<EventRecord>;
    /// Ids of every object the user may view (for filtering the live feed).
    async fn objects_visible(&self, viewer: &Viewer) -> Result<Vec<Uuid>>;
}

/// Users, groups, roles, grants, API tokens and sign-in failures.
#[async_trait]
pub trait PrincipalStore: Send + Sync {
    async fn user_create(&self, user: UserRecord, event: NewEvent) -> Result<EventRecord>;
    /// Creates the first user and grants it `role` on the root, only if there is no user yet. Returns
    /// false (and changes nothing) when a user exists.
    async fn user_bootstrap(&self, user: UserRecord, role: Uuid, event: NewEvent) -> Result<bool>;
    async fn user_get(&self, id: Uuid) -> Result<Option<UserRecord>>;
    async fn user_by_name(&self, name: &str) -> Result<Option<UserRecord>>;
    async fn users_list(&self) -> Result<Vec<UserRecord>>;
    /// Sets a password and ends the user's sessions but `keep` (the one the user changed it in).
    async fn user_password_set(
        &self,
        id: Uuid,
        password_hash: String,
        keep: Option<Uuid>,
        event: NewEvent,
    ) -> Result<EventRecord>;
    /// Deletes a user with its tokens, memberships and grants.
    async fn user_delete(&self, id: Uuid, event: NewEvent) -> Result<EventRecord>;
    async fn user_groups(&self, user: Uuid) -> Result<Vec<String>>;
    async fn group_create(&self, id: Uuid, name: &str, event: NewEvent) -> Result<EventRecord>;
    async fn group_by_name(&self, name: &str) -> Result<Option<GroupRecord>>;
    async fn groups_list(&self) -> Result<Vec<GroupRecord>>;
    /// Adds a member; already a member is success.
    async fn group_member_add(&self, group: Uuid, user: Uuid, event: NewEvent) -> Result<EventRecord>;
    async fn group_member_remove(&self, group: Uuid, user: Uuid, event: NewEvent) -> Result<EventRecord>;
    /// Creates or refreshes a built-in role (used at start; logged only when it changes nothing else).
    async fn role_upsert_builtin(&self, id: Uuid, name: &str, privileges: &[&str]) -> Result<()>;
    async fn role_create(&self, role: RoleRecord, event: NewEvent) -> Result<EventRecord>;
    async fn role_by_name(&self, name: &str) -> Result<Option<RoleRecord>>;
    async fn roles_list(&self) -> Result<Vec<RoleRecord>>;
    /// Grants a role; a grant of the same principal on the same object is replaced.
    async fn permission_create(&self, grant: NewGrant, event: NewEvent) -> Result<(PermissionRecord, EventRecord)>;
    async fn permission_get(&self, id: Uuid) -> Result<Option<PermissionRecord>>;
    async fn permission_delete(&self, id: Uuid, event: NewEvent) -> Result<EventRecord>;
    async fn permissions_list(&self, filter: PermissionFilter) -> Result<Vec<PermissionRecord>>;
    /// The user's effective privileges on an object (DESIGN §7): the nearest node on the path from the
    /// object up to the root that holds a grant applying to it (on the object itself, or propagating
    /// from an ancestor) decides; there, the user's own grants beat its groups'; groups' grants unite.
    async fn privileges_effective(&self, viewer: &Viewer, object: Uuid) -> Result<Vec<String>>;
    /// The annotation keys that some grant's conditions name.
    async fn condition_annotation_keys(&self) -> Result<std::collections::BTreeSet<String>>;
    /// The grants with conditions that reach this user (its own and its groups'), to decide which of
    /// their request conditions fail ([`Viewer::excluded`]).
    async fn grants_conditional(&self, user: Uuid) -> Result<Vec<PermissionRecord>>;
    async fn token_create(&self, token: TokenRecord, event: Option<NewEvent>) -> Result<()>;
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>>;
    async fn tokens_list(&self, user: Uuid, kind: TokenKind) -> Result<Vec<TokenRecord>>;
    /// Deletes a token of this user; false when there was none.
    async fn token_delete(&self, user: Uuid, id: Uuid, event: Option<NewEvent>) -> Result<bool>;
    /// Reserves a sign-in attempt for `account`, atomically with every replica: if the account must
    /// wait (`policy`), returns the seconds to wait and counts nothing; otherwise counts the attempt
    /// as a failure (a success takes it back with [`PrincipalStore::signin_forgive`]).
    async fn signin_reserve(&self, account: &str, at: DateTime<Utc>, policy: SigninPolicy) -> Result<Option<u64>>;
    /// Takes back one reserved attempt (it succeeded).
    async fn signin_forgive(&self, account: &str) -> Result<()>;
    /// Begins two-factor enrollment: the secret (off until confirmed) and the recovery codes' hashes,
    /// replacing any earlier ones.
    async fn user_mfa_begin(&self, id: Uuid, secret: &str, recovery: &[String], event: NewEvent)
    -> Result<EventRecord>;
    /// Turns two-factor sign-in on (the code of `step` confirmed it and is used): the enroll-only
    /// session that confirmed (`session`) becomes a full one, the user's other enroll-only sessions end
    /// (whoever holds them has not shown a code).
    async fn user_mfa_enable(&self, id: Uuid, step: i64, session: Option<Uuid>, event: NewEvent)
    -> Result<EventRecord>;
    /// Turns two-factor sign-in off and forgets the secret and the recovery codes.
    async fn user_mfa_clear(&self, id: Uuid, event: NewEvent) -> Result<EventRecord>;
    /// Uses the code of time step `step`: false when that step, or a later one, was used already.
    async fn user_mfa_step_use(&self, id: Uuid, step: i64) -> Result<bool>;
    /// Disables a user (ending every session and API token of it) or enables it again.
    async fn user_disabled_set(&self, id: Uuid, disabled: bool, event: NewEvent) -> Result<EventRecord>;
    /// Uses a recovery code (its hash) once: false when it is unknown or used.
    async fn user_recovery_use(&self, id: Uuid, hash: &str) -> Result<bool>;
}

/// The append-only, hash-chained log: appending, the feed and the audit queries.
#[async_trait]
pub trait LogStore: Send + Sync {
    async fn event_append(&self, event: NewEvent) -> Result<EventRecord>;
    /// Feed entries (`feed` true) after `after`, in order, at most `limit`.
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRecord>>;
    /// Feed events after `after` whose scope object `user` may view (filtered in the database, so a
    /// reader who may see little costs little).
    async fn events_after_visible(&self, after: i64, viewer: &Viewer, limit: u32) -> Result<Vec<EventRecord>>;
    /// The newest sequence number (0 when empty).
    async fn events_head(&self) -> Result<i64>;
    async fn audit_query(&self, filter: AuditFilter) -> Result<Vec<EventRecord>>;
    /// Recomputes the whole chain.
    async fn audit_verify(&self) -> Result<AuditVerify>;
}

/// VMs: their config versions, runtime state, leases, disk attachments and pools' usage.
#[async_trait]
pub trait VmStore: Send + Sync {
    /// Creates the VM's object and version 1 of its config.
    async fn vm_create(
        &self,
        object: NewObject,
        config: ConfigWrite,
        event: NewEvent,
    ) -> Result<(VmRecord, EventRecord)>;
    async fn vm_get(&self, id: Uuid) -> Result<Option<VmRecord>>;
    /// The VMs whose newest config holds a disk (named `name` or by its id), with their power state:
    /// one indexed read (`vm_disks`, kept with every config version), whatever the number of VMs.
    async fn disk_attachments(&self, name: &str, id: Uuid) -> Result<Vec<AttachmentRecord>>;
    /// A VM by its name (one read: the object and its VM row).
    async fn vm_by_name(&self, name: &str) -> Result<Option<VmRecord>>;
    /// VMs by name after the cursor; with a viewer, only those it may view.
    async fn vms_list(&self, viewer: Option<&Viewer>, filter: VmFilter) -> Result<Vec<VmRecord>>;
    /// One atomic write: reads the VM, lets `f` decide, applies what it says with its log entries.
    async fn vm_write(&self, id: Uuid, f: VmWriteFn) -> Result<Written>;
    /// Versions newest first, older than `before`.
    async fn vm_versions(&self, id: Uuid, before: Option<i64>, limit: u32) -> Result<Vec<VersionRecord>>;
    async fn vm_version(&self, id: Uuid, version: i64) -> Result<Option<VersionRecord>>;
    /// VMs whose lease has expired by `now` (for the sweeper that reports expiries).
    async fn vm_leases_expired(&self, now: DateTime<Utc>) -> Result<Vec<Uuid>>;
    /// What a pool's members use, summed in the database: the vCPUs and memory of its VMs that run
    /// (other than `except`), and the capacity of its disks (other than `except`).
    async fn pool_usage(&self, pool: &str, except: Option<Uuid>) -> Result<PoolUsage>;
}

/// A snapshot as stored: of a VM or of one disk (`owner_id`); `doc` is its view.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub name: String,
    pub doc: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Snapshots of VMs and of disks.
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// Records a snapshot with its log entry (409 `already_exists` for a name the VM has).
    async fn snapshot_insert(&self, snapshot: SnapshotRecord, event: NewEvent) -> Result<EventRecord>;
    /// A VM's or a disk's snapshots, oldest first.
    async fn snapshots_of(&self, owner: Uuid) -> Result<Vec<SnapshotRecord>>;
    async fn snapshot_get(&self, id: Uuid) -> Result<Option<SnapshotRecord>>;
    /// Removes a snapshot's record with its log entry; false when it was not there.
    async fn snapshot_remove(&self, id: Uuid, event: NewEvent) -> Result<bool>;
    /// Replaces a snapshot's document (a safety snapshot learns the version it protects; a user pins
    /// one), with its event; false when it is gone.
    async fn snapshot_update(&self, id: Uuid, doc: serde_json::Value, event: NewEvent) -> Result<bool>;
    /// Every snapshot of every VM (for the reaper of expired safety snapshots).
    async fn snapshots_all(&self) -> Result<Vec<SnapshotRecord>>;
}

/// Tasks (long operations).
#[async_trait]
pub trait TaskStore: Send + Sync {
    /// Creates or updates a task, with an optional log entry in the same transaction.
    async fn task_put(&self, task: TaskRecord, event: Option<NewEvent>) -> Result<()>;
    async fn task_get(&self, id: Uuid) -> Result<Option<TaskRecord>>;
    /// Newest first, created before the cursor (a task id), at most `limit`.
    async fn tasks_list(&self, before: Option<Uuid>, limit: u32) -> Result<Vec<TaskRecord>>;
}

/// Sagas and their operation locks.
#[async_trait]
pub trait SagaStore: Send + Sync {
    /// Records a new saga and takes its operation locks, all or nothing: when an object is already
    /// locked, nothing is written and the holder is returned.
    async fn saga_begin(&self, saga: SagaRecord, locks: &[Uuid]) -> Result<Option<OpLock>>;
    /// Records a saga's progress (`done`, `current`, `data`).
    async fn saga_update(&self, saga: &SagaRecord) -> Result<()>;
    /// Records a saga's end (`done`, `undone` or `stuck`) and releases its locks.
    async fn saga_end(&self, saga: &SagaRecord) -> Result<()>;
    /// Releases a running saga's locks (it committed; what is left of it needs no exclusion).
    async fn saga_unlock(&self, id: Uuid) -> Result<()>;
    /// Sagas still `running` (a crash interrupted them), oldest first.
    async fn sagas_unfinished(&self) -> Result<Vec<SagaRecord>>;
    async fn saga_get(&self, id: Uuid) -> Result<Option<SagaRecord>>;
    /// The lock on an object, if a saga holds one.
    async fn op_lock_get(&self, object: Uuid) -> Result<Option<OpLock>>;
}

/// The longest note [`ClusterStore::signal_send`] carries (PostgreSQL's NOTIFY takes under 8000 bytes).
pub const SIGNAL_MAX: usize = 7900;

/// The database itself and the replicas on it: liveness, the leader, nodes, meta keys.
#[async_trait]
pub trait ClusterStore: Send + Sync {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// Whether the database answers.
    async fn ping(&self) -> Result<()>;
    /// Registers this process as a live replica, until it ends.
    async fn replica_register(&self, id: Uuid) -> Result<()>;
    /// Whether a replica still runs (its sagas are its own while it does).
    async fn replica_alive(&self, id: Uuid) -> Result<bool>;
    /// How many replicas run on this database now (this one included).
    async fn replicas_live(&self) -> Result<u32>;
    /// Takes, or keeps, the role of the one replica that runs background work (saga recovery, lease
    /// expiry reports, autostart); `false`: another replica has it. Taken over when its holder dies.
    async fn leader_try(&self) -> Result<bool>;
    /// Calls `wake` whenever a process commits to the log (for feeds across replicas; a no-op where
    /// only this process writes).
    async fn log_watch(&self, wake: std::sync::Arc<dyn Fn() + Send + Sync>) -> Result<()>;
    /// Sends a short note (at most [`SIGNAL_MAX`] bytes) to every replica watching `channel`, this one
    /// included; nothing is kept (PostgreSQL NOTIFY; a no-op on SQLite, where one process is all).
    async fn signal_send(&self, channel: &str, payload: &str) -> Result<()>;
    /// Calls `on` with every note sent on `channel` from now on (a no-op on SQLite).
    async fn signal_watch(&self, channel: &str, on: std::sync::Arc<dyn Fn(String) + Send + Sync>) -> Result<()>;
    /// Records where a node's replica answers and, when it serves TLS, the certificate it is
    /// trusted by (at every start).
    async fn node_register(&self, node: &str, url: &str, ca_pem: Option<&str>) -> Result<()>;
    /// Where a node's replica answers.
    async fn node_addr(&self, node: &str) -> Result<Option<NodeAddr>>;
    /// This process stops using the store: its replica and leader locks go, its connections close.
    async fn close(&self);
    async fn meta_get(&self, key: &str) -> Result<Option<String>>;
    async fn meta_set(&self, key: &str, value: &str) -> Result<()>;
    /// A setting that is a change of its own (a policy): written with its event, in one transaction.
    async fn meta_set_logged(&self, key: &str, value: &str, event: NewEvent) -> Result<EventRecord>;
}

/// A pool's usage (see [`VmStore::pool_usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    pub vcpus_running: u64,
    pub memory_mib_running: u64,
    pub disk_bytes: u64,
}

/// The per-account sign-in limit: `free` failures within `window`, then each try waits 2, 4, 8 …
/// seconds after the last failure, at most `delay_max_s`.
#[derive(Debug, Clone, Copy)]
pub struct SigninPolicy {
    pub window: chrono::Duration,
    pub free: i64,
    pub delay_max_s: i64,
}

impl SigninPolicy {
    /// Seconds an account with `f` must wait at `at` (0: none).
    pub fn wait(&self, f: &SigninFailures, at: DateTime<Utc>) -> u64 {
        if at - f.first_at > self.window || f.failures < self.free {
            return 0;
        }
        let n = (f.failures - self.free).clamp(0, 30) as u32;
        let delay = 2i64.saturating_pow(n + 1).min(self.delay_max_s);
        let until = f.last_at + chrono::Duration::seconds(delay);
        if until <= at { 0 } else { ((until - at).num_milliseconds() as u64).div_ceil(1000).max(1) }
    }
}

/// Failed sign-ins of one account (every replica counts into the same row).
#[derive(Debug, Clone, PartialEq)]
pub struct SigninFailures {
    pub failures: i64,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
}
