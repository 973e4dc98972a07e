//! The SQL of VMs: their config versions, runtime state, leases, disk attachments and pools' usage (the [`crate::VmStore`] half of [`sql_store!`]).

macro_rules! sql_vms {
    ($Store:ident, $DB:ident, $Row:ty, $Pool:ty, $backend:literal) => {
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

/// Keeps `object_annotations` equal to the annotations of a VM's newest config (in the transaction
/// that writes it): conditions on grants are checked against them.
async fn vm_annotations_sync(tx: &mut Transaction<'static, $DB>, id: &str, config: &serde_json::Value) -> Result<()> {
    sqlx::query("DELETE FROM object_annotations WHERE object_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(db_err("write a VM's annotations"))?;
    if let Some(a) = config.get("annotations").and_then(|a| a.as_object()) {
        for (k, v) in a {
            sqlx::query("INSERT INTO object_annotations (object_id, key, value) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(k)
                .bind(v.as_str().unwrap_or_default())
                .execute(&mut **tx)
                .await
                .map_err(db_err("write a VM's annotations"))?;
        }
    }
    Ok(())
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
        vm_annotations_sync(&mut tx, &id_s, &config.config).await?;
        let vm =
            Self::vm_get_tx(&mut tx, id).await?.ok_or_else(|| Error::internal("a new VM could not be read back"))?;
        tx.commit().await.map_err(db_err("commit"))?;
        Ok((vm, ev))
    }

    pub(crate) async fn vms_list_impl(&self, viewer: Option<&Viewer>, f: VmFilter) -> Result<Vec<VmRecord>> {
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
            cte = visibility_cte!("$7")
        ));
        let rows = sqlx::query(sql)
            .bind(viewer.map(|v| v.user.to_string()))
            .bind(f.folder.map(|u| u.to_string()))
            .bind(prefix)
            .bind(f.power_state.map(PowerState::as_str))
            .bind(f.after.unwrap_or_default())
            .bind(f.limit as i64)
            .bind(viewer.map(Viewer::excluded_param).unwrap_or_default())
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
                vm_annotations_sync(&mut tx, &id_s, &c.config).await?;
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

#[async_trait]
impl VmStore for $Store {
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

    async fn vms_list(&self, viewer: Option<&Viewer>, filter: VmFilter) -> Result<Vec<VmRecord>> {
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
}
    };
}
