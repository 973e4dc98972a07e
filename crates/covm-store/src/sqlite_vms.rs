//! The SQLite store's VMs: config versions, runtime state and edit leases, each write one transaction.

use chrono::{DateTime, Utc};
use covm_types::Error;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use uuid::Uuid;

use crate::sqlite::{append, db_err, json, object_insert, object_row, time, uuid};
use crate::*;

const VM_SELECT: &str = "SELECT o.id, o.kind, o.name, o.parent_id, o.path, o.spec, o.created_at,
        v.version, v.config, v.power_state, v.runtime, v.generation, v.lease_holder_id, v.lease_holder,
        v.lease_token, v.lease_acquired_at, v.lease_expires_at, v.lease_fence
    FROM objects o JOIN vms v ON v.id = o.id";

fn vm_row(r: &SqliteRow) -> Result<VmRecord> {
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
        power_state: r.get("power_state"),
        runtime: json(r.get("runtime"))?,
        generation: r.get("generation"),
        lease,
        lease_fence: r.get("lease_fence"),
    })
}

fn version_row(r: &SqliteRow) -> Result<VersionRecord> {
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

async fn version_insert(
    tx: &mut Transaction<'static, Sqlite>,
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
    tx: &mut Transaction<'static, Sqlite>,
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
            Error::conflict("already_exists", format!("the name {name} is taken (at {path})")).with_field("name")
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

impl SqliteStore {
    pub(crate) async fn vm_get_impl(&self, pool: &SqlitePool, id: Uuid) -> Result<Option<VmRecord>> {
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

    async fn vm_get_tx(tx: &mut Transaction<'static, Sqlite>, id: Uuid) -> Result<Option<VmRecord>> {
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
            .bind(f.power_state)
            .bind(f.after.unwrap_or_default())
            .bind(f.limit as i64)
            .fetch_all(&self.reader)
            .await
            .map_err(db_err("list VMs"))?;
        rows.iter().map(vm_row).collect()
    }

    pub(crate) async fn vm_write_impl(&self, id: Uuid, f: VmWriteFn) -> Result<(Option<VmRecord>, Vec<EventRecord>)> {
        let mut tx = self.begin().await?;
        let vm = Self::vm_get_tx(&mut tx, id).await?.ok_or_else(|| Error::not_found("vm", &id.to_string()))?;
        let at = now();
        let w = f(&vm, at)?;
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
            }
            if let Some(r) = &w.runtime {
                sqlx::query(
                    "UPDATE vms SET power_state = $2, runtime = $3, generation = generation + $4 WHERE id = $1",
                )
                .bind(&id_s)
                .bind(&r.power_state)
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
                            lease_acquired_at = $5, lease_expires_at = $6, lease_fence = MAX(lease_fence, $4)
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
        Ok((after, events))
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

fn task_row(r: &SqliteRow) -> Result<TaskRecord> {
    let error: Option<String> = r.get("error");
    Ok(TaskRecord {
        id: uuid(r.get("id"))?,
        kind: r.get("kind"),
        object_id: crate::sqlite::uuid_opt(r.get("object_id"))?,
        object_name: r.get("object_name"),
        actor: r.get("actor"),
        request_id: r.get("request_id"),
        state: r.get("state"),
        progress: r.get("progress"),
        message: r.get("message"),
        error: error.as_deref().map(json).transpose()?,
        created_at: time(r.get("created_at"))?,
        updated_at: time(r.get("updated_at"))?,
    })
}

impl SqliteStore {
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
        .bind(&t.state)
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

fn saga_row(r: &SqliteRow) -> Result<SagaRecord> {
    let done: String = r.get("done");
    Ok(SagaRecord {
        id: uuid(r.get("id"))?,
        kind: r.get("kind"),
        state: r.get("state"),
        actor: r.get("actor"),
        request_id: r.get("request_id"),
        data: json(r.get("data"))?,
        done: serde_json::from_str(&done).map_err(|_| Error::internal("bad saga steps in the database"))?,
        current: r.get("current"),
        error: r.get("error"),
        created_at: time(r.get("created_at"))?,
        updated_at: time(r.get("updated_at"))?,
    })
}

fn lock_row(r: &SqliteRow) -> Result<OpLock> {
    Ok(OpLock {
        object_id: uuid(r.get("object_id"))?,
        saga_id: uuid(r.get("saga_id"))?,
        kind: r.get("kind"),
        actor: r.get("actor"),
        taken_at: time(r.get("taken_at"))?,
    })
}

impl SqliteStore {
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
            "INSERT INTO sagas (id, kind, state, actor, request_id, data, done, current, error, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(s.id.to_string())
        .bind(&s.kind)
        .bind(&s.state)
        .bind(&s.actor)
        .bind(&s.request_id)
        .bind(s.data.to_string())
        .bind(serde_json::to_string(&s.done).unwrap_or_default())
        .bind(&s.current)
        .bind(&s.error)
        .bind(time_to_db(s.created_at))
        .bind(time_to_db(s.updated_at))
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
        .bind(&s.state)
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
