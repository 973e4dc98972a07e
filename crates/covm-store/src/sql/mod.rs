//! The SQL both stores share: SQLite (the embedded default) and PostgreSQL run the same statements on
//! the same schema shape (ids, times and JSON documents as text, counters and flags as 64-bit
//! integers), so one body of code, instantiated per backend by [`sql_store!`], serves both. What differs
//! (connecting, how a write transaction begins and serializes, the migrations) stays in each backend's
//! module.

use chrono::{DateTime, Utc};
use covm_types::vm::PowerState;
use covm_types::{Error, ErrorCode};

use crate::Result;
use uuid::Uuid;

/// The common table expressions that compute, for the user bound as `$1`, the effective privileges on
/// every object some grant reaches (`eff(obj, privilege)`) and the objects it may view (`visible(id)`).
/// See [`Store::privileges_effective`] for the rule.
macro_rules! visibility_cte {
    ($excluded:literal) => {
        concat!(
            "WITH ug(pid, object_id, propagate, role_id, is_user) AS (
            SELECT p.id, p.object_id, p.propagate, p.role_id, CASE WHEN p.principal_kind = 'user' THEN 1 ELSE 0 END
            FROM permissions p
            WHERE ((p.principal_kind = 'user' AND p.principal_id = $1)
               OR (p.principal_kind = 'group'
                   AND p.principal_id IN (SELECT group_id FROM group_members WHERE user_id = $1)))
              AND (p.conditions IS NULL OR ",
            $excluded,
            " NOT LIKE '%|' || p.id || '|%')
        ),
        app(obj, dist, role_id, is_user) AS (
            SELECT c.object_id, c.depth, ug.role_id, ug.is_user
            FROM ug JOIN closure c ON c.ancestor_id = ug.object_id
            WHERE (c.depth = 0 OR ug.propagate = 1)
              AND NOT EXISTS (SELECT 1 FROM permission_annotations pa WHERE pa.permission_id = ug.pid
                  AND NOT EXISTS (SELECT 1 FROM object_annotations oa
                      WHERE oa.object_id = c.object_id AND oa.key = pa.key AND oa.value = pa.value))
        ),
        best(obj, dist) AS (SELECT obj, MIN(dist) FROM app GROUP BY obj),
        win(obj, role_id, is_user) AS (
            SELECT a.obj, a.role_id, a.is_user FROM app a JOIN best b ON a.obj = b.obj AND a.dist = b.dist
        ),
        cls(obj, is_user) AS (SELECT obj, MAX(is_user) FROM win GROUP BY obj),
        visible(id) AS (
            SELECT DISTINCT w.obj
            FROM win w JOIN cls ON w.obj = cls.obj AND w.is_user = cls.is_user
            JOIN role_privileges rp ON rp.role_id = w.role_id AND rp.privilege = 'System.View'
        )
        "
        )
    };
}

/// The same rule for one object (`$2`): only the grants on its own path are looked at.
macro_rules! object_privileges_cte {
    ($excluded:literal) => {
        concat!(
            "WITH ug(pid, object_id, propagate, role_id, is_user) AS (
            SELECT p.id, p.object_id, p.propagate, p.role_id, CASE WHEN p.principal_kind = 'user' THEN 1 ELSE 0 END
            FROM permissions p
            WHERE p.object_id IN (SELECT ancestor_id FROM closure WHERE object_id = $2)
              AND ((p.principal_kind = 'user' AND p.principal_id = $1)
               OR (p.principal_kind = 'group'
                   AND p.principal_id IN (SELECT group_id FROM group_members WHERE user_id = $1)))
              AND (p.conditions IS NULL OR ",
            $excluded,
            " NOT LIKE '%|' || p.id || '|%')
        ),
        app(dist, role_id, is_user) AS (
            SELECT c.depth, ug.role_id, ug.is_user
            FROM ug JOIN closure c ON c.ancestor_id = ug.object_id AND c.object_id = $2
            WHERE (c.depth = 0 OR ug.propagate = 1)
              AND NOT EXISTS (SELECT 1 FROM permission_annotations pa WHERE pa.permission_id = ug.pid
                  AND NOT EXISTS (SELECT 1 FROM object_annotations oa
                      WHERE oa.object_id = $2 AND oa.key = pa.key AND oa.value = pa.value))
        ),
        win(role_id, is_user) AS (SELECT role_id, is_user FROM app WHERE dist = (SELECT MIN(dist) FROM app)),
        eff(privilege) AS (
            SELECT DISTINCT rp.privilege FROM win JOIN role_privileges rp ON rp.role_id = win.role_id
            WHERE win.is_user = (SELECT MAX(is_user) FROM win)
        )
        "
        )
    };
}

/// Maps a database error: a unique constraint is a conflict on `what`; anything else is logged once
/// here and becomes an internal error.
/// Decides whether a connection goes back to the pool: never one still inside a transaction. A
/// COMMIT that failed (a full disk) may leave the database rolled back and the driver still counting a
/// transaction, whose ROLLBACK then fails too; such a connection is closed and the pool makes a new
/// one, so writes resume by themselves once the cause is gone. A connection outside a transaction goes
/// straight back (a round trip per release is the single SQLite writer's hand-over time, and under load
/// every waiting writer pays it); one inside is pinged first, which lets a rollback queued by a dropped
/// transaction finish.
pub(crate) async fn release_check<C: sqlx::Connection>(conn: &mut C) -> std::result::Result<bool, sqlx::Error> {
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    if conn.ping().await.is_err() {
        return Ok(false);
    }
    let clean = !conn.is_in_transaction();
    if !clean {
        tracing::warn!("a database connection was left inside a transaction; it is closed, not reused");
    }
    Ok(clean)
}

pub(crate) fn db_err(what: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| {
        if let sqlx::Error::Database(d) = &e {
            if d.is_unique_violation() {
                return Error::conflict(ErrorCode::AlreadyExists, format!("{what}: the name is already taken"));
            }
            if d.is_foreign_key_violation() {
                return Error::conflict(ErrorCode::InUse, format!("{what}: the object is still referenced"));
            }
            // SQLITE_FULL (SQLite turns ENOSPC into it), PostgreSQL's disk_full class.
            let code = d.code().unwrap_or_default();
            if code == "13" || code == "53100" {
                tracing::error!(error = %e, "database error: {what}: the file system that holds the database is full");
                return Error::storage_full(
                    "database",
                    format!(
                        "could not {what}: the file system that holds covm's database is full; free space there and try again"
                    ),
                );
            }
            // PostgreSQL shutting down, refusing connections, or a connection that broke.
            if code.starts_with("57P") || code.starts_with("08") {
                tracing::error!(error = %e, "database error: {what}: the database cannot be reached");
                return Error::store_unavailable(format!("could not {what}: the database cannot be reached right now"));
            }
        }
        if matches!(
            e,
            sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
        ) {
            tracing::error!(error = %e, "database error: {what}: the database cannot be reached");
            return Error::store_unavailable(format!("could not {what}: the database cannot be reached right now"));
        }
        tracing::error!(error = %e, "database error: {what}");
        Error::internal(format!("database error: could not {what}"))
    }
}

pub(crate) fn uuid(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|_| Error::internal(format!("bad id {s} in the database")))
}

pub(crate) fn uuid_opt(s: Option<String>) -> Result<Option<Uuid>> {
    s.as_deref().map(uuid).transpose()
}

pub(crate) fn time(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| Error::internal(format!("bad time {s} in the database")))
}

/// A stored enum's string read back; an unknown one is data this build cannot read (an internal error).
pub(crate) fn stored<T>(what: &str, s: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T> {
    parse(s).ok_or_else(|| Error::internal(format!("the database holds an unknown {what} {s:?}")))
}

pub(crate) fn power_state(s: &str) -> Result<PowerState> {
    stored("power state", s, PowerState::parse)
}

pub(crate) fn json(s: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s).map_err(|_| Error::internal("bad JSON in the database"))
}

pub(crate) const PERMISSION_SELECT: &str = "SELECT p.id, p.principal_kind, p.principal_id, p.role_id, p.object_id,
        p.propagate, p.created_at, p.conditions, r.name AS role_name,
        COALESCE(u.name, g.name) AS principal_name
    FROM permissions p
    JOIN roles r ON r.id = p.role_id
    LEFT JOIN users u ON p.principal_kind = 'user' AND u.id = p.principal_id
    LEFT JOIN groups g ON p.principal_kind = 'group' AND g.id = p.principal_id";

pub(crate) const VM_SELECT: &str = "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at,
        v.version, v.config, v.power_state, v.runtime, v.generation, v.lease_holder_id, v.lease_holder,
        v.lease_token, v.lease_acquired_at, v.lease_expires_at, v.lease_fence
    FROM objects o JOIN vms v ON v.id = o.id";

#[macro_use]
mod inventory;
#[macro_use]
mod principals;
#[macro_use]
mod log;
#[macro_use]
mod vms;
#[macro_use]
mod snapshots;
#[macro_use]
mod tasks;
#[macro_use]
mod sagas;
#[macro_use]
mod cluster;

/// The store's code for one backend: `sql_store!(SqliteStore, Sqlite, SqliteRow, SqlitePool, "sqlite")`.
/// The backend module defines the struct (with `writer` and `reader` pools) and `begin()`, which opens
/// a write transaction that holds the log's write lock until it ends.
macro_rules! sql_store {
    ($Store:ident, $DB:ident, $Row:ty, $Pool:ty, $backend:literal) => {
        sql_inventory!($Store, $DB, $Row, $Pool, $backend);
        sql_principals!($Store, $DB, $Row, $Pool, $backend);
        sql_log!($Store, $DB, $Row, $Pool, $backend);
        sql_vms!($Store, $DB, $Row, $Pool, $backend);
        sql_snapshots!($Store, $DB, $Row, $Pool, $backend);
        sql_tasks!($Store, $DB, $Row, $Pool, $backend);
        sql_sagas!($Store, $DB, $Row, $Pool, $backend);
        sql_cluster!($Store, $DB, $Row, $Pool, $backend);
    };
}
