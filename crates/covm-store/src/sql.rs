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
    () => {
        "WITH ug(object_id, propagate, role_id, is_user) AS (
            SELECT p.object_id, p.propagate, p.role_id, CASE WHEN p.principal_kind = 'user' THEN 1 ELSE 0 END
            FROM permissions p
            WHERE (p.principal_kind = 'user' AND p.principal_id = $1)
               OR (p.principal_kind = 'group'
                   AND p.principal_id IN (SELECT group_id FROM group_members WHERE user_id = $1))
        ),
        app(obj, dist, role_id, is_user) AS (
            SELECT c.object_id, c.depth, ug.role_id, ug.is_user
            FROM ug JOIN closure c ON c.ancestor_id = ug.object_id
            WHERE c.depth = 0 OR ug.propagate = 1
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
    };
}

/// The same rule for one object (`$2`): only the grants on its own path are looked at.
macro_rules! object_privileges_cte {
    () => {
        "WITH ug(object_id, propagate, role_id, is_user) AS (
            SELECT p.object_id, p.propagate, p.role_id, CASE WHEN p.principal_kind = 'user' THEN 1 ELSE 0 END
            FROM permissions p
            WHERE p.object_id IN (SELECT ancestor_id FROM closure WHERE object_id = $2)
              AND ((p.principal_kind = 'user' AND p.principal_id = $1)
               OR (p.principal_kind = 'group'
                   AND p.principal_id IN (SELECT group_id FROM group_members WHERE user_id = $1)))
        ),
        app(dist, role_id, is_user) AS (
            SELECT c.depth, ug.role_id, ug.is_user
            FROM ug JOIN closure c ON c.ancestor_id = ug.object_id AND c.object_id = $2
            WHERE c.depth = 0 OR ug.propagate = 1
        ),
        win(role_id, is_user) AS (SELECT role_id, is_user FROM app WHERE dist = (SELECT MIN(dist) FROM app)),
        eff(privilege) AS (
            SELECT DISTINCT rp.privilege FROM win JOIN role_privileges rp ON rp.role_id = win.role_id
            WHERE win.is_user = (SELECT MAX(is_user) FROM win)
        )
        "
    };
}

/// Maps a database error: a unique constraint is a conflict on `what`; anything else is logged once
/// here and becomes an internal error.
/// Decides whether a connection goes back to the pool: never one still inside a transaction. A
/// COMMIT that failed (a full disk) may leave the database rolled back and the driver still counting a
/// transaction, whose ROLLBACK then fails too; such a connection is closed and the pool makes a new
/// one, so writes resume by themselves once the cause is gone. The ping lets a rollback queued by a
/// dropped transaction finish first.
pub(crate) async fn release_check<C: sqlx::Connection>(conn: &mut C) -> std::result::Result<bool, sqlx::Error> {
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
        p.propagate, p.created_at, r.name AS role_name,
        COALESCE(u.name, g.name) AS principal_name
    FROM permissions p
    JOIN roles r ON r.id = p.role_id
    LEFT JOIN users u ON p.principal_kind = 'user' AND u.id = p.principal_id
    LEFT JOIN groups g ON p.principal_kind = 'group' AND g.id = p.principal_id";

pub(crate) const VM_SELECT: &str = "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at,
        v.version, v.config, v.power_state, v.runtime, v.generation, v.lease_holder_id, v.lease_holder,
        v.lease_token, v.lease_acquired_at, v.lease_expires_at, v.lease_fence
    FROM objects o JOIN vms v ON v.id = o.id";

/// The store's code for one backend: `sql_store!(SqliteStore, Sqlite, SqliteRow, SqlitePool, "sqlite")`.
/// The backend module defines the struct (with `writer` and `reader` pools) and `begin()`, which opens
/// a write transaction that holds the log's write lock until it ends.
macro_rules! sql_store {
    ($Store:ident, $DB:ident, $Row:ty, $Pool:ty, $backend:literal) => {
pub(crate) fn object_row(r: &$Row) -> Result<ObjectRecord> {
    let kind: String = r.get("kind");
    Ok(ObjectRecord {
        id: uuid(r.get("id"))?,
        kind: ObjectKind::parse(&kind).ok_or_else(|| Error::internal(format!("bad kind {kind}")))?,
        name: r.get("name"),
        parent_id: uuid_opt(r.get("parent_id"))?,
        path: r.get("path"),
        spec: json(r.get("spec"))?,
        created_at: time(r.get("created_at"))?,
    })
}

fn user_row(r: &$Row) -> Result<UserRecord> {
    Ok(UserRecord {
        id: uuid(r.get("id"))?,
        name: r.get("name"),
        password_hash: r.get("password_hash"),
        created_at: time(r.get("created_at"))?,
    })
}

fn token_row(r: &$Row) -> Result<TokenRecord> {
    let kind: String = r.get("kind");
    Ok(TokenRecord {
        id: uuid(r.get("id"))?,
        user_id: uuid(r.get("user_id"))?,
        kind: if kind == "api" { TokenKind::Api } else { TokenKind::Session },
        name: r.get("name"),
        hash: r.get("hash"),
        created_at: time(r.get("created_at"))?,
        expires_at: time(r.get("expires_at"))?,
    })
}

fn event_row(r: &$Row) -> Result<EventRecord> {
    let patch: Option<String> = r.get("patch");
    Ok(EventRecord {
        seq: r.get("seq"),
        time: time(r.get("time"))?,
        actor: r.get("actor"),
        request_id: r.get("request_id"),
        kind: r.get("kind"),
        object_kind: r.get("object_kind"),
        object_id: uuid_opt(r.get("object_id"))?,
        object_name: r.get("object_name"),
        scope_id: uuid_opt(r.get("scope_id"))?,
        feed: r.get::<i64, _>("feed") != 0,
        version_before: r.get("version_before"),
        version_after: r.get("version_after"),
        patch: patch.as_deref().map(json).transpose()?,
        data: json(r.get("data"))?,
        hash: r.get("hash"),
    })
}

/// Appends one entry to the log inside the caller's write transaction.
pub(crate) async fn append(tx: &mut Transaction<'static, $DB>, e: NewEvent) -> Result<EventRecord> {
    let prev = sqlx::query("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut **tx)
        .await
        .map_err(db_err("read the log"))?;
    let (prev_seq, prev_hash) = match prev {
        Some(r) => (r.get::<i64, _>("seq"), r.get::<String, _>("hash")),
        None => (0, String::new()),
    };
    let mut rec = EventRecord {
        seq: prev_seq + 1,
        time: now(),
        actor: e.actor,
        request_id: e.request_id,
        kind: e.kind,
        object_kind: e.object_kind,
        object_id: e.object_id,
        object_name: e.object_name,
        scope_id: e.scope_id,
        feed: e.feed,
        version_before: e.version_before,
        version_after: e.version_after,
        patch: e.patch,
        data: e.data,
        hash: String::new(),
    };
    rec.hash = event_hash(&prev_hash, &rec);
    sqlx::query(
        "INSERT INTO events (seq, time, actor, request_id, kind, object_kind, object_id, object_name,
            scope_id, feed, version_before, version_after, patch, data, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(rec.seq)
    .bind(time_to_db(rec.time))
    .bind(&rec.actor)
    .bind(&rec.request_id)
    .bind(&rec.kind)
    .bind(&rec.object_kind)
    .bind(rec.object_id.map(|u| u.to_string()))
    .bind(&rec.object_name)
    .bind(rec.scope_id.map(|u| u.to_string()))
    .bind(rec.feed as i64)
    .bind(rec.version_before)
    .bind(rec.version_after)
    .bind(rec.patch.as_ref().map(|p| p.to_string()))
    .bind(rec.data.to_string())
    .bind(&rec.hash)
    .execute(&mut **tx)
    .await
    .map_err(db_err("append to the log"))?;
    Ok(rec)
}

async fn insert_user(tx: &mut Transaction<'static, $DB>, user: &UserRecord) -> Result<()> {
    sqlx::query("INSERT INTO users (id, name, password_hash, created_at) VALUES ($1, $2, $3, $4)")
        .bind(user.id.to_string())
        .bind(&user.name)
        .bind(&user.password_hash)
        .bind(time_to_db(user.created_at))
        .execute(&mut **tx)
        .await
        .map_err(db_err("create the user"))?;
    Ok(())
}

/// Inserts an object under its parent folder with its path and closure rows, inside the caller's write
/// transaction; a taken path, or a taken name of a kind other than folder, is a conflict.
pub(crate) async fn object_insert(tx: &mut Transaction<'static, $DB>, object: NewObject) -> Result<ObjectRecord> {
    let parent = sqlx::query("SELECT path, kind FROM objects WHERE id = $1")
        .bind(object.parent_id.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db_err("read the parent folder"))?
        .ok_or_else(|| Error::not_found("folder", &object.parent_id.to_string()))?;
    if parent.get::<String, _>("kind") != "folder" {
        return Err(Error::invalid("parent", "the parent is not a folder"));
    }
    let parent_path: String = parent.get("path");
    let path = if parent_path == "/" { format!("/{}", object.name) } else { format!("{parent_path}/{}", object.name) };
    let taken =
        sqlx::query("SELECT kind FROM objects WHERE path = $1 OR (kind = $2 AND kind <> 'folder' AND name = $3)")
            .bind(&path)
            .bind(object.kind.as_str())
            .bind(&object.name)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_err("check the name"))?;
    if let Some(r) = taken {
        let kind: String = r.get("kind");
        return Err(Error::conflict(ErrorCode::AlreadyExists, format!("a {kind} named {} already exists", object.name))
            .with_field("name"));
    }
    let rec = ObjectRecord {
        id: object.id,
        kind: object.kind,
        name: object.name,
        parent_id: Some(object.parent_id),
        path,
        spec: object.spec,
        created_at: now(),
    };
    let id = rec.id.to_string();
    sqlx::query(
        "INSERT INTO objects (id, kind, name, parent_id, path, spec, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(rec.kind.as_str())
    .bind(&rec.name)
    .bind(object.parent_id.to_string())
    .bind(&rec.path)
    .bind(rec.spec.to_string())
    .bind(time_to_db(rec.created_at))
    .execute(&mut **tx)
    .await
    .map_err(db_err("create an object"))?;
    sqlx::query(
        "INSERT INTO closure (object_id, ancestor_id, depth)
         SELECT $1, ancestor_id, depth + 1 FROM closure WHERE object_id = $2
         UNION ALL SELECT $1, $1, 0",
    )
    .bind(&id)
    .bind(object.parent_id.to_string())
    .execute(&mut **tx)
    .await
    .map_err(db_err("create an object"))?;
    Ok(rec)
}

/// Appends the change's log entry and commits.
pub(crate) async fn finish(mut tx: Transaction<'static, $DB>, event: NewEvent) -> Result<EventRecord> {
    let ev = append(&mut tx, event).await?;
    tx.commit().await.map_err(db_err("commit"))?;
    Ok(ev)
}

impl $Store {
    async fn group_members(&self, group: &str) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT u.name FROM group_members m JOIN users u ON u.id = m.user_id
             WHERE m.group_id = $1 ORDER BY u.name",
        )
        .bind(group)
        .fetch_all(&self.reader)
        .await
        .map_err(db_err("read group members"))?;
        Ok(rows.iter().map(|r| r.get("name")).collect())
    }

    async fn role_privileges(&self, role: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT privilege FROM role_privileges WHERE role_id = $1 ORDER BY privilege")
            .bind(role)
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("read role privileges"))?;
        Ok(rows.iter().map(|r| r.get("privilege")).collect())
    }

    async fn role_record(&self, r: &$Row) -> Result<RoleRecord> {
        let id: String = r.get("id");
        Ok(RoleRecord {
            id: uuid(&id)?,
            name: r.get("name"),
            builtin: r.get::<i64, _>("builtin") != 0,
            privileges: self.role_privileges(&id).await?,
        })
    }
}

fn permission_row(r: &$Row) -> Result<PermissionRecord> {
    let kind: String = r.get("principal_kind");
    Ok(PermissionRecord {
        id: uuid(r.get("id"))?,
        principal_kind: if kind == "group" { PrincipalKind::Group } else { PrincipalKind::User },
        principal_id: uuid(r.get("principal_id"))?,
        principal_name: r.get::<Option<String>, _>("principal_name").unwrap_or_default(),
        role_id: uuid(r.get("role_id"))?,
        role_name: r.get("role_name"),
        object_id: uuid(r.get("object_id"))?,
        propagate: r.get::<i64, _>("propagate") != 0,
        created_at: time(r.get("created_at"))?,
    })
}

#[async_trait]
impl Store for $Store {
    fn backend(&self) -> &'static str {
        $backend
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await.map(|_| ()).map_err(db_err("reach the database"))
    }

    async fn object_get(&self, id: Uuid) -> Result<Option<ObjectRecord>> {
        sqlx::query(
            "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o WHERE o.id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await
        .map_err(db_err("read an object"))?
        .as_ref()
        .map(object_row)
        .transpose()
    }

    async fn object_by_path(&self, path: &str) -> Result<Option<ObjectRecord>> {
        sqlx::query(
            "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o WHERE o.path = $1",
        )
        .bind(path)
        .fetch_optional(&self.reader)
        .await
        .map_err(db_err("read an object"))?
        .as_ref()
        .map(object_row)
        .transpose()
    }

    async fn object_by_name(&self, kind: ObjectKind, name: &str) -> Result<Option<ObjectRecord>> {
        sqlx::query(
            "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o
             WHERE o.kind = $1 AND o.name = $2 ORDER BY o.path LIMIT 1",
        )
        .bind(kind.as_str())
        .bind(name)
        .fetch_optional(&self.reader)
        .await
        .map_err(db_err("read an object"))?
        .as_ref()
        .map(object_row)
        .transpose()
    }

    async fn object_children(&self, parent: Uuid, viewer: Option<Uuid>) -> Result<Vec<ObjectRecord>> {
        let rows = match viewer {
            None => {
                sqlx::query(
                    "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o
                 WHERE o.parent_id = $1 ORDER BY o.name",
                )
                .bind(parent.to_string())
                .fetch_all(&self.reader)
                .await
            }
            Some(user) => {
                sqlx::query(concat!(
                    visibility_cte!(),
                    "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o
                 WHERE o.parent_id = $2 AND EXISTS (
                    SELECT 1 FROM closure c JOIN visible v ON v.id = c.object_id WHERE c.ancestor_id = o.id)
                 ORDER BY o.name"
                ))
                .bind(user.to_string())
                .bind(parent.to_string())
                .fetch_all(&self.reader)
                .await
            }
        }
        .map_err(db_err("list a folder"))?;
        rows.iter().map(object_row).collect()
    }

    async fn objects_list(
        &self,
        kind: ObjectKind,
        viewer: Option<Uuid>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ObjectRecord>> {
        let after = after.unwrap_or("");
        let rows = match viewer {
            None => {
                sqlx::query(
                    "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at FROM objects o
                 WHERE o.kind = $1 AND o.path > $2 AND o.id <> $4 ORDER BY o.path LIMIT $3",
                )
                .bind(kind.as_str())
                .bind(after)
                .bind(limit as i64)
                .bind(ROOT_ID.to_string())
                .fetch_all(&self.reader)
                .await
            }
            Some(user) => {
                sqlx::query(concat!(
                    visibility_cte!(),
                    "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at
                 FROM objects o JOIN visible v ON v.id = o.id
                 WHERE o.kind = $2 AND o.path > $3 AND o.id <> $5 ORDER BY o.path LIMIT $4"
                ))
                .bind(user.to_string())
                .bind(kind.as_str())
                .bind(after)
                .bind(limit as i64)
                .bind(ROOT_ID.to_string())
                .fetch_all(&self.reader)
                .await
            }
        }
        .map_err(db_err("list objects"))?;
        rows.iter().map(object_row).collect()
    }

    async fn object_create(&self, object: NewObject, event: NewEvent) -> Result<(ObjectRecord, EventRecord)> {
        let mut tx = self.begin().await?;
        let rec = object_insert(&mut tx, object).await?;
        let ev = append(&mut tx, event).await?;
        tx.commit().await.map_err(db_err("commit"))?;
        Ok((rec, ev))
    }

    async fn object_spec_set(&self, id: Uuid, spec: serde_json::Value) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE objects SET spec = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(spec.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("update an object"))?;
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn object_spec_update(
        &self,
        id: Uuid,
        expected: &serde_json::Value,
        spec: serde_json::Value,
        event: NewEvent,
    ) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let current: Option<String> = sqlx::query("SELECT spec FROM objects WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err("read an object"))?
            .map(|r| r.get("spec"));
        let Some(current) = current else {
            return Err(Error::not_found("object", &id.to_string()));
        };
        if &json(&current)? != expected {
            return Err(Error::conflict(ErrorCode::Conflict, "the object changed meanwhile; try again"));
        }
        sqlx::query("UPDATE objects SET spec = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(spec.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("update an object"))?;
        finish(tx, event).await
    }

    async fn object_delete(&self, id: Uuid, event: NewEvent) -> Result<EventRecord> {
        if id == ROOT_ID {
            return Err(Error::conflict(ErrorCode::RootFolder, "the root folder cannot be deleted"));
        }
        let mut tx = self.begin().await?;
        let id_s = id.to_string();
        let children: i64 = sqlx::query("SELECT COUNT(*) AS n FROM objects WHERE parent_id = $1")
            .bind(&id_s)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err("count children"))?
            .get("n");
        if children > 0 {
            return Err(Error::conflict(
                ErrorCode::FolderNotEmpty,
                format!("the folder holds {children} objects; delete or move them first"),
            )
            .with_details(serde_json::json!({ "children": children })));
        }
        let n = sqlx::query("DELETE FROM objects WHERE id = $1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("delete an object"))?
            .rows_affected();
        if n == 0 {
            return Err(Error::not_found("object", &id_s));
        }
        finish(tx, event).await
    }

    async fn objects_visible(&self, user: Uuid) -> Result<Vec<Uuid>> {
        let rows = sqlx::query(concat!(visibility_cte!(), "SELECT id FROM visible"))
            .bind(user.to_string())
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("compute visibility"))?;
        rows.iter().map(|r| uuid(r.get("id"))).collect()
    }

    async fn user_create(&self, user: UserRecord, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        insert_user(&mut tx, &user).await?;
        finish(tx, event).await
    }

    async fn user_bootstrap(&self, user: UserRecord, role: Uuid, event: NewEvent) -> Result<bool> {
        let mut tx = self.begin().await?;
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM users")
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err("count users"))?
            .get("n");
        if n > 0 {
            return Ok(false);
        }
        insert_user(&mut tx, &user).await?;
        sqlx::query(
            "INSERT INTO permissions (id, principal_kind, principal_id, role_id, object_id, propagate, created_at)
             VALUES ($1, 'user', $2, $3, $4, 1, $5)",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(user.id.to_string())
        .bind(role.to_string())
        .bind(ROOT_ID.to_string())
        .bind(time_to_db(user.created_at))
        .execute(&mut *tx)
        .await
        .map_err(db_err("grant the first user"))?;
        append(&mut tx, event).await?;
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(true)
    }

    async fn user_get(&self, id: Uuid) -> Result<Option<UserRecord>> {
        sqlx::query("SELECT id, name, password_hash, created_at FROM users WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a user"))?
            .as_ref()
            .map(user_row)
            .transpose()
    }

    async fn user_by_name(&self, name: &str) -> Result<Option<UserRecord>> {
        sqlx::query("SELECT id, name, password_hash, created_at FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a user"))?
            .as_ref()
            .map(user_row)
            .transpose()
    }

    async fn users_list(&self) -> Result<Vec<UserRecord>> {
        let rows = sqlx::query("SELECT id, name, password_hash, created_at FROM users ORDER BY name")
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list users"))?;
        rows.iter().map(user_row).collect()
    }

    async fn user_password_set(&self, id: Uuid, password_hash: String, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(password_hash)
            .execute(&mut *tx)
            .await
            .map_err(db_err("set a password"))?
            .rows_affected();
        if n == 0 {
            return Err(Error::not_found("user", &id.to_string()));
        }
        // A new password ends every session of the user; API tokens stay.
        sqlx::query("DELETE FROM tokens WHERE user_id = $1 AND kind = 'session'")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("end sessions"))?;
        finish(tx, event).await
    }

    async fn user_delete(&self, id: Uuid, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let id_s = id.to_string();
        sqlx::query("DELETE FROM permissions WHERE principal_kind = 'user' AND principal_id = $1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("delete the user's grants"))?;
        let n = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("delete the user"))?
            .rows_affected();
        if n == 0 {
            return Err(Error::not_found("user", &id_s));
        }
        finish(tx, event).await
    }

    async fn user_groups(&self, user: Uuid) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT g.name FROM group_members m JOIN groups g ON g.id = m.group_id
             WHERE m.user_id = $1 ORDER BY g.name",
        )
        .bind(user.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db_err("read a user's groups"))?;
        Ok(rows.iter().map(|r| r.get("name")).collect())
    }

    async fn group_create(&self, id: Uuid, name: &str, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO groups (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(id.to_string())
            .bind(name)
            .bind(time_to_db(now()))
            .execute(&mut *tx)
            .await
            .map_err(db_err("create the group"))?;
        finish(tx, event).await
    }

    async fn group_by_name(&self, name: &str) -> Result<Option<GroupRecord>> {
        let Some(r) = sqlx::query("SELECT id, name, created_at FROM groups WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a group"))?
        else {
            return Ok(None);
        };
        let id: String = r.get("id");
        Ok(Some(GroupRecord {
            id: uuid(&id)?,
            name: r.get("name"),
            members: self.group_members(&id).await?,
            created_at: time(r.get("created_at"))?,
        }))
    }

    async fn groups_list(&self) -> Result<Vec<GroupRecord>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM groups ORDER BY name")
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list groups"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.get("id");
            out.push(GroupRecord {
                id: uuid(&id)?,
                name: r.get("name"),
                members: self.group_members(&id).await?,
                created_at: time(r.get("created_at"))?,
            });
        }
        Ok(out)
    }

    async fn group_member_add(&self, group: Uuid, user: Uuid, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO group_members (group_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(group.to_string())
            .bind(user.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("add a group member"))?;
        finish(tx, event).await
    }

    async fn group_member_remove(&self, group: Uuid, user: Uuid, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM group_members WHERE group_id = $1 AND user_id = $2")
            .bind(group.to_string())
            .bind(user.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("remove a group member"))?;
        finish(tx, event).await
    }

    async fn role_upsert_builtin(&self, id: Uuid, name: &str, privileges: &[&str]) -> Result<()> {
        let mut tx = self.begin().await?;
        let id_s = id.to_string();
        sqlx::query(
            "INSERT INTO roles (id, name, builtin, created_at) VALUES ($1, $2, 1, $3)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        )
        .bind(&id_s)
        .bind(name)
        .bind(time_to_db(now()))
        .execute(&mut *tx)
        .await
        .map_err(db_err("create a built-in role"))?;
        sqlx::query("DELETE FROM role_privileges WHERE role_id = $1")
            .bind(&id_s)
            .execute(&mut *tx)
            .await
            .map_err(db_err("refresh a built-in role"))?;
        for p in privileges {
            sqlx::query("INSERT INTO role_privileges (role_id, privilege) VALUES ($1, $2)")
                .bind(&id_s)
                .bind(*p)
                .execute(&mut *tx)
                .await
                .map_err(db_err("refresh a built-in role"))?;
        }
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn role_create(&self, role: RoleRecord, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let id_s = role.id.to_string();
        sqlx::query("INSERT INTO roles (id, name, builtin, created_at) VALUES ($1, $2, 0, $3)")
            .bind(&id_s)
            .bind(&role.name)
            .bind(time_to_db(now()))
            .execute(&mut *tx)
            .await
            .map_err(db_err("create the role"))?;
        for p in &role.privileges {
            sqlx::query("INSERT INTO role_privileges (role_id, privilege) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(&id_s)
                .bind(p)
                .execute(&mut *tx)
                .await
                .map_err(db_err("create the role"))?;
        }
        finish(tx, event).await
    }

    async fn role_by_name(&self, name: &str) -> Result<Option<RoleRecord>> {
        let r = sqlx::query("SELECT id, name, builtin FROM roles WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a role"))?;
        match r {
            Some(r) => Ok(Some(self.role_record(&r).await?)),
            None => Ok(None),
        }
    }

    async fn roles_list(&self) -> Result<Vec<RoleRecord>> {
        let rows = sqlx::query("SELECT id, name, builtin FROM roles ORDER BY builtin DESC, name")
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list roles"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.role_record(r).await?);
        }
        Ok(out)
    }

    async fn permission_create(
        &self,
        id: Uuid,
        principal: (PrincipalKind, Uuid),
        role: Uuid,
        object: Uuid,
        propagate: bool,
        event: NewEvent,
    ) -> Result<(PermissionRecord, EventRecord)> {
        let mut tx = self.begin().await?;
        // One grant per principal and object: a new grant replaces the old one (as in vSphere).
        sqlx::query(
            "INSERT INTO permissions (id, principal_kind, principal_id, role_id, object_id, propagate, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (principal_kind, principal_id, object_id)
             DO UPDATE SET id = excluded.id, role_id = excluded.role_id, propagate = excluded.propagate,
                           created_at = excluded.created_at",
        )
        .bind(id.to_string())
        .bind(principal.0.as_str())
        .bind(principal.1.to_string())
        .bind(role.to_string())
        .bind(object.to_string())
        .bind(propagate as i64)
        .bind(time_to_db(now()))
        .execute(&mut *tx)
        .await
        .map_err(db_err("grant a permission"))?;
        let ev = append(&mut tx, event).await?;
        tx.commit().await.map_err(db_err("commit"))?;
        let rec =
            self.permission_get(id).await?.ok_or_else(|| Error::internal("a new grant could not be read back"))?;
        Ok((rec, ev))
    }

    async fn permission_get(&self, id: Uuid) -> Result<Option<PermissionRecord>> {
        let sql = sqlx::AssertSqlSafe(format!("{PERMISSION_SELECT} WHERE p.id = $1"));
        sqlx::query(sql)
            .bind(id.to_string())
            .fetch_optional(&self.writer)
            .await
            .map_err(db_err("read a grant"))?
            .as_ref()
            .map(permission_row)
            .transpose()
    }

    async fn permission_delete(&self, id: Uuid, event: NewEvent) -> Result<EventRecord> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("DELETE FROM permissions WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("revoke a permission"))?
            .rows_affected();
        if n == 0 {
            return Err(Error::not_found("permission", &id.to_string()));
        }
        finish(tx, event).await
    }

    async fn permissions_list(&self, filter: PermissionFilter) -> Result<Vec<PermissionRecord>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "{cte} {PERMISSION_SELECT}
             WHERE ($2 IS NULL OR p.object_id = $2) AND ($3 IS NULL OR p.principal_id = $3)
               AND ($1 IS NULL OR p.object_id IN (SELECT id FROM visible))
             ORDER BY p.created_at, p.id",
            cte = visibility_cte!()
        ));
        let rows = sqlx::query(sql)
            .bind(filter.viewer.map(|u| u.to_string()))
            .bind(filter.object_id.map(|u| u.to_string()))
            .bind(filter.principal_id.map(|u| u.to_string()))
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list grants"))?;
        rows.iter().map(permission_row).collect()
    }

    async fn privileges_effective(&self, user: Uuid, object: Uuid) -> Result<Vec<String>> {
        let rows = sqlx::query(concat!(object_privileges_cte!(), "SELECT privilege FROM eff ORDER BY privilege"))
            .bind(user.to_string())
            .bind(object.to_string())
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("compute privileges"))?;
        Ok(rows.iter().map(|r| r.get("privilege")).collect())
    }

    async fn token_create(&self, token: TokenRecord, event: Option<NewEvent>) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO tokens (id, user_id, kind, name, hash, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(token.id.to_string())
        .bind(token.user_id.to_string())
        .bind(token.kind.as_str())
        .bind(&token.name)
        .bind(&token.hash)
        .bind(time_to_db(token.created_at))
        .bind(time_to_db(token.expires_at))
        .execute(&mut *tx)
        .await
        .map_err(db_err("create the token"))?;
        if let Some(e) = event {
            append(&mut tx, e).await?;
        }
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        sqlx::query("SELECT id, user_id, kind, name, hash, created_at, expires_at FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a token"))?
            .as_ref()
            .map(token_row)
            .transpose()
    }

    async fn tokens_list(&self, user: Uuid, kind: TokenKind) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query(
            "SELECT id, user_id, kind, name, hash, created_at, expires_at FROM tokens
             WHERE user_id = $1 AND kind = $2 ORDER BY created_at",
        )
        .bind(user.to_string())
        .bind(kind.as_str())
        .fetch_all(&self.reader)
        .await
        .map_err(db_err("list tokens"))?;
        rows.iter().map(token_row).collect()
    }

    async fn token_delete(&self, user: Uuid, id: Uuid, event: Option<NewEvent>) -> Result<bool> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("DELETE FROM tokens WHERE id = $1 AND user_id = $2")
            .bind(id.to_string())
            .bind(user.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("delete a token"))?
            .rows_affected();
        if n > 0
            && let Some(e) = event
        {
            append(&mut tx, e).await?;
        }
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(n > 0)
    }

    async fn event_append(&self, event: NewEvent) -> Result<EventRecord> {
        let tx = self.begin().await?;
        finish(tx, event).await
    }

    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query("SELECT * FROM events WHERE seq > $1 AND feed = 1 ORDER BY seq LIMIT $2")
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("read the log"))?;
        rows.iter().map(event_row).collect()
    }

    async fn disk_attachments(&self, name: &str, id: Uuid) -> Result<Vec<AttachmentRecord>> {
        let rows = sqlx::query(
            "SELECT a.vm_id, o.name, v.power_state, a.controller, a.unit, a.read_only, a.generation
             FROM vm_disks a JOIN objects o ON o.id = a.vm_id JOIN vms v ON v.id = a.vm_id
             WHERE a.disk = $1 OR a.disk = $2 ORDER BY o.name",
        )
        .bind(name)
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db_err("read a disk's attachments"))?;
        rows.iter()
            .map(|r| {
                Ok(AttachmentRecord {
                    vm_id: uuid(r.get(0))?,
                    vm_name: r.get(1),
                    power_state: power_state(r.get(2))?,
                    controller: r.get(3),
                    unit: u32::try_from(r.get::<i64, _>(4)).unwrap_or(0),
                    read_only: r.get::<i64, _>(5) != 0,
                    generation: u64::try_from(r.get::<i64, _>(6)).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn events_after_visible(&self, after: i64, user: Uuid, limit: u32) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query(concat!(
            visibility_cte!(),
            "SELECT * FROM events WHERE seq > $2 AND feed = 1 AND scope_id IN (SELECT id FROM visible)
             ORDER BY seq LIMIT $3"
        ))
        .bind(user.to_string())
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await
        .map_err(db_err("read the log"))?;
        rows.iter().map(event_row).collect()
    }

    async fn events_head(&self) -> Result<i64> {
        let r = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS s FROM events")
            .fetch_one(&self.reader)
            .await
            .map_err(db_err("read the log"))?;
        Ok(r.get("s"))
    }

    async fn audit_query(&self, f: AuditFilter) -> Result<Vec<EventRecord>> {
        let (kind_exact, kind_prefix) = match f.kind {
            Some(k) if k.ends_with('.') => (None, Some(format!("{}%", k.replace('%', "").replace('_', "\\_")))),
            Some(k) => (Some(k), None),
            None => (None, None),
        };
        let rows = sqlx::query(
            "SELECT * FROM events
             WHERE seq > $1
               AND ($2 IS NULL OR actor = $2)
               AND ($3 IS NULL OR object_id = $3)
               AND ($4 IS NULL OR kind = $4)
               AND ($5 IS NULL OR kind LIKE $5 ESCAPE '\\')
               AND ($6 IS NULL OR time >= $6)
               AND ($7 IS NULL OR time <= $7)
             ORDER BY seq LIMIT $8",
        )
        .bind(f.after)
        .bind(f.actor)
        .bind(f.object_id.map(|u| u.to_string()))
        .bind(kind_exact)
        .bind(kind_prefix)
        .bind(f.since.map(time_to_db))
        .bind(f.until.map(time_to_db))
        .bind(f.limit as i64)
        .fetch_all(&self.reader)
        .await
        .map_err(db_err("query the audit log"))?;
        rows.iter().map(event_row).collect()
    }

    async fn audit_verify(&self) -> Result<AuditVerify> {
        // Read in pages so that a long log does not sit in memory at once.
        let mut prev_hash = String::new();
        let mut expected_seq = 1;
        let mut entries = 0u64;
        loop {
            let rows = sqlx::query("SELECT * FROM events WHERE seq >= $1 ORDER BY seq LIMIT 1000")
                .bind(expected_seq)
                .fetch_all(&self.reader)
                .await
                .map_err(db_err("read the log"))?;
            if rows.is_empty() {
                return Ok(AuditVerify { ok: true, entries, broken_seq: None });
            }
            for r in &rows {
                let seq: i64 = r.get("seq");
                let broken = AuditVerify { ok: false, entries, broken_seq: Some(expected_seq) };
                if seq != expected_seq {
                    return Ok(broken);
                }
                let Ok(rec) = event_row(r) else {
                    return Ok(broken);
                };
                if event_hash(&prev_hash, &rec) != rec.hash {
                    return Ok(broken);
                }
                prev_hash = rec.hash;
                expected_seq += 1;
                entries += 1;
            }
        }
    }

    async fn vm_create(
        &self,
        object: NewObject,
        config: ConfigWrite,
        event: NewEvent,
    ) -> Result<(VmRecord, EventRecord)> {
        self.vm_create_impl(object, config, event).await
    }

    async fn vm_get(&self, id: Uuid) -> Result<Option<VmRecord>> {
        self.vm_get_impl(&self.reader, id).await
    }

    async fn vm_by_name(&self, name: &str) -> Result<Option<VmRecord>> {
        self.vm_by_name_impl(name).await
    }

    async fn vms_list(&self, viewer: Option<Uuid>, filter: VmFilter) -> Result<Vec<VmRecord>> {
        self.vms_list_impl(viewer, filter).await
    }

    async fn vm_write(&self, id: Uuid, f: VmWriteFn) -> Result<Written> {
        self.vm_write_impl(id, f).await
    }

    async fn vm_versions(&self, id: Uuid, before: Option<i64>, limit: u32) -> Result<Vec<VersionRecord>> {
        self.vm_versions_impl(id, before, limit).await
    }

    async fn vm_version(&self, id: Uuid, version: i64) -> Result<Option<VersionRecord>> {
        self.vm_version_impl(id, version).await
    }

    async fn vm_leases_expired(&self, now: DateTime<Utc>) -> Result<Vec<Uuid>> {
        self.vm_leases_expired_impl(now).await
    }

    async fn task_put(&self, task: TaskRecord, event: Option<NewEvent>) -> Result<()> {
        self.task_put_impl(task, event).await
    }

    async fn task_get(&self, id: Uuid) -> Result<Option<TaskRecord>> {
        self.task_get_impl(id).await
    }

    async fn tasks_list(&self, before: Option<Uuid>, limit: u32) -> Result<Vec<TaskRecord>> {
        self.tasks_list_impl(before, limit).await
    }

    async fn replica_register(&self, id: Uuid) -> Result<()> {
        self.replica_register_impl(id).await
    }

    async fn replica_alive(&self, id: Uuid) -> Result<bool> {
        self.replica_alive_impl(id).await
    }

    async fn leader_try(&self) -> Result<bool> {
        self.leader_try_impl().await
    }

    async fn log_watch(&self, wake: std::sync::Arc<dyn Fn() + Send + Sync>) -> Result<()> {
        self.log_watch_impl(wake).await
    }

    async fn close(&self) {
        self.close_impl().await
    }

    async fn node_register(&self, node: &str, url: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO nodes (id, url, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET url = excluded.url, updated_at = excluded.updated_at",
        )
        .bind(node)
        .bind(url)
        .bind(time_to_db(now()))
        .execute(&mut *tx)
        .await
        .map_err(db_err("register a node"))?;
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn node_url(&self, node: &str) -> Result<Option<String>> {
        Ok(sqlx::query("SELECT url FROM nodes WHERE id = $1")
            .bind(node)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a node"))?
            .map(|r| r.get("url")))
    }

    async fn saga_begin(&self, saga: SagaRecord, locks: &[Uuid]) -> Result<Option<OpLock>> {
        self.saga_begin_impl(saga, locks).await
    }

    async fn saga_update(&self, saga: &SagaRecord) -> Result<()> {
        self.saga_update_impl(saga, false).await
    }

    async fn saga_end(&self, saga: &SagaRecord) -> Result<()> {
        self.saga_update_impl(saga, true).await
    }

    async fn saga_unlock(&self, id: Uuid) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM op_locks WHERE saga_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("release operation locks"))?;
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn sagas_unfinished(&self) -> Result<Vec<SagaRecord>> {
        self.sagas_unfinished_impl().await
    }

    async fn saga_get(&self, id: Uuid) -> Result<Option<SagaRecord>> {
        self.saga_get_impl(id).await
    }

    async fn op_lock_get(&self, object: Uuid) -> Result<Option<OpLock>> {
        self.op_lock_get_impl(object).await
    }

    async fn meta_get(&self, key: &str) -> Result<Option<String>> {
        Ok(sqlx::query("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read settings"))?
            .map(|r| r.get("value")))
    }

    async fn meta_set(&self, key: &str, value: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await
        .map_err(db_err("write settings"))?;
        tx.commit().await.map_err(db_err("commit"))
    }

    async fn pool_usage(&self, pool: &str, except: Option<Uuid>) -> Result<PoolUsage> {
        // The JSON functions differ between the backends; the shape of the answer does not.
        let (vms, disks): (&'static str, &'static str) = match $backend {
            "sqlite" => (
                "SELECT COALESCE(SUM(json_extract(config, '$.cpus')), 0), COALESCE(SUM(json_extract(config, '$.memory_mib')), 0)
                 FROM vms WHERE json_extract(config, '$.pool') = $1 AND power_state NOT IN ('off', 'crashed')
                   AND id <> $2",
                "SELECT COALESCE(SUM(json_extract(spec, '$.capacity_bytes')), 0) FROM objects
                 WHERE kind = 'disk' AND json_extract(spec, '$.pool') = $1 AND id <> $2",
            ),
            _ => (
                "SELECT COALESCE(SUM((config::jsonb->>'cpus')::bigint), 0)::bigint,
                        COALESCE(SUM((config::jsonb->>'memory_mib')::bigint), 0)::bigint
                 FROM vms WHERE config::jsonb->>'pool' = $1 AND power_state NOT IN ('off', 'crashed')
                   AND id <> $2",
                "SELECT COALESCE(SUM((spec::jsonb->>'capacity_bytes')::bigint), 0)::bigint FROM objects
                 WHERE kind = 'disk' AND spec::jsonb->>'pool' = $1 AND id <> $2",
            ),
        };
        let except = except.map(|u| u.to_string()).unwrap_or_default();
        let r = sqlx::query(vms)
            .bind(pool)
            .bind(&except)
            .fetch_one(&self.reader)
            .await
            .map_err(db_err("sum a pool's VMs"))?;
        let d = sqlx::query(disks)
            .bind(pool)
            .bind(&except)
            .fetch_one(&self.reader)
            .await
            .map_err(db_err("sum a pool's disks"))?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(PoolUsage {
            vcpus_running: n(r.get(0)),
            memory_mib_running: n(r.get(1)),
            disk_bytes: n(d.get(0)),
        })
    }

    async fn signin_reserve(&self, account: &str, at: DateTime<Utc>, policy: SigninPolicy) -> Result<Option<u64>> {
        // In the write transaction: every replica's writers queue, so check and count are one step.
        let mut tx = self.begin().await?;
        let row = sqlx::query("SELECT failures, first_at, last_at FROM signin_failures WHERE account = $1")
            .bind(account)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err("read failed sign-ins"))?;
        let now = match row {
            Some(r) => Some(SigninFailures {
                failures: r.get("failures"),
                first_at: time(r.get("first_at"))?,
                last_at: time(r.get("last_at"))?,
            }),
            None => None,
        };
        if let Some(f) = &now {
            let wait = policy.wait(f, at);
            if wait > 0 {
                return Ok(Some(wait));
            }
        }
        let (failures, first_at) = match now {
            Some(f) if at - f.first_at <= policy.window => (f.failures + 1, f.first_at),
            _ => (1, at),
        };
        sqlx::query(
            "INSERT INTO signin_failures (account, failures, first_at, last_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (account) DO UPDATE SET failures = excluded.failures, first_at = excluded.first_at,
             last_at = excluded.last_at",
        )
        .bind(account)
        .bind(failures)
        .bind(time_to_db(first_at))
        .bind(time_to_db(at))
        .execute(&mut *tx)
        .await
        .map_err(db_err("count a sign-in attempt"))?;
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(None)
    }

    async fn signin_forgive(&self, account: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE signin_failures SET failures = failures - 1 WHERE account = $1 AND failures > 0")
            .bind(account)
            .execute(&mut *tx)
            .await
            .map_err(db_err("count a sign-in"))?;
        tx.commit().await.map_err(db_err("commit"))
    }

}

impl $Store {
    async fn root_ensure(&self) -> Result<()> {
        let mut tx = self.begin().await?;
        let root = ROOT_ID.to_string();
        sqlx::query(
            "INSERT INTO objects (id, kind, name, parent_id, path, spec, created_at)
             VALUES ($1, 'folder', '', NULL, '/', '{}', $2) ON CONFLICT DO NOTHING",
        )
        .bind(&root)
        .bind(time_to_db(now()))
        .execute(&mut *tx)
        .await
        .map_err(db_err("create the root folder"))?;
        sqlx::query("INSERT INTO closure (object_id, ancestor_id, depth) VALUES ($1, $1, 0) ON CONFLICT DO NOTHING")
            .bind(&root)
            .execute(&mut *tx)
            .await
            .map_err(db_err("create the root folder"))?;
        tx.commit().await.map_err(db_err("commit"))
    }

}

fn vm_row(r: &$Row) -> Result<VmRecord> {
    let holder: Option<String> = r.get("lease_holder_id");
    let lease = match holder {
        Some(h) => Some(LeaseRecord {
            holder_id: uuid(&h)?,
            holder: r.get::<Option<String>, _>("lease_holder").unwrap_or_default(),
            token: r.get::<Option<i64>, _>("lease_token").unwrap_or_default(),
            acquired_at: time(&r.get::<Option<String>, _>("lease_acquired_at").unwrap_or_default())?,
            expires_at: time(&r.get::<Option<String>, _>("lease_expires_at").unwrap_or_default())?,
        }),
        None => None,
    };
    Ok(VmRecord {
        object: object_row(r)?,
        version: r.get("version"),
        config: json(r.get("config"))?,
        power_state: power_state(r.get("power_state"))?,
        runtime: json(r.get("runtime"))?,
        generation: r.get("generation"),
        lease,
        lease_fence: r.get("lease_fence"),
    })
}

fn version_row(r: &$Row) -> Result<VersionRecord> {
    Ok(VersionRecord {
        version: r.get("version"),
        config: json(r.get("config"))?,
        author: r.get("author"),
        time: time(r.get("time"))?,
        message: r.get("message"),
        request_id: r.get("request_id"),
        patch: json(r.get("patch"))?,
        event_seq: r.get("event_seq"),
    })
}

/// Keeps `vm_disks` equal to the disks of a VM's newest config (in the transaction that writes it).
async fn vm_disks_sync(tx: &mut Transaction<'static, $DB>, id: &str, config: &serde_json::Value) -> Result<()> {
    sqlx::query("DELETE FROM vm_disks WHERE vm_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(db_err("write a VM's disks"))?;
    for d in config["disks"].as_array().into_iter().flatten() {
        sqlx::query(
            "INSERT INTO vm_disks (vm_id, disk, controller, unit, read_only, generation)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(d["disk"].as_str().unwrap_or_default())
        .bind(d["controller"].as_str().unwrap_or_default())
        .bind(d["unit"].as_i64().unwrap_or(0))
        .bind(i64::from(d["read_only"].as_bool().unwrap_or(false)))
        .bind(d["generation"].as_i64().unwrap_or(0))
        .execute(&mut **tx)
        .await
        .map_err(db_err("write a VM's disks"))?;
    }
    Ok(())
}

async fn version_insert(
    tx: &mut Transaction<'static, $DB>,
    id: &str,
    version: i64,
    c: &ConfigWrite,
    at: DateTime<Utc>,
    event_seq: Option<i64>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO vm_versions (vm_id, version, config, author, time, message, request_id, patch, event_seq)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(version)
    .bind(c.config.to_string())
    .bind(&c.author)
    .bind(time_to_db(at))
    .bind(&c.message)
    .bind(&c.request_id)
    .bind(c.patch.to_string())
    .bind(event_seq)
    .execute(&mut **tx)
    .await
    .map_err(db_err("write a config version"))?;
    Ok(())
}

/// Renames or moves a VM's object (a VM has no children, so only its own path and closure change).
async fn object_place(
    tx: &mut Transaction<'static, $DB>,
    obj: &ObjectRecord,
    name: &str,
    parent: Uuid,
) -> Result<()> {
    if obj.name == name && obj.parent_id == Some(parent) {
        return Ok(());
    }
    let parent_path: String = sqlx::query("SELECT path FROM objects WHERE id = $1 AND kind = 'folder'")
        .bind(parent.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db_err("read a folder"))?
        .ok_or_else(|| Error::invalid("folder", "the folder no longer exists"))?
        .get("path");
    let path = if parent_path == "/" { format!("/{name}") } else { format!("{parent_path}/{name}") };
    let taken = sqlx::query("SELECT 1 FROM objects WHERE id <> $3 AND (path = $1 OR (kind = 'vm' AND name = $2))")
        .bind(&path)
        .bind(name)
        .bind(obj.id.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db_err("check the name"))?;
    if taken.is_some() {
        return Err(
            Error::conflict(ErrorCode::AlreadyExists, format!("the name {name} is taken (at {path})")).with_field("name")
        );
    }
    let id = obj.id.to_string();
    sqlx::query("UPDATE objects SET name = $2, parent_id = $3, path = $4 WHERE id = $1")
        .bind(&id)
        .bind(name)
        .bind(parent.to_string())
        .bind(&path)
        .execute(&mut **tx)
        .await
        .map_err(db_err("move a VM"))?;
    if obj.parent_id != Some(parent) {
        sqlx::query("DELETE FROM closure WHERE object_id = $1 AND depth > 0")
            .bind(&id)
            .execute(&mut **tx)
            .await
            .map_err(db_err("move a VM"))?;
        sqlx::query(
            "INSERT INTO closure (object_id, ancestor_id, depth)
             SELECT $1, ancestor_id, depth + 1 FROM closure WHERE object_id = $2",
        )
        .bind(&id)
        .bind(parent.to_string())
        .execute(&mut **tx)
        .await
        .map_err(db_err("move a VM"))?;
    }
    Ok(())
}

impl $Store {
    pub(crate) async fn vm_by_name_impl(&self, name: &str) -> Result<Option<VmRecord>> {
        let sql = sqlx::AssertSqlSafe(format!("{VM_SELECT} WHERE o.kind = 'vm' AND o.name = $1"));
        sqlx::query(sql)
            .bind(name)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a VM"))?
            .as_ref()
            .map(vm_row)
            .transpose()
    }

    pub(crate) async fn vm_get_impl(&self, pool: &$Pool, id: Uuid) -> Result<Option<VmRecord>> {
        let sql = sqlx::AssertSqlSafe(format!("{VM_SELECT} WHERE o.id = $1"));
        sqlx::query(sql)
            .bind(id.to_string())
            .fetch_optional(pool)
            .await
            .map_err(db_err("read a VM"))?
            .as_ref()
            .map(vm_row)
            .transpose()
    }

    async fn vm_get_tx(tx: &mut Transaction<'static, $DB>, id: Uuid) -> Result<Option<VmRecord>> {
        let sql = sqlx::AssertSqlSafe(format!("{VM_SELECT} WHERE o.id = $1"));
        sqlx::query(sql)
            .bind(id.to_string())
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_err("read a VM"))?
            .as_ref()
            .map(vm_row)
            .transpose()
    }

    pub(crate) async fn vm_create_impl(
        &self,
        object: NewObject,
        config: ConfigWrite,
        event: NewEvent,
    ) -> Result<(VmRecord, EventRecord)> {
        let id = object.id;
        // The object (path, closure) and the VM row go in one transaction with the log entry.
        let mut tx = self.begin().await?;
        let rec = object_insert(&mut tx, object).await?;
        let at = rec.created_at;
        let id_s = id.to_string();
        sqlx::query("INSERT INTO vms (id, version, config) VALUES ($1, 1, $2)")
            .bind(&id_s)
            .bind(config.config.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err("create a VM"))?;
        let ev = append(&mut tx, event).await?;
        version_insert(&mut tx, &id_s, 1, &config, at, Some(ev.seq)).await?;
        vm_disks_sync(&mut tx, &id_s, &config.config).await?;
        let vm =
            Self::vm_get_tx(&mut tx, id).await?.ok_or_else(|| Error::internal("a new VM could not be read back"))?;
        tx.commit().await.map_err(db_err("commit"))?;
        Ok((vm, ev))
    }

    pub(crate) async fn vms_list_impl(&self, viewer: Option<Uuid>, f: VmFilter) -> Result<Vec<VmRecord>> {
        let prefix =
            f.name_prefix.map(|p| format!("{}%", p.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
        let sql = sqlx::AssertSqlSafe(format!(
            "{cte} {VM_SELECT}
             WHERE ($1 IS NULL OR o.id IN (SELECT id FROM visible))
               AND ($2 IS NULL OR o.id IN (SELECT object_id FROM closure WHERE ancestor_id = $2))
               AND ($3 IS NULL OR o.name LIKE $3 ESCAPE '\\')
               AND ($4 IS NULL OR v.power_state = $4)
               AND o.name > $5
             ORDER BY o.name LIMIT $6",
            cte = visibility_cte!()
        ));
        let rows = sqlx::query(sql)
            .bind(viewer.map(|u| u.to_string()))
            .bind(f.folder.map(|u| u.to_string()))
            .bind(prefix)
            .bind(f.power_state.map(PowerState::as_str))
            .bind(f.after.unwrap_or_default())
            .bind(f.limit as i64)
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list VMs"))?;
        rows.iter().map(vm_row).collect()
    }

    pub(crate) async fn vm_write_impl(&self, id: Uuid, f: VmWriteFn) -> Result<Written> {
        let mut tx = self.begin().await?;
        let vm = Self::vm_get_tx(&mut tx, id).await?.ok_or_else(|| Error::not_found("vm", &id.to_string()))?;
        let at = now();
        // Outcomes that write nothing end the transaction unwritten (dropping it rolls it back).
        let w = match f(&vm, at)? {
            WriteOutcome::Write(w) => *w,
            WriteOutcome::Unchanged => return Ok(Written::Unchanged(vm)),
            WriteOutcome::Retry(why) => return Ok(Written::Retry(why)),
            WriteOutcome::Stale { your_version, .. } => return Ok(Written::Stale { vm, your_version }),
        };
        let id_s = id.to_string();
        if w.delete {
            // Versions and the VM row go with the object (ON DELETE CASCADE).
            sqlx::query("DELETE FROM objects WHERE id = $1")
                .bind(&id_s)
                .execute(&mut *tx)
                .await
                .map_err(db_err("delete a VM"))?;
        }
        let mut events = Vec::with_capacity(w.events.len());
        for e in w.events {
            events.push(append(&mut tx, e).await?);
        }
        if !w.delete {
            if let Some(c) = &w.config {
                object_place(&mut tx, &vm.object, &c.name, c.parent_id).await?;
                let version = vm.version + 1;
                sqlx::query("UPDATE vms SET version = $2, config = $3 WHERE id = $1")
                    .bind(&id_s)
                    .bind(version)
                    .bind(c.config.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err("write a config version"))?;
                version_insert(&mut tx, &id_s, version, c, at, events.first().map(|e| e.seq)).await?;
                vm_disks_sync(&mut tx, &id_s, &c.config).await?;
            }
            if let Some(r) = &w.runtime {
                sqlx::query(
                    "UPDATE vms SET power_state = $2, runtime = $3, generation = generation + $4 WHERE id = $1",
                )
                .bind(&id_s)
                .bind(r.power_state.as_str())
                .bind(r.runtime.to_string())
                .bind(i64::from(r.bump_generation))
                .execute(&mut *tx)
                .await
                .map_err(db_err("write runtime state"))?;
            }
            match &w.lease {
                Some(LeaseWrite::Set(l)) => {
                    sqlx::query(
                        "UPDATE vms SET lease_holder_id = $2, lease_holder = $3, lease_token = $4,
                            lease_acquired_at = $5, lease_expires_at = $6,
                            lease_fence = CASE WHEN lease_fence > $4 THEN lease_fence ELSE $4 END
                         WHERE id = $1",
                    )
                    .bind(&id_s)
                    .bind(l.holder_id.to_string())
                    .bind(&l.holder)
                    .bind(l.token)
                    .bind(time_to_db(l.acquired_at))
                    .bind(time_to_db(l.expires_at))
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err("write a lease"))?;
                }
                Some(LeaseWrite::Clear) => {
                    sqlx::query(
                        "UPDATE vms SET lease_holder_id = NULL, lease_holder = NULL, lease_token = NULL,
                            lease_acquired_at = NULL, lease_expires_at = NULL WHERE id = $1",
                    )
                    .bind(&id_s)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err("clear a lease"))?;
                }
                None => {}
            }
        }
        let after = if w.delete { None } else { Self::vm_get_tx(&mut tx, id).await? };
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(Written::Done { vm: after, events })
    }

    pub(crate) async fn vm_versions_impl(
        &self,
        id: Uuid,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<VersionRecord>> {
        let rows =
            sqlx::query("SELECT * FROM vm_versions WHERE vm_id = $1 AND version < $2 ORDER BY version DESC LIMIT $3")
                .bind(id.to_string())
                .bind(before.unwrap_or(i64::MAX))
                .bind(limit as i64)
                .fetch_all(&self.reader)
                .await
                .map_err(db_err("read versions"))?;
        rows.iter().map(version_row).collect()
    }

    pub(crate) async fn vm_version_impl(&self, id: Uuid, version: i64) -> Result<Option<VersionRecord>> {
        sqlx::query("SELECT * FROM vm_versions WHERE vm_id = $1 AND version = $2")
            .bind(id.to_string())
            .bind(version)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a version"))?
            .as_ref()
            .map(version_row)
            .transpose()
    }

    pub(crate) async fn vm_leases_expired_impl(&self, at: DateTime<Utc>) -> Result<Vec<Uuid>> {
        let rows = sqlx::query("SELECT id FROM vms WHERE lease_expires_at IS NOT NULL AND lease_expires_at <= $1")
            .bind(time_to_db(at))
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("find expired leases"))?;
        rows.iter().map(|r| uuid(r.get("id"))).collect()
    }
}

fn task_row(r: &$Row) -> Result<TaskRecord> {
    let error: Option<String> = r.get("error");
    Ok(TaskRecord {
        id: uuid(r.get("id"))?,
        kind: r.get("kind"),
        object_id: uuid_opt(r.get("object_id"))?,
        object_name: r.get("object_name"),
        actor: r.get("actor"),
        request_id: r.get("request_id"),
        state: stored("task state", r.get("state"), TaskState::parse)?,
        progress: r.get("progress"),
        message: r.get("message"),
        error: error.as_deref().map(json).transpose()?,
        created_at: time(r.get("created_at"))?,
        updated_at: time(r.get("updated_at"))?,
    })
}

impl $Store {
    pub(crate) async fn task_put_impl(&self, t: TaskRecord, event: Option<NewEvent>) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO tasks (id, kind, object_id, object_name, actor, request_id, state, progress, message, error,
                created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, progress = excluded.progress,
                message = excluded.message, error = excluded.error, updated_at = excluded.updated_at",
        )
        .bind(t.id.to_string())
        .bind(&t.kind)
        .bind(t.object_id.map(|u| u.to_string()))
        .bind(&t.object_name)
        .bind(&t.actor)
        .bind(&t.request_id)
        .bind(t.state.as_str())
        .bind(t.progress)
        .bind(&t.message)
        .bind(t.error.as_ref().map(|e| e.to_string()))
        .bind(time_to_db(t.created_at))
        .bind(time_to_db(t.updated_at))
        .execute(&mut *tx)
        .await
        .map_err(db_err("write a task"))?;
        if let Some(e) = event {
            append(&mut tx, e).await?;
        }
        tx.commit().await.map_err(db_err("commit"))
    }

    pub(crate) async fn task_get_impl(&self, id: Uuid) -> Result<Option<TaskRecord>> {
        sqlx::query("SELECT * FROM tasks WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a task"))?
            .as_ref()
            .map(task_row)
            .transpose()
    }

    pub(crate) async fn tasks_list_impl(&self, before: Option<Uuid>, limit: u32) -> Result<Vec<TaskRecord>> {
        let rows = sqlx::query("SELECT * FROM tasks WHERE ($1 IS NULL OR id < $1) ORDER BY id DESC LIMIT $2")
            .bind(before.map(|u| u.to_string()))
            .bind(limit as i64)
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list tasks"))?;
        rows.iter().map(task_row).collect()
    }
}

fn saga_row(r: &$Row) -> Result<SagaRecord> {
    let done: String = r.get("done");
    Ok(SagaRecord {
        id: uuid(r.get("id"))?,
        kind: r.get("kind"),
        state: stored("saga state", r.get("state"), SagaState::parse)?,
        actor: r.get("actor"),
        request_id: r.get("request_id"),
        data: json(r.get("data"))?,
        done: serde_json::from_str(&done).map_err(|_| Error::internal("bad saga steps in the database"))?,
        current: r.get("current"),
        error: r.get("error"),
        owner: uuid(r.get("owner"))?,
        created_at: time(r.get("created_at"))?,
        updated_at: time(r.get("updated_at"))?,
    })
}

fn lock_row(r: &$Row) -> Result<OpLock> {
    Ok(OpLock {
        object_id: uuid(r.get("object_id"))?,
        saga_id: uuid(r.get("saga_id"))?,
        kind: r.get("kind"),
        actor: r.get("actor"),
        taken_at: time(r.get("taken_at"))?,
    })
}

impl $Store {
    pub(crate) async fn saga_begin_impl(&self, s: SagaRecord, locks: &[Uuid]) -> Result<Option<OpLock>> {
        let mut tx = self.begin().await?;
        for id in locks {
            let held = sqlx::query("SELECT * FROM op_locks WHERE object_id = $1")
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err("read an operation lock"))?;
            if let Some(r) = held {
                return lock_row(&r).map(Some);
            }
        }
        sqlx::query(
            "INSERT INTO sagas (id, kind, state, actor, request_id, data, done, current, error, created_at, updated_at,
                owner)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(s.id.to_string())
        .bind(&s.kind)
        .bind(s.state.as_str())
        .bind(&s.actor)
        .bind(&s.request_id)
        .bind(s.data.to_string())
        .bind(serde_json::to_string(&s.done).unwrap_or_default())
        .bind(&s.current)
        .bind(&s.error)
        .bind(time_to_db(s.created_at))
        .bind(time_to_db(s.updated_at))
        .bind(s.owner.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db_err("record a saga"))?;
        for id in locks {
            sqlx::query("INSERT INTO op_locks (object_id, saga_id, kind, actor, taken_at) VALUES ($1, $2, $3, $4, $5)")
                .bind(id.to_string())
                .bind(s.id.to_string())
                .bind(&s.kind)
                .bind(&s.actor)
                .bind(time_to_db(s.created_at))
                .execute(&mut *tx)
                .await
                .map_err(db_err("take an operation lock"))?;
        }
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(None)
    }

    pub(crate) async fn saga_update_impl(&self, s: &SagaRecord, end: bool) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE sagas SET state = $2, data = $3, done = $4, current = $5, error = $6, updated_at = $7 WHERE id = $1",
        )
        .bind(s.id.to_string())
        .bind(s.state.as_str())
        .bind(s.data.to_string())
        .bind(serde_json::to_string(&s.done).unwrap_or_default())
        .bind(&s.current)
        .bind(&s.error)
        .bind(time_to_db(s.updated_at))
        .execute(&mut *tx)
        .await
        .map_err(db_err("record a saga's progress"))?;
        if end {
            sqlx::query("DELETE FROM op_locks WHERE saga_id = $1")
                .bind(s.id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(db_err("release operation locks"))?;
        }
        tx.commit().await.map_err(db_err("commit"))
    }

    pub(crate) async fn sagas_unfinished_impl(&self) -> Result<Vec<SagaRecord>> {
        let rows = sqlx::query("SELECT * FROM sagas WHERE state = 'running' ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list sagas"))?;
        rows.iter().map(saga_row).collect()
    }

    pub(crate) async fn saga_get_impl(&self, id: Uuid) -> Result<Option<SagaRecord>> {
        sqlx::query("SELECT * FROM sagas WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read a saga"))?
            .as_ref()
            .map(saga_row)
            .transpose()
    }

    pub(crate) async fn op_lock_get_impl(&self, object: Uuid) -> Result<Option<OpLock>> {
        sqlx::query("SELECT * FROM op_locks WHERE object_id = $1")
            .bind(object.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err("read an operation lock"))?
            .as_ref()
            .map(lock_row)
            .transpose()
    }
}

    };
}
